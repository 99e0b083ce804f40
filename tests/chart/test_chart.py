"""The Helm chart as code: rendered and linted by Helm's own library (helm-python-sdk) over a
matrix of values, every object validated with kubernetes-validate, and the security and wiring
properties a platform team relies on asserted."""

from __future__ import annotations

import base64
import importlib.metadata
import json
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from signalbox import pod
from signalbox.core import crdgen, envoygen

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "signalbox"
KUBERNETES_VERSION = "1.32"

MATRIX: dict[str, tuple[str, dict[str, Any]]] = {
    "defaults": ("signalbox-system", {}),
    "ha": (
        "signalbox-system",
        {
            "operator": {"replicas": 2},
            "gateway": {"replicas": 3},
            "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12},
            "podDisruptionBudget": {"enabled": True, "minAvailable": 2},
        },
    ),
    "metrics": (
        "signalbox-system",
        {
            "metrics": {
                "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                "grafanaDashboard": {"enabled": True},
            }
        },
    ),
    "custom": (
        "llm-gateway",
        {
            "image": {"registry": "registry.internal:5000", "repository": "platform/signalbox", "tag": "0.1.0-rc1"},
            "operator": {"watchNamespaces": ["team-a", "team-b"], "secretNames": ["openai-key"], "consumerKeys": False},
            "gateway": {
                "limitStore": {
                    "redis": {
                        "url": "rediss://redis.internal:6380/0",
                        "passwordSecret": "redis-auth",
                        "caSecret": "redis-ca",
                    }
                },
                "upstreamCaSecret": "provider-ca",
                "failureMode": "open",
                "accounting": False,
                "requestLog": False,
                "service": {"type": "LoadBalancer", "port": 8080},
                "adminApi": {"expose": True},
                "tracing": {"otlpEndpoint": "otel-collector.observability:4317", "samplingPercent": 10},
            },
            "routingConfigMap": "llm-routing",
        },
    ),
}
# Kinds whose schema kubernetes-validate does not ship: checked against their CRDs here instead.
CUSTOM_KINDS = {"ServiceMonitor", "KopfPeering", "ClusterKopfPeering"}


def render(values: dict[str, Any], namespace: str) -> list[dict[str, Any]]:
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values)
        manifests = chart.render(values, name="sb", namespace=namespace)
    objects = []
    for name, text in manifests.items():
        if name.endswith(".yaml"):
            objects += [obj for obj in yaml.safe_load_all(text) if obj]
    return objects


@pytest.fixture(scope="module", params=sorted(MATRIX))
def case(request) -> tuple[str, str, dict[str, Any], list[dict[str, Any]]]:
    namespace, values = MATRIX[request.param]
    return request.param, namespace, values, render(values, namespace)


def of_kind(objects: list[dict[str, Any]], *kinds: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in kinds]


def pod_specs(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o["spec"]["template"]["spec"] for o in of_kind(objects, "Deployment")}


def test_chart_lints_clean():
    result = helm.lint(str(CHART))
    assert result["errors"] == []
    assert [m for m in result["messages"] if m["severity"] >= 2] == []  # warnings and errors


def test_every_rendered_object_is_valid_kubernetes(case):
    _, _, _, objects = case
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_peering_objects_match_the_shipped_crds(case):
    _, _, _, objects = case
    crds = {d["spec"]["names"]["kind"]: d for d in crdgen.definitions().values()}
    for obj in of_kind(objects, "KopfPeering", "ClusterKopfPeering"):
        assert obj["apiVersion"] == "kopf.dev/v1" and obj["kind"] in crds


