-- Signalbox: Azure OpenAI clients' paths, as the gateway's own.
--
-- Azure's SDKs and code written for Azure OpenAI call /openai/deployments/<deployment>/<operation>
-- (with ?api-version=...) or, on its v1 API, /openai/v1/<operation>. Both become /v1/<operation>
-- before anything else reads the path (the client's path that every attempt is rewritten from,
-- the router phase, the routes): the request is then the OpenAI request it is. Azure's
-- api-version is its own and is dropped; the alias is the body's `model`, which Azure's SDKs
-- send too (the deployment in the path is the same name). A per-route script of the listener's
-- Lua filter, on the routes that match those paths only (envoygen.clientpaths).

function envoy_on_request(handle)
  local headers = handle:headers()
  local path = headers:get(":path"):match("^[^?#]*")
  local operation = path:match("^/openai/deployments/[^/]+/(.+)$") or path:match("^/openai/v1(.*)$")
  headers:replace(":path", "/v1" .. (operation:sub(1, 1) == "/" and "" or "/") .. operation)
  handle:clearRouteCache()
end
