"""core/usage.lua, the usage reader Envoy runs on every routed response, under LuaJIT (as in
Envoy) with a stand-in for the handle Envoy passes: chunks in, dynamic metadata out."""

from __future__ import annotations

import json
from importlib import resources

import pytest
from lupa import luajit21

SOURCE = resources.files("signalbox.core").joinpath("usage.lua").read_text()
HANDLE = """
function(chunks, meta, stored)
  local metadata = {
    get = function(self, ns) return meta end,
    set = function(self, ns, key, value) stored[key] = value end,
  }
  local info = {dynamicMetadata = function(self) return metadata end}
  local handle = {
    streamInfo = function(self) return info end,
    bodyChunks = function(self)
      local i = 0
      return function()
        i = i + 1
        local c = chunks[i]
        if c == nil then return nil end
        return {getBytes = function(self, start, n) return string.sub(c, start + 1, start + n) end,
                length = function(self) return #c end}
      end
    end,
  }
  envoy_on_response(handle)
end
"""


def read_usage(chunks: list[str], routed: bool = True) -> dict[str, str]:
    lua = luajit21.LuaRuntime()
    lua.execute(SOURCE)
    stored = lua.table()
    meta = lua.table_from({"decision": "token"}) if routed else None
    lua.eval(HANDLE)(lua.table_from(chunks), meta, stored)
    return dict(stored.items())


def sse(*events: dict) -> str:
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def test_json_body_usage():
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}})
    assert read_usage([body]) == {"prompt_tokens": "12", "completion_tokens": "30"}


@pytest.mark.parametrize("cut", range(1, 60))
def test_stream_usage_split_anywhere_across_chunks(cut):
    stream = sse(
        {"choices": [{"delta": {"content": "hi"}}]},
        {"choices": [], "usage": {"prompt_tokens": 123, "completion_tokens": 45, "prompt_tokens_details": {}}},
    )
    at = stream.index('"usage"') + cut
    assert read_usage([stream[:at], stream[at:]]) == {"prompt_tokens": "123", "completion_tokens": "45"}


def test_usage_words_inside_generated_text_are_not_usage():
    text = 'Set {"prompt_tokens": 999, "completion_tokens": 999} in your config'
    body = json.dumps(
        {"choices": [{"message": {"content": text}}], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
    )
    assert read_usage([body]) == {"prompt_tokens": "5", "completion_tokens": "2"}
    assert read_usage([json.dumps({"choices": [{"message": {"content": text}}]})]) == {}


def test_nothing_is_set_without_usage_or_for_requests_the_gateway_did_not_route():
    assert read_usage([sse({"choices": [{"delta": {"content": "hi"}}]})]) == {}
    assert read_usage([json.dumps({"usage": {"prompt_tokens": 1, "completion_tokens": 1}})], routed=False) == {}
