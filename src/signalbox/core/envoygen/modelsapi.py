"""The models API beyond OpenAI's plain listing, answered inside Envoy: `GET /v1/models/<id>`
for OpenAI's and Anthropic's SDKs, and `GET /v1/models` for Anthropic's (its own shape,
paginated). A request without a body needs no prompt, so no Python: a Lua script
(core/models_api.lua) holding the aliases answers on one route (`luaroutes`).

Once consumers are declared, who asks decides what is listed: a consumer sees the aliases it
may call, an anonymous caller those of policies that serve anonymous callers, or a 401 when
there are none (as for any other request). Only the ext_proc knows a caller by its key, so on
such a gateway the models paths go to it (`routes(..., by_caller=True)`) and `answer` gives the
same API as the script, over the aliases that caller may see.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, unquote

from .. import errors
from .clusters import lua_error, lua_literal
from .contract import (
    AZURE_PREFIX,
    CLIENT_PATH_KEY,
    METADATA_NS,
    MODELS_PATH,
    anthropic_model,
    models_listing,
    openai_model,
)
from .luaroutes import run_script, script_file
from .options import EXTPROC_FILTER, _any

# The header Anthropic's SDKs send on every request and OpenAI's never do: which API's shape a
# models request is answered in.
ANTHROPIC_HEADER = "anthropic-version"
# Anthropic's page sizes for the list (its API reference): by default and at most.
PAGE_DEFAULT, PAGE_MAX = 20, 1000

_LUA = script_file("models_api.lua")
# The router-phase ext_proc reads bodies only; a models request has none, so on a gateway that
# lists per caller its headers are sent instead, and the ext_proc answers them.
_ASK_EXTPROC = _any(
    "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
    overrides={
        "processing_mode": {
            "request_header_mode": "SEND",
            "response_header_mode": "SKIP",
            "request_body_mode": "NONE",
            "response_body_mode": "NONE",
        }
    },
)
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
        f"PATH_KEY = {{{lua_literal(METADATA_NS)}, {lua_literal(CLIENT_PATH_KEY)}}}\n",
    ]
    return "".join(prelude) + _LUA


def routes(aliases: list[str], listing: dict[str, Any], by_caller: bool = False) -> list[dict[str, Any]]:
    """The models routes, in match order: OpenAI's listing (`listing`, a direct response) for a
    request without ANTHROPIC_HEADER, then the script for the rest of `/v1/models` and every
    `/v1/models/<id>`. Any other method is refused after them, with the other paths'.

    `by_caller` (consumers are declared): one route instead, whose requests' headers go to the
    ext_proc, which answers them for the caller (`answer`); the script and the listing would
    show every alias to anyone."""
    get = {"name": ":method", "string_match": {"exact": "GET"}}
    not_anthropic = {"name": ANTHROPIC_HEADER, "present_match": True, "invert_match": True}
    # The same paths as Azure's clients call them (envoygen.clientpaths), answered here: a
    # request's Lua script runs once, so one whose path that script rewrote could not reach this.
    azure = f"^({'|'.join(re.escape(p) for p in _MODELS_PATHS)})"
    answered = {
        "name": "models-api",
        "match": {"safe_regex": {"regex": azure + "(/.*)?$"}, "headers": [get]},
        # Answered by the script or the ext_proc: this is reached only if it failed (Envoy logs why).
        "direct_response": {"status": _FAILED.status, "body": {"inline_string": _FAILED.body().decode()}},
        "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
    }
    if by_caller:
        return [{**answered, "typed_per_filter_config": {EXTPROC_FILTER: _ASK_EXTPROC}}]
    return [
        {**listing, "match": {"safe_regex": {"regex": azure + "$"}, "headers": [get, not_anthropic]}},
        {**answered, "typed_per_filter_config": run_script(script(aliases))},
    ]


# Every path the models API answers, `GET` only: the listings and `<listing>/<id>`.
MODELS_PATH_RE = re.compile(f"({'|'.join(re.escape(p) for p in _MODELS_PATHS)})(/.*)?", re.DOTALL)


def is_models_path(path: str) -> bool:
    return MODELS_PATH_RE.fullmatch(path.split("?", 1)[0]) is not None


def _shown(name: str) -> str:
    """What an error message may repeat of a name the client sent: its first 200 bytes, each
    outside a few safe characters made "?" (as the script does, byte for byte)."""
    raw = name.encode("utf-8", "surrogateescape")[:200]
    return re.sub(rb"[^A-Za-z0-9\-._~:/@+ ]", b"?", raw).decode("ascii")


def _refusal(name: str, named: str = "") -> errors.RequestError:
    template = _ERRORS[name]
    return type(template)(template.message.replace(_NAMED, _shown(named)), param=template.param)


def answer(aliases: Sequence[str], path: str, anthropic: bool) -> bytes:
    """The body of a `GET` on a models path (`is_models_path`), in the caller's API, over
    `aliases` (in listing order): what core/models_api.lua and the plain listing answer, for a
    gateway that lists per caller. Raises the script's refusals (a RequestError)."""
    bare, _, query = path.partition("?")
    found = MODELS_PATH_RE.fullmatch(bare)
    rest = found.group(2) if found else None
    if rest:
        # Bytes the client percent-encoded that are not UTF-8 name no alias, and stay theirs.
        named = unquote(rest[1:].split("#", 1)[0], errors="surrogateescape")
        if named not in aliases:
            raise _refusal("not_found", named)
        shape = anthropic_model(named) if anthropic else openai_model(named)
        return json.dumps(shape, separators=(",", ":")).encode()
    if not anthropic:
        return models_listing(list(aliases))
    return _anthropic_page(list(aliases), dict(parse_qsl(query, keep_blank_values=True, errors="surrogateescape")))


def _anthropic_page(ids: list[str], asked: dict[str, str]) -> bytes:
    """Anthropic's list: `limit` models (PAGE_DEFAULT, at most PAGE_MAX), after `after_id` or
    before `before_id`."""
    limit = PAGE_DEFAULT
    if "limit" in asked:
        try:
            wanted = float(asked["limit"])
        except ValueError:
            raise _refusal("bad_limit") from None
        if not 1 <= wanted <= PAGE_MAX or wanted != int(wanted):
            raise _refusal("bad_limit")
        limit = int(wanted)
    if "after_id" in asked and "before_id" in asked:
        raise _refusal("both_cursors")
    cursor = asked.get("after_id", asked.get("before_id"))
    if cursor is not None and cursor not in ids:
        raise _refusal("unknown_cursor", cursor)
    if "before_id" in asked:
        at = ids.index(asked["before_id"])
        page, more = ids[max(0, at - limit) : at], at - limit > 0
    else:
        start = ids.index(cursor) + 1 if cursor is not None else 0
        page, more = ids[start : start + limit], start + limit < len(ids)
    body = {
        "data": [anthropic_model(a) for a in page],
        "has_more": more,
        "first_id": page[0] if page else None,
        "last_id": page[-1] if page else None,
    }
    return json.dumps(body, separators=(",", ":")).encode()
