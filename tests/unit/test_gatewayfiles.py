"""Envoy's resource files as a gateway's publishers write them (issue 12): a change to policies
replaces the clusters and routes it changes and leaves the listener's file alone, so Envoy
keeps its listener (filters, attempt.lua's Lua states) and parses nothing it already has."""

import json
from pathlib import Path

import orjson
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import descriptor_pool, message_factory
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from signalbox import gatewayfiles, xdsbinary
from signalbox.core import envoygen
from signalbox.core.compiler import compile_config
from tests.factories import backend, model, policy, provider

PROVIDERS = [provider("a", "http://127.0.0.1:9001/v1", [model("m")]), provider("b", "http://b:1/v1", [model("m")])]


def files(workdir: Path) -> dict[str, Path]:
    return {n: Path(envoygen.resource_file(str(workdir / gatewayfiles.ENVOY_DIR), n)) for n in envoygen.RESOURCE_FILES}


def inodes(workdir: Path) -> dict[str, int]:
    return {n: p.stat().st_ino for n, p in files(workdir).items()}


def test_a_policy_change_rewrites_routes_and_clusters_but_not_the_listener(tmp_path):
    first = compile_config(PROVIDERS, [policy("p", ["x"], [backend("a", "m"), backend("b", "m", priority=1)])])
    gatewayfiles.write_envoy(first.config, tmp_path, envoygen.GatewayOptions())
    written = inodes(tmp_path)
    # Written again unchanged: no file is replaced (each replacement makes Envoy parse it).
    gatewayfiles.write_envoy(first.config, tmp_path, envoygen.GatewayOptions())
    assert inodes(tmp_path) == written

    more = compile_config(
        PROVIDERS,
        [
            policy("p", ["x"], [backend("a", "m"), backend("b", "m", priority=1)]),
            policy("q", ["y"], [backend("b", "m"), backend("a", "m", priority=1)], strategy="cost"),
        ],
    )
    gatewayfiles.write_envoy(more.config, tmp_path, envoygen.GatewayOptions())
    now = inodes(tmp_path)
    assert now["lds.json"] == written["lds.json"]
    assert now["rds.json"] != written["rds.json"]
    routes = gatewayfiles.read_envoy_file(tmp_path / gatewayfiles.ENVOY_DIR, "rds.json")["resources"][0]
    # q is decided: its requests go by the decided route, which reads their cluster from the
    # router phase's metadata (a type xds-protos lacks: written and read with our own module).
    decided = {r["name"]: r for r in routes["virtual_hosts"][0]["routes"]}["decided"]
    plugin = decided["route"]["inline_cluster_specifier_plugin"]["extension"]["typed_config"]
    assert plugin["@type"].endswith("priority_group.v3.PriorityGroupClusterSpecifier")
    assert plugin["override_metadata_namespace"] == envoygen.contract.TARGET_NS


def test_the_ext_proc_loads_the_published_config_and_keeps_it_when_the_file_is_garbage(tmp_path):
    """The config travels to the ext_proc as binary protobuf (0.8 s of JSON parsing per worker
    and change at the 2,000-provider fleet, milliseconds now): what is published loads, and
    bytes that are not a config change nothing."""
    from signalbox.extproc.reload import TableHolder

    cfg = compile_config(PROVIDERS, [policy("p", ["x"], [backend("a", "m")])], generation=7).config
    gatewayfiles.publish(cfg, tmp_path, envoygen.GatewayOptions(), envoy=False)
    holder = TableHolder(resolve_key=lambda *_: None)
    assert holder.load_file(tmp_path / gatewayfiles.CONFIG_FILE)
    assert holder.current.generation == 7 and holder.current.aliases == ["x"]
    gatewayfiles.write_atomic(tmp_path / gatewayfiles.CONFIG_FILE, b"\xff\xfe not a config")
    assert not holder.load_file(tmp_path / gatewayfiles.CONFIG_FILE)
    assert holder.current.generation == 7


