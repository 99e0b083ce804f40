import importlib
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signalbox.core import envoygen
from signalbox.core.compiler import compile_config
from signalbox.core.envoygen import contract
from signalbox.core.envoygen.endpoints import ORIGIN, ORIGIN_MIN_BACKENDS, ORIGIN_SUFFIX
from tests.factories import backend, model, policy, provider
from tests.unit.test_attempt_lua import attempt_backends


def config(strategy="weighted", **spec):
    providers = [
        provider("a", "http://127.0.0.1:9001/v1", [model("m")]),
        provider("b", "https://api.example.com/v1", [model("m")], auth={"env": "B_KEY"}),
    ]
    result = compile_config(
        providers, [policy("p", ["x"], [backend("a", "m"), backend("b", "m", priority=1)], strategy=strategy, **spec)]
    )
    assert result.ok, result.problems
    return result.config


def by_name(items):
    return {i["name"]: i for i in items}


def decided_cluster(route, target):
    """The cluster Envoy sends a request the router phase decided for `target` to by `route`:
    the route's own, or the one its priority group specifier reads from the router phase's
    metadata (contract.TARGET_NS)."""
    action = route["route"]
    if "cluster" in action:
        return action["cluster"]
    plugin = action["inline_cluster_specifier_plugin"]["extension"]
    assert plugin["name"] == "envoy.router.cluster_specifier_plugin.priority_group"
    assert plugin["typed_config"]["override_metadata_namespace"] == envoygen.contract.TARGET_NS
    (group,) = envoygen.contract.target_groups(target)["priority_groups"]  # what the router phase writes
    (cluster,) = group["clusters"]
    return cluster["cluster_name"]


CREDENTIALS = envoygen.GatewayOptions(credentials_dir="/run/keys")


def router_upstream_filters(cfg, opts):
    """The upstream filters every attempt runs: the main listener's router's."""
    hcm = envoygen.listener(cfg, opts)["filter_chains"][0]["filters"][0]["typed_config"]
    router = hcm["http_filters"][-1]
    assert router["name"] == "envoy.filters.http.router"
    return router["typed_config"]["upstream_http_filters"]


def targets(cfg=None):
    """The aggregate cluster of each backend of policy p as first choice (named by its chain)."""
    return [b.target for b in (cfg or config()).policies[0].backends]


def test_one_aggregate_cluster_per_target_in_failover_order():
    clusters = by_name(envoygen.clusters(config(), CREDENTIALS))
    t0, t1 = targets()
    assert t0.startswith("t.default.a.m.2.") and t1.startswith("t.default.b.m.2.")
    agg = clusters[t0]["cluster_type"]["typed_config"]["clusters"]
    assert agg == ["b.default.a.m", "b.default.b.m"]
    assert clusters[t1]["cluster_type"]["typed_config"]["clusters"] == ["b.default.b.m", "b.default.a.m"]
    # No cluster has upstream filters of its own: the router's run for every chain. Protocol
    # options only where they do something (each block costs Envoy memory per cluster): a
    # backend's idle timeout, and nothing on an aggregate.
    assert not any("typed_extension_protocol_options" in c for n, c in clusters.items() if n.startswith("t."))
    for name, cluster in clusters.items():
        if name.startswith("b."):
            (options,) = cluster["typed_extension_protocol_options"].values()
            assert set(options) - {"@type"} == {"common_http_protocol_options", "explicit_http_config"}
    filters = router_upstream_filters(config(), CREDENTIALS)
    assert [f["name"] for f in filters] == [
        "signalbox.attempt_headers",
        "signalbox.attempt_marker",  # names the picked host's backend,
        "signalbox.attempt",  # then one script prepares the attempt (its key included): no Python
        "signalbox.translate",  # skipped unless the backend speaks another API than the client
        "signalbox.strip_gateway_headers_upstream",
        "envoy.filters.http.upstream_codec",
    ]
    lua = filters[2]["typed_config"]["default_source_code"]["inline_string"]
    assert "OWN = " in lua and '["default/a/m"]' in lua and '["default/b/m"]' in lua
    translate = filters[3]["typed_config"]
    assert translate["extension_config"]["name"] == "envoy.filters.http.ext_proc"
    (skip,) = translate["xds_matcher"]["matcher_list"]["matchers"]
    header = skip["predicate"]["not_matcher"]["single_predicate"]["input"]["typed_config"]["header_name"]
    assert header == envoygen.TRANSLATE_HEADER  # skipped when attempt.lua did not mark the attempt
    # It runs after attempt.lua added the key: no header but the path goes to Python.
    forward = translate["extension_config"]["typed_config"]["forward_rules"]
    assert forward == {"allowed_headers": {"patterns": [{"exact": ":path"}]}}
    removed = [m["remove"] for m in filters[4]["typed_config"]["mutations"]["request_mutations"]]
    assert sorted(removed) == sorted(envoygen.GATEWAY_HEADERS)


def test_the_routes_name_the_config_they_were_made_from_for_the_router_phase():
    """Envoy keeps the routes a request arrived under; the router phase decides it by their
    config (TableHolder.for_routes), which it reads in the virtual host's name, sent to it as
    an attribute."""
    providers = [provider("a", "http://127.0.0.1:9001/v1", [model("m")]), provider("b", "http://b:1/v1", [model("m")])]
    names = set()
    for member in ("a", "b"):
        cfg = compile_config(providers, [policy("p", ["x"], [backend(member, "m")], strategy="cost")]).config
        hcm = envoygen.listener(cfg, envoygen.GatewayOptions())["filter_chains"][0]["filters"][0]["typed_config"]
        (host,) = hcm["route_config"]["virtual_hosts"]
        assert contract.routes_key_of(host["name"]) == contract.routes_key(cfg)
        names.add(host["name"])
        extproc = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")
        assert contract.VIRTUAL_HOST_ATTRIBUTE in extproc["typed_config"]["request_attributes"]
    assert len(names) == 2
    assert contract.routes_key_of(contract.virtual_host_name("")) == ""


def test_a_change_no_route_depends_on_leaves_the_routes_as_they_were():
    """A model's quality decides in the router phase only: the config changes, its routes (and
    the name they carry for the router phase) do not, so Envoy is not made to read them again."""

    def routes(quality: float):
        providers = [provider("a", "http://127.0.0.1:9001/v1", [model("m", quality=quality)])]
        cfg = compile_config(providers, [policy("p", ["x"], [backend("a", "m")], strategy="cost")]).config
        hcm = envoygen.listener(cfg, envoygen.GatewayOptions())["filter_chains"][0]["filters"][0]["typed_config"]
        return cfg, hcm["route_config"]

    (before, before_routes), (after, after_routes) = routes(0.5), routes(0.9)
    assert before.content_hash != after.content_hash
    assert contract.routes_key(before) == contract.routes_key(after)
    assert before_routes == after_routes


def test_policies_with_the_same_chain_share_its_aggregate_and_keep_their_own_routes():
    providers = [provider("a", "http://127.0.0.1:9001/v1", [model("m")]), provider("b", "http://b:1/v1", [model("m")])]
    chain = [backend("a", "m"), backend("b", "m", priority=1)]
    cfg = compile_config(
        providers,
        [policy(f"p{i}", [f"x{i}"], chain, strategy="cost", timeoutMs=1000 * (i + 1)) for i in range(50)],
    ).config
    assert {tuple(b.target for b in p.backends) for p in cfg.policies} == {tuple(targets(cfg))}
    clusters = envoygen.clusters(cfg, CREDENTIALS)
    assert len(clusters) == 2 + 2  # two backends, two chains (a then b, b then a): not 100
    hcm = envoygen.listener(cfg, envoygen.GatewayOptions())["filter_chains"][0]["filters"][0]["typed_config"]
    routes = by_name(hcm["route_config"]["virtual_hosts"][0]["routes"])
    t0 = targets(cfg)[0]
    # A route per policy whose action is its own (here every policy's budget differs), not
    # per policy and chain: each policy's own settings.
    assert routes["default/p7:decided"]["route"]["timeout"] == "8.000s"
    assert decided_cluster(routes["default/p7:decided"], t0) == t0
    assert not [name for name in routes if ":t." in name]
    # The first policy's action is as common as any: its route matches any decided target.
    assert routes["decided"]["route"]["timeout"] == "1.000s"
    assert routes["decided"]["match"]["dynamic_metadata"] == [
        {"filter": "signalbox", "path": [{"key": "target"}], "value": {"present_match": True}}
    ]
    names = [r["name"] for r in hcm["route_config"]["virtual_hosts"][0]["routes"]]
    assert names.index("default/p7:decided") < names.index("decided")  # the policy's own first


