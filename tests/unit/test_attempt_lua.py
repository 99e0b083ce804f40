"""core/attempt.lua, which prepares every upstream attempt inside Envoy (path, authority, body
model, usage for streams, a check that the key was added), under LuaJIT as in Envoy, with a
stand-in for the handle Envoy passes. The body rewrite takes client input: hypothesis."""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lupa import luajit21

from signalbox.api.v1alpha1 import config_pb2 as pb
from signalbox.core import envoygen

# A stand-in for the handle Envoy passes: its headers (`hdrs`), the dynamic metadata a hook
# reads (`meta`) and the notes it writes (the global `notes`).
HANDLE = """
function stub_handle(hdrs, meta)
  notes = {}
  local headers = {}
  function headers:get(k) return hdrs[k] end
  function headers:replace(k, v) hdrs[k] = v end
  function headers:remove(k) hdrs[k] = nil end
  local metadata = {}
  function metadata:get(ns) return meta end
  function metadata:set(ns, k, v) notes[k] = v end
  local info = {}
  function info:dynamicMetadata() return metadata end
  local handle = {}
  function handle:headers() return headers end
  function handle:streamInfo() return info end
  return handle
end
"""

HARNESS = """
function(hdrs, meta, text)
  local responded = {}
  local body = {text = text}
  function body:getBytes(start, n) return string.sub(self.text, start + 1, start + n) end
  function body:length() return #self.text end
  function body:setBytes(t) self.text = t end
  local handle = stub_handle(hdrs, meta)
  function handle:body() if text == nil then return nil end return body end
  function handle:respond(h, b) responded.status = h[":status"]; responded.body = b end
  envoy_on_request(handle)
  return body.text, responded.status, responded.body
end
"""

OPENAI = pb.Provider(id="default/oai", host="api.example.com", port=443, tls=True, base_path="/openai/v1")
KEYED = pb.Provider(
    id="default/k", host="k.example.com", port=8443, tls=True, base_path="/v1", auth=pb.Auth(header="x-api-key")
)
AZURE = pb.Provider(
    id="default/az",
    type=pb.AZURE_OPENAI,
    host="res.openai.azure.com",
    port=443,
    tls=True,
    base_path="",
    azure_api_version="2024-06-01",
)


def backend(provider: pb.Provider, model: str = "m-up") -> pb.Backend:
    return pb.Backend(id=f"{provider.id}/m", provider_id=provider.id, model="m", upstream_model=model)


class Attempt:
    def __init__(self, provider: pb.Provider, model: str = "m-up", credentials_dir: str | None = None):
        self.lua = luajit21.LuaRuntime()
        self.backend = backend(provider, model)
        keys = KEYS_DIR if credentials_dir is None else credentials_dir
        settings = {self.backend.id: envoygen.attempt_settings(self.backend, provider, keys)}
        self.lua.execute(envoygen.attempt_source(settings))
        self.lua.execute(HANDLE)
        self.run_lua = self.lua.eval(HARNESS)

    def run(self, path: str, body: str | None, meta: dict | None = None, headers: dict | None = None):
        # The marker filter of the picked backend named it before attempt.lua runs.
        named = {envoygen.ATTEMPT_HEADER: self.backend.id}
        hdrs = self.lua.table_from({":path": path, ":authority": "gateway", **named, **(headers or {})})
        text, status, answer = self.run_lua(hdrs, self.lua.table_from(meta) if meta is not None else None, body)
        return dict(hdrs), text, status, answer

    def rewrite(self, text: str, usage: bool | str = True):
        return self.lua.globals().rewrite_body(text, json.dumps("m-up"), usage)


ANTHROPIC = pb.Provider(
    id="default/claude",
    type=pb.ANTHROPIC,
    host="api.anthropic.com",
    port=443,
    tls=True,
    base_path="/v1",
    auth=pb.Auth(header="x-api-key"),
)
CLAUDE_KEY = {"x-api-key": "k"}
# Where the Attempt harness's keyed providers have their key, as the publisher writes it.
KEYS_DIR = tempfile.mkdtemp(prefix="signalbox-keys-")
for _keyed in (KEYED, ANTHROPIC):
    Path(envoygen.credential_file(KEYS_DIR, _keyed.id)).write_text("k")