def test_an_envoy_about_to_start_gets_the_backend_clusters_alone_then_everything(tmp_path):
    """Backends warm before any chain exists (each chain is told of every cluster that becomes
    active after it: 10.6 s of Envoy at the 2,000-provider fleet when given all at once). Only
    those compiled policies route to: a backend only decided policies name reaches Envoy with a
    chain a request asks for (extproc.xds)."""
    cfg = compile_config(
        [*PROVIDERS, provider("c", "http://127.0.0.1:9003/v1", [model("m")])],
        [
            policy("p", ["x"], [backend("a", "m"), backend("b", "m", priority=1)]),
            policy("d", ["y"], [backend("c", "m"), backend("a", "m")], strategy="cost"),
        ],
    ).config
    options = envoygen.GatewayOptions(ads=True)
    gatewayfiles.publish(cfg, tmp_path, options, backends_first=True)
    envoy_dir = tmp_path / gatewayfiles.ENVOY_DIR
    first = {n: gatewayfiles.read_envoy_file(envoy_dir, n).get("resources", []) for n in envoygen.RESOURCE_FILES}
    assert sorted(c["name"] for c in first["cds.json"]) == ["b.default.a.m", "b.default.b.m"]
    assert all(c["type"] == "EDS" for c in first["cds.json"])
    assert first["lds.json"] == first["rds.json"] == []  # nothing routes to a chain not there yet

    gatewayfiles.write_envoy(cfg, tmp_path, options)
    clusters = {c["name"] for c in gatewayfiles.read_envoy_file(envoy_dir, "cds.json")["resources"]}
    assert {p.target for p in cfg.policies[0].backends} < clusters
    assert {b.cluster for b in cfg.backends} < clusters  # the whole file has every backend
    assert json.loads(files(tmp_path)["lds.json"].read_text())["resources"]

    # Backends that Envoy resolves itself (no ADS) warm at once: nothing to stage.
    gatewayfiles.publish(cfg, tmp_path / "dns", envoygen.GatewayOptions(), backends_first=True)
    assert json.loads(files(tmp_path / "dns")["lds.json"].read_text())["resources"]


def test_envoys_files_are_the_generated_resources_in_utf8_json(tmp_path):
    """Written by orjson, as bytes: UTF-8 whatever the process's locale, non-ASCII names as
    they are (the standard library's encoder escaped them; orjson does not)."""
    cfg = compile_config(
        [provider("a", "http://127.0.0.1:9001/v1", [model("m")])],
        [policy("p", ["modèle-é", "x"], [backend("a", "m")])],
    ).config
    assert cfg is not None
    gatewayfiles.write_envoy(cfg, tmp_path, envoygen.GatewayOptions())
    config_dir = str(tmp_path / gatewayfiles.ENVOY_DIR)
    expected = envoygen.resources(cfg, envoygen.GatewayOptions(), config_dir)
    for name, path in files(tmp_path).items():
        if name in envoygen.BINARY_FILES:  # the same resources, as Envoy reads a .pb file
            assert path.suffix == ".pb"
            whole = xdsbinary.parse_dict(expected[name], discovery_pb2.DiscoveryResponse())
            assert unpacked(discovery_pb2.DiscoveryResponse.FromString(path.read_bytes())) == unpacked(whole)
            continue
        assert json.loads(path.read_bytes().decode("utf-8")) == expected[name]
    assert "modèle-é".encode() in files(tmp_path)["rds.json"].read_bytes()


def unpacked(response: discovery_pb2.DiscoveryResponse) -> list:
    """The resources as messages: equal content, whatever order each Any's bytes were written in."""
    out = []
    for packed in response.resources:
        message_type = descriptor_pool.Default().FindMessageTypeByName(packed.type_url.rsplit("/", 1)[1])
        message = message_factory.GetMessageClass(message_type)()
        assert packed.Unpack(message)
        out.append(message)
    return out


