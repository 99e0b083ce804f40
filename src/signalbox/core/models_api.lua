-- Signalbox: the models API for what a plain listing cannot answer, inside Envoy.
--
-- GET /v1/models/<id> (OpenAI's and Anthropic's "retrieve a model", in the caller's API) and
-- GET /v1/models from an Anthropic client (its own shape, paginated): no body, so no prompt and
-- no Python. A per-route script of the listener's Lua filter, which is off on every other
-- route. OpenAI's plain listing is a direct response (envoygen.modelsapi).
--
-- The generator defines, above this text:
--   IDS, SEP   the gateway's aliases in listing order, as one string: each followed by SEP (a
--              byte no alias holds). One string rather than a table: a Lua state per Envoy thread
--              holds the script, and the tables are built in a state only once it answers a
--              models request (at 2,000 aliases a table literal cost Envoy 8 MB at rest)
--   OPENAI     a model object in OpenAI's shape, as the pieces between which its id goes
--   ANTHROPIC  the same in Anthropic's shape
--   PREFIXES   where one model's id starts: "/v1/models/", and the same below Azure's v1 API
--   PAGE       Anthropic's default and largest page sizes, {default, max}
--   ERRORS     the refusals by name, each {status, code, body, anthropic} (signalbox.core.errors);
--              "{model}" in a body is where the model the client named goes
--   PATH_KEY   {namespace, key} of the dynamic metadata where the request log reads the client's
--              path (contract.CLIENT_PATH_KEY): the listener's filter that keeps it runs after
--              this one, which answers before it would
-- The client API is Anthropic's when the request carries `anthropic-version` (its SDKs always
-- send it, OpenAI's never do).

-- A string as a JSON string literal. Aliases are UTF-8 (protobuf strings), kept as they are.
local function quoted(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    if c == '"' or c == "\\" then
      return "\\" .. c
    end
    return string.format("\\u%04x", c:byte())
  end) .. '"'
end

-- MODELS (each {id, its JSON}) and INDEX (id -> position), made on this state's first request.
local MODELS, INDEX
local function load()
  if MODELS then
    return
  end
  MODELS, INDEX = {}, {}
  local start = 1
  while start <= #IDS do
    local stop = IDS:find(SEP, start, true)
    local id = IDS:sub(start, stop - 1)
    MODELS[#MODELS + 1] = {id, quoted(id)}
    INDEX[id] = #MODELS
    start = stop + 1
  end
end

-- Percent-decoding; `plus`: a query string's "+" is a space (form encoding).
local function decode(s, plus)
  if plus then
    s = s:gsub("%+", " ")
  end
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

-- What an error message may repeat of a name the client sent: a few safe characters, so the
-- body stays valid JSON whatever the bytes were.
local function shown(s)
  return (s:sub(1, 200):gsub("[^%w%-%._~:/@+ ]", "?"))
end

local function reply(handle, status, body, code)
  local headers = {[":status"] = status, ["content-type"] = "application/json"}
  if code then
    headers["x-signalbox-reason"] = code
  end
  handle:respond(headers, body)
end

local function refuse(handle, name, anthropic, named)
  local e = ERRORS[name]
  local body = anthropic and e.anthropic or e.body
  if named then
    body = body:gsub("{model}", function() return shown(named) end)
  end
  reply(handle, e.status, body, e.code)
end

local function query(path)
  local out = {}
  for pair in (path:match("%?(.*)$") or ""):gmatch("[^&]+") do
    local key, value = pair:match("^([^=]*)=?(.*)$")
    out[decode(key, true)] = decode(value, true)
  end
  return out
end

-- Anthropic's list: `limit` models (PAGE), after `after_id` or before `before_id`.
local function list(handle, path)
  local asked = query(path)
  local limit = PAGE[1]
  if asked.limit then
    limit = tonumber(asked.limit)
    if not limit or limit ~= math.floor(limit) or limit < 1 or limit > PAGE[2] then
      return refuse(handle, "bad_limit", true)
    end
  end
  if asked.after_id and asked.before_id then
    return refuse(handle, "both_cursors", true)
  end
  local first, last, more
  local cursor = asked.after_id or asked.before_id
  local at = cursor and INDEX[cursor]
  if cursor and not at then
    return refuse(handle, "unknown_cursor", true, cursor)
  end
  if asked.before_id then
    first, last = math.max(1, at - limit), at - 1
    more = first > 1
  else
    first = (at or 0) + 1
    last = math.min(#MODELS, first + limit - 1)
    more = last < #MODELS
  end
  local items = {}
  for i = first, last do
    items[#items + 1] = table.concat(ANTHROPIC, MODELS[i][2])
  end
  local ends = last >= first
  reply(handle, "200", '{"data":[' .. table.concat(items, ",") .. '],"has_more":' .. tostring(more)
    .. ',"first_id":' .. (ends and MODELS[first][2] or "null")
    .. ',"last_id":' .. (ends and MODELS[last][2] or "null") .. "}")
end

function envoy_on_request(handle)
  load()
  local headers = handle:headers()
  local path = headers:get(":path")
  handle:streamInfo():dynamicMetadata():set(PATH_KEY[1], PATH_KEY[2], path)
  local anthropic = headers:get("anthropic-version") ~= nil
  local rest
  for _, prefix in ipairs(PREFIXES) do
    if path:sub(1, #prefix) == prefix then
      rest = path:sub(#prefix + 1)
      break
    end
  end
  if not rest then
    return list(handle, path)
  end
  local named = decode(rest:match("^[^?#]*"), false)
  local i = INDEX[named]
  if not i then
    return refuse(handle, "not_found", anthropic, named)
  end
  reply(handle, "200", table.concat(anthropic and ANTHROPIC or OPENAI, MODELS[i][2]))
end