def test_rbac_has_no_wildcards_and_secrets_are_read_only_but_for_consumer_keys(case):
    _, _, values, objects = case
    rules = [r for role in of_kind(objects, "Role", "ClusterRole") for r in role["rules"]]
    assert rules
    for rule in rules:
        for field in ("verbs", "resources", "apiGroups"):
            assert "*" not in rule.get(field, []), rule
        if "secrets" in rule["resources"]:
            if set(rule["verbs"]) & {"create", "patch"}:
                # The operator's consumer keys: write, never delete, and only when asked for.
                assert values.get("operator", {}).get("consumerKeys", True), rule
                assert set(rule["verbs"]) == {"get", "list", "watch", "create", "patch"}, rule
                continue
            assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule
            names = values.get("operator", {}).get("secretNames")
            if names:
                assert rule["resourceNames"] == names
    configmap_rules = [r for r in rules if "configmaps" in r["resources"] and set(r["verbs"]) & {"patch", "update"}]
    assert all(r.get("resourceNames") for r in configmap_rules)  # only the one routing ConfigMap


def test_namespaced_install_grants_nothing_cluster_wide():
    objects = render(*reversed(MATRIX["custom"]))
    assert of_kind(objects, "ClusterRole", "ClusterRoleBinding") == []
    assert {r["metadata"]["namespace"] for r in of_kind(objects, "Role") if "secrets" in str(r)} == {"team-a", "team-b"}


def test_cluster_wide_install_uses_cluster_roles():
    objects = render(*reversed(MATRIX["defaults"]))
    roles = {r["metadata"]["name"] for r in of_kind(objects, "ClusterRole")}
    assert roles == {"sb-signalbox-operator", "sb-signalbox-gateway-secrets"}


def test_every_container_is_non_root_read_only_without_capabilities(case):
    _, _, _, objects = case
    for name, spec in pod_specs(objects).items():
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, (name, container["name"])
            assert sc["readOnlyRootFilesystem"] is True, (name, container["name"])
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}


def test_gateway_pod_runs_envoy_and_extproc_sharing_the_socket_volume(case):
    _, namespace, values, objects = case
    gateway = next(spec for name, spec in pod_specs(objects).items() if name.endswith("-gateway"))
    containers = {c["name"]: c for c in gateway["containers"]}
    assert set(containers) == {"envoy", "extproc"}
    socket_dir = str(Path(pod.EXTPROC_SOCKET).parent)
    for container in (containers["envoy"], containers["extproc"], gateway["initContainers"][0]):
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["run"] == socket_dir, container["name"]
    run = next(v for v in gateway["volumes"] if v["name"] == "run")
    assert run["emptyDir"]["medium"] == "Memory"  # keys and socket never touch disk
    assert containers["envoy"]["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert containers["extproc"]["readinessProbe"]["grpc"]["port"] == 8082
    args = containers["extproc"]["args"]
    exposed = values.get("gateway", {}).get("adminApi", {}).get("expose", False)
    if exposed:
        assert "--admin-address=0.0.0.0:8083" in args and "--admin-token-file=/etc/signalbox/admin/token" in args
    else:
        assert "--admin-address=127.0.0.1:8083" in args and not any(a.startswith("--admin-token") for a in args)
    assert "--decision-key-file=/etc/signalbox/decision/key" in args
    assert containers["envoy"]["lifecycle"]["preStop"]["exec"]["command"][:2] == ["signalbox", "envoy-drain"]
    configmap = values.get("routingConfigMap", "signalbox-routing")
    assert f"--configmap={namespace}/{configmap}" in containers["extproc"]["args"]
    failure_mode = values.get("gateway", {}).get("failureMode", "closed")
    assert f"--failure-mode={failure_mode}" in containers["extproc"]["args"]
    accounting = values.get("gateway", {}).get("accounting", True)
    assert ("--no-accounting" in containers["extproc"]["args"]) == (not accounting)
    assert ("--no-accounting" in gateway["initContainers"][0]["args"]) == (not accounting)
    request_log = values.get("gateway", {}).get("requestLog", True)
    assert ("--no-request-log" in containers["extproc"]["args"]) == (not request_log)


def test_gateway_replicas_share_spend_and_learning_through_their_own_configmap(case):
    """Each replica may patch only the replica ConfigMap (its key of it), which the chart creates."""
    _, namespace, _, objects = case
    name = "sb-signalbox-replicas"
    assert any(o["metadata"]["name"] == name for o in of_kind(objects, "ConfigMap"))
    extproc = next(
        c
        for n, spec in pod_specs(objects).items()
        if n.endswith("-gateway")
        for c in spec["containers"]
        if c["name"] == "extproc"
    )
    assert f"--replica-configmap={namespace}/{name}" in extproc["args"]
    assert "--replica-sync-interval=2" in extproc["args"]
    assert extproc["env"][0] == {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    gateway_role = next(r for r in of_kind(objects, "Role") if r["metadata"]["name"] == "sb-signalbox-gateway-config")
    writable = [r for r in gateway_role["rules"] if "patch" in r["verbs"]]
    assert writable == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": [name],
            "verbs": ["get", "list", "watch", "patch"],
        }
    ]
    # The operator reads it (only it) to show the replicas' spend in RoutingPolicy status.budget.
    operator = next(c for n, spec in pod_specs(objects).items() if n.endswith("-operator") for c in spec["containers"])
    assert f"--replica-configmap={namespace}/{name}" in operator["args"]
    operator_role = next(r for r in of_kind(objects, "Role") if r["metadata"]["name"] == "sb-signalbox-operator-config")
    assert {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [name], "verbs": ["get"]} in operator_role[
        "rules"
    ]