def test_every_attempt_loses_every_key_header_then_gets_its_providers_key_from_envoy():
    """Keys never pass through the ext_proc: every attempt first loses all key headers (the
    client's too), then one marker names the picked host's backend (its host's name, after
    removing any client copy), then attempt.lua adds that backend's provider's key, read from
    the provider's file; no key is in Envoy's config."""
    filters = router_upstream_filters(config(), CREDENTIALS)
    strip, marker, attempt = filters[:3]
    removed = [m["remove"] for m in strip["typed_config"]["mutations"]["request_mutations"] if "remove" in m]
    assert {"authorization", "api-key"} <= set(removed)
    assert marker == envoygen.attempt_marker()
    mutations = marker["typed_config"]["mutations"]["request_mutations"]
    assert mutations[0] == {"remove": envoygen.ATTEMPT_HEADER}
    assert mutations[1]["append"]["header"] == {
        "key": envoygen.ATTEMPT_HEADER,
        "value": "%UPSTREAM_HOST_NAME%",
    }
    lua = attempt["typed_config"]["default_source_code"]["inline_string"]
    assert envoygen.credential_file("/run/keys", "default/b") in lua  # b's key comes from its file
    assert "default/a" not in envoygen.credential_file("/run/keys", "default/b")
    assert '["key_file"] = ""' in lua  # a is keyless
    assert not any("credential" in json.dumps(f) for f in filters)  # no SDS, no injector
    # Providers never see the marker's header.
    assert envoygen.ATTEMPT_HEADER in envoygen.GATEWAY_HEADERS


def test_clients_cannot_send_gateway_headers():
    listener = envoygen.listener(config(), envoygen.GatewayOptions())
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    first = hcm["http_filters"][0]
    assert first["name"] == "signalbox.strip_client_gateway_headers"
    removed = [m["remove"] for m in first["typed_config"]["mutations"]["request_mutations"]]
    assert envoygen.PATH_HEADER in removed
    # The client's path, kept for every attempt's rewrite (the header map is shared by attempts),
    # once the Lua routes' scripts (off but on their own routes) have made an Azure client's
    # path the gateway's own.
    lua, kept = hcm["http_filters"][1:3]
    assert lua["name"] == "envoy.filters.http.lua" and lua["disabled"] is True
    assert kept == envoygen.client_path_filter()


def test_backend_cluster_carries_its_backend_id_tls_and_outlier_detection():
    clusters = by_name(envoygen.clusters(config(), envoygen.GatewayOptions()))
    b = clusters["b.default.b.m"]
    (host,) = b["load_assignment"]["endpoints"][0]["lb_endpoints"]
    # The host's name is the backend's id (what the marker, logs and spans read); no metadata.
    assert host["endpoint"]["hostname"] == "default/b/m" and "metadata" not in host
    assert b["transport_socket"]["typed_config"]["sni"] == "api.example.com"
    assert "transport_socket" not in clusters["b.default.a.m"]
    assert b["outlier_detection"]["consecutive_5xx"] > 0


