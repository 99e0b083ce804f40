-- Signalbox: prepare one upstream attempt for the backend Envoy picked, inside Envoy.
--
-- Runs as an upstream HTTP filter of the router (every aggregate cluster's), once per attempt. Lua cannot see
-- the picked host, so before it one header_mutation filter names the backend in ATTEMPT_HEADER
-- from the picked host's name (the backend's id, %UPSTREAM_HOST_NAME%); the last upstream filter
-- names it again on the answer, for envoy_on_response.
-- The generator defines, above this text, the contract's names (ATTEMPT_HEADER, and NS,
-- CLIENT_PATH_KEY, BODY_MODEL_KEY of the dynamic metadata), SETTINGS (what the backends of one
-- provider share) and OWN (backend id -> the index of its provider's SETTINGS, when its own
-- settings follow from its id, else {index, model, model_json, api_path, name}), for every
-- backend: one script serves every chain, as an upstream filter of the router. backend_of(id)
-- gives a backend's settings; each entry holds id, model, model_json, api_path and name, and
-- reads the rest from its provider's, through its metatable:
--   model       the model name the provider expects ("model" in the body)
--   model_json  the same, as a JSON string literal
--   path        the provider's path for the client's "/v1/<rest>" ("<rest>" appended)
--   query       extra query parameters (Azure's api-version), "" for none
--   authority   the provider's host[:port]
--   key_header  the header its provider's key goes in, "" if keyless
--   key_file    the file holding that header's whole value ("" when keys are not added)
--   id          the backend's id (the route names, in LARGER_AFTER_HEADER, the members of the
--               request's chain a later member with a larger context window follows)
--   sanitize    true when its streams pass on whole, well-formed events only
--   api         the API family it speaks: "openai" or "anthropic"
--   provider    its provider's name, and genai its kind (the GenAI conventions' name)
--   name        the model's name in the config
--   model_at    where that name starts in the backend's id ("<provider id>/<name>")
-- and ERRORS, the gateway's error bodies (from signalbox.core.errors) by name, each with its
-- status, code and the body in each client API (`body`: OpenAI's, `anthropic`);
-- TRANSLATE_HEADER, which marks an attempt whose backend speaks another API than the client
-- (the upstream-phase ext_proc, skipped on every other attempt, translates it), and
-- TRANSLATE_KEY, where that ext_proc reads which translation (ATTEMPT_NS metadata); MIXED,
-- true when the config's backends speak more than one API; RETRY_HEADER, the response header the route's retry policy retries on, and
-- ATTEMPT_NS, the dynamic metadata namespace this script keeps its per-attempt notes in;
-- TRACED, true when spans are exported (they read the answering provider's kind from a note).
-- The client's path comes from dynamic metadata (header_to_metadata on the listener): the
-- request headers are one map shared by every attempt, so `:path` already holds the previous
-- attempt's rewrite. The body is the router's buffered copy, fresh for every attempt.
-- The one key it handles is the picked backend's provider's, read from that provider's file.

-- The client's API family by the path it called, and the path below a provider's base URL of
-- each family's generation endpoint.
local CLIENT_APIS = {["/v1/messages"] = "anthropic", ["/v1/chat/completions"] = "openai",
                     ["/v1/responses"] = "responses", ["/v1/messages/count_tokens"] = "anthropic"}
-- Client paths no other API family has an equivalent of: only a backend of the client's API.
local UNTRANSLATABLE = {["/v1/messages/count_tokens"] = true}
local API_PATHS = {openai = "/chat/completions", anthropic = "/messages"}

-- Provider keys: each provider's whole header value (prefix and key) in a file of its own,
-- written by the gateway's publisher (memory-backed in a pod, mode 0600). Read again at most
-- once a second per Envoy thread, so a rotated key is in use within a second; nil while the
-- file is missing.
local KEYS = {}
local function key_of(path)
  local now = os.time()
  local entry = KEYS[path]
  if entry == nil or entry.at ~= now then
    local file = io.open(path, "rb")
    local value = nil
    if file ~= nil then
      value = file:read("*a")
      file:close()
    end
    entry = {value = value, at = now}
    KEYS[path] = entry
  end
  return entry.value
end

-- Each backend's entry, made on its first attempt in this Lua state (one per Envoy thread):
-- a table per backend made when the script loads was 25 MB of Envoy at 10,000 backends.
local METAS = {}
for i, shared in ipairs(SETTINGS) do METAS[i] = {__index = shared} end
local ENTRIES = {}
function backend_of(id)
  local entry = ENTRIES[id]
  if entry ~= nil then return entry end
  local own = OWN[id]
  if own == nil then return nil end
  if type(own) == "number" then
    local name = string.sub(id, SETTINGS[own].model_at)
    entry = setmetatable({id = id, model = name, model_json = '"' .. name .. '"', name = name}, METAS[own])
  else
    entry = setmetatable({id = id, model = own[2], model_json = own[3], api_path = own[4], name = own[5]},
                         METAS[own[1]])
  end
  ENTRIES[id] = entry
  return entry
end

local function refuse(handle, name, api)
  local e = ERRORS[name]
  handle:respond({[":status"] = e.status, ["content-type"] = "application/json", ["x-signalbox-reason"] = e.code},
                 api == "anthropic" and e.anthropic or e.body)
end

-- JSON scanning: just enough to find the top-level members of an object without decoding it.
-- Each function takes the text and a 1-based index and returns the index after what it read,
-- or nil when the text is not well-formed there.
local function after_ws(s, i)
  return string.find(s, "[^ \t\r\n]", i)
end

local function after_string(s, i)
  local j = i + 1
  while true do
    local k = string.find(s, '["\\]', j)
    if k == nil then return nil end
    if string.byte(s, k) == 92 then j = k + 2 else return k + 1 end
  end
end

local function after_value(s, i)
  local c = string.byte(s, i)
  if c == 34 then return after_string(s, i) end
  if c == 123 or c == 91 then
    local depth, j = 0, i
    while true do
      local k = string.find(s, '["{}%[%]]', j)
      if k == nil then return nil end
      local b = string.byte(s, k)
      if b == 34 then
        j = after_string(s, k)
        if j == nil then return nil end
      else
        if b == 123 or b == 91 then depth = depth + 1 else depth = depth - 1 end
        j = k + 1
        if depth == 0 then return j end
      end
    end
  end
  -- A number, true, false or null: up to the next delimiter.
  local k = string.find(s, "[,}%] \t\r\n]", i)
  if k == nil or k == i then return nil end
  return k
end

-- The members of the object at s[i]: a list of {key = raw key text, ks = key start, vs = value
-- start, ve = index after the value}, and the index of the closing brace.
local function members(s, i)
  i = after_ws(s, i)
  if i == nil or string.byte(s, i) ~= 123 then return nil end
  local out = {}
  i = after_ws(s, i + 1)
  if i ~= nil and string.byte(s, i) == 125 then return out, i end
  while i ~= nil do
    if string.byte(s, i) ~= 34 then return nil end
    local ke = after_string(s, i)
    if ke == nil then return nil end
    local colon = after_ws(s, ke)
    if colon == nil or string.byte(s, colon) ~= 58 then return nil end
    local vs = after_ws(s, colon + 1)
    if vs == nil then return nil end
    local ve = after_value(s, vs)
    if ve == nil then return nil end
    out[#out + 1] = {key = string.sub(s, i + 1, ke - 2), ks = i, vs = vs, ve = ve}
    local n = after_ws(s, ve)
    if n == nil then return nil end
    local b = string.byte(s, n)
    if b == 125 then return out, n end
    if b ~= 44 then return nil end
    i = after_ws(s, n + 1)
  end
  return nil
end

local USAGE = '"include_usage":true'

-- stream_options with include_usage set to true (usage is how spend is counted).
local function with_usage(s, vs, ve)
  local value = string.sub(s, vs, ve - 1)
  local inner, close = members(value, 1)
  if inner == nil then return "{" .. USAGE .. "}" end
  for _, m in ipairs(inner) do
    if m.key == "include_usage" then
      if string.sub(value, m.vs, m.ve - 1) == "true" then return value end
      return string.sub(value, 1, m.vs - 1) .. "true" .. string.sub(value, m.ve)
    end
  end
  local sep = (#inner > 0) and "," or ""
  return string.sub(value, 1, close - 1) .. sep .. USAGE .. string.sub(value, close)
end

-- The body with every top-level "model" set to model_json and, for an OpenAI stream, `usage`
-- true: usage asked for; "drop": no stream_options at all (a provider that refuses the field,
-- `streamUsage: false`). nil and the name of an error in ERRORS when it cannot be rewritten
-- safely.
function rewrite_body(s, model_json, usage)
  local list, close = members(s, 1)
  if list == nil then return nil, "not_object" end
  local edits = {} -- {start, index after, replacement}, in body order
  local streaming, has_options, found = false, false, false
  local drop = usage == "drop"
  for i, m in ipairs(list) do
    if string.find(m.key, "\\", 1, true) then
      return nil, "escaped_name"
    end
    if m.key == "model" then
      edits[#edits + 1] = {m.vs, m.ve, model_json}
      found = true
    elseif m.key == "stream" then
      streaming = usage == true and string.sub(s, m.vs, m.ve - 1) == "true"
    elseif m.key == "stream_options" and drop then
      -- The member and one comma beside it: up to the next member, else from the last one.
      local nxt, prev = list[i + 1], list[i - 1]
      if nxt ~= nil then
        edits[#edits + 1] = {m.ks, nxt.ks, ""}
      elseif prev ~= nil then
        edits[#edits + 1] = {prev.ve, m.ve, ""}
      else
        edits[#edits + 1] = {m.ks, m.ve, ""}
      end
    elseif m.key == "stream_options" and usage then
      has_options = true
      edits[#edits + 1] = {m.vs, m.ve, nil}
    end
  end
  if not found then return nil, "no_model" end
  local parts, pos = {}, 1
  for _, e in ipairs(edits) do
    local replacement = e[3]
    if replacement == nil then
      replacement = streaming and with_usage(s, e[1], e[2]) or string.sub(s, e[1], e[2] - 1)
    end
    parts[#parts + 1] = string.sub(s, pos, e[1] - 1)
    parts[#parts + 1] = replacement
    pos = e[2]
  end
  parts[#parts + 1] = string.sub(s, pos, close - 1)
  if streaming and not has_options then
    parts[#parts + 1] = ',"stream_options":{' .. USAGE .. '}'
  end
  parts[#parts + 1] = string.sub(s, close)
  return table.concat(parts)
end

-- The client's path as it called it (the attempts' shared header map holds the last attempt's),
-- split: (path, query, path without a trailing slash).
local function client_path(handle, headers)
  local meta = handle:streamInfo():dynamicMetadata():get(NS) or {}
  local bare, query = string.match(meta[CLIENT_PATH_KEY] or headers:get(":path") or "", "^([^?]*)%??(.*)$")
  return bare, query, (string.gsub(bare, "/$", "")), meta
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local bare, query, trimmed, meta = client_path(handle, headers)
  local api = CLIENT_APIS[trimmed]
  local marked = headers:get(ATTEMPT_HEADER) or ""
  if marked == RELAY_BACKEND then
    return -- to the stream relay (extproc.relay): the request as the router phase left it
  end
  -- The relay's signed decision and return address are for the router phase, never a provider.
  headers:remove(RELAY_HEADER)
  headers:remove(RELAY_BACK_HEADER)
  local BACKEND = backend_of(marked)
  if BACKEND == nil then
    refuse(handle, "no_backend", api) -- a config in transition: a 5xx, the chain moves on
    return
  end
  if BACKEND.key_header ~= "" then
    -- Every key header is gone by now (the client's too): only this provider's is added.
    local key = BACKEND.key_file ~= "" and key_of(BACKEND.key_file) or nil
    if key == nil or key == "" then
      refuse(handle, "key_unavailable", api) -- a 5xx: the next backend of the chain is tried
      return
    end
    headers:replace(BACKEND.key_header, key)
  end
  local rest = bare
  if string.sub(bare, 1, 4) == "/v1/" then rest = string.sub(bare, 4) end
  -- A backend that serves the client's API itself (OpenAI's Responses API on a provider that
  -- has it) takes the request as it is: no translation, the client's path.
  local native = api == BACKEND.api or (api == "responses" and BACKEND.responses)
  if api ~= nil and not native and UNTRANSLATABLE[trimmed] then
    refuse(handle, "only_own_api", api) -- the router phase never picks such a backend first
    return
  elseif api ~= nil and not native then
    -- Another API family: the upstream-phase ext_proc translates this attempt's body (this
    -- script sets the path; the answer's headers are fixed on the way back, envoy_on_response).
    -- Gemini and Bedrock name the model in the path (`api_path`; the translation switches to
    -- their streaming method).
    rest = BACKEND.api_path or API_PATHS[BACKEND.api]
    -- NO_USAGE_ROUTE: the translation asks this backend for no usage at the end of a stream.
    local route = api .. ">" .. BACKEND.api .. (BACKEND.no_usage and NO_USAGE_ROUTE or "")
    headers:replace(TRANSLATE_HEADER, route)
    handle:streamInfo():dynamicMetadata():set(ATTEMPT_NS, TRANSLATE_KEY, route)
  elseif api == nil and BACKEND.api ~= "openai" then
    -- Completions and embeddings exist in OpenAI's API only (the router phase never picks such
    -- a backend first for them; a later member of a chain can still meet one).
    refuse(handle, "other_api", "openai")
    return
  else
    headers:remove(TRANSLATE_HEADER)
    if MIXED then
      -- An earlier attempt of this request may have been translated: its note must not fix
      -- this answer's headers.
      handle:streamInfo():dynamicMetadata():set(ATTEMPT_NS, TRANSLATE_KEY, "")
    end
  end
  if BACKEND.api == "anthropic" and headers:get("anthropic-version") == nil then
    headers:replace("anthropic-version", ANTHROPIC_VERSION)
  end
  if BACKEND.query ~= "" then
    query = (query ~= "" and (query .. "&") or "") .. BACKEND.query
  end
  headers:replace(":path", BACKEND.path .. rest .. (query ~= "" and ("?" .. query) or ""))
  headers:replace(":authority", BACKEND.authority)
  local larger = headers:get(LARGER_AFTER_HEADER)
  if larger ~= nil and string.find("," .. larger .. ",", "," .. BACKEND.id .. ",", 1, true) then
    handle:streamInfo():dynamicMetadata():set(ATTEMPT_NS, "larger_after", "1")
  end
  if BACKEND.sanitize then
    handle:streamInfo():dynamicMetadata():set(ATTEMPT_NS, "sanitize", "1")
  end
  if meta[BODY_MODEL_KEY] == BACKEND.model then
    return -- the router phase already wrote this backend's model into the body
  end
  local body = handle:body()
  if body == nil then return end
  -- stream_options.include_usage is a chat completions field: only chat bodies get it, and
  -- none goes to a provider that refuses the field (`no_usage`, streamUsage: false).
  local usage = api ~= "anthropic" and BACKEND.api == "openai" and not (api == "responses" and native)
  if usage and BACKEND.no_usage then usage = "drop" end
  local text, why = rewrite_body(body:getBytes(0, body:length()), BACKEND.model_json, usage)
  if text == nil then
    refuse(handle, why, api)
    return
  end
  body:setBytes(text)
end

-- What providers say when a prompt does not fit the model's context window (OpenAI and the
-- compatible servers, Azure, Anthropic, Gemini), lower-cased.
local TOO_LONG = {"context_length_exceeded", "maximum context length", "prompt is too long",
                  "input is too long", "exceeds the context window", "too many tokens"}

-- A 400 that says the prompt is too long for this backend, when a later member of the chain has
-- a larger window: marked retriable (RETRY_HEADER), so Envoy tries the next backend. Otherwise
-- the client gets it as it is. Only such 400s are read (and buffered).
local function retry_if_too_long(handle)
  local notes = handle:streamInfo():dynamicMetadata():get(ATTEMPT_NS)
  if notes == nil or notes["larger_after"] ~= "1" then return end
  local body = handle:body()
  if body == nil then return end
  local text = string.lower(body:getBytes(0, math.min(body:length(), 8192)))
  for _, phrase in ipairs(TOO_LONG) do
    if string.find(text, phrase, 1, true) then
      -- Reading the body yielded: the header map from before it is out of scope.
      handle:headers():replace(RETRY_HEADER, "context_length")
      return
    end
  end
end

-- Server-sent events: whole events only, malformed ones left out. An event is kept unless a
-- `data:` payload other than [DONE] is not one JSON object (its top-level members are checked,
-- about 10 us per event under LuaJIT; within the benchmark's noise). Comments, `event:` and
-- `id:` lines pass as they are.
local function event_ok(block)
  local data = {}
  for line in string.gmatch(block, "[^\r\n]+") do
    local payload = string.match(line, "^data: ?(.*)$")
    if payload ~= nil then data[#data + 1] = payload end
  end
  if #data == 0 then return true end
  local payload = table.concat(data, "\n")
  if payload == "[DONE]" then return true end
  local list, close = members(payload, 1)
  return list ~= nil and after_ws(payload, close + 1) == nil
end

-- A stream's next bytes: (the complete, well-formed events of pending .. text, what is left
-- after the last complete event). A tail past SSE_MAX_PENDING bytes without an end of event is
-- let through as it is rather than held.
SSE_MAX_PENDING = 1048576
function complete_events(text)
  local out, pos = {}, 1
  while true do
    local s, e = string.find(text, "\r?\n\r?\n", pos)
    if s == nil then break end
    local block = string.sub(text, pos, e)
    if event_ok(string.sub(text, pos, s - 1)) then out[#out + 1] = block end
    pos = e + 1
  end
  local rest = string.sub(text, pos)
  if #rest > SSE_MAX_PENDING then
    out[#out + 1] = rest
    rest = ""
  end
  return table.concat(out), rest
end

-- Who answered: the provider and model headers, from the backend the answer names (replacing
-- any the provider sent), and the provider's kind for spans. The stream relay's answer keeps
-- the headers the attempt it made got.
local function name_answer(handle, headers)
  local served = headers:get(ATTEMPT_HEADER)
  headers:remove(ATTEMPT_HEADER)
  if served == RELAY_BACKEND then return nil end
  local BACKEND = served ~= nil and backend_of(served) or nil
  if BACKEND == nil then
    headers:remove(PROVIDER_HEADER)
    headers:remove(MODEL_HEADER)
    return nil
  end
  headers:replace(PROVIDER_HEADER, BACKEND.provider)
  headers:replace(MODEL_HEADER, BACKEND.name or BACKEND.model)
  if TRACED then
    handle:streamInfo():dynamicMetadata():set(ATTEMPT_NS, GENAI_PROVIDER_KEY, BACKEND.genai)
  end
  return BACKEND
end

-- A 2xx that is a web page, not an API's answer: the provider's site behind a wrong base URL,
-- a proxy's or a login page. Or a redirect (3xx): a base URL with http:// for an https:// API,
-- a moved path, a login in front of the API. Passed on, a redirect sends the client's SDK (which
-- follows it) with the prompt straight to wherever it points, past the gateway. Either is made a
-- 502 in the client's API shape (on the way back this script comes after the translation), with
-- no Location, marked for the retry policy: the next backend is tried, Envoy's outlier detection
-- counts it, and a client that gets it last gets an error its SDK reads.
local function not_an_answer(handle, reason)
  local e = ERRORS[reason]
  local _, _, trimmed = client_path(handle, handle:headers())
  -- The page, whole (an empty body when the answer has none, as a redirect often does: so the
  -- error can still be written); reading it yields, so the headers are fetched again.
  local body = handle:body(true)
  if body ~= nil then
    body:setBytes(CLIENT_APIS[trimmed] == "anthropic" and e.anthropic or e.body)
  end
  local headers = handle:headers()
  headers:replace(":status", e.status)
  headers:replace("content-type", "application/json")
  headers:remove("content-length")
  headers:remove("location")
  headers:replace(RETRY_HEADER, "not_api")
end

function envoy_on_response(handle)
  local headers = handle:headers()
  local BACKEND = name_answer(handle, headers)
  local status = headers:get(":status")
  local page = string.find(headers:get("content-type") or "", "html", 1, true)
  if BACKEND ~= nil and string.sub(status, 1, 1) == "2" and page then
    not_an_answer(handle, "not_api")
    return
  end
  if BACKEND ~= nil and string.sub(status, 1, 1) == "3" then
    not_an_answer(handle, "redirect")
    return
  end
  local notes = handle:streamInfo():dynamicMetadata():get(ATTEMPT_NS)
  if notes ~= nil and notes[TRANSLATE_KEY] ~= nil and notes[TRANSLATE_KEY] ~= "" then
    -- The translation rewrites the body (a stream chunk by chunk, anything else whole, as JSON).
    headers:remove("content-length")
    local ctype = headers:get("content-type") or ""
    if string.find(ctype, "amazon.eventstream", 1, true) then
      headers:replace("content-type", "text/event-stream") -- Bedrock's binary events, as SSE
    elseif not string.find(ctype, "text/event-stream", 1, true) then
      headers:replace("content-type", "application/json")
    end
  end
  if status == "400" then
    retry_if_too_long(handle)
    return
  end
  local ctype = headers:get("content-type") or ""
  if status ~= "200" or not string.find(ctype, "text/event-stream", 1, true) or headers:get("content-length") then
    return
  end
  if notes == nil or notes["sanitize"] ~= "1" then return end
  -- Chunk by chunk as they come (nothing is buffered whole): each passes on holding only whole,
  -- well-formed events; a partial event waits for the chunk that ends it. A stream that ends
  -- inside an event loses that partial event, as a client would.
  local pending = ""
  for chunk in handle:bodyChunks() do
    local text = pending .. chunk:getBytes(0, chunk:length())
    local out, rest = complete_events(text)
    -- The usual chunk: whole, well-formed events, passed on as it came (no copy back).
    if out ~= text or pending ~= "" then chunk:setBytes(out) end
    pending = rest
  end
end
