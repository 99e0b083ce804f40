"""Consumers: compiled into the config as key hashes and JWT matches, identified and authorized
on the request path (extproc.identity), and what a gateway with consumers compiles to."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from signalbox.core import envoygen
from signalbox.core.compiler import compile_config
from signalbox.core.errors import ModelNotAllowed, Unauthenticated
from signalbox.core.keys import generate_key, key_hash
from signalbox.extproc.identity import Identities, authorize, authorize_feedback, visible_aliases
from signalbox.extproc.runtime import RuntimeTable
from signalbox.local import compile_files
from tests.factories import backend, consumer, dump, model, policy, provider

KEY_A, KEY_B = generate_key(), generate_key()
PROVIDERS = [provider("p", "http://127.0.0.1:9", [model("m"), model("n")])]
POLICIES = [
    policy("chat", ["chat"], [backend("p", "m")]),
    policy("code", ["code"], [backend("p", "n")]),
    policy("open", ["open"], [backend("p", "m")], allowAnonymous=True),
]
JWKS = '{"keys": []}'


def compiled(*consumers, keys=None):
    result = compile_config(PROVIDERS, POLICIES, consumers=consumers, key_hashes=keys or {})
    assert result.ok, result.problems
    return result.config


def table(*consumers, keys=None) -> RuntimeTable:
    return RuntimeTable.from_config(compiled(*consumers, keys=keys))


TEAMS = (
    consumer("team-a", apiKey={"env": "A"}, models=["chat"], limits={"requestsPerMinute": 5}),
    consumer("team-b", apiKey={"env": "B"}, policies=["code"]),
    consumer("robots", jwt={"issuer": "https://idp", "jwks": JWKS, "claims": {"groups": "robots"}}),
)
HASHES = {"default/team-a": [(key_hash(KEY_A), 0)], "default/team-b": [(key_hash(KEY_B), 0)]}


def test_consumers_compile_to_hashes_and_matches_and_take_every_policy_off_the_compiled_path():
    without = compile_config(PROVIDERS, POLICIES).config
    assert all(p.compiled for p in without.policies)  # weighted, one backend: Envoy alone
    cfg = compiled(*TEAMS, keys=HASHES)
    assert not any(p.compiled for p in cfg.policies)
    by_id = {c.id: c for c in cfg.consumers}
    assert [k.sha256 for k in by_id["default/team-a"].keys] == [key_hash(KEY_A)]
    assert by_id["default/team-b"].policies == ["default/code"]
    assert by_id["default/team-a"].limits.requests_per_minute == 5
    assert [(p.issuer, p.jwks) for p in cfg.jwt_providers] == [("https://idp", JWKS)]
    # Keys themselves appear nowhere: not in the config, not in what Envoy is given.
    resources = str(envoygen.resources(cfg, envoygen.GatewayOptions()))
    for key in (KEY_A, KEY_B):
        assert key not in cfg.SerializeToString().decode("latin-1") and key not in resources


def test_consumer_problems_name_the_field():
    bad = [
        consumer("x", apiKey={"env": "X"}, models=["nope"], policies=["missing"]),
        consumer("y", jwt={"issuer": "https://idp", "jwks": JWKS, "claims": {"sub": "a"}}),
        consumer("z", jwt={"issuer": "https://idp", "jwks": '{"keys": [1]}', "claims": {"sub": "b"}}),
        consumer("w", team="nobody"),
    ]
    result = compile_config(PROVIDERS, POLICIES, consumers=bad)
    found = {(p.name, p.path, p.reason) for p in result.problems}
    assert ("x", "spec.models[0]", "RefNotFound") in found
    assert ("x", "spec.policies[0]", "RefNotFound") in found
    assert ("z", "spec.jwt", "Invalid") in found
    assert any(p.name == "w" and "apiKey, jwt or both" in p.message for p in result.problems)


def test_local_runs_hash_the_key_named_by_env_or_file_and_say_when_it_is_missing(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY_B + "\n")
    files = tmp_path / "config.yaml"
    files.write_text(
        dump(
            *PROVIDERS,
            *POLICIES,
            consumer("team-a", apiKey={"env": "TEAM_A_KEY"}),
            consumer("team-b", apiKey={"file": str(key_file)}),
        )
    )
    result = compile_files([files], env={"TEAM_A_KEY": KEY_A})
    assert result.ok, result.problems
    assert {c.id: [k.sha256 for k in c.keys] for c in result.config.consumers} == {
        "default/team-a": [key_hash(KEY_A)],
        "default/team-b": [key_hash(KEY_B)],
    }
    missing = compile_files([files], env={})
    assert not missing.ok
    assert [str(p) for p in missing.problems] == [
        "Consumer default/team-a: spec.apiKey: environment variable TEAM_A_KEY holds no key"
    ]


def test_keys_in_any_header_an_sdk_uses_name_their_consumer_and_jwts_match_by_claims():
    ids = table(*TEAMS, keys=HASHES).identities
    assert ids.identify({"authorization": f"Bearer {KEY_A}"}, None, 0).id == "default/team-a"
    assert ids.identify({"x-api-key": KEY_B}, None, 0).id == "default/team-b"
    assert ids.identify({"api-key": KEY_A}, None, 0).id == "default/team-a"
    assert ids.identify({"authorization": f"Basic {KEY_A}"}, None, 0) is None
    assert ids.identify({"authorization": "Bearer sbx-unknown"}, None, 0) is None
    robot = {"iss": "https://idp", "groups": ["staff", "robots"]}
    assert ids.identify({}, robot, 0).id == "default/robots"
    assert ids.identify({}, {"iss": "https://other", "groups": ["robots"]}, 0) is None
    assert ids.identify({}, {"iss": "https://idp", "groups": "staff"}, 0) is None


def test_a_rotated_out_key_works_until_it_expires_and_a_disabled_consumer_has_none():
    old, new = generate_key(), generate_key()
    keys = {"default/team-a": [(key_hash(new), 0), (key_hash(old), 1000)]}
    ids = table(consumer("team-a", apiKey={}), keys=keys).identities
    assert ids.identify({"x-api-key": old}, None, 999).id == "default/team-a"
    assert ids.identify({"x-api-key": old}, None, 1000) is None
    assert ids.identify({"x-api-key": new}, None, 10**10).id == "default/team-a"
    revoked = table(consumer("team-a", apiKey={}, disabled=True), keys=keys).identities
    assert revoked.enabled and revoked.identify({"x-api-key": new}, None, 0) is None


def test_authorize_answers_401_for_anonymous_callers_403_for_what_a_consumer_was_not_given():
    t = table(*TEAMS, keys=HASHES)
    policies = {p.name: p for p in t.policies}
    ids = t.identities
    team_a, team_b = ids.consumers["default/team-a"], ids.consumers["default/team-b"]
    authorize(ids, team_a, policies["chat"], "chat", {})
    with pytest.raises(ModelNotAllowed) as err:
        authorize(ids, team_a, policies["code"], "code", {})
    assert err.value.status == 403 and "may not use model 'code'" in err.value.message
    authorize(ids, team_b, policies["code"], "code", {})  # by policy
    with pytest.raises(Unauthenticated) as missing:
        authorize(ids, None, policies["chat"], "chat", {})
    assert missing.value.status == 401 and "needs an API key" in missing.value.message
    with pytest.raises(Unauthenticated) as invalid:
        authorize(ids, None, policies["chat"], "chat", {"authorization": "Bearer nope"})
    assert "not valid" in invalid.value.message
    authorize(ids, None, policies["open"], "open", {})  # allowAnonymous
    # No consumer declared: everyone is served, as before consumers existed.
    plain = table()
    authorize(plain.identities, None, plain.policies[0], "chat", {})


def test_feedback_is_authorized_as_a_request_to_the_policy_it_teaches():
    t = table(*TEAMS, keys=HASHES)
    ids, policies = t.identities, {p.name: p for p in t.policies}
    team_a, team_b = ids.consumers["default/team-a"], ids.consumers["default/team-b"]
    authorize_feedback(ids, team_a, policies["chat"], t.by_alias, {})
    authorize_feedback(ids, team_b, policies["code"], t.by_alias, {})  # given by policy
    with pytest.raises(ModelNotAllowed, match="may not use policy 'code'"):
        authorize_feedback(ids, team_a, policies["code"], t.by_alias, {})
    with pytest.raises(Unauthenticated):
        authorize_feedback(ids, None, policies["chat"], t.by_alias, {})
    authorize_feedback(ids, None, policies["open"], t.by_alias, {})  # allowAnonymous
    plain = table()
    authorize_feedback(plain.identities, None, plain.policies[0], plain.by_alias, {})


def test_the_models_api_lists_what_each_caller_may_call():
    t = table(*TEAMS, keys=HASHES)
    ids = t.identities
    assert visible_aliases(ids, ids.consumers["default/team-a"], t.by_alias, {}) == ["chat"]
    assert visible_aliases(ids, ids.consumers["default/team-b"], t.by_alias, {}) == ["code"]  # by policy
    assert visible_aliases(ids, ids.consumers["default/robots"], t.by_alias, {}) == ["chat", "code", "open"]
    assert visible_aliases(ids, None, t.by_alias, {}) == ["open"]  # allowAnonymous
    # Without an anonymous policy an anonymous caller is refused as a request would be.
    closed = compile_config(PROVIDERS, POLICIES[:2], consumers=TEAMS, key_hashes=HASHES)
    closed_table = RuntimeTable.from_config(closed.config)
    with pytest.raises(Unauthenticated, match="needs an API key"):
        visible_aliases(closed_table.identities, None, closed_table.by_alias, {})
    with pytest.raises(Unauthenticated, match="not valid"):
        visible_aliases(closed_table.identities, None, closed_table.by_alias, {"x-api-key": "sbx-nope"})
    plain = table()  # no consumer declared: every alias, for everyone
    assert visible_aliases(plain.identities, None, plain.by_alias, {}) == ["chat", "code", "open"]


@given(
    st.dictionaries(st.sampled_from(["authorization", "x-api-key", "api-key", "other"]), st.text(max_size=80)),
    st.one_of(
        st.none(), st.dictionaries(st.text(max_size=8), st.one_of(st.text(), st.integers(), st.lists(st.text())))
    ),
)
def test_identify_takes_any_headers_and_payload_and_names_nobody_without_a_real_key(headers, payload):
    ids = IDENTITIES
    found = ids.identify(headers, payload, 0)
    if found is not None:
        assert found.id == "default/robots" or any(KEY_A in v or KEY_B in v for v in headers.values())


IDENTITIES: Identities = table(*TEAMS, keys=HASHES).identities


def test_with_consumers_envoy_sends_key_headers_checks_jwts_and_never_fails_open():
    def router(cfg, failure_mode="open"):
        listener = envoygen.listener(cfg, envoygen.GatewayOptions(failure_mode=failure_mode))
        filters = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
        return {f["name"]: f["typed_config"] for f in filters}

    plain = router(compiled())
    assert plain["envoy.filters.http.ext_proc"]["failure_mode_allow"] is True  # as configured
    assert "envoy.filters.http.jwt_authn" not in plain
    assert "request.headers['authorization']" not in plain["envoy.filters.http.ext_proc"]["request_attributes"]

    gated = router(compiled(*TEAMS, keys=HASHES))
    ext = gated["envoy.filters.http.ext_proc"]
    assert ext["failure_mode_allow"] is False
    for header in ("authorization", "x-api-key", "api-key"):
        assert f"request.headers['{header}']" in ext["request_attributes"]
    assert ext["metadata_options"]["forwarding_namespaces"] == {"untyped": ["envoy.filters.http.jwt_authn"]}
    jwt_config = gated["envoy.filters.http.jwt_authn"]
    (provider_config,) = jwt_config["providers"].values()
    assert provider_config["issuer"] == "https://idp" and provider_config["local_jwks"] == {"inline_string": JWKS}
    requirements = jwt_config["rules"][0]["requires"]["requires_any"]["requirements"]
    assert {"allow_missing_or_failed": {}} in requirements  # a gateway key in Authorization passes on


def test_with_consumers_the_models_api_is_answered_by_the_ext_proc_for_its_caller():
    def models_routes(cfg) -> dict[str, dict]:
        listener = envoygen.listener(cfg, envoygen.GatewayOptions())
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
        return {r["name"]: r for r in routes if r.get("name", "").startswith("models")}

    plain = models_routes(compiled())
    assert set(plain) == {"models", "models-api"}  # Envoy alone: a direct response and the script
    assert "envoy.filters.http.lua" in plain["models-api"]["typed_per_filter_config"]
    gated = models_routes(compiled(*TEAMS, keys=HASHES))
    assert set(gated) == {"models-api"}
    (ext,) = gated["models-api"]["typed_per_filter_config"].values()
    assert ext["overrides"]["processing_mode"]["request_header_mode"] == "SEND"