def _skeleton(part: object) -> object:
    """A part with its strings emptied: parts of one skeleton are made from one conversion."""
    if isinstance(part, dict):
        return {k: _skeleton(v) for k, v in part.items()}
    if isinstance(part, list):
        return [_skeleton(v) for v in part]
    return "" if isinstance(part, str) else part


def _route_parts(document: dict) -> list[bytes]:
    """A route table's parts: its own fields, each virtual host's own fields, each route."""
    (table,) = document["resources"]
    out = [orjson.dumps({k: v for k, v in table.items() if k not in ("@type", "virtual_hosts")})]
    for host in table["virtual_hosts"]:
        out.append(orjson.dumps({k: v for k, v in host.items() if k != "routes"}))
        out += [orjson.dumps(r) for r in host["routes"]]
    return out


def _parts(name: str, document: dict, before: dict | None = None) -> list[bytes]:
    """What the encoder converts whole, given the document it encoded `before`: each cluster of
    a shape (the cluster without its name and, for an aggregate, its members; a provider's
    backends share one, as do chains of the same kind) not seen before, the first of its shape;
    of a route table, the first part (its own fields, a virtual host's, a route) of each
    skeleton (`_skeleton`) not seen before."""

    def shape_of(cluster: dict) -> bytes:
        shape = {**cluster, "name": ""}
        if cluster.get("cluster_type", {}).get("name") == "envoy.clusters.aggregate":
            typed = {**cluster["cluster_type"]["typed_config"], "clusters": []}
            shape["cluster_type"] = {**cluster["cluster_type"], "typed_config": typed}
        return orjson.dumps(shape)

    if name == "cds.json":
        shapes = {shape_of(c) for c in (before or {"resources": []})["resources"]}
        out = []
        for cluster in document["resources"]:
            shape = shape_of(cluster)
            if shape not in shapes:
                shapes.add(shape)
                out.append(orjson.dumps(cluster))
        return out
    skeletons = {orjson.dumps(_skeleton(orjson.loads(p))) for p in (_route_parts(before) if before else [])}
    out = []
    for part in dict.fromkeys(_route_parts(document)):
        skeleton = orjson.dumps(_skeleton(orjson.loads(part)))
        if skeleton not in skeletons:
            skeletons.add(skeleton)
            out.append(part)
    return out


@pytest.mark.parametrize("name", sorted(envoygen.BINARY_FILES))
def test_a_change_converts_only_what_it_changed(tmp_path, monkeypatch, name):
    """Envoy reads clusters and routes as binary protobuf (a whole 10 MB JSON cluster file took
    it 1.0 s to re-read at the 2,000-provider fleet, the binary one 0.34-0.55 s); converting
    everything in Python would cost more than that, so each cluster and each route is converted
    once and kept while in use."""
    options = envoygen.GatewayOptions()
    one = [policy("p", ["x"], [backend("a", "m"), backend("b", "m", priority=1)])]
    two = [*one, policy("q", ["y"], [backend("c", "m"), backend("a", "m", priority=1)], strategy="latency")]
    before = compile_config(PROVIDERS, one).config
    after = compile_config([*PROVIDERS, provider("c", "http://c:1/v1", [model("m"), model("n")])], two).config
    encoder = xdsbinary.ResourceEncoder()
    converted: list[bytes] = []
    real = xdsbinary.parse_dict

    def counting(part, message, *args, **kwargs):
        converted.append(orjson.dumps(part))
        return real(part, message, *args, **kwargs)

    def whole(document: dict) -> list[bytes]:
        # What was converted whole; the rest are pieces of a part made from another of its
        # skeleton (a string inside a Struct or an Any: the message around it).
        parts = set(_route_parts(document)) if name == "rds.json" else {orjson.dumps(c) for c in document["resources"]}
        return sorted(c for c in converted if c in parts)

    monkeypatch.setattr(xdsbinary, "parse_dict", counting)
    first = envoygen.resources(before, options, str(tmp_path))[name]
    encoder.encode(first)
    assert whole(first) == sorted(_parts(name, first))
    converted.clear()
    assert encoder.encode(first) and converted == []  # unchanged: nothing converted
    second = envoygen.resources(after, options, str(tmp_path))[name]
    encoded = encoder.encode(second)
    assert whole(second) == sorted(_parts(name, second, first))
    monkeypatch.setattr(xdsbinary, "parse_dict", real)
    whole = real(second, discovery_pb2.DiscoveryResponse())
    assert unpacked(discovery_pb2.DiscoveryResponse.FromString(encoded)) == unpacked(whole)
    assert encoder.encode(second) == encoded
    assert xdsbinary.decode(encoded)["resources"][0]["name"] == second["resources"][0]["name"]


