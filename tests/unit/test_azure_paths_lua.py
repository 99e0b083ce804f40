"""core/azure_paths.lua, which turns Azure OpenAI clients' paths into the gateway's own inside
Envoy, under LuaJIT as in Envoy. The path is the client's: hypothesis."""

from __future__ import annotations

import re
from urllib.parse import quote

from hypothesis import given
from hypothesis import strategies as st
from lupa import luajit21

from signalbox.core.envoygen import clientpaths
from signalbox.core.envoygen.luaroutes import script_file

HARNESS = """
function(path)
  local hdrs = {[":path"] = path}
  local headers = {}
  function headers:get(k) return hdrs[k] end
  function headers:replace(k, v) hdrs[k] = v end
  local handle = {cleared = false}
  function handle:headers() return headers end
  function handle:clearRouteCache() self.cleared = true end
  envoy_on_request(handle)
  return hdrs[":path"], handle.cleared
end
"""

LUA = luajit21.LuaRuntime()
LUA.execute(script_file("azure_paths.lua"))
REWRITE = LUA.eval(HARNESS)
DEPLOYMENT = st.text(min_size=1, max_size=20).map(lambda s: quote(s, safe=""))
QUERY = st.sampled_from(["", "?api-version=2024-10-21", "?api-version=preview&x=1"])


@given(deployment=DEPLOYMENT, operation=st.sampled_from(clientpaths.DEPLOYMENT_OPERATIONS), query=QUERY)
def test_a_deployment_path_becomes_the_openai_path_of_its_operation(deployment, operation, query):
    path = f"/openai/deployments/{deployment}/{operation}"
    assert re.fullmatch(clientpaths.DEPLOYMENT_PATHS, path)  # the route Envoy sends here
    assert tuple(REWRITE(path + query)) == (f"/v1/{operation}", True)


@given(rest=st.sampled_from(["", "/", "/chat/completions", "/responses", "/embeddings", "/files/x"]), query=QUERY)
def test_azures_v1_api_is_the_openai_api_below_v1(rest, query):
    assert tuple(REWRITE(clientpaths.V1_PREFIX + rest + query)) == ("/v1" + (rest or "/"), True)
