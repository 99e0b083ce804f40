"""The command line reaches the components: flags are not only parsed but applied."""

import json
from pathlib import Path

from signalbox.cli import build_parser, local_gateway, pod_options, request_summary
from signalbox.local import LocalGateway

ROOT = Path(__file__).resolve().parents[2]


def test_no_accounting_turns_accounting_off_in_envoy_and_in_every_ext_proc_worker(tmp_path):
    args = build_parser().parse_args(["up", "-f", "x.yaml", "--workdir", str(tmp_path), "--no-accounting"])
    gateway = local_gateway(args)
    assert gateway.options.accounting is False  # no usage filter, no access log in Envoy's listener
    assert all("--no-accounting" in gateway.extproc_argv(n) for n in range(len(gateway.options.extproc_sockets)))
    # The ext_proc parses what the gateway passes it.
    assert build_parser().parse_args(gateway.extproc_argv(0)[3:]).no_accounting is True

    on = local_gateway(build_parser().parse_args(["up", "-f", "x.yaml", "--workdir", str(tmp_path)]))
    assert on.options.accounting is True and "--no-accounting" not in on.extproc_argv(0)


def test_the_gateway_pods_processes_honour_no_accounting():
    for command in ("config-sync", "gateway-sidecar"):
        assert pod_options(build_parser().parse_args([command, "--no-accounting"])).accounting is False
        assert pod_options(build_parser().parse_args([command])).accounting is True


def test_the_sidecars_config_sync_child_gets_every_pod_option_the_sidecar_was_given():
    """The sidecar starts `config-sync` with its pod options (cli._config_sync_process): one not
    passed on would make the child write files for another pod (accounting on where the chart
    turned it off, another failure mode, another ConfigMap)."""
    from signalbox.cli import _pod_argv

    given = [
        "--configmap=team/routing",
        "--workdir=/run/x",
        "--failure-mode=open",
        "--no-accounting",
        "--no-request-log",
        "--server=https://k8s:6443",
        "--replica-configmap=team/replicas",
        "--replica-sync-interval=0.5",
        "--replica=gw-3",
        "--listen-port=9000",
        "--health-port=9001",
        "--admin-port=9002",
        "--admin-socket=/run/x/admin.sock",
        "--otlp-endpoint=collector:4317",
        "--trace-sampling=12.5",
        "--upstream-ca-file=/etc/ca.pem",
    ]
    sidecar = build_parser().parse_args(["gateway-sidecar", *given, "--health-address=0.0.0.0:8082"])
    child = build_parser().parse_args(["config-sync", *_pod_argv(sidecar)])
    for option in given:
        dest = option.split("=")[0].lstrip("-").replace("-", "_")
        assert getattr(child, dest) == getattr(sidecar, dest), option
    assert pod_options(child) == pod_options(sidecar)
    # Defaults stay defaults.
    defaults = build_parser().parse_args(["gateway-sidecar"])
    assert pod_options(build_parser().parse_args(["config-sync", *_pod_argv(defaults)])) == pod_options(defaults)


def test_the_request_log_is_on_by_default_and_goes_to_the_workdir_locally_and_stdout_in_a_pod(tmp_path):
    up = ["up", "-f", "x.yaml", "--workdir", str(tmp_path)]
    assert local_gateway(build_parser().parse_args(up)).options.request_log == str(tmp_path / "requests.log")
    assert local_gateway(build_parser().parse_args([*up, "--no-request-log"])).options.request_log == ""
    for command in ("config-sync", "gateway-sidecar"):
        assert pod_options(build_parser().parse_args([command])).request_log == "/dev/stdout"
        assert pod_options(build_parser().parse_args([command, "--no-request-log"])).request_log == ""


def test_signalbox_up_sums_up_each_request_log_line_on_the_console():
    routed = {
        "time": "2026-11-22T10:09:01.039Z",
        "method": "POST",
        "path": "/v1/chat/completions",
        "status": 200,
        "duration_ms": 7,
        "policy": "auto",
        "provider": "fast-local",
        "model": "small",
        "reason": "cost:cheapest-with-quality>=0",
        "prompt_tokens": "10",
        "completion_tokens": "7",
    }
    line = request_summary(routed)
    assert line.endswith(
        " 200 POST /v1/chat/completions  auto -> fast-local/small  cost:cheapest-with-quality>=0  7 ms  10+7 tokens"
    )
    refused = {**routed, "status": 404, "policy": "none", "provider": "none", "model": "none"}
    refused.update(reason="model_not_found", prompt_tokens=None, completion_tokens=None)
    assert request_summary(refused).endswith(" 404 POST /v1/chat/completions  none -> none  model_not_found  7 ms")
    attempt = {"event": "attempt", "time": routed["time"], "backend": "default/slow/big"}
    attempt.update(status=0, flags="UT", duration_ms=1500)
    assert request_summary(attempt).endswith("   attempt -> default/slow/big  no response UT  1500 ms")