def test_key_files_are_readable_by_their_owner_alone_whatever_was_left_behind(tmp_path):
    """A key file is created with its mode before the key is written to it, also when a stale
    temporary file (another mode, another content) was left by a publisher that died."""
    from signalbox.extproc.runtime import credential

    keyed = provider("k", "http://127.0.0.1:9001/v1", [model("m")], auth={"env": "K"})
    cfg = compile_config([keyed], [policy("p", ["x"], [backend("k", "m")])]).config
    options = envoygen.GatewayOptions(credentials_dir=str(tmp_path / "credentials"))
    path = Path(envoygen.credential_file(options.credentials_dir, cfg.providers[0].id))
    path.parent.mkdir(parents=True)
    stale = path.with_name(f".{path.name}.tmp")
    stale.write_text("left behind")
    stale.chmod(0o644)
    gatewayfiles.write_credentials(cfg, options, lambda auth: credential(auth, "sk-one"))
    assert path.stat().st_mode & 0o077 == 0 and path.read_text().endswith("sk-one")
    assert not stale.exists()
    gatewayfiles.write_credentials(cfg, options, lambda auth: credential(auth, "sk-two"))
    assert path.stat().st_mode & 0o077 == 0 and path.read_text().endswith("sk-two")


PROVIDER_POOL = [
    # Context windows differ (a chain's routes say which members a larger window follows).
    provider(
        n,
        f"http://{n}.internal:{9000 + i}/v1",
        [model("m", contextWindow=8192 * (1 + i % 3)), model("n")],
        connectTimeoutMs=1000 + 100 * i,
    )
    for i, n in enumerate("abcde")
]


@st.composite
def fleets(draw):
    """A config: some providers (with their timeouts varied), policies over their backends."""
    chosen = draw(
        st.lists(st.sampled_from(PROVIDER_POOL), min_size=2, max_size=5, unique_by=lambda p: p["metadata"]["name"])
    )
    names = [p["metadata"]["name"] for p in chosen]
    policies = []
    for i in range(draw(st.integers(1, 4))):
        members = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
        refs = [backend(n, draw(st.sampled_from(["m", "n"])), priority=k) for k, n in enumerate(members)]
        strategy = draw(st.sampled_from(["failover", "latency", "weighted", "cost"]))
        policies.append(policy(f"p{i}", [f"alias{i}"], refs, strategy=strategy))
    timeout = draw(st.sampled_from([None, 1500]))
    if timeout:  # a provider's own field changed: its backends' clusters change
        chosen = [{**chosen[0], "spec": {**chosen[0]["spec"], "connectTimeoutMs": timeout}}, *chosen[1:]]
    result = compile_config(chosen, policies)
    assume(result.ok)
    return result.config


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    configs=st.lists(fleets(), min_size=1, max_size=4),
    ads=st.booleans(),
    idle=st.lists(st.sampled_from([0, 1500]), min_size=4, max_size=4),
)
def test_keyed_parts_encode_to_the_files_the_whole_documents_give(configs, ads, idle):
    """The publisher converts a cluster, and a policy's routes, once per key (what they are made
    from: `envoygen.ResourceParts`): across any sequence of changes its files must be the ones
    the made documents give, or a cluster or route whose key missed an input would keep its old
    form in Envoy."""
    clusters, routes = xdsbinary.KeyedEncoder(), xdsbinary.RouteTableEncoder()
    for cfg, idle_ms in zip(configs, idle, strict=False):
        for prov in cfg.providers:
            prov.idle_timeout_ms = idle_ms
        options = envoygen.GatewayOptions(ads=ads, extproc_admin_port=8083)
        parts = envoygen.resource_parts(cfg, options, "/cfg")
        whole = envoygen.resources(cfg, options, "/cfg")
        assert clusters.encode(parts.clusters) == xdsbinary.ResourceEncoder().encode(whole["cds.json"])
        assert routes.encode(parts.routes) == xdsbinary.ResourceEncoder().encode(whole["rds.json"])