def test_a_chat_client_on_an_anthropic_backend_is_marked_for_translation_to_its_messages_path():
    hdrs, text, status, _ = Attempt(ANTHROPIC).run(
        "/v1/chat/completions", '{"model":"a","stream":true}', headers=CLAUDE_KEY
    )
    assert status is None
    assert hdrs[":path"] == "/v1/messages" and hdrs[envoygen.TRANSLATE_HEADER] == "openai>anthropic"
    assert hdrs["anthropic-version"] == envoygen.ANTHROPIC_VERSION
    # The model is the backend's; usage is asked for by the translation, not by a chat field.
    assert json.loads(text) == {"model": "m-up", "stream": True}


def test_a_messages_client_on_an_anthropic_backend_passes_as_it_is():
    hdrs, text, _, _ = Attempt(ANTHROPIC).run(
        "/v1/messages",
        '{"model":"a","stream":true,"max_tokens":5}',
        headers={**CLAUDE_KEY, "anthropic-version": "2099-01-01", envoygen.TRANSLATE_HEADER: "stale"},
    )
    assert hdrs[":path"] == "/v1/messages" and envoygen.TRANSLATE_HEADER not in hdrs
    assert hdrs["anthropic-version"] == "2099-01-01"  # the client's own
    assert json.loads(text) == {"model": "m-up", "stream": True, "max_tokens": 5}


def test_a_messages_client_on_an_openai_backend_is_marked_for_translation_to_chat():
    hdrs, text, _, _ = Attempt(OPENAI).run("/v1/messages", '{"model":"a","stream":true,"max_tokens":5}')
    assert hdrs[":path"] == "/openai/v1/chat/completions"
    assert hdrs[envoygen.TRANSLATE_HEADER] == "anthropic>openai"
    assert "stream_options" not in json.loads(text)


def test_a_responses_client_passes_through_to_a_provider_that_serves_the_responses_api():
    native = pb.Provider()
    native.CopyFrom(OPENAI)
    native.type, native.responses_api = pb.OPENAI, True
    hdrs, text, status, _ = Attempt(native).run(
        "/v1/responses", '{"model":"a","input":"hi","stream":true}', headers={envoygen.TRANSLATE_HEADER: "stale"}
    )
    assert status is None and hdrs[":path"] == "/openai/v1/responses" and envoygen.TRANSLATE_HEADER not in hdrs
    assert json.loads(text) == {"model": "m-up", "input": "hi", "stream": True}  # no chat-only stream_options
    # Without the Responses API the same request is translated to chat.
    hdrs, _, _, _ = Attempt(OPENAI).run("/v1/responses", '{"model":"a","input":"hi"}')
    assert hdrs[":path"] == "/openai/v1/chat/completions" and hdrs[envoygen.TRANSLATE_HEADER] == "responses>openai"


def test_token_counting_goes_to_anthropic_backends_only():
    hdrs, _, status, _ = Attempt(ANTHROPIC).run("/v1/messages/count_tokens", '{"model":"a"}', headers=CLAUDE_KEY)
    assert status is None and hdrs[":path"] == "/v1/messages/count_tokens"
    assert envoygen.TRANSLATE_HEADER not in hdrs
    _, _, status, answer = Attempt(OPENAI).run("/v1/messages/count_tokens", '{"model":"a"}')
    assert status == "400"
    assert json.loads(answer)["type"] == "error" and "token counting" in json.loads(answer)["error"]["message"]


def test_openai_only_endpoints_on_an_anthropic_backend_are_a_clean_400():
    _, _, status, answer = Attempt(ANTHROPIC).run("/v1/embeddings", '{"model":"a","input":"x"}', headers=CLAUDE_KEY)
    assert status == "400"
    assert json.loads(answer)["error"]["code"] == "unsupported_feature"


def test_refusals_are_in_the_clients_api():
    _, _, status, answer = Attempt(ANTHROPIC).run("/v1/messages", "[1]", headers=CLAUDE_KEY)
    assert status == "400"
    assert json.loads(answer)["type"] == "error" and json.loads(answer)["error"]["type"] == "invalid_request_error"