def idle_timeout(cluster):
    options = cluster.get("typed_extension_protocol_options", {})
    http = options.get("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
    return http and http["common_http_protocol_options"]["idle_timeout"]


# Keep-alive timeouts of servers providers run on: a connection idle this long is closed by the
# server, so Envoy must close its own first (uvicorn: vLLM, SGLang, LiteLLM; llama.cpp's server;
# AWS's application load balancer, in front of many hosted APIs).
PLAIN_SERVER_KEEPALIVE_MS = 5000
HOSTED_LOAD_BALANCER_IDLE_MS = 60000


@pytest.mark.parametrize("ads", [False, True])
def test_backend_connections_close_before_the_servers_would_and_only_backends_carry_protocol_options(ads):
    """Envoy keeps an idle upstream connection for an hour by default, one pool per backend
    cluster per Envoy worker. A server that closes an idle connection first can do so as Envoy
    hands it a request, which then fails unanswered: a backend's cluster closes its idle
    connections before the servers of its scheme would (plain HTTP: self-hosted; HTTPS: hosted),
    or after its provider's `idleTimeoutMs`. Aggregates open no connection of their own and
    carry nothing (each options block costs Envoy memory per cluster)."""
    clusters = by_name(envoygen.clusters(config(), envoygen.GatewayOptions(ads=ads)))
    plain, tls = idle_timeout(clusters["b.default.a.m"]), idle_timeout(clusters["b.default.b.m"])
    assert float(plain.removesuffix("s")) * 1000 < PLAIN_SERVER_KEEPALIVE_MS
    assert float(tls.removesuffix("s")) * 1000 < HOSTED_LOAD_BALANCER_IDLE_MS
    for name in targets():
        assert "typed_extension_protocol_options" not in clusters[name]

    providers = [provider("a", "http://127.0.0.1:9001/v1", [model("m")], idleTimeoutMs=1500)]
    result = compile_config(providers, [policy("p", ["x"], [backend("a", "m")])])
    assert result.config is not None, result.problems
    (backend_cluster,) = [
        c for c in envoygen.clusters(result.config, envoygen.GatewayOptions(ads=ads)) if c["name"].startswith("b.")
    ]
    assert idle_timeout(backend_cluster) == "1.500s"


def test_the_many_backends_of_one_tls_endpoint_share_one_origin():
    """One TLS context for an endpoint many backends reach, not one per backend (about 265 KB
    of Envoy each with the system CA bundle): every model of every provider naming one host,
    port and connect timeout reaches the same internal listener, whose one TLS cluster checks
    the host's name. An endpoint fewer backends reach keeps a TLS cluster per backend (the hop
    costs each request: envoygen.origins)."""
    n = ORIGIN_MIN_BACKENDS
    models = [f"m{i}" for i in range(n)]
    providers = [
        provider("a", "https://api.example.com/v1", [model(m) for m in models[:-1]]),
        provider("b", "https://api.example.com/v1", [model("m0")]),
        provider("c", "https://api.example.com:8443/v1", [model(m) for m in models]),
        provider("d", "https://api.example.com/v1", [model(m) for m in models[:-1]], connectTimeoutMs=500),
        provider("alone", "https://other.example.org/v1", [model("m0")]),
        provider("plain", "http://127.0.0.1:9001/v1", [model(m) for m in models]),
    ]
    refs = [backend(p["metadata"]["name"], m["name"]) for p in providers for m in p["spec"]["models"]]
    result = compile_config(providers, [policy("p", ["x"], refs)])
    assert result.ok, result.problems
    shared = {"a": True, "b": True, "c": True, "d": False, "alone": False, "plain": False}
    for ads in (False, True):
        opts = envoygen.GatewayOptions(ads=ads, upstream_ca_file="/etc/private-ca.pem")
        docs = envoygen.resources(result.config, opts)
        clusters = by_name(docs["cds.json"]["resources"])
        origins = {n: c for n, c in clusters.items() if n.startswith("origin.")}
        assert len(origins) == 2  # a and b share one; c's port is another
        for origin in origins.values():
            tls = origin["transport_socket"]["typed_config"]
            assert tls["common_tls_context"]["validation_context"]["trusted_ca"] == {"filename": "/etc/private-ca.pem"}
            (host,) = origin["load_assignment"]["endpoints"][0]["lb_endpoints"]
            assert tls["sni"] == host["endpoint"]["address"]["socket_address"]["address"] == "api.example.com"
        listeners = {item["name"]: item for item in docs["lds.json"]["resources"] if "internal_listener" in item}
        # Besides the origins, the listener a resting backend's second host names (over ADS).
        assert (listeners.pop(envoygen.contract.RESTING_LISTENER, None) is not None) == ads
        assert set(listeners) == set(origins)
        for name, internal in listeners.items():
            (chain,) = internal["filter_chains"]
            (proxy,) = chain["filters"]
            assert proxy["typed_config"]["cluster"] == name
        for b in result.config.backends:
            cluster = clusters[b.cluster]
            via_origin = shared[b.provider_id.split("/")[1]]
            tls_of_its_own = "transport_socket" in cluster
            assert tls_of_its_own == (not via_origin and b.provider_id != "default/plain")
            # Its resting listener's host is reached in plain text (ADS sends it that host).
            assert ("transport_socket_matches" in cluster) == (tls_of_its_own and ads)
            if ads:
                service = cluster["eds_cluster_config"].get("service_name", b.cluster)
                reach = "/origin" if via_origin else "" if b.provider_id == "default/plain" else "/tls"
                assert service == b.cluster + reach  # a resource per way of reaching (endpoints)
            else:
                (host,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
                assert ("envoy_internal_address" in host["endpoint"]["address"]) == via_origin
                assert cluster["type"] == ("STATIC" if via_origin else "STRICT_DNS")
    boot = envoygen.bootstrap(envoygen.GatewayOptions(), "/cfg")
    assert envoygen.INTERNAL_LISTENER_EXTENSION in boot["bootstrap_extensions"]


def test_a_backend_crossing_over_to_its_origin_is_never_given_the_providers_address():
    """The backend whose endpoint reaches ORIGIN_MIN_BACKENDS backends becomes a plain cluster.
    Over ADS it asks for another resource than its TLS cluster did, one whose assignment names
    the origin's listener and nothing else whatever addresses are known: Envoy holding the new
    cluster with the old assignment (they arrive apart) would send a request in clear text to
    the provider's TLS port."""
    from signalbox.core.envoygen.endpoints import BackendEndpoint

    def first_backend(count):
        models = [model(f"m{i}") for i in range(count)]
        compiled = compile_config([provider("a", "https://api.example.com/v1", models)], [])
        assert compiled.ok, compiled.problems
        b = next(b for b in compiled.config.backends if b.model == "m0")
        cluster = by_name(envoygen.clusters(compiled.config, envoygen.GatewayOptions(ads=True)))[b.cluster]
        return compiled.config, b, cluster

    _, before_backend, before = first_backend(ORIGIN_MIN_BACKENDS - 1)
    cfg, after_backend, after = first_backend(ORIGIN_MIN_BACKENDS)
    assert "transport_socket" in before
    assert before["eds_cluster_config"]["service_name"] == before_backend.cluster + "/tls"
    assert "transport_socket" not in after
    service = after["eds_cluster_config"]["service_name"]
    assert service == after_backend.cluster + ORIGIN_SUFFIX
    endpoint = BackendEndpoint.of(after_backend, cfg.providers[0])
    assignment = endpoint.load_assignment(["10.0.0.1"], reach=ORIGIN)
    assert assignment["cluster_name"] == service
    assert "socket_address" not in json.dumps(assignment) and "10.0.0.1" not in json.dumps(assignment)


@pytest.mark.parametrize(
    "strategy,chains", [("failover", 1), ("fastest", 1), ("weighted", 2), ("round-robin", 2), ("cost", 2)]
)
def test_only_chains_a_route_can_use_get_an_aggregate(strategy, chains):
    """A compiled failover policy is sent to its first chain only (which skips what is
    unhealthy): the chains that start with its later backends would be clusters nothing uses
    (2,000 of the 10,000 aggregates at the 2,000-policy fleet, bench/README.md)."""
    cfg = config(strategy)
    aggregates = [c for c in envoygen.clusters(cfg, CREDENTIALS) if c["name"].startswith("t.")]
    assert len(aggregates) == chains
    hcm = envoygen.listener(cfg, envoygen.GatewayOptions())["filter_chains"][0]["filters"][0]["typed_config"]
    routed = json.dumps(hcm["route_config"])
    if strategy == "cost":
        # Decided: a target the router phase can pick (its cluster comes with the decision).
        assert {a["name"] for a in aggregates} == {b.target for p in cfg.policies for b in p.backends if b.target}
    else:
        # Compiled: the chains its route walks (by their members; a request the router phase
        # decides for it anyway goes to one of these aggregates, asked for then).
        assert {a["name"] for a in aggregates} == {t for t, _ in envoygen.contract.compiled_split(cfg.policies[0])}
        assert all(b.cluster in routed for a in aggregates for b in envoygen.chain_members(cfg)[a["name"]])


def test_a_compiled_policy_decided_anyway_goes_where_envoy_sends_it():
    """A compiled policy's request the router phase decided (an alias Envoy's JSON reader did
    not read, or a canary's candidate) goes by the decided route, to one of the policy's
    chains by the same weights as Envoy's own split, with the same retries: the router phase
    passes the policy's split on (contract.SPLIT_KEY), and no route is the policy's alone."""
    cfg = config("weighted")
    cfg.policies[0].backends[0].weight, cfg.policies[0].backends[1].weight = 3, 1
    hcm = envoygen.listener(cfg, envoygen.GatewayOptions())["filter_chains"][0]["filters"][0]["typed_config"]
    (host,) = hcm["route_config"]["virtual_hosts"]
    routes = by_name(host["routes"])
    compiled = routes["compiled:default/p:x"]
    decided = routes["decided"]
    split = envoygen.contract.compiled_split(cfg.policies[0])
    (group,) = envoygen.contract.target_groups("ignored", envoygen.contract.split_text(split))["priority_groups"]
    assert [(c["cluster_name"], c["weight"]) for c in group["clusters"]] == split
    assert sorted(c["weight"] for c in group["clusters"]) == [1, 3]
    # Envoy's own route walks the same chains by the same weights, member by member.
    members = {t: [b.cluster for b in chain] for t, chain in envoygen.chain_members(cfg).items()}
    walked = compiled["route"]["inline_cluster_specifier_plugin"]["extension"]["typed_config"]["priority_groups"]
    assert walked == envoygen.contract.chain_groups(split, members)
    # The same retries, but for how a retry finds the next backend (the aggregate's next
    # priority, or the route's next group).
    by_aggregate, by_groups = envoygen.retry_policy_of(host, decided), envoygen.retry_policy_of(host, compiled)
    assert by_aggregate.pop("retry_priority") and by_groups.pop("refresh_cluster_on_retry") is True
    assert by_aggregate == by_groups
    assert not [name for name in routes if name.startswith("default/p:")]


def test_the_router_phase_writes_the_groups_the_contract_says():
    """The router phase writes a decision's groups field by field (contract.put_target_groups,
    4 us a request); Envoy's specifier reads them as `target_groups` says."""
    from google.protobuf import json_format, struct_pb2

    for target, split in (("t.a", ""), ("t.a", "t.a=3,t.b=1"), ("t.x", "t.y=1")):
        written = struct_pb2.Struct()
        envoygen.contract.put_target_groups(written, target, split)
        assert json_format.MessageToDict(written) == envoygen.contract.target_groups(target, split)


def test_a_policys_deadlines_become_the_attempts_timeouts():
    cfg = config("cost")  # decided: the policy's route, its target from the router phase
    cfg.policies[0].per_try_timeout_ms, cfg.policies[0].idle_timeout_ms, cfg.policies[0].timeout_ms = 1500, 800, 9000
    hcm = envoygen.listener(cfg, envoygen.GatewayOptions())["filter_chains"][0]["filters"][0]["typed_config"]
    (host,) = hcm["route_config"]["virtual_hosts"]
    route = by_name(host["routes"])["decided"]
    assert route["route"]["timeout"] == "9.000s"
    retry = envoygen.retry_policy_of(host, route)
    assert retry["per_try_timeout"] == "1.500s"
    assert retry["per_try_idle_timeout"] == "0.800s"


def test_routes_retry_on_failures_and_move_to_next_priority():
    cfg = config("cost")  # decided: the policy's route, its target from the router phase
    lds = envoygen.listener(cfg, envoygen.GatewayOptions())
    hcm = lds["filter_chains"][0]["filters"][0]["typed_config"]
    (host,) = hcm["route_config"]["virtual_hosts"]
    routes = by_name(host["routes"])
    t0 = targets(cfg)[0]
    retry = envoygen.retry_policy_of(host, routes["decided"])
    retry_on = {"5xx", "reset", "connect-failure", "retriable-status-codes", "retriable-headers"}
    assert set(retry["retry_on"].split(",")) == retry_on
    # attempt.lua marks a refusal worth the next backend (a prompt too long for this one's window).
    assert retry["retriable_headers"] == [{"name": "x-signalbox-retry", "present_match": True}]
    assert hcm["route_config"]["response_headers_to_remove"] == ["x-signalbox-retry"]
    # 429 and a rejected key (401/403) move on too: the next backend has its own limits and key.
    assert retry["retriable_status_codes"] == [401, 403, 429] and retry["num_retries"] == 1
    assert retry["retry_priority"]["name"] == "envoy.retry_priorities.previous_priorities"
    # A backend that failed or timed out is not tried again within the request.
    assert [p["name"] for p in retry["retry_host_predicate"]] == ["envoy.retry_host_predicates.previous_hosts"]
    assert "per_try_idle_timeout" not in retry  # no silence deadline unless the policy sets one
    # The one decided policy's action is the commonest: its route takes any decided target.
    (target,) = routes["decided"]["match"]["dynamic_metadata"]
    assert target == {"filter": "signalbox", "path": [{"key": "target"}], "value": {"present_match": True}}
    assert decided_cluster(routes["decided"], t0) == t0
    # Every attempt, the first included, is prepared by the aggregate cluster's attempt.lua.
    assert "regex_rewrite" not in routes["decided"]["route"]
    assert "request_headers_to_add" not in routes["decided"]
    # Bodyless requests are Envoy's to answer: they never reach the ext_proc.
    assert (
        json.loads(__import__("base64").b64decode(routes["models"]["direct_response"]["body"]["inline_bytes"]))["data"][
            0
        ]["id"]
        == "x"
    )
    assert routes["empty:/v1/chat/completions"]["direct_response"]["status"] == 400
    assert routes["method:/v1/chat/completions"]["direct_response"]["status"] == 404
    assert routes["unknown-path"]["direct_response"]["status"] == 404


def test_fastest_hedges_after_delay():
    lds = envoygen.listener(config("fastest", hedge={"delayMs": 250}), envoygen.GatewayOptions())
    (host,) = lds["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"]
    route = next(r for r in host["routes"] if r["name"].startswith("compiled:"))
    assert route["route"]["hedge_policy"] == {"hedge_on_per_try_timeout": True}
    assert envoygen.retry_policy_of(host, route)["per_try_timeout"] == "0.250s"


def test_fail_open_routes_unrouted_requests_instead_of_refusing():
    opts = envoygen.GatewayOptions(failure_mode="open")
    lds = envoygen.listener(config(), opts)
    hcm = lds["filter_chains"][0]["filters"][0]["typed_config"]
    assert by_name(hcm["http_filters"])["envoy.filters.http.ext_proc"]["typed_config"]["failure_mode_allow"] is True
    assert hcm["route_config"]["virtual_hosts"][0]["routes"][-1]["route"]["cluster"] == targets()[0]


def test_what_routes_share_is_said_once_on_the_virtual_host():
    """Issue 12: each decided route repeated the answer headers and the retry policy (1.7 KB of
    its 2.2 KB at the 2,000-policy fleet). Said once, what each route gets must not change."""
    providers = [provider("a", "http://127.0.0.1:9001/v1", [model("m")]), provider("b", "http://b:1/v1", [model("m")])]
    chain = [backend("a", "m"), backend("b", "m", priority=1)]
    cfg = compile_config(
        providers,
        [
            policy("common1", ["x"], chain, strategy="cost"),
            policy("common2", ["y"], chain, strategy="cost"),
            policy("own", ["z"], chain, strategy="cost"),
        ],
    ).config
    cfg.policies[2].per_try_timeout_ms = 700
    hcm = envoygen.listener(cfg, envoygen.GatewayOptions(failure_mode="open"))["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    (host,) = hcm["route_config"]["virtual_hosts"]
    routes = [r for r in host["routes"] if r["name"].startswith("default/") or r["name"] == "decided"]
    # One for the two policies with the same action, one for the third, whatever their chains.
    assert [r["name"] for r in routes] == ["default/own:decided", "decided"]
    # Who answered and why: on the virtual host, and no longer on each route.
    said = {h["header"]["key"]: h["header"]["value"] for h in host["response_headers_to_add"]}
    assert "x-signalbox-provider" not in said  # attempt.lua's, per attempt
    assert said["x-signalbox-decision"] == "%DYNAMIC_METADATA(signalbox:decision)%"
    assert not any("response_headers_to_add" in r for r in routes)
    # A refusal's own reason header (and a compiled route's decision) beats the virtual host's.
    assert hcm["route_config"]["most_specific_header_mutations_wins"] is True
    # The common retry policy once, on the virtual host; a route with another keeps its own,
    # whole. (Here the two routes' policies are equally common: the first counted is said once.)
    own, shared = by_name(routes)["default/own:decided"], by_name(routes)["decided"]
    assert sum("retry_policy" in r["route"] for r in (own, shared)) == 1
    assert envoygen.retry_policy_of(host, own)["per_try_timeout"] == "0.700s"
    assert "per_try_timeout" not in envoygen.retry_policy_of(host, shared)
    assert envoygen.retry_policy_of(host, own)["retry_on"] == envoygen.retry_policy_of(host, shared)["retry_on"]
    # A route that had no retry policy (failing open) does not inherit one.
    fail_open = by_name(host["routes"])["fail-open"]
    assert envoygen.retry_policy_of(host, fail_open) == {"num_retries": 0}


def test_backend_clusters_keep_only_the_stats_that_are_read():
    """Issue 12: ~140 stats per backend cluster were 335 MB of Envoy's memory at 10,000
    backends. What dashboards and the fault tests read stays; pool and balancer internals go."""
    import re

    patterns = envoygen.bootstrap(envoygen.GatewayOptions(), "/cfg")["stats_config"]["stats_matcher"]
    dropped = patterns["exclusion_list"]["patterns"]
    regexes = [re.compile(p["safe_regex"]["regex"]) for p in dropped if "safe_regex" in p]
    prefixes = [p["prefix"] for p in dropped if "prefix" in p]

    def kept(stat):
        return not any(stat.startswith(p) for p in prefixes) and not any(r.match(stat) for r in regexes)

    backend = "cluster.b.default.p.gpt-4.1"
    for stat in (
        "upstream_rq_total",
        "upstream_rq_completed",
        "upstream_rq_5xx",  # the dashboard's errors by backend
        "upstream_rq_503",
        "upstream_rq_time",
        "upstream_rq_timeout",
        "upstream_rq_per_try_timeout",
        "upstream_cx_connect_fail",
        "membership_healthy",  # a rest reaching Envoy (bench.scale rest_to_envoy)
        "outlier_detection.ejections_active",  # circuit breaking
        "outlier_detection.ejections_enforced_total",
    ):
        assert kept(f"{backend}.{stat}"), stat
    for stat in (
        "upstream_cx_total",
        "upstream_cx_rx_bytes_total",
        "lb_healthy_panic",
        "circuit_breakers.default.rq_open",
        "version_text",  # EDS subscription internals
        "init_fetch_timeout",
    ):
        assert not kept(f"{backend}.{stat}"), stat
    # Aggregates keep none; Envoy's own clusters (the ext_proc's) keep all.
    assert not kept("cluster.t.default.p.gpt-4.1.2.abc.upstream_rq_total")
    assert kept(f"cluster.{envoygen.EXTPROC_CLUSTER}.upstream_cx_connect_fail")
    assert kept(f"cluster.{envoygen.EXTPROC_CLUSTER}.upstream_cx_total")


def test_generated_resources_hold_no_key_values(monkeypatch):
    monkeypatch.setenv("B_KEY", "sk-very-secret")
    text = json.dumps(envoygen.resources(config(), envoygen.GatewayOptions()))
    assert "sk-very-secret" not in text


def test_bootstrap_watches_files_and_uses_unix_socket_for_extproc():
    opts = envoygen.GatewayOptions(extproc_sockets=("/run/sb-0.sock", "/run/sb-1.sock"))
    boot = envoygen.bootstrap(opts, "/cfg")
    # Each resource file in a folder of its own: Envoy re-reads every file whose folder saw a
    # move, and a new route table must not make it parse the clusters again (issue 12).
    dynamic = boot["dynamic_resources"]
    assert dynamic["lds_config"]["path_config_source"] == {
        "path": "/cfg/lds/lds.json",
        "watched_directory": {"path": "/cfg/lds"},
    }
    assert dynamic["cds_config"]["path_config_source"]["watched_directory"] == {"path": "/cfg/cds"}
    # The routes are a resource of their own (RDS): a policy change leaves the listener alone.
    files = envoygen.resources(config(), opts, "/cfg")
    assert list(files) == ["cds.json", "lds.json", "rds.json"]
    hcm = files["lds.json"]["resources"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert "route_config" not in hcm
    assert hcm["rds"]["config_source"]["path_config_source"]["watched_directory"] == {"path": "/cfg/rds"}
    (table,) = files["rds.json"]["resources"]
    assert table["name"] == hcm["rds"]["route_config_name"]
    assert (
        table["virtual_hosts"][0]["routes"]
        == envoygen.listener(config(), opts)["filter_chains"][0]["filters"][0]["typed_config"]["route_config"][
            "virtual_hosts"
        ][0]["routes"]
    )
    endpoints = boot["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"] for e in endpoints] == [
        {"pipe": {"path": "/run/sb-0.sock"}},
        {"pipe": {"path": "/run/sb-1.sock"}},
    ]


def test_accounting_reads_usage_in_envoy_and_reports_it_through_the_access_log_only_when_on():
    def hcm(opts):
        return envoygen.listener(config(), opts)["filter_chains"][0]["filters"][0]["typed_config"]

    on = hcm(envoygen.GatewayOptions())
    names = [f["name"] for f in on["http_filters"]]
    # On the response path filters run in reverse: the router, the SSE reader, the JSON reader.
    assert names[-2:] == ["signalbox.sse_usage", "envoy.filters.http.router"]
    assert names.index("signalbox.json") < names.index("signalbox.sse_usage")
    json_rules = by_name(on["http_filters"])["signalbox.json"]["typed_config"]["response_rules"]["rules"]
    sse_rules = on["http_filters"][-2]["typed_config"]["response_rules"]["content_parser"]["typed_config"]["rules"]
    assert [r["rule"] for r in sse_rules] == json_rules
    # OpenAI's usage, then Anthropic's (answers and message_delta, and message_start's input),
    # then the Responses API's completed event.
    assert [([s["key"] for s in r["selectors"]], r["on_present"]["key"]) for r in json_rules] == [
        (["usage", "prompt_tokens"], "prompt_tokens"),
        (["usage", "completion_tokens"], "completion_tokens"),
        (["usage", "input_tokens"], "prompt_tokens"),
        (["usage", "output_tokens"], "completion_tokens"),
        (["message", "usage", "input_tokens"], "prompt_tokens"),
        (["response", "usage", "input_tokens"], "prompt_tokens"),  # Responses' stream
        (["response", "usage", "output_tokens"], "completion_tokens"),
        # Cached input (token limits that leave it out, or count Anthropic's in).
        (["usage", "prompt_tokens_details", "cached_tokens"], "cached_tokens"),
        (["usage", "input_tokens_details", "cached_tokens"], "cached_tokens"),
        (["response", "usage", "input_tokens_details", "cached_tokens"], "cached_tokens"),
        (["usage", "cache_read_input_tokens"], "cache_read_tokens"),
        (["message", "usage", "cache_read_input_tokens"], "cache_read_tokens"),
    ]
    (access_log,) = on["access_log"]
    common = access_log["typed_config"]["common_config"]
    assert common["grpc_service"]["envoy_grpc"] == {"cluster_name": envoygen.EXTPROC_CLUSTER}
    assert common["buffer_flush_interval"] == "0.100s"
    tag, compiled = common["custom_tags"]  # the endpoint that answered, after any failover
    assert tag == {"tag": "backend", "value": "%UPSTREAM_HOST_NAME%"}
    assert compiled["tag"] == envoygen.COMPILED_POLICY_TAG and "route" in compiled["metadata"]["kind"]
    either = [f["metadata_filter"]["matcher"]["path"] for f in access_log["filter"]["or_filter"]["filters"]]
    assert either == [[{"key": "decision"}], [{"key": envoygen.ALIAS_KEY}]]

    off = hcm(envoygen.GatewayOptions(accounting=False))
    assert "signalbox.sse_usage" not in [f["name"] for f in off["http_filters"]] and off["access_log"] == []


def test_the_request_log_is_one_json_line_per_request_without_request_headers_but_the_id():
    def hcm(opts):
        return envoygen.listener(config(), opts)["filter_chains"][0]["filters"][0]["typed_config"]

    on = hcm(envoygen.GatewayOptions(request_log="/dev/stdout"))
    (log,) = [a for a in on["access_log"] if a["name"] == "envoy.access_loggers.file"]
    assert log["typed_config"]["path"] == "/dev/stdout"
    fields = log["typed_config"]["log_format"]["json_format"]
    assert {"status", "policy", "provider", "model", "reason", "duration_ms", "prompt_tokens"} <= set(fields)
    # Request headers could carry keys or user data: only these may be read from the request.
    read = {v.split("%REQ(", 1)[1].split(")")[0] for v in fields.values() if "%REQ(" in v}
    assert read == {"X-REQUEST-ID", ":METHOD"}  # the path: the client's, kept in metadata
    assert on["always_set_request_id_in_response"] is True  # what a client quotes to find its line

    off = hcm(envoygen.GatewayOptions(request_log=""))
    assert all(a["name"] != "envoy.access_loggers.file" for a in off["access_log"])


def test_policies_that_need_no_prompt_are_compiled_and_the_rest_are_decided():
    def compiled(strategy="weighted", models=("m", "m"), **spec):
        providers = [
            provider("a", "http://127.0.0.1:9001/v1", [model("m"), model("small", contextWindow=4000)]),
            provider("b", "http://127.0.0.1:9002/v1", [model("m"), model("tools", capabilities=["tools"])]),
        ]
        backends = [backend("a", models[0], weight=3), backend("b", models[1], weight=1, priority=1)]
        result = compile_config(providers, [policy("p", ["x"], backends, strategy=strategy, **spec)])
        assert result.ok, result.problems
        return result.config.policies[0].compiled

    for strategy in ("weighted", "round-robin", "failover", "fastest"):
        assert compiled(strategy), strategy
    for strategy in ("cost", "latency", "least-busy", "classified", "hash"):
        extra = {
            "hash": {"hash": {"header": "x-user"}},
            "classified": {"routes": [{"backends": ["a/m"]}]},
        }.get(strategy, {})
        assert not compiled(strategy, **extra), strategy
    assert not compiled(learning={"enabled": True})
    assert not compiled(budget={"hourlyUsd": 1})
    assert not compiled(match={"models": ["x"], "headers": [{"name": "x-team", "value": "a"}]})
    # The prompt decides which backends are eligible: the ext_proc must see it.
    assert not compiled(models=("small", "m"))  # context windows differ
    assert not compiled(models=("m", "tools"))  # capabilities differ


def test_a_compiled_alias_is_routed_by_envoy_with_the_ext_proc_off():
    cfg = config()
    assert cfg.policies[0].compiled
    hcm = envoygen.listener(cfg, envoygen.GatewayOptions())["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    assert names.index("signalbox.json") < names.index("envoy.filters.http.ext_proc")
    json_filter = by_name(hcm["http_filters"])["signalbox.json"]["typed_config"]
    (alias,) = json_filter["request_rules"]["rules"]
    assert alias["selectors"] == [{"key": "model"}] and alias["on_present"]["key"] == envoygen.ALIAS_KEY
    (host,) = hcm["route_config"]["virtual_hosts"]
    routes = by_name(host["routes"])
    route = routes["compiled:default/p:x"]
    # Its chains walked by the route, attempt by attempt: no aggregate cluster for them.
    members = {t: [b.cluster for b in chain] for t, chain in envoygen.chain_members(cfg).items()}
    assert envoygen.contract.compiled_split(cfg.policies[0]) == [(t, 1) for t in targets(cfg)]
    groups = route["route"]["inline_cluster_specifier_plugin"]["extension"]["typed_config"]["priority_groups"]
    assert len(groups) == len(members[targets(cfg)[0]]) > 1
    for i, group in enumerate(groups):  # the i-th member of each chain, weighted as its chain
        assert group["clusters"] == [{"cluster_name": members[t][i], "weight": 1} for t in targets(cfg)]
    retry = envoygen.retry_policy_of(host, route)
    assert retry["refresh_cluster_on_retry"] is True  # each retry asks for the next group
    assert "retry_priority" not in retry  # which would send it to a cluster's resting host
    assert route["match"]["dynamic_metadata"][0]["path"] == [{"key": envoygen.ALIAS_KEY}]
    assert route["typed_per_filter_config"]["envoy.filters.http.ext_proc"]["disabled"] is True
    assert route["metadata"]["filter_metadata"]["signalbox"] == {
        "policy": "p",
        "policy_id": "default/p",
        "reason": "weighted",
    }
    headers = {h["header"]["key"]: h["header"]["value"] for h in route["response_headers_to_add"]}
    assert headers["x-signalbox-policy"] == "%METADATA(ROUTE:signalbox:policy)%"
    failover = by_name(
        envoygen.listener(config("failover"), envoygen.GatewayOptions())["filter_chains"][0]["filters"][0][
            "typed_config"
        ]["route_config"]["virtual_hosts"][0]["routes"]
    )["compiled:default/p:x"]
    first = failover["route"]["inline_cluster_specifier_plugin"]["extension"]["typed_config"]["priority_groups"]
    chain = envoygen.chain_members(config("failover"))[targets()[0]]
    assert [g["clusters"] for g in first] == [[{"cluster_name": b.cluster, "weight": 1}] for b in chain]


def test_chains_walked_by_groups_must_be_of_one_length():
    """Group i holds every chain's i-th member, so a split over chains of different lengths (an
    embedding model's chain leaves out what cannot embed), or over a chain not known, keeps
    its aggregate clusters."""
    members = {"t.a": ["b.1", "b.2"], "t.b": ["b.2", "b.1"], "t.c": ["b.3"]}
    groups = envoygen.contract.chain_groups([("t.a", 3), ("t.b", 1)], members)
    assert groups == [
        {"name": "attempt1", "clusters": [{"cluster_name": "b.1", "weight": 3}, {"cluster_name": "b.2", "weight": 1}]},
        {"name": "attempt2", "clusters": [{"cluster_name": "b.2", "weight": 3}, {"cluster_name": "b.1", "weight": 1}]},
    ]
    assert envoygen.contract.chain_groups([("t.a", 1), ("t.c", 1)], members) is None
    assert envoygen.contract.chain_groups([("t.a", 1), ("t.x", 1)], members) is None
    assert envoygen.contract.chain_groups([("t.c", 1)], members) == [
        {"name": "attempt1", "clusters": [{"cluster_name": "b.3", "weight": 1}]}
    ]


def test_upstream_tls_checks_the_certificates_name_against_the_providers_host():
    from signalbox.core.envoygen.options import upstream_tls

    for host, san_type in (("api.openai.com", "DNS"), ("10.1.2.3", "IP_ADDRESS")):
        tls = upstream_tls(host, "/etc/private-ca.pem")["typed_config"]
        assert tls["sni"] == host
        validation = tls["common_tls_context"]["validation_context"]
        assert validation["trusted_ca"] == {"filename": "/etc/private-ca.pem"}
        assert validation["match_typed_subject_alt_names"] == [{"san_type": san_type, "matcher": {"exact": host}}]
    opts = envoygen.GatewayOptions(upstream_ca_file="/etc/private-ca.pem")
    tls_backend = by_name(envoygen.clusters(config(), opts))["b.default.b.m"]["transport_socket"]["typed_config"]
    assert tls_backend["common_tls_context"]["validation_context"]["trusted_ca"]["filename"] == "/etc/private-ca.pem"


def test_backend_endpoints_come_over_ads_in_a_gateway_and_inline_otherwise():
    cds = by_name(envoygen.clusters(config(), envoygen.GatewayOptions(ads=True)))
    for name, resource in (("b.default.a.m", {}), ("b.default.b.m", {"service_name": "b.default.b.m/tls"})):
        cluster = cds[name]
        assert cluster["type"] == "EDS" and "load_assignment" not in cluster
        # b speaks TLS: its endpoints are a resource of their own (envoygen.endpoints.resource_name).
        assert cluster["eds_cluster_config"] == {"eds_config": {"ads": {}, "resource_api_version": "V3"}, **resource}
        assert "health_checks" not in cluster  # rests travel as endpoint health (extproc.xds)
    assert cds["b.default.b.m"]["transport_socket"]["name"] == "envoy.transport_sockets.tls"
    boot = envoygen.bootstrap(envoygen.GatewayOptions(ads=True), "/cfg")
    ads = boot["dynamic_resources"]["ads_config"]
    assert ads["api_type"] == "DELTA_GRPC"
    (service,) = ads["grpc_services"]
    assert service["envoy_grpc"]["cluster_name"] == envoygen.contract.XDS_CLUSTER
    statics = by_name(boot["static_resources"]["clusters"])
    assert statics[envoygen.contract.XDS_CLUSTER]["health_checks"]  # a worker that is gone is left at once
    # With two workers or more, the stream goes to the last one first (the first also serves the
    # admin API and the stream relay: both in one worker made it the largest, issue 12), and to
    # the others only while it is gone.
    sockets = ("/run/sb-0.sock", "/run/sb-1.sock", "/run/sb-2.sock")
    workers = envoygen.bootstrap(envoygen.GatewayOptions(ads=True, extproc_sockets=sockets), "/cfg")
    groups = by_name(workers["static_resources"]["clusters"])[envoygen.contract.XDS_CLUSTER]["load_assignment"]
    assert [
        (g.get("priority", 0), [e["endpoint"]["address"]["pipe"]["path"] for e in g["lb_endpoints"]])
        for g in groups["endpoints"]
    ] == [(0, ["/run/sb-2.sock"]), (1, ["/run/sb-0.sock", "/run/sb-1.sock"])]
    extproc = by_name(workers["static_resources"]["clusters"])[envoygen.contract.EXTPROC_CLUSTER]["load_assignment"]
    (every,) = extproc["endpoints"]  # requests still go to every worker alike
    assert len(every["lb_endpoints"]) == 3
    # Without the ext_proc's ADS server, Envoy resolves the host name itself.
    inline = by_name(envoygen.clusters(config(), envoygen.GatewayOptions()))["b.default.a.m"]
    assert inline["type"] == "STRICT_DNS" and "health_checks" not in inline
    (host,) = inline["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert host["endpoint"]["hostname"] == "default/a/m"
    assert "ads_config" not in envoygen.bootstrap(envoygen.GatewayOptions(), "/cfg")["dynamic_resources"]
    # Failing open routes with no ext_proc at all, even one down when Envoy starts: Envoy keeps
    # resolving the backends itself there.
    failing_open = envoygen.GatewayOptions(ads=True, failure_mode="open")
    assert by_name(envoygen.clusters(config(), failing_open))["b.default.a.m"]["type"] == "STRICT_DNS"
    assert "ads_config" not in envoygen.bootstrap(failing_open, "/cfg")["dynamic_resources"]


def test_attempts_worth_a_cooldown_reach_the_extproc_and_every_attempt_reaches_the_request_log():
    lds = envoygen.listener(config(), envoygen.GatewayOptions(request_log="/tmp/requests.log"))
    router = lds["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][-1]["typed_config"]
    grpc_log, file_log = router["upstream_log"]
    assert grpc_log["typed_config"]["common_config"]["log_name"] == "signalbox-attempts"
    logged = grpc_log["typed_config"]["additional_response_headers_to_log"]
    assert {
        "retry-after",
        "retry-after-ms",
        "x-ratelimit-remaining-requests",
        "anthropic-ratelimit-tokens-reset",
    } <= set(logged)
    cel = grpc_log["filter"]["extension_filter"]["typed_config"]["expression"]
    assert "response.code == 429" in cel and "response.code == 401" in cel
    assert file_log["typed_config"]["log_format"]["json_format"]["event"] == "attempt"
    # Without accounting (no access log service) only the file line stays.
    lds = envoygen.listener(config(), envoygen.GatewayOptions(request_log="/tmp/r.log", accounting=False))
    router = lds["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][-1]["typed_config"]
    assert [u["name"] for u in router["upstream_log"]] == ["envoy.access_loggers.file"]


def test_routes_tell_the_one_attempt_script_which_members_a_larger_window_follows():
    """attempt.lua serves every chain, so the route to a chain names its members that a later,
    larger context window follows (a too-long prompt's refusal from them is retried)."""
    providers = [
        provider(
            "a", "http://127.0.0.1:9001/v1", [model("small", contextWindow=8000), model("big", contextWindow=64000)]
        )
    ]
    chain = [backend("a", "small"), backend("a", "big", priority=1)]
    cfg = compile_config(providers, [policy("p", ["x"], chain, strategy="cost")]).config
    small_first, big_first = (b.target for b in cfg.policies[0].backends)
    assert envoygen.larger_after(cfg) == {small_first: "default/a/small"}  # nothing follows big first
    hcm = envoygen.listener(cfg, envoygen.GatewayOptions())["filter_chains"][0]["filters"][0]["typed_config"]
    routes = by_name(hcm["route_config"]["virtual_hosts"][0]["routes"])
    (added,) = routes[f"{cfg.policies[0].id}:{small_first}"]["request_headers_to_add"]
    assert added["header"] == {"key": envoygen.LARGER_AFTER_HEADER, "value": "default/a/small"}
    assert routes[f"{cfg.policies[0].id}:{small_first}"]["route"]["cluster"] == small_first
    # The chain nothing larger follows goes by the policy's route, which adds no header; the
    # route of its own comes first, so a request decided for it never reaches that one.
    names = [r["name"] for r in hcm["route_config"]["virtual_hosts"][0]["routes"]]
    assert names.index(f"{cfg.policies[0].id}:{small_first}") < names.index("decided")
    assert decided_cluster(routes["decided"], big_first) == big_first
    assert "request_headers_to_add" not in routes["decided"]
    assert envoygen.LARGER_AFTER_HEADER in envoygen.GATEWAY_HEADERS  # clients cannot send it


def test_a_chain_known_from_the_last_generation_takes_its_members_from_this_config():
    """The generator remembers each target's member clusters (a target's name is a digest of
    them) and skips working the chain out again; the members' settings still come from the
    config being generated: a model's context window that changed is seen."""

    def compiled(big_window):
        models = [model("small", contextWindow=8000), model("big", contextWindow=big_window)]
        chain = [backend("a", "small"), backend("a", "big", priority=1)]
        return compile_config([provider("a", "http://127.0.0.1:9001/v1", models)], [policy("p", ["x"], chain)]).config

    larger, same = compiled(64000), compiled(4000)
    assert [b.target for b in larger.policies[0].backends] == [b.target for b in same.policies[0].backends]
    small_first = larger.policies[0].backends[0].target
    fresh = envoygen.resources(larger, envoygen.GatewayOptions())
    assert envoygen.larger_after(larger) == {small_first: "default/a/small"}
    assert envoygen.larger_after(same) == {same.policies[0].backends[1].target: "default/a/big"}
    assert envoygen.resources(larger, envoygen.GatewayOptions()) == fresh


# One generation's config, drawn as the edits between generations: what a chain's second
# model's window is, whether provider b speaks TLS (with enough backends to share an origin) and
# which header takes its key, the policy's strategy, timeout and first-token deadline, and the
# gateway's options.
_GENERATION = st.fixed_dictionaries(
    {
        "window": st.sampled_from([4000, 8000, 64000]),
        "tls": st.booleans(),
        "key_header": st.sampled_from(["", "x-api-key"]),
        "strategy": st.sampled_from(["cost", "failover", "weighted", "latency"]),
        "timeout": st.sampled_from([0, 30000]),
        "first_token": st.booleans(),
        "options": st.sampled_from(
            [
                envoygen.GatewayOptions(),
                envoygen.GatewayOptions(credentials_dir="/run/keys", ads=True),
                envoygen.GatewayOptions(credentials_dir="/run/other", otlp_endpoint="127.0.0.1:4317"),
            ]
        ),
    }
)


def _generation_config(g):
    models_a = [model("m1", contextWindow=8000), model("m2", contextWindow=g["window"])]
    models_b = [model(f"n{i}") for i in range(envoygen.endpoints.ORIGIN_MIN_BACKENDS)]
    auth = {"env": "B_KEY", **({"header": g["key_header"]} if g["key_header"] else {})}
    scheme = "https" if g["tls"] else "http"
    providers = [
        provider("a", "http://127.0.0.1:9001/v1", models_a),
        provider("b", f"{scheme}://api.example.com/v1", models_b, auth=auth),
    ]
    spec = {"timeoutMs": g["timeout"]} if g["timeout"] else {}
    chain = [backend("a", "m1"), backend("a", "m2", priority=1), backend("b", "n0", priority=2)]
    pol = policy("p", ["x"], chain, strategy=g["strategy"], **spec)
    if g["first_token"]:
        pol["spec"]["failover"] = {**pol["spec"].get("failover", {}), "firstTokenTimeoutMs": 2000}
    others = policy("q", ["y"], [backend("b", f"n{i}") for i in range(3)], strategy="round-robin")
    cfg = compile_config(providers, [pol, others]).config
    assert cfg is not None
    return cfg


@settings(max_examples=40, deadline=None)
@given(st.lists(_GENERATION, min_size=2, max_size=5))
def test_what_the_generator_keeps_between_generations_never_changes_its_output(generations):
    """What one generation made is kept for the next (`envoygen.kept`: parts made from the
    providers and backends alone, each chain's members and windows; `listener._kept_routes`:
    each policy's routes): whatever came before, a config's resources are those a generator
    that kept nothing makes."""
    # (The package exports functions of the same names as these modules.)
    kept_module = importlib.import_module("signalbox.core.envoygen.kept")
    listener_module = importlib.import_module("signalbox.core.envoygen.listener")

    for g in generations:
        cfg = _generation_config(g)
        made = envoygen.resources(cfg, g["options"], "/tmp/envoy")
        kept_module.forget()
        listener_module._kept_routes = {}
        assert made == envoygen.resources(cfg, g["options"], "/tmp/envoy")


def test_a_policy_change_leaves_what_is_made_of_the_providers_and_backends_alone():
    """The point of keeping (issue 12): a generation whose providers and backends are the last
    one's does not make their parts again; one where they changed does."""
    kept_module = importlib.import_module("signalbox.core.envoygen.kept")
    clusters_module = importlib.import_module("signalbox.core.envoygen.clusters")
    base = {"window": 8000, "tls": True, "key_header": "", "timeout": 0, "first_token": False}
    opts = envoygen.GatewayOptions(credentials_dir="/run/keys")
    made = []
    real = clusters_module._backend_keys

    def counted(*args):
        made.append(1)
        return real(*args)

    kept_module.forget()
    clusters_module._backend_keys = counted
    try:
        envoygen.resources(_generation_config({**base, "strategy": "cost"}), opts, "/tmp/envoy")
        envoygen.resources(_generation_config({**base, "strategy": "failover"}), opts, "/tmp/envoy")
        assert len(made) == 1  # a policy's change
        envoygen.resources(_generation_config({**base, "strategy": "failover", "window": 64000}), opts, "/tmp/envoy")
        assert len(made) == 2  # a model's window changed: a backend did
        # Outside a generation (a function called on its own) nothing is kept or reused.
        envoygen.backend_clusters(_generation_config({**base, "strategy": "failover"}), opts)
        assert len(made) == 3
    finally:
        clusters_module._backend_keys = real


@settings(max_examples=40, deadline=None)
@given(windows=st.lists(st.sampled_from([4000, 8000, 32000, 128000]), min_size=1, max_size=5))
def test_each_chain_marks_exactly_the_members_a_larger_window_follows(windows):
    """The generator works out each chain once and marks in one pass from its end: a member is
    marked when any later member of its chain has a larger window, in every chain."""
    models = [model(f"m{i}", contextWindow=w) for i, w in enumerate(windows)]
    chain = [backend("a", f"m{i}", priority=i) for i in range(len(windows))]
    cfg = compile_config([provider("a", "http://127.0.0.1:9001/v1", models)], [policy("p", ["x"], chain)]).config
    members = envoygen.chain_members(cfg)
    assert set(members) == {b.target for b in cfg.policies[0].backends}
    expected = {}
    for target, chain_backends in members.items():
        marked = [
            b.id
            for j, b in enumerate(chain_backends)
            if any(later.context_window > b.context_window for later in chain_backends[j + 1 :])
        ]
        if marked:
            expected[target] = ",".join(marked)
    assert envoygen.larger_after(cfg) == expected


def test_requests_without_alias_or_target_meet_their_answer_before_any_policy_route():
    """Envoy matches a route before the body is read, then again once metadata is set: the
    answers for requests with neither alias nor target come first, guarded by that absence, and
    the same answers stay last for requests that carry either."""
    for opts in (envoygen.GatewayOptions(), envoygen.GatewayOptions(failure_mode="open")):
        hcm = envoygen.listener(config(), opts)["filter_chains"][0]["filters"][0]["typed_config"]
        routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
        early = [r for r in routes if r["name"].startswith("unrouted:")]
        assert early == routes[: len(early)] and early
        tail = routes[-len(early) :]
        for guarded, plain in zip(early, tail, strict=True):
            assert guarded["name"] == "unrouted:" + plain["name"]
            absent = guarded["match"]["dynamic_metadata"]
            assert {m["path"][0]["key"] for m in absent} == {envoygen.ALIAS_KEY, "target"}
            assert all(m["invert"] and m["value"] == {"present_match": True} for m in absent)
            assert {k: v for k, v in guarded.items() if k not in ("name", "match")} == {
                k: v for k, v in plain.items() if k not in ("name", "match")
            }


def bedrock_config(**auth):
    providers = [
        provider(
            "br",
            "https://bedrock-runtime.eu-central-1.amazonaws.com",
            [model("haiku", upstreamName="anthropic.claude-3-haiku-20240307-v1:0"), model("titan")],
            type="bedrock",
            **auth,
        ),
        provider("a", "http://127.0.0.1:9001/v1", [model("m")]),
    ]
    result = compile_config(
        providers, [policy("p", ["x"], [backend("br", "haiku"), backend("a", "m", priority=1)], strategy="failover")]
    )
    assert result.ok, result.problems
    return result.config


def test_bedrock_attempts_are_signed_by_envoy_after_the_translation():
    cfg = bedrock_config(auth={"secretRef": {"name": "aws", "key": "credentials"}, "format": "aws-credentials"})
    (br,) = [p for p in cfg.providers if p.name == "br"]
    assert br.aws_region == "eu-central-1"  # from the runtime endpoint's host
    filters = router_upstream_filters(cfg, CREDENTIALS)
    names = [f["name"] for f in filters]
    assert names.index("signalbox.translate") < names.index("signalbox.sign.default/br")
    assert names.index("signalbox.sign.default/br") < names.index("signalbox.strip_gateway_headers_upstream")
    signer = filters[names.index("signalbox.sign.default/br")]["typed_config"]
    signing = signer["extension_config"]["typed_config"]
    assert (signing["service_name"], signing["region"], signing["use_unsigned_payload"]) == (
        "bedrock",
        "eu-central-1",
        False,
    )
    # The credentials are a file Envoy reads, never the config; only this provider's keys.
    source = signing["credential_provider"]["credentials_file_provider"]["credentials_data_source"]
    assert source == {"filename": envoygen.credential_file("/run/keys", "default/br")}
    assert signing["credential_provider"]["custom_credential_provider_chain"] is True
    # The gateway's own headers, removed after signing, are not signed.
    assert signing["match_included_headers"] == [{"exact": "content-type"}, {"prefix": "x-amz-"}]
    # Skipped unless the attempt goes to one of this provider's backends.
    (skip,) = signer["xds_matcher"]["matcher_list"]["matchers"]
    predicate = skip["predicate"]["not_matcher"]["single_predicate"]
    assert predicate["input"]["typed_config"]["header_name"] == envoygen.ATTEMPT_HEADER
    assert predicate["value_match"]["safe_regex"]["regex"] == r"^(?:default/br/haiku|default/br/titan)$"
    # The model ID is percent-encoded in Converse's path; no key header is added by attempt.lua.
    lua = filters[names.index("signalbox.attempt")]["typed_config"]["default_source_code"]["inline_string"]
    haiku = attempt_backends(lua)["default/br/haiku"]
    assert haiku.api_path == "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse"
    assert haiku.key_header == ""


def test_a_bedrock_provider_without_auth_uses_envoys_aws_credential_chain():
    signing = next(
        f for f in router_upstream_filters(bedrock_config(), CREDENTIALS) if f["name"].startswith("signalbox.sign.")
    )["typed_config"]["extension_config"]["typed_config"]
    assert "credential_provider" not in signing  # environment, IRSA web identity, instance role
    assert [
        f["name"] for f in router_upstream_filters(config(), CREDENTIALS) if f["name"].startswith("signalbox.sign.")
    ] == []


def test_a_first_token_deadline_holds_answers_headers_only_on_its_policys_attempts():
    plain = config()
    assert not [f for f in router_upstream_filters(plain, CREDENTIALS) if f["name"] == "signalbox.first_token"]
    cfg = config(failover={"firstTokenTimeoutMs": 700, "perTryTimeoutMs": 300})
    filters = router_upstream_filters(cfg, CREDENTIALS)
    names = [f["name"] for f in filters]
    # Nearest the codec of the filters that act (the answer reaches it first), before the
    # gateway's headers are removed (its matcher reads one).
    assert names.index("signalbox.first_token") == names.index("signalbox.strip_gateway_headers_upstream") - 1
    holder = filters[names.index("signalbox.first_token")]["typed_config"]
    processor = holder["extension_config"]["typed_config"]
    assert processor["send_body_without_waiting_for_header_response"] is True
    assert processor["processing_mode"]["response_header_mode"] == "SEND"
    assert processor["processing_mode"]["request_header_mode"] == "SKIP"
    assert processor["failure_mode_allow"] is True  # without the ext_proc: no deadline, no failure
    assert processor["message_timeout"] == "5.700s"  # past the deadline: the attempt's timer ends first
    (skip,) = holder["xds_matcher"]["matcher_list"]["matchers"]
    header = skip["predicate"]["not_matcher"]["single_predicate"]["input"]["typed_config"]["header_name"]
    assert header == envoygen.contract.FIRST_TOKEN_HEADER
    # The policy's routes mark its attempts, and the attempt's timer is the first-token deadline.
    hcm = envoygen.listener(cfg, envoygen.GatewayOptions())["filter_chains"][0]["filters"][0]["typed_config"]
    (host,) = hcm["route_config"]["virtual_hosts"]
    mine = [r for r in host["routes"] if r.get("name", "").startswith("compiled:default/p:") or r["name"] == "decided"]
    assert {r["name"].split(":")[0] for r in mine} == {"decided", "compiled"}  # decided and compiled
    for route in mine:
        mark = {"key": header, "value": "%DYNAMIC_METADATA(signalbox:stream)%"}  # the request's `stream`
        assert {"header": mark, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"} in route["request_headers_to_add"]
        assert envoygen.retry_policy_of(host, route)["per_try_timeout"] == "0.700s"
    assert header in envoygen.GATEWAY_HEADERS  # never sent to a provider
    # Only streams are held: the matcher wants "true", which Envoy's JSON reader puts in the
    # metadata the routes' header reads from the body's `stream`.
    assert skip["predicate"]["not_matcher"]["single_predicate"]["value_match"]["safe_regex"]["regex"] == "^true$"
    reader = envoygen.listener(cfg, envoygen.GatewayOptions())["filter_chains"][0]["filters"][0]["typed_config"]
    (json_filter,) = [f for f in reader["http_filters"] if f["name"] == "signalbox.json"]
    rules = json_filter["typed_config"]["request_rules"]["rules"]
    assert {
        "selectors": [{"key": "stream"}],
        "on_present": {"metadata_namespace": "signalbox", "key": "stream"},
    } in rules


def grpc_services(node):
    """Every GrpcService in a generated resource tree."""
    if isinstance(node, dict):
        if "envoy_grpc" in node:
            yield node
        for value in node.values():
            yield from grpc_services(value)
    elif isinstance(node, list):
        for item in node:
            yield from grpc_services(item)


def test_streams_to_the_extproc_go_to_another_worker_when_one_refuses_but_are_never_resent_after_a_reset():
    opts = envoygen.GatewayOptions(accounting=True, translation=True)
    cfg = config(strategy="latency")
    services = [
        s
        for s in grpc_services(envoygen.resources(cfg, opts, "/cfg"))
        if s["envoy_grpc"]["cluster_name"] == envoygen.contract.EXTPROC_CLUSTER
    ]
    assert len(services) >= 3  # the router's ext_proc, the translator's, the access logs
    for service in services:
        retry_on = set(service["retry_policy"]["retry_on"].split(","))
        assert "connect-failure" in retry_on
        # A worker that reset a stream may have crashed on it: the request goes to no other.
        assert not retry_on & {"reset", "reset-before-request", "5xx", "unavailable", "cancelled"}


def test_attempt_lua_made_for_the_last_config_is_reused_only_while_its_backends_are_the_same():
    """attempt.lua is kept from one generation to the next (a policy change leaves the backends
    as they were): any change to a backend, its provider or the key folder makes it anew."""

    def attempt_lua(cfg, opts):
        (script,) = [f for f in router_upstream_filters(cfg, opts) if f["name"] == "signalbox.attempt"]
        return script["typed_config"]["default_source_code"]["inline_string"]

    before = config()
    changed = config()
    changed.backends[0].upstream_model = "renamed-upstream-model"
    changed.providers[0].base_path = "/v2"
    first = attempt_lua(before, CREDENTIALS)
    assert attempt_lua(before, CREDENTIALS) == first
    after = attempt_lua(changed, CREDENTIALS)
    assert after != first and "renamed-upstream-model" in after and "renamed-upstream-model" not in first
    elsewhere = envoygen.GatewayOptions(credentials_dir="/run/other-keys")
    assert "/run/other-keys" in attempt_lua(changed, elsewhere) and "/run/other-keys" not in after


@given(
    first=st.tuples(st.text(min_size=1, max_size=20), st.integers(1, 65535), st.integers(0, 5000)),
    second=st.tuples(st.text(min_size=1, max_size=20), st.integers(1, 65535), st.integers(0, 5000)),
)
def test_two_tls_endpoints_never_share_an_origin(first, second):
    """An origin's name is its listener's and its TLS cluster's: two endpoints (host, port,
    connect timeout) with one name would send one provider's requests, keys and all, to the
    other's host. Hosts the name cannot spell as they are (an IPv6 address) included."""
    from signalbox.api.v1alpha1 import config_pb2 as pb
    from signalbox.core.envoygen.endpoints import DEFAULT_CONNECT_TIMEOUT_MS, origin_name

    def endpoint(host, port, timeout):
        return pb.Provider(host=host, port=port, connect_timeout_ms=timeout, tls=True)

    def same(a, b):
        timeouts = (a[2] or DEFAULT_CONNECT_TIMEOUT_MS), (b[2] or DEFAULT_CONNECT_TIMEOUT_MS)
        return a[:2] == b[:2] and timeouts[0] == timeouts[1]

    names = origin_name(endpoint(*first)), origin_name(endpoint(*second))
    assert (names[0] == names[1]) == same(first, second)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)
    assert origin_name(pb.Provider(host="api.example.com", port=443)) == ""  # no TLS, no origin


@pytest.mark.parametrize("failure_mode", ["closed", "open"])
def test_chains_are_asked_for_on_demand_only_where_envoy_holds_the_ads_stream(failure_mode):
    """Over ADS the stream sends a chain only when Envoy asks (extproc.xds), so the listener
    asks for a route's chain when a request first needs it: after the router phase and the
    buffer (the decided route, the body held), right before the router. Failing open Envoy
    reads every cluster from the file and has no ADS to ask: an on_demand filter naming one
    would make it refuse the listener."""
    opts = envoygen.GatewayOptions(ads=True, failure_mode=failure_mode)
    hcm = envoygen.listener(config(), opts)["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    if failure_mode == "closed":
        asking = names.index("envoy.filters.http.on_demand")
        assert names[asking - 1] == "envoy.filters.http.buffer" and names[-1] == "envoy.filters.http.router"
        assert names.index("envoy.filters.http.ext_proc") < asking
        odcds = hcm["http_filters"][asking]["typed_config"]["odcds"]
        assert "ads" in odcds["source"]
        assert envoygen.bootstrap(opts, "/cfg")["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"
    else:
        assert "envoy.filters.http.on_demand" not in names
        assert "ads_config" not in envoygen.bootstrap(opts, "/cfg")["dynamic_resources"]
