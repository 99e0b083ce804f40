"""Azure OpenAI's client paths, served as the gateway's own.

Code written for Azure OpenAI (`AzureOpenAI(azure_endpoint=...)`, or the v1 API's
`OpenAI(base_url=".../openai/v1")`) reaches the gateway by changing its endpoint alone: its
paths become the OpenAI ones inside Envoy before anything reads them (core/azure_paths.lua, on
the two routes that match them, `luaroutes`), and its `api-key` header is a gateway key like
`Authorization` (contract.KEY_HEADERS). Only the operations the gateway serves are matched;
any other Azure path is an unknown path.
"""

from __future__ import annotations

from typing import Any

from .. import errors
from .contract import AZURE_PREFIX
from .luaroutes import run_script, script_file

# What Azure calls below a deployment that the gateway serves (its v1 API, `/openai/v1/...`,
# is the OpenAI API itself: all of it becomes `/v1/...`, and what the gateway lacks there is an
# unknown path as on `/v1`). Short enough for Envoy's regex budget (RE2 program size 100).
DEPLOYMENT_OPERATIONS = ("chat/completions", "completions", "embeddings")
DEPLOYMENT_PATHS = f"^{AZURE_PREFIX}/deployments/[^/]+/({'|'.join(DEPLOYMENT_OPERATIONS)})/?$"
V1_PREFIX = AZURE_PREFIX + "/v1"
_LUA = script_file("azure_paths.lua")


def routes() -> list[dict[str, Any]]:
    """The routes that rewrite an Azure client's path and let the request be routed again.
    Their own answer is reached only if the script failed (Envoy logs why)."""
    failed = errors.UnsupportedPath("this Azure OpenAI path could not be read by the gateway")
    action = {
        "direct_response": {"status": failed.status, "body": {"inline_string": failed.body().decode()}},
        "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
        "typed_per_filter_config": run_script(_LUA),
    }
    return [
        {"name": "azure-deployments", "match": {"safe_regex": {"regex": DEPLOYMENT_PATHS}}, **action},
        {"name": "azure-v1", "match": {"path_separated_prefix": V1_PREFIX}, **action},
    ]