def test_path_authority_and_model_are_the_backends():
    headers, text, status, _ = Attempt(OPENAI).run("/v1/chat/completions?x=1", '{"model":"alias","n":1}')
    assert status is None
    assert headers[":path"] == "/openai/v1/chat/completions?x=1"
    assert headers[":authority"] == "api.example.com"
    assert json.loads(text) == {"model": "m-up", "n": 1}


def test_a_failover_attempt_starts_from_the_clients_path_not_the_previous_rewrite():
    """Envoy's request headers are shared by every attempt: `:path` holds the first
    attempt's rewrite (another provider's base path), the client's path is in metadata."""
    headers, _, _, _ = Attempt(KEYED).run(
        "/openai/v1/chat/completions?x=1",
        '{"model":"other"}',
        meta={"path": "/v1/chat/completions?x=1"},
        headers={"x-api-key": "Bearer k"},
    )
    assert headers[":path"] == "/v1/chat/completions?x=1"
    assert headers[":authority"] == "k.example.com:8443"


def test_azure_paths_name_the_deployment_and_carry_the_api_version():
    headers, _, _, _ = Attempt(AZURE, "prod").run("/x", '{"model":"a"}', meta={"path": "/v1/completions?y=2"})
    assert headers[":path"] == "/openai/deployments/prod/completions?y=2&api-version=2024-06-01"
    headers, _, _, _ = Attempt(AZURE, "prod").run("/v1/chat/completions", '{"model":"a"}')
    assert headers[":path"] == "/openai/deployments/prod/chat/completions?api-version=2024-06-01"


def test_a_body_the_router_phase_already_wrote_for_this_backend_is_not_read():
    _, text, status, _ = Attempt(OPENAI).run("/v1/chat/completions", "not json", meta={"body_model": "m-up"})
    assert (text, status) == ("not json", None)
    _, _, status, answer = Attempt(OPENAI).run("/v1/chat/completions", "not json", meta={"body_model": "other"})
    assert status == "400" and json.loads(answer)["error"]["code"] == "invalid_json"


def test_an_attempt_to_a_keyed_provider_without_its_key_is_a_503_the_chain_moves_past(tmp_path):
    attempt = Attempt(KEYED, credentials_dir=str(tmp_path))
    _, _, status, answer = attempt.run("/v1/chat/completions", '{"model":"a"}')
    assert status == "503"  # no file yet
    assert json.loads(answer)["error"]["code"] == "provider_key_unavailable"
    key_file = Path(envoygen.credential_file(str(tmp_path), KEYED.id))
    key_file.write_text("")
    time.sleep(1.05)  # keys are read again at most once a second
    _, _, status, _ = attempt.run("/v1/chat/completions", '{"model":"a"}')
    assert status == "503"  # an empty file: a key that could not be read


def test_the_key_added_is_the_providers_own_from_its_file(tmp_path):
    key_file = Path(envoygen.credential_file(str(tmp_path), KEYED.id))
    key_file.write_text("sk-provider-key")
    attempt = Attempt(KEYED, credentials_dir=str(tmp_path))
    headers, _, status, _ = attempt.run("/v1/chat/completions", '{"model":"a"}', headers={"x-api-key": "client"})
    assert status is None and headers["x-api-key"] == "sk-provider-key"
    key_file.write_text("sk-rotated")
    time.sleep(1.05)
    headers, _, _, _ = attempt.run("/v1/chat/completions", '{"model":"a"}')
    assert headers["x-api-key"] == "sk-rotated"  # a rotated key is in use within a second
    # A keyless provider's attempt carries no key header at all.
    headers, _, status, _ = Attempt(OPENAI, credentials_dir=str(tmp_path)).run("/v1/chat/completions", '{"model":"a"}')
    assert status is None and "x-api-key" not in headers and "authorization" not in headers


def test_streams_ask_for_usage_whatever_the_client_sent():
    attempt = Attempt(OPENAI)
    for body in (
        '{"model":"a","stream":true}',
        '{"stream":true,"model":"a","stream_options":{}}',
        '{"stream_options":{"include_usage":false,"x":1},"stream":true,"model":"a"}',
        '{"model":"a","stream":true,"stream_options":null}',
    ):
        out = json.loads(attempt.rewrite(body))
        assert out["model"] == "m-up" and out["stream_options"]["include_usage"] is True, body
    assert "stream_options" not in json.loads(attempt.rewrite('{"model":"a","stream":false}'))


