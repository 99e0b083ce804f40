"""The models API beyond OpenAI's plain listing, answered inside Envoy: `GET /v1/models/<id>`
for OpenAI's and Anthropic's SDKs, and `GET /v1/models` for Anthropic's (its own shape,
paginated). A request without a body needs no prompt, so no Python: a Lua script
(core/models_api.lua) holding the aliases answers on one route, through a Lua filter that is
off on every other route (one filter instance per request costs nothing there: it is not
created). The aliases travel with the routes (RDS), so a change to them never touches the
listener.
"""

from __future__ import annotations

import json
from importlib import resources as package_files
from typing import Any

from .. import errors
from .clusters import _compact, lua_literal
from .contract import MODEL_PATH_PREFIX, MODELS_PATH, anthropic_model, openai_model
from .options import _any

LUA_FILTER = "envoy.filters.http.lua"
# The header Anthropic's SDKs send on every request and OpenAI's never do: which API's shape a
# models request is answered in.
ANTHROPIC_HEADER = "anthropic-version"
# Anthropic's page sizes for the list (its API reference): by default and at most.
PAGE_DEFAULT, PAGE_MAX = 20, 1000

_LUA = _compact(package_files.files("signalbox.core").joinpath("models_api.lua").read_text())
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


def _refusal(err: errors.RequestError) -> dict[str, str]:
    return {
        "status": str(err.status),
        "code": err.code,
        "body": err.body().decode(),
        "anthropic": err.body_for(errors.ANTHROPIC_API).decode(),
    }


def script(aliases: list[str]) -> str:
    """models_api.lua for these aliases (in the order the listing gives them)."""
    sep = "\n"  # in no alias: models.Alias
    pieces = {"OPENAI": _pieces(openai_model(_ID)), "ANTHROPIC": _pieces(anthropic_model(_ID))}
    prelude = [
        f"IDS = {lua_literal(''.join(a + sep for a in aliases))}\n",
        f"SEP = {lua_literal(sep)}\n",
        *(f"{name} = {{{', '.join(lua_literal(p) for p in parts)}}}\n" for name, parts in pieces.items()),
        f"PREFIX = {lua_literal(MODEL_PATH_PREFIX)}\n",
        f"PAGE = {{{PAGE_DEFAULT}, {PAGE_MAX}}}\n",
        "ERRORS = {" + ", ".join(f"{k} = {lua_literal(_refusal(e))}" for k, e in _ERRORS.items()) + "}\n",
    ]
    return "".join(prelude) + _LUA


def lua_filter() -> dict[str, Any]:
    """The listener's Lua filter: off unless a route turns it on with its script (`routes`)."""
    return {"name": LUA_FILTER, "disabled": True, "typed_config": _any("envoy.extensions.filters.http.lua.v3.Lua")}


def routes(aliases: list[str], listing: dict[str, Any]) -> list[dict[str, Any]]:
    """The models routes, in match order: OpenAI's listing (`listing`, a direct response) for a
    request without ANTHROPIC_HEADER, then the script for the rest of `/v1/models` and every
    `/v1/models/<id>`. Any other method is refused after them, with the other paths'."""
    get = {"name": ":method", "string_match": {"exact": "GET"}}
    not_anthropic = {"name": ANTHROPIC_HEADER, "present_match": True, "invert_match": True}
    on = _any("envoy.extensions.filters.http.lua.v3.LuaPerRoute", source_code={"inline_string": script(aliases)})
    return [
        {**listing, "match": {"path": MODELS_PATH, "headers": [get, not_anthropic]}},
        {
            "name": "models-api",
            "match": {"path_separated_prefix": MODELS_PATH, "headers": [get]},
            # Answered by the script: this is reached only if it failed (Envoy logs why).
            "direct_response": {"status": _FAILED.status, "body": {"inline_string": _FAILED.body().decode()}},
            "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
            "typed_per_filter_config": {LUA_FILTER: on},
        },
    ]