def test_a_request_that_is_no_routing_decision_says_what_happened():
    listing = {
        "time": "2026-11-22T10:09:01.039Z",
        "method": "GET",
        "path": "/v1/models",
        "status": 200,
        "duration_ms": 2,
        "policy": None,
        "provider": None,
        "model": None,
        "reason": None,
    }
    line = request_summary(listing)
    assert line.endswith(" 200 GET /v1/models  answered by the gateway  2 ms") and "None" not in line


def test_classify_reports_bad_lines_and_classifies_the_rest(tmp_path, capsys):
    from signalbox.cli import main

    lines = ['{"prompt": "Write a Python function"}', "not json", "[1, 2]", '{"prompt": 5}', ""]
    (tmp_path / "in.jsonl").write_text("\n".join(lines))
    out = tmp_path / "out.jsonl"
    argv = ["classify", "-f", str(ROOT / "examples" / "quickstart"), "--input", str(tmp_path / "in.jsonl")]
    assert main([*argv, "--output", str(out)]) == 1
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert records[0]["line"] == 1 and records[0]["task_type"] == "code"
    assert [r["line"] for r in records if "error" in r] == [2, 3, 4]
    assert "in.jsonl:2:" in capsys.readouterr().err


def test_signalbox_up_applies_only_a_changed_config_and_only_its_inputs(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("providers.yaml", "policies.yaml"):
        (inputs / name).write_text((ROOT / "examples" / "quickstart" / name).read_text())
    # A work directory inside the watched folder: its files must never trigger a recompile.
    gateway = LocalGateway(paths=[str(inputs)], port=0, workdir=inputs / "work", start_fakes=False)
    assert gateway.apply().changed and gateway.generation == 1
    (inputs / "notes.txt").write_text("not an input")
    again = gateway.apply()
    assert again.ok and not again.changed and gateway.generation == 1
    assert gateway.is_input(inputs / "policies.yaml") and gateway.is_input(inputs / "sub" / "more.yml")
    assert not gateway.is_input(inputs / "notes.txt") and not gateway.is_input(inputs / "requests.log")
    assert not gateway.is_input(inputs / "work" / "config" / "routing.json")
    assert not gateway.is_input(inputs / "work" / "stray.yaml")
    edited = (inputs / "policies.yaml").read_text().replace("weight: 3", "weight: 4")
    (inputs / "policies.yaml").write_text(edited)
    assert gateway.apply().changed and gateway.generation == 2


def test_the_operators_namespaces_reach_its_settings():
    from signalbox.operator.main import config_from

    config = config_from(build_parser().parse_args(["operator", "-n", "team-a", "-n", "team-b"]))
    assert config.namespaces == ("team-a", "team-b") and config.exact_namespaces  # no namespace scanning
    assert config_from(build_parser().parse_args(["operator"])).namespaces == ()


def test_validate_summarises_a_large_fleet_and_lists_everything_on_request(tmp_path, capsys):
    from bench.fleet import alias
    from bench.fleet import main as write_fleet
    from signalbox.cli import SHOWN
    from signalbox.cli import main as cli_main

    write_fleet(["--out", str(tmp_path), "--providers", "60", "--policies", "60"])
    assert cli_main(["validate", "-f", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "60 provider(s), 300 backend(s), 60 policy(ies)" in out
    assert f"60 alias(es): {alias(0)}" in out and f"and {60 - SHOWN} more (--all" in out
    assert alias(59) not in out and len(out) < 2_000
    assert cli_main(["validate", "-f", str(tmp_path), "--all"]) == 0
    assert alias(59) in capsys.readouterr().out

    # Problems too: the first ones, then how many more.
    (tmp_path / "policies.yaml").write_text(
        (tmp_path / "policies.yaml").read_text().replace("provider: p", "provider: x")
    )
    assert cli_main(["validate", "-f", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "invalid: 300 problem(s)" in err and err.count("\n  - ") == SHOWN and "280 more" in err


def test_building_the_command_line_loads_no_operator_or_control_plane_library():
    """Every command builds the whole parser, each ext_proc worker's too: the operator's
    arguments once brought kopf, the Kubernetes client and pydantic into every worker (151 MB
    of RSS on the quickstart, 64 MB without them)."""
    import subprocess
    import sys

    heavy = {"kopf", "kubernetes", "pydantic", "yaml", "google.auth", "signalbox.core.compiler"}
    code = (
        "import sys; from signalbox.cli import build_parser; build_parser(); "
        f"print(sorted({heavy!r} & set(sys.modules)))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_every_signalbox_process_keeps_libraries_to_one_thread_unless_told_otherwise():
    """A gateway runs one ext_proc worker per core: OpenBLAS's and tokenizers' own threads only
    competed with the other workers (the task-type tier 0.62 ms median with tokenizers' pool,
    0.41 ms without, bench/tiers.py). Set before numpy loads, and never over an operator's own
    choice."""
    import os
    import subprocess
    import sys

    code = (
        "import os, sys; import signalbox.cli; "
        "print(os.environ['OPENBLAS_NUM_THREADS'], os.environ['TOKENIZERS_PARALLELISM'], 'numpy' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["1", "false", "False"]
    chosen = {**env, "TOKENIZERS_PARALLELISM": "true"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=chosen).stdout
    assert out.split()[1] == "true"


SCRAPE_IN_A_THREAD = """
import gc, io, sys
if sys.argv[1] == "signalbox":
    import signalbox.cli  # noqa: F401  (what every signalbox process imports first)
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from signalbox.extproc.memtrim import release_free_memory

def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

def scrape():  # as the admin API answers /metrics: a text of 12 MB, made in a thread
    out = io.BytesIO()
    for _ in range(400):
        out.write(b"x" * 30000)
    return out.getvalue()

pool = ThreadPoolExecutor(1)
before = rss()
for _ in range(3):
    body = pool.submit(scrape).result()
    body = None
    gc.collect()
    release_free_memory()
print(rss() - before)
"""


def test_a_large_block_made_in_a_thread_is_given_back_once_freed():
    """glibc raised its mmap threshold to the size of any mapped block freed and then kept later
    blocks of that size in its heaps: each worker serving /metrics at a large fleet kept the
    scrape's text (12 MB) for good. `signalbox.processenv` fixes the threshold at 1 MiB."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def grown(how: str) -> float:
        run = subprocess.run(
            [sys.executable, "-c", SCRAPE_IN_A_THREAD, how], capture_output=True, text=True, check=True, env=env
        )
        return float(run.stdout)

    assert grown("plain") > 8  # glibc's own behaviour, which the setting is for
    assert grown("signalbox") < 2


def test_signalbox_up_says_at_start_which_providers_have_no_key_here_never_a_key(monkeypatch, capsys):
    """A provider whose key cannot be read is never routed to; `signalbox up` says so at start
    (by where the key should be, never its value), a large fleet's counted beyond the first."""
    from signalbox.cli import MISSING_KEYS_SHOWN, _warn_of_missing_keys
    from signalbox.core.compiler import compile_config
    from tests.factories import model, provider

    monkeypatch.setenv("SET_KEY", "sk-set-value-0042")
    monkeypatch.delenv("UNSET_KEY", raising=False)
    keyed = [
        provider("set", "http://s:1/v1", [model("m")], auth={"env": "SET_KEY"}),
        provider("a-unset", "http://u:1/v1", [model("m")], auth={"env": "UNSET_KEY"}),
        provider("b-secret", "http://x:1/v1", [model("m")], auth={"secretRef": {"name": "k", "key": "apiKey"}}),
        *(provider(f"c-more{i}", "http://m:1/v1", [model("m")], auth={"env": "UNSET_KEY"}) for i in range(6)),
    ]
    cfg = compile_config(keyed, []).config
    _warn_of_missing_keys(cfg)
    said = capsys.readouterr().err
    assert f"8 of {len(keyed)} provider(s) have no API key" in said
    assert "default/a-unset (environment variable UNSET_KEY)" in said and "Secret default/k key apiKey" in said
    assert "reads no Secrets" in said and f"and {8 - MISSING_KEYS_SHOWN} more" in said
    assert "default/set " not in said and "sk-set-value-0042" not in said
    _warn_of_missing_keys(compile_config(keyed[:1], []).config)
    assert capsys.readouterr().err == ""


def test_signalbox_ups_example_request_is_one_the_first_alias_can_answer():
    """The start's `try:` line asks the first alias in the API its backends serve: a chat for
    chat models, an embedding when its policy has embedding models only (chat would be a 400)."""
    from signalbox.cli import _example_request
    from signalbox.core.compiler import compile_config
    from tests.factories import backend, model, policy, provider

    providers = [provider("p", "http://p:1/v1", [model("chat"), model("emb", capabilities=["embeddings"])])]
    embed_first = [policy("a", ["a-embed"], [backend("p", "emb")]), policy("b", ["b-chat"], [backend("p", "chat")])]
    said = _example_request(compile_config(providers, embed_first).config, "http://gw/v1")
    assert said.startswith("curl -s http://gw/v1/embeddings") and '"model":"a-embed","input"' in said
    chat_first = [policy("a", ["a-chat"], [backend("p", "chat")]), policy("b", ["b-embed"], [backend("p", "emb")])]
    said = _example_request(compile_config(providers, chat_first).config, "http://gw/v1")
    assert said.startswith("curl -s http://gw/v1/chat/completions") and '"model":"a-chat","messages"' in said