def test_every_top_level_model_is_replaced_and_nested_ones_are_not():
    """json_to_metadata routed on one of duplicate keys; the provider may read another: all
    of them name the backend's model, so no crafted body reaches a model its alias does not allow."""
    raw = '{"model":"alias","messages":[{"model":"keep","content":"\\"model\\": \\"x\\""}],"model" : "sneaky"}'
    out = Attempt(OPENAI).rewrite(raw)
    pairs = json.loads(out, object_pairs_hook=list)
    assert [v for k, v in pairs if k == "model"] == ["m-up", "m-up"]
    assert json.loads(out)["messages"][0] == {"model": "keep", "content": '"model": "x"'}


@pytest.mark.parametrize(
    "raw, error",
    [
        ('{"mo\\u0064el":"alias"}', "escaped_name"),
        ('{"messages":[]}', "no_model"),
        ("[1,2]", "not_object"),
        ('{"model":"a",}', "not_object"),
        ('{"model":"a"', "not_object"),
    ],
)
def test_bodies_it_cannot_rewrite_safely_are_refused(raw, error):
    text, reason = Attempt(OPENAI).rewrite(raw)
    assert text is None and reason == error


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    members=st.dictionaries(st.text(max_size=8).filter(lambda k: k not in ("stream", "stream_options")), json_values),
    model=json_values,
    stream=st.sampled_from([None, True, False]),
    options=st.sampled_from([None, {}, {"include_usage": False}, {"include_usage": True, "x": 1}]),
    indent=st.sampled_from([None, 0, 2]),
    ensure_ascii=st.booleans(),
)
def test_any_json_object_keeps_every_member_but_model(members, model, stream, options, indent, ensure_ascii):
    body = {**members, "model": model}
    if stream is not None:
        body["stream"] = stream
    if options is not None:
        body["stream_options"] = options
    raw = json.dumps(body, indent=indent, ensure_ascii=ensure_ascii)
    result = Attempt(OPENAI).rewrite(raw)
    if isinstance(result, tuple):  # refused: only for names spelled with escapes
        assert result[1] == "escaped_name" and "\\" in json.dumps(list(body), ensure_ascii=ensure_ascii)
        return
    out = json.loads(result)
    expected = {**body, "model": "m-up"}
    if stream:
        expected["stream_options"] = {**(options or {}), "include_usage": True}
    assert out == expected


@settings(max_examples=300, deadline=None)
@given(
    members=st.dictionaries(st.text(max_size=8).filter(lambda k: k != "stream_options"), json_values, max_size=5),
    options=json_values,
    at=st.integers(min_value=0, max_value=6),
    indent=st.sampled_from([None, 0, 2]),
)
def test_a_provider_that_refuses_stream_options_gets_none_wherever_it_was(members, options, at, indent):
    """`streamUsage: false`: the member is taken out wherever it stands (first, between,
    last, alone), with its comma, and everything else is kept."""
    items = list({**members, "model": "x"}.items())
    items.insert(min(at, len(items)), ("stream_options", options))
    raw = json.dumps(dict(items), indent=indent)
    result = Attempt(OPENAI).rewrite(raw, "drop")
    if isinstance(result, tuple):
        assert result[1] == "escaped_name" and "\\" in json.dumps([k for k, _ in items])
        return
    assert json.loads(result) == {**members, "model": "m-up"}


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60) | st.binary(max_size=60).map(lambda b: b.decode("latin-1")))
def test_arbitrary_text_is_rewritten_or_refused_never_an_error(text):
    result = Attempt(OPENAI).rewrite("{" + text)
    if isinstance(result, tuple):
        assert result[1] in envoygen.ATTEMPT_ERRORS
    else:
        assert isinstance(result, str) and '"m-up"' in result


def test_an_attempt_no_marker_named_is_a_503_the_chain_moves_past():
    """Only when Envoy runs a chain the config no longer describes (a reload in flight)."""
    _, _, status, answer = Attempt(OPENAI).run(
        "/v1/chat/completions", '{"model":"a"}', headers={envoygen.ATTEMPT_HEADER: "default/other/m"}
    )
    assert status == "503" and json.loads(answer)["error"]["code"] == "routing_unavailable"