def test_image_and_namespace_come_from_values(case):
    _, namespace, values, objects = case
    image = values.get("image", {})
    expected = "{}/{}:{}".format(
        image.get("registry", "ghcr.io"),
        image.get("repository", "signalbox/signalbox"),
        image.get("tag", importlib.metadata.version("signalbox")),
    )
    for spec in pod_specs(objects).values():
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            assert container["image"] == expected
    namespaced = [o for o in objects if o["kind"] not in ("ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering")]
    watched = set(values.get("operator", {}).get("watchNamespaces", []))
    assert {o["metadata"]["namespace"] for o in namespaced} <= {namespace} | watched


def test_optional_objects_follow_values(case):
    name, _, _, objects = case
    kinds = {o["kind"] for o in objects}
    assert ("HorizontalPodAutoscaler" in kinds) == (name == "ha")
    assert ("PodDisruptionBudget" in kinds) == (name == "ha")
    assert ("ServiceMonitor" in kinds) == (name == "metrics")
    gateway = next(o for o in of_kind(objects, "Deployment") if o["metadata"]["name"].endswith("-gateway"))
    assert ("replicas" in gateway["spec"]) == (name != "ha")  # the HPA owns replicas


def test_gateway_bootstrap_is_the_generator_output_for_its_failure_mode(case):
    """Failing open, Envoy must read its clusters from files (it starts and routes with the
    ext_proc down); failing closed they come over the ext_proc's ADS stream."""
    _, _, values, objects = case
    failure_mode = values.get("gateway", {}).get("failureMode", "closed")
    configmap = next(o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("envoy-bootstrap"))
    rendered = json.loads(configmap["data"]["envoy-bootstrap.json"])
    assert rendered == pod.bootstrap(failure_mode=failure_mode)
    over_ads = "ads" in rendered["dynamic_resources"]["cds_config"]
    assert over_ads == (failure_mode == "closed")


def test_committed_bootstrap_files_are_fresh():
    for mode, path in pod.BOOTSTRAP_FILES.items():
        assert (ROOT / path).read_text() == pod.bootstrap_json(mode), "stale: run `make chart-files`"


def test_chart_crds_are_the_generated_ones_not_a_copy():
    assert (CHART / "crds").is_symlink()
    with helm.Chart.load(str(CHART)) as chart:
        shipped = {Path(c["name"]).name: c["data"] for c in chart.crds}
    assert set(shipped) == set(crdgen.definitions())
    for name, text in shipped.items():
        assert text == (ROOT / "crds" / name).read_text()


