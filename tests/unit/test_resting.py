"""The resting file (extproc.resting) and the health listener's answer from it (core/resting.lua,
under LuaJIT as in Envoy, with a stand-in for the handle Envoy passes): the checks of every
backend that Envoy answers without Python."""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import quote

from hypothesis import given, settings
from hypothesis import strategies as st
from lupa import luajit21

from signalbox.core import envoygen
from signalbox.core.envoygen.contract import BACKEND_HEALTH_PATH
from signalbox.extproc import resting

HARNESS = """
function(path)
  local answer = {}
  local headers = {}
  function headers:get(k) if k == ":path" then return path end end
  local handle = {}
  function handle:headers() return headers end
  function handle:respond(h, b) answer.status = h[":status"]; answer.body = b end
  envoy_on_request(handle)
  return answer.status
end
"""


def health_lua(resting_file: Path):
    """The health listener's Lua filter as generated, run in LuaJIT."""
    options = envoygen.GatewayOptions(resting_file=str(resting_file), checks_port=0)
    listener = envoygen.checks_listener(options)
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (lua_filter,) = [f for f in hcm["http_filters"] if f["name"] == "signalbox.resting"]
    runtime = luajit21.LuaRuntime()
    runtime.execute(lua_filter["typed_config"]["default_source_code"]["inline_string"])
    check = runtime.eval(HARNESS)
    return lambda backend, peer="127.0.0.1:5555": check(f"{BACKEND_HEALTH_PATH}?id={quote(backend, safe='')}", peer)


def test_a_resting_backend_fails_its_check_until_its_rest_ends(tmp_path):
    path = tmp_path / "resting"
    now = time.time()
    resting.write(path, resting.render({"ns/p/m": (now + 30, "429"), "ns/q/m": (now - 5, "429")}))
    check = health_lua(path)
    assert check("ns/p/m") == "503"
    assert check("ns/q/m") == "200"  # its rest is over: the file need not be rewritten for it
    assert check("ns/other/m") == "200"


def test_before_the_file_exists_nothing_rests(tmp_path):
    assert health_lua(tmp_path / "never-written")("ns/p/m") == "200"


def test_the_file_is_rewritten_only_when_what_rests_changes(tmp_path):
    active: dict[str, tuple[float, str]] = {}
    writer = resting.RestingFile(tmp_path / "resting", lambda: active)
    assert writer.sync() and (tmp_path / "resting").read_text() == ""
    assert not writer.sync()
    active["ns/p/m"] = (1_900_000_000.0, "rate-limited")
    assert writer.sync()
    assert (tmp_path / "resting").read_text() == "ns/p/m\t1900000000.000\n"
    assert not writer.sync()
    assert [p.name for p in tmp_path.iterdir()] == ["resting"]  # no temporary file left


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=40), st.floats(min_value=0, max_value=4e9), max_size=6))
def test_any_set_of_rests_reads_back_through_the_lua_as_written(rests):
    """Whatever the ids (they come from names, but the file format must not be fooled by one),
    a listed backend is resting exactly when its end is still to come."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resting"
        resting.write(path, resting.render({b: (until, "x") for b, until in rests.items()}))
        check = health_lua(path)
        now = time.time()
        for backend, until in rests.items():
            if not resting.listable(backend) or abs(until - now) < 2:
                continue  # left out of the file; or too close to the clock to call
            assert check(backend) == ("503" if until > now else "200"), json.dumps([backend, until])