class Backends:
    """The backends as attempt.lua (`source`) gives them in a Lua state, as in each Envoy
    thread: `backend_of(id)`, and the ids it knows."""

    def __init__(self, source: str):
        self.lua = luajit21.LuaRuntime()
        self.lua.execute(source)
        self.of = self.lua.globals().backend_of

    def __getitem__(self, backend_id: str):
        return self.of(backend_id)

    def ids(self) -> set[str]:
        return set(self.lua.globals().OWN.keys())


def attempt_backends(source: str) -> Backends:
    return Backends(source)


SETTING = st.one_of(st.booleans(), st.text(max_size=12), st.binary(max_size=12).map(lambda b: b.decode("latin-1")))


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=12),
        st.tuples(
            st.fixed_dictionaries(
                {"model": st.text(max_size=12), "model_json": st.text(max_size=12)},
                optional={"api_path": st.text(max_size=12)},
            ),
            st.sampled_from(["openai", "anthropic"]),  # every backend has an API
            st.dictionaries(st.sampled_from(["path", "authority", "key_file", "sanitize"]), SETTING),
        ),
        max_size=8,
    )
)
def test_each_backend_reads_every_setting_it_was_given_whatever_its_provider_shares(backends):
    """BACKENDS keeps what a provider's backends share once (`_backends_table`); each backend
    still reads exactly its own settings, and nothing it was not given."""
    given_settings = {
        backend_id: {"id": backend_id, **own, "api": api, **rest} for backend_id, (own, api, rest) in backends.items()
    }
    table = attempt_backends(envoygen.attempt_source(given_settings))
    for backend_id, setting in given_settings.items():
        entry = table[backend_id]
        for key, value in setting.items():
            assert entry[key] == value
        for key in {"api_path", "path", "authority", "key_file", "sanitize"} - set(setting):
            assert entry[key] is None
    assert table.ids() == set(given_settings)


@settings(max_examples=150, deadline=None)
@given(
    provider_id=st.text(min_size=1, max_size=16),
    models=st.lists(
        st.tuples(st.text(min_size=1, max_size=16), st.one_of(st.none(), st.text(max_size=16))), max_size=6
    ),
    kind=st.sampled_from([pb.OPENAI_COMPATIBLE, pb.GEMINI, pb.BEDROCK, pb.ANTHROPIC]),
)
def test_a_backend_made_from_its_id_reads_what_its_settings_say(provider_id, models, kind):
    """Most backends are one number in the table (their settings follow from their id and
    their provider's: `_follows_from_id`); whichever way a backend is written, attempt.lua's
    entry for it holds exactly what `attempt_settings` says, and an id the config does not
    have is no backend."""
    provider = pb.Provider(id=provider_id, type=kind, host="h.example.com", port=443, tls=True, base_path="/v1")
    backends = {}
    for name, upstream in models:
        b = pb.Backend(id=f"{provider_id}/{name}", provider_id=provider_id, model=name, upstream_model=upstream or name)
        backends[b.id] = b
    given_settings = {b.id: envoygen.attempt_settings(b, provider, "/keys") for b in backends.values()}
    table = attempt_backends(envoygen.attempt_source(given_settings))
    for backend_id, setting in given_settings.items():
        entry = table[backend_id]
        for key, value in setting.items():
            assert entry[key] == value, key
    assert table[f"{provider_id}/not-a-model-of-it"] is None or f"{provider_id}/not-a-model-of-it" in backends


def test_a_providers_backends_share_its_settings_in_the_source():
    """Five models of one provider: its path, authority and key file are written once."""
    provider = KEYED
    backends = [
        pb.Backend(id=f"{provider.id}/m{i}", provider_id=provider.id, model=f"m{i}", upstream_model=f"u{i}")
        for i in range(5)
    ]
    source = envoygen.attempt_source({b.id: envoygen.attempt_settings(b, provider, "/keys") for b in backends})
    assert source.count(envoygen.credential_file("/keys", provider.id)) == 1
    assert source.count("k.example.com:8443") == 1
    table = attempt_backends(source)
    assert [table[b.id].model for b in backends] == [f"u{i}" for i in range(5)]
    assert {table[b.id].key_file for b in backends} == {envoygen.credential_file("/keys", provider.id)}