def test_app_version_matches_the_package():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == importlib.metadata.version("signalbox")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"gateway": {"failureMode": "sometimes"}}, "/gateway/failureMode"),
        ({"operator": {"replicas": 0}}, "/operator/replicas"),
        ({"image": {"registry": ""}}, "/image/registry"),
        ({"gatway": {"replicas": 2}}, "'gatway' not allowed"),  # a typo is an error, not silently ignored
        ({"gateway": {"replicaSync": {"intervalSeconds": 0}}}, "/gateway/replicaSync/intervalSeconds"),
        ({"gateway": {"tracing": {"otlpEndpoint": "http://collector"}}}, "/gateway/tracing/otlpEndpoint"),
        ({"gateway": {"tracing": {"samplingPercent": 150}}}, "/gateway/tracing/samplingPercent"),
    ],
)
def test_values_schema_rejects_bad_values(values, message):
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(helm.HelmError, match=message):
        chart.validate_schema(values)


def test_notes_tell_the_user_what_to_apply_next():
    with helm.Chart.load(str(CHART)) as chart:
        notes = chart.render({}, name="sb", namespace="signalbox-system")["signalbox/templates/NOTES.txt"]
    assert "kubectl get aiproviders,routingpolicies" in notes
    assert "http://sb-signalbox-gateway.signalbox-system.svc:80/v1" in notes


