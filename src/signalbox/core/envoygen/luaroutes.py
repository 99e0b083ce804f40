"""The listener's Lua filter, off unless a route turns it on with a script of its own.

What needs a little code but no prompt runs here, inside Envoy, on the routes that need it:
the models API (`modelsapi`) and the paths of Azure OpenAI's clients (`clientpaths`). A route's
script travels with the routes (RDS), so what it holds (the aliases) changes without touching
the listener, whose change would drain connections. On every other route the filter is not
created at all.
"""

from __future__ import annotations

from importlib import resources as package_files
from typing import Any

from .clusters import _compact
from .options import _any

LUA_FILTER = "envoy.filters.http.lua"


def script_file(name: str) -> str:
    """A Lua script shipped in signalbox.core, without comments and indentation."""
    return _compact(package_files.files("signalbox.core").joinpath(name).read_text())


def lua_filter() -> dict[str, Any]:
    """The filter in the listener's chain, off by default. It runs before the client's path is
    kept (`client_path_filter`): a script that rewrites the path is what the attempts see."""
    return {"name": LUA_FILTER, "disabled": True, "typed_config": _any("envoy.extensions.filters.http.lua.v3.Lua")}


def run_script(source: str) -> dict[str, Any]:
    """A route's `typed_per_filter_config` that turns the filter on with `source`."""
    return {LUA_FILTER: _any("envoy.extensions.filters.http.lua.v3.LuaPerRoute", source_code={"inline_string": source})}