def test_error_bodies_are_the_gateways_and_every_setting_is_a_safe_lua_literal():
    codes = {e["code"] for e in envoygen.ATTEMPT_ERRORS.values()}
    assert codes == {
        "invalid_json",
        "provider_key_unavailable",
        "routing_unavailable",
        "unsupported_feature",
        "upstream_not_api",
    }
    lua = luajit21.LuaRuntime()
    tricky = 'a"b\\c\n]]--\x00é'
    assert lua.eval(envoygen.lua_literal(tricky)) == tricky


def _relay(attempt: Attempt, chunks: list[str]) -> str:
    """What envoy_on_response passes on for a stream arriving in these chunks."""
    complete_events = attempt.lua.globals().complete_events
    pending, out = "", []
    for chunk in chunks:
        passed, pending = complete_events(pending + chunk)
        out.append(passed)
    return "".join(out)


EVENT = st.builds(
    lambda d: f"data: {json.dumps(d)}\n\n",
    st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=20)), max_size=3),
)
MALFORMED = st.sampled_from(
    [
        'data: {"choices": [{"delta": {"content": \n\n',
        "data: {not json}\n\n",
        'data: {"a": }\n\n',
        "data: [1, 2]\n\n",
        'data: {"a": 1} trailing\n\n',
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(st.tuples(st.booleans(), EVENT, MALFORMED), max_size=8),
    cuts=st.lists(st.integers(0, 4000), max_size=10),
)
def test_a_stream_keeps_every_well_formed_event_and_drops_malformed_ones_however_it_is_chunked(events, cuts):
    good = [event if ok else None for ok, event, _ in events]
    stream = "".join(event if ok else bad for ok, event, bad in events) + "data: [DONE]\n\n"
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(points)]
    assert _relay(Attempt(OPENAI), chunks) == "".join(g for g in good if g) + "data: [DONE]\n\n"


def test_comments_named_events_and_crlf_pass_and_a_partial_last_event_is_not_invented():
    attempt = Attempt(OPENAI)
    stream = ': keep-alive\r\n\r\nevent: message\r\ndata: {"a": 1}\r\n\r\ndata: {"b"'
    assert _relay(attempt, [stream]) == ': keep-alive\r\n\r\nevent: message\r\ndata: {"a": 1}\r\n\r\n'


RESPONSE_HARNESS = """
function(hdrs)
  envoy_on_response(stub_handle(hdrs, nil))
  return notes
end
"""


@pytest.mark.parametrize("traced", [False, True])
def test_an_answer_is_named_by_the_backend_that_gave_it(traced):
    """The last upstream filter names the answering backend (its host's name) on the answer;
    attempt.lua turns that into the provider's and the model's names (the config's, not the
    provider's own model name), replacing what the provider sent, and removes the name. The
    note spans read is written only when spans are exported; the stream relay's answer keeps
    what the attempt it made was told."""
    provider = pb.Provider(id="default/oai", name="oai", host="api.example.com", port=443, tls=True, type=pb.OPENAI)
    b = backend(provider, "gpt-upstream")
    lua = luajit21.LuaRuntime()
    lua.execute(envoygen.attempt_source({b.id: envoygen.attempt_settings(b, provider, "/keys")}, traced=traced))
    lua.execute(HANDLE)
    respond = lua.eval(RESPONSE_HARNESS)
    spoofed = {"x-signalbox-provider": "spoofed", "x-signalbox-model": "spoofed"}
    hdrs = lua.table_from({":status": "200", envoygen.ATTEMPT_HEADER: b.id, **spoofed})
    notes = dict(respond(hdrs))
    assert (hdrs["x-signalbox-provider"], hdrs["x-signalbox-model"]) == ("oai", "m")
    assert hdrs[envoygen.ATTEMPT_HEADER] is None
    assert notes == ({"genai_provider": "openai"} if traced else {})
    unknown = lua.table_from({":status": "200", envoygen.ATTEMPT_HEADER: "default/gone/m", **spoofed})
    respond(unknown)
    assert unknown["x-signalbox-provider"] is None and unknown["x-signalbox-model"] is None
    relayed = lua.table_from({":status": "200", envoygen.ATTEMPT_HEADER: envoygen.contract.RELAY_BACKEND, **spoofed})
    respond(relayed)
    assert relayed["x-signalbox-provider"] == "spoofed" and relayed[envoygen.ATTEMPT_HEADER] is None