def test_grafana_dashboard_queries_only_metrics_that_exist():
    import re

    from signalbox.extproc.metrics import Metrics

    objects = render(*reversed(MATRIX["metrics"]))
    configmap = next(o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("grafana-dashboard"))
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(configmap["data"]["signalbox.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    # Metric names, not the label names of `by (...)` and `{...}` clauses.
    bare = [re.sub(r"by \([^)]*\)|\{[^}]*\}", "", e) for e in exprs]
    ours = {n for e in bare for n in re.findall(r"\b((?:signalbox|gen_ai)_[a-z_]+)", e)}
    metrics = Metrics()
    metrics.watch_budgets(list)  # as every Processor does: budget gauges are read at scrape time
    exposed = metrics.exposition().decode()
    for name in ours:
        base = re.sub(r"_(total|bucket|sum|count)$", "", name)
        assert base in exposed, name
    assert {"signalbox_cost_usd_total", "gen_ai_client_token_usage_total", "signalbox_requests_total"} <= ours
    assert {"signalbox_budget_spent_usd", "signalbox_budget_limit_usd", "signalbox_budget_remaining_usd"} <= ours


def test_the_admin_api_is_off_the_network_unless_exposed_and_then_behind_a_token(case):
    _, _, values, objects = case
    exposed = values.get("gateway", {}).get("adminApi", {}).get("expose", False)
    metrics_service = next(o for o in of_kind(objects, "Service") if o["metadata"]["name"].endswith("-gateway-metrics"))
    ports = {p["name"] for p in metrics_service["spec"]["ports"]}
    assert ports == ({"metrics", "admin"} if exposed else {"metrics"})
    secrets = {o["metadata"]["name"]: o for o in of_kind(objects, "Secret")}
    assert "sb-signalbox-decision-key" in secrets  # every replica signs decisions alike
    assert base64.b64decode(secrets["sb-signalbox-decision-key"]["data"]["key"])
    assert ("sb-signalbox-admin-token" in secrets) == exposed
    # Signalbox's metrics are scraped through Envoy's metrics port either way.
    health = envoygen.health_listener(pod.options())
    routes = health["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    metrics_route = next(r for r in routes if r["match"].get("path") == "/metrics")
    assert metrics_route["route"]["cluster"] == envoygen.EXTPROC_ADMIN_CLUSTER


def extproc(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The gateway pod's spec and its extproc container."""
    (deployment,) = [d for d in of_kind(objects, "Deployment") if d["metadata"]["name"].endswith("gateway")]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "extproc"]
    return pod, container


def test_limits_go_to_the_redis_named_in_values_with_its_password_and_ca_from_secrets():
    pod, container = extproc(render(*reversed(MATRIX["custom"])))
    assert "--redis-url=rediss://redis.internal:6380/0?ssl_ca_certs=/etc/signalbox/redis-ca/ca.crt" in container["args"]
    (password,) = [e for e in container["env"] if e["name"] == "SIGNALBOX_REDIS_PASSWORD"]
    assert password["valueFrom"]["secretKeyRef"] == {"name": "redis-auth", "key": "password"}
    assert {"name": "redis-ca", "mountPath": "/etc/signalbox/redis-ca", "readOnly": True} in container["volumeMounts"]
    assert any(v["name"] == "redis-ca" and v["secret"]["secretName"] == "redis-ca" for v in pod["volumes"])
    (operator,) = [
        d
        for d in of_kind(render(*reversed(MATRIX["custom"])), "Deployment")
        if d["metadata"]["name"].endswith("operator")
    ]
    (op,) = operator["spec"]["template"]["spec"]["containers"]
    assert any(a.startswith("--redis-url=rediss://redis.internal:6380/0") for a in op["args"])  # status.spend
    _, default = extproc(render(*reversed(MATRIX["defaults"])))
    assert not any(a.startswith("--redis-url") for a in default["args"])  # embedded, per replica


def test_spans_go_to_the_collector_named_in_values():
    """The sidecar writes Envoy's listener and clusters (tracing included) from its arguments."""
    _, custom = extproc(render(*reversed(MATRIX["custom"])))
    assert "--otlp-endpoint=otel-collector.observability:4317" in custom["args"]
    assert "--trace-sampling=10" in custom["args"]
    _, default = extproc(render(*reversed(MATRIX["defaults"])))
    assert not any(a.startswith("--otlp-endpoint") for a in default["args"])


def test_service_accounts_carry_the_annotations_irsa_needs():
    """With eks.amazonaws.com/role-arn on the gateway's ServiceAccount, EKS gives its pods the
    web identity Envoy signs Bedrock requests with (AIProviders of type bedrock without auth);
    on the operator's, its probes of them sign with that role too."""
    role = "arn:aws:iam::123456789012:role/signalbox-bedrock"
    values = {
        "gateway": {"serviceAccountAnnotations": {"eks.amazonaws.com/role-arn": role}},
        "operator": {"serviceAccountAnnotations": {"eks.amazonaws.com/role-arn": role}},
    }
    accounts = {
        o["metadata"]["name"]: o["metadata"] for o in of_kind(render(values, "signalbox-system"), "ServiceAccount")
    }
    assert {name.rsplit("-", 1)[1] for name in accounts} == {"gateway", "operator"}
    for metadata in accounts.values():
        assert metadata["annotations"] == {"eks.amazonaws.com/role-arn": role}
    plain = of_kind(render({}, "signalbox-system"), "ServiceAccount")
    assert all("annotations" not in o["metadata"] for o in plain)


def test_providers_tls_is_verified_against_the_ca_secret_named_in_values():
    """config-sync names the file in the clusters it writes (the init container's and the
    sidecar's), and Envoy reads it: all three containers mount it."""
    pod, _ = extproc(render(*reversed(MATRIX["custom"])))
    mount = {"name": "upstream-ca", "mountPath": "/etc/signalbox-upstream-ca", "readOnly": True}
    for container in pod["initContainers"] + pod["containers"]:
        assert mount in container["volumeMounts"], container["name"]
        if container["name"] != "envoy":
            assert "--upstream-ca-file=/etc/signalbox-upstream-ca/ca.crt" in container["args"]
    assert any(v["name"] == "upstream-ca" and v["secret"]["secretName"] == "provider-ca" for v in pod["volumes"])
    # Not asked for: the system's CAs, nothing mounted.
    pod, container = extproc(render(*reversed(MATRIX["defaults"])))
    assert not any(a.startswith("--upstream-ca-file") for a in container["args"])
    assert not any(v["name"] == "upstream-ca" for v in pod["volumes"])