_cluster_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)


@settings(max_examples=80, deadline=None)
@given(
    chains=st.lists(
        st.tuples(_cluster_names, st.lists(_cluster_names, min_size=1, max_size=5)),
        min_size=1,
        max_size=6,
        unique_by=lambda chain: chain[0],
    )
)
def test_failover_chains_made_from_one_shape_encode_as_json_format_converts_them(chains):
    """A chain (aggregate cluster) not converted before is made from another chain's message with
    its own name and members: whatever the names and members, the encoding must hold what
    converting each chain's JSON gives."""
    from signalbox.core.envoygen.clusters import _aggregate

    document = {"resources": [_aggregate(name, members) for name, members in chains]}
    encoded = xdsbinary.ResourceEncoder().encode(document)
    whole = xdsbinary.parse_dict(json.loads(json.dumps(document)), discovery_pb2.DiscoveryResponse())
    assert unpacked(discovery_pb2.DiscoveryResponse.FromString(encoded)) == unpacked(whole)
    for packed, (_, members) in zip(discovery_pb2.DiscoveryResponse.FromString(encoded).resources, chains, strict=True):
        (cluster,) = unpacked(discovery_pb2.DiscoveryResponse(resources=[packed]))
        (config,) = unpacked(discovery_pb2.DiscoveryResponse(resources=[cluster.cluster_type.typed_config]))
        assert list(config.clusters) == members


_texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
# Keys whose string values the fleets' routes vary by policy: plain string fields, and the
# values of the route's metadata (a Struct, set by converting the message around it again).
_RENAMED = ("name", "exact", "cluster", "policy", "policy_id", "reason", "prefix")


def _renamed(node: object, draw) -> object:
    if isinstance(node, dict):
        return {
            k: draw(_texts) if k in _RENAMED and isinstance(v, str) and draw(st.booleans()) else _renamed(v, draw)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_renamed(v, draw) for v in node]
    return node


@settings(max_examples=60, deadline=None)
@given(config=fleets(), data=st.data())
def test_routes_made_from_another_of_their_skeleton_encode_as_json_format_converts_them(config, data):
    """A route (or route table, or virtual host) not converted before is made from the message of
    one with the same JSON but for its strings, with its own strings set: whatever the strings,
    the encoding must hold what converting each route's JSON gives."""
    document = envoygen.resources(config, envoygen.GatewayOptions(ads=True), "/cfg")["rds.json"]
    document = _renamed(document, data.draw)
    encoded = xdsbinary.ResourceEncoder().encode(document)
    whole = xdsbinary.parse_dict(json.loads(json.dumps(document)), discovery_pb2.DiscoveryResponse())
    assert unpacked(discovery_pb2.DiscoveryResponse.FromString(encoded)) == unpacked(whole)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | _texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_texts, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(part=st.dictionaries(_texts, _json_values, max_size=5))