PAGE_HARNESS = """
function(hdrs, text, meta)
  local handle = stub_handle(hdrs, meta)
  local body = {text = text}
  function body:getBytes(start, n) return string.sub(self.text, start + 1, start + n) end
  function body:length() return #self.text end
  function body:setBytes(t) self.text = t end
  function handle:body() return body end
  envoy_on_response(handle)
  return body.text
end
"""


def answer_hook(provider: pb.Provider):
    """(a backend of `provider`, LuaJIT with attempt.lua for it, PAGE_HARNESS): the script's
    response hook, as Envoy runs it on an attempt's answer."""
    b = backend(provider)
    lua = luajit21.LuaRuntime()
    lua.execute(envoygen.attempt_source({b.id: envoygen.attempt_settings(b, provider, KEYS_DIR)}))
    lua.execute(HANDLE)
    return b, lua, lua.eval(PAGE_HARNESS)


@pytest.mark.parametrize(("client", "shape"), [("/v1/chat/completions", "error"), ("/v1/messages", "type")])
@pytest.mark.parametrize("provider", [OPENAI, ANTHROPIC])
@pytest.mark.parametrize("ctype", ["text/html", "text/html; charset=utf-8", "application/xhtml+xml"])
def test_a_web_page_for_an_answer_becomes_a_502_the_retry_policy_moves_past(client, shape, provider, ctype):
    """A 2xx web page (a wrong base URL, a proxy's login page) is no answer: it becomes a 502
    in the client's API shape (on the way back the script comes after any translation), marked
    for the retry policy; a JSON answer or a stream is left as it came."""
    b, lua, page = answer_hook(provider)
    hdrs = lua.table_from(
        {":status": "200", "content-type": ctype, "content-length": "88", envoygen.ATTEMPT_HEADER: b.id}
    )
    meta = lua.table_from({envoygen.contract.CLIENT_PATH_KEY: client})
    body = json.loads(page(hdrs, "<!doctype html><html><body>Sign in</body></html>", meta))
    assert hdrs[":status"] == "502" and hdrs[envoygen.contract.RETRY_HEADER] == "not_api"
    assert hdrs["content-type"] == "application/json" and hdrs["content-length"] is None
    assert shape in body and "web page" in json.dumps(body)
    for fine in ("application/json", "text/event-stream"):
        hdrs = lua.table_from({":status": "200", "content-type": fine, envoygen.ATTEMPT_HEADER: b.id})
        assert page(hdrs, '{"id": "x"}') == '{"id": "x"}' and hdrs[":status"] == "200"
    hdrs = lua.table_from({":status": "404", "content-type": "text/html", envoygen.ATTEMPT_HEADER: b.id})
    assert page(hdrs, "<html>Not Found</html>") == "<html>Not Found</html>" and hdrs[":status"] == "404"


@pytest.mark.parametrize(("client", "shape"), [("/v1/chat/completions", "error"), ("/v1/messages", "type")])
@pytest.mark.parametrize("status", ["301", "302", "303", "307", "308"])
def test_a_redirect_becomes_a_502_without_its_location(client, shape, status):
    """A backend's redirect is never passed on: the client's SDK follows redirects, and would
    send the prompt past the gateway to wherever it points. It becomes a 502 in the client's
    API shape with no Location, marked for the retry policy."""
    b, lua, page = answer_hook(OPENAI)
    hdrs = lua.table_from(
        {":status": status, "location": "https://elsewhere.example/v1/chat/completions", envoygen.ATTEMPT_HEADER: b.id}
    )
    meta = lua.table_from({envoygen.contract.CLIENT_PATH_KEY: client})
    body = json.loads(page(hdrs, "", meta))
    assert hdrs[":status"] == "502" and hdrs[envoygen.contract.RETRY_HEADER] == "not_api"
    assert hdrs["location"] is None and hdrs["content-type"] == "application/json"
    assert shape in body and "redirect" in json.dumps(body)
