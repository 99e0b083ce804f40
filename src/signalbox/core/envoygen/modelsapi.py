"""The models API beyond OpenAI's plain listing, answered inside Envoy: `GET /v1/models/<id>`
for OpenAI's and Anthropic's SDKs, and `GET /v1/models` for Anthropic's (its own shape,
paginated). A request without a body needs no prompt, so no Python: a Lua script
(core/models_api.lua) holding the aliases answers on one route (`luaroutes`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from .. import errors
from .clusters import lua_error, lua_literal
from .contract import AZURE_PREFIX, MODELS_PATH, anthropic_model, openai_model
from .luaroutes import run_script, script_file

# The header Anthropic's SDKs send on every request and OpenAI's never do: which API's shape a
# models request is answered in.
ANTHROPIC_HEADER = "anthropic-version"
# Anthropic's page sizes for the list (its API reference): by default and at most.
PAGE_DEFAULT, PAGE_MAX = 20, 1000

_LUA = script_file("models_api.lua")
# The listing's paths: OpenAI's, and Azure OpenAI's (its SDK's, and its v1 API's).
_MODELS_PATHS = (MODELS_PATH, AZURE_PREFIX + "/models", AZURE_PREFIX + MODELS_PATH)
# Where a refusal's message names what the client sent (the script puts it there, made safe).
_NAMED = "{model}"
# Stands for the id in a model object's JSON, which the script splits around.
_ID = "\x00signalbox-id\x00"

_ERRORS = {
    "not_found": errors.UnknownModel(
        f"model '{_NAMED}' is not served by this gateway; {MODELS_PATH} lists those it is", param="model"
    ),
    "bad_limit": errors.InvalidParameter(f"limit: a whole number from 1 to {PAGE_MAX}", param="limit"),
    "both_cursors": errors.InvalidParameter("after_id and before_id: give one of them, not both"),
    "unknown_cursor": errors.InvalidParameter(f"no model '{_NAMED}' to page from: {MODELS_PATH} lists the ids"),
}

# What the script's route answers if the script failed: a bug, in Envoy's log by request id.
_FAILED = errors.InternalError("in this answer's x-request-id header")


def _pieces(shape: dict[str, Any]) -> list[str]:
    """A model object's JSON as the pieces between which its id (a JSON string) goes."""
    return json.dumps(shape, separators=(",", ":")).split(json.dumps(_ID))


def script(aliases: list[str]) -> str:
    """models_api.lua for these aliases (in the order the listing gives them)."""
    sep = "\n"  # in no alias: models.Alias
    pieces = {"OPENAI": _pieces(openai_model(_ID)), "ANTHROPIC": _pieces(anthropic_model(_ID))}
    prelude = [
        f"IDS = {lua_literal(''.join(a + sep for a in aliases))}\n",
        f"SEP = {lua_literal(sep)}\n",
        *(f"{name} = {{{', '.join(lua_literal(p) for p in parts)}}}\n" for name, parts in pieces.items()),
        f"PREFIXES = {{{', '.join(lua_literal(p + '/') for p in _MODELS_PATHS)}}}\n",
        f"PAGE = {{{PAGE_DEFAULT}, {PAGE_MAX}}}\n",
        "ERRORS = {" + ", ".join(f"{k} = {lua_literal(lua_error(e))}" for k, e in _ERRORS.items()) + "}\n",
    ]
    return "".join(prelude) + _LUA


def routes(aliases: list[str], listing: dict[str, Any]) -> list[dict[str, Any]]:
    """The models routes, in match order: OpenAI's listing (`listing`, a direct response) for a
    request without ANTHROPIC_HEADER, then the script for the rest of `/v1/models` and every
    `/v1/models/<id>`. Any other method is refused after them, with the other paths'."""
    get = {"name": ":method", "string_match": {"exact": "GET"}}
    not_anthropic = {"name": ANTHROPIC_HEADER, "present_match": True, "invert_match": True}
    # The same paths as Azure's clients call them (envoygen.clientpaths), answered here: a
    # request's Lua script runs once, so one whose path that script rewrote could not reach this.
    azure = f"^({'|'.join(re.escape(p) for p in _MODELS_PATHS)})"
    return [
        {**listing, "match": {"safe_regex": {"regex": azure + "$"}, "headers": [get, not_anthropic]}},
        {
            "name": "models-api",
            "match": {"safe_regex": {"regex": azure + "(/.*)?$"}, "headers": [get]},
            # Answered by the script: this is reached only if it failed (Envoy logs why).
            "direct_response": {"status": _FAILED.status, "body": {"inline_string": _FAILED.body().decode()}},
            "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
            "typed_per_filter_config": run_script(script(aliases)),
        },
    ]