def test_a_parts_strings_are_read_from_its_json_in_the_order_of_their_paths(part):
    """Telling a part's skeleton and strings from its JSON alone: keys and values with quotes,
    backslashes, colons or any character must come out whole, values apart from keys."""
    tokens = xdsbinary._STRING.findall(orjson.dumps(part))
    values = [orjson.loads(string) for string, colon in tokens if not colon]
    paths = xdsbinary._string_paths(part)
    assert len(values) == len(paths)
    for path, value in zip(paths, values, strict=True):
        node = part
        for step in path:
            node = node[step]
        assert node == value


def test_a_key_file_unchanged_since_it_was_written_is_not_read_again_and_one_changed_is_rewritten(
    tmp_path, monkeypatch
):
    """Every change checked every keyed provider's file by reading it (2,000 files, 0.1 s of each
    change at the 2,000-provider fleet); a file someone else changed is still put right."""
    from signalbox.extproc.runtime import credential

    keyed = provider("k", "http://127.0.0.1:9001/v1", [model("m")], auth={"env": "K"})
    cfg = compile_config([keyed], [policy("p", ["x"], [backend("k", "m")])]).config
    options = envoygen.GatewayOptions(credentials_dir=str(tmp_path / "credentials"))
    path = Path(envoygen.credential_file(options.credentials_dir, cfg.providers[0].id))
    path.parent.mkdir(parents=True)
    resolve = lambda auth: credential(auth, "sk-one")  # noqa: E731
    gatewayfiles.write_credentials(cfg, options, resolve)
    real_read = Path.read_text
    with monkeypatch.context() as patched:
        patched.setattr(Path, "read_text", lambda self, *a, **k: pytest.fail(f"{self} read again"))
        gatewayfiles.write_credentials(cfg, options, resolve)
    path.write_text("tampered")
    gatewayfiles.write_credentials(cfg, options, resolve)
    assert real_read(path).endswith("sk-one")
    path.unlink()
    gatewayfiles.write_credentials(cfg, options, resolve)
    assert real_read(path).endswith("sk-one")


def test_a_field_xds_protos_lacks_is_written_where_envoy_reads_it():
    """RetryPolicy.refresh_cluster_on_retry (field 14 in Envoy 1.40, which routes walking a chain
    by priority groups need) is not in xds-protos 1.85.0: the encoder writes it into the retry
    policy as the unknown field it is to protobuf, inside an Any as well, and leaves the
    document it read as it was."""
    from envoy.config.route.v3 import route_components_pb2, route_pb2

    refreshed = {"num_retries": 1, "refresh_cluster_on_retry": True}
    route = {"match": {"prefix": "/"}, "route": {"cluster": "c", "retry_policy": refreshed}}
    message = xdsbinary.parse_dict(route, route_components_pb2.Route())
    num_retries = bytes([0x12, 0x02, 0x08, 0x01])  # field 2, a UInt32Value of 1
    assert message.route.retry_policy.num_retries.value == 1
    assert message.route.retry_policy.SerializeToString() == num_retries + bytes([14 << 3, 0x01])
    assert route["route"]["retry_policy"] == refreshed
    for unset in ({"num_retries": 1}, {"num_retries": 1, "refresh_cluster_on_retry": False}):
        plain = xdsbinary.parse_dict({"retry_policy": unset}, route_components_pb2.RouteAction())
        assert plain.retry_policy.SerializeToString() == num_retries
    table = {"name": "t", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [route]}]}
    document = {"resources": [{"@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration", **table}]}
    for encoded in (
        xdsbinary.ResourceEncoder().encode(document),
        xdsbinary.parse_dict(document, discovery_pb2.DiscoveryResponse()).SerializeToString(),
    ):
        (packed,) = discovery_pb2.DiscoveryResponse.FromString(encoded).resources
        read = route_pb2.RouteConfiguration.FromString(packed.value)
        assert read.virtual_hosts[0].routes[0].route.retry_policy.SerializeToString().endswith(bytes([14 << 3, 1]))
