-- The answer to Envoy's health check of each backend (BACKEND_HEALTH_PATH?id=<backend id>), on
-- the checks listener: 503 while the backend is in RESTING_FILE with a time still to come, else
-- 200. The ext_proc rewrites the file (by rename) whenever the set of resting backends changes;
-- each check reads it whole (a few lines; at most HEALTH_CHECKS_PER_SECOND checks a second).
-- Its listener is on 127.0.0.1: only this host can ask.
-- The generator defines RESTING_FILE and BACKEND_HEALTH_PATH above this text.

local function unescaped(s)
  return (string.gsub(s, "%%(%x%x)", function(hex) return string.char(tonumber(hex, 16)) end))
end

local function resting(id)
  local file = io.open(RESTING_FILE, "r")
  if file == nil then return false end -- not written yet: nothing rests
  local now = os.time()
  for line in file:lines() do
    local backend, ends = string.match(line, "^(.*)\t([%d%.]+)$")
    if backend == id and tonumber(ends) > now then
      file:close()
      return true
    end
  end
  file:close()
  return false
end

function envoy_on_request(handle)
  local path = handle:headers():get(":path") or ""
  local bare, query = string.match(path, "^([^?]*)%??(.*)$")
  if bare ~= BACKEND_HEALTH_PATH then return end
  local id = unescaped(string.match(query, "id=([^&]*)") or "")
  if resting(id) then
    handle:respond({[":status"] = "503"}, "cooling down")
  else
    handle:respond({[":status"] = "200"}, "ok")
  end
end
