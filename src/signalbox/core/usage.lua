-- Signalbox: read token usage from a routed response as it streams through Envoy.
--
-- Runs in Envoy's Lua filter on the response path. It never buffers: each body chunk passes on
-- at once, and the last "prompt_tokens" / "completion_tokens" numbers seen (the usage object
-- of a JSON body, or the usage chunk at the end of an SSE stream) are kept. At the end they
-- become dynamic metadata, which the access log carries to Signalbox's accounting. Only
-- unescaped keys match: the same words inside generated text arrive as \"prompt_tokens\".
local NS = "signalbox"
-- A number split across two chunks is found in the tail of the previous one plus the next.
local TAIL = 256

function envoy_on_response(handle)
  local meta = handle:streamInfo():dynamicMetadata():get(NS)
  if meta == nil or (meta["decision"] == nil and meta["alias"] == nil) then
    return -- not a routed request (decided, or on a compiled route): /v1/models, ...
  end
  local prompt, completion
  local tail = ""
  for chunk in handle:bodyChunks() do
    local text = tail .. chunk:getBytes(0, chunk:length())
    for n in string.gmatch(text, '"prompt_tokens"%s*:%s*(%d+)') do prompt = n end
    for n in string.gmatch(text, '"completion_tokens"%s*:%s*(%d+)') do completion = n end
    tail = string.sub(text, -TAIL)
  end
  if prompt ~= nil then
    handle:streamInfo():dynamicMetadata():set(NS, "prompt_tokens", prompt)
    handle:streamInfo():dynamicMetadata():set(NS, "completion_tokens", completion or "0")
  end
end
