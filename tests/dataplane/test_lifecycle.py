"""Gateway lifecycle: hot reload, the ext_proc going away, and the CLI a newcomer runs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from signalbox.cli import main as cli_main
from signalbox.extproc.reload import read_config
from signalbox.local import free_port
from tests.factories import backend, dump, model, policy, provider

from .conftest import start_gateway, wait_for

pytestmark = pytest.mark.dataplane
ROOT = Path(__file__).resolve().parents[2]


def two_way(fakes, weight_alpha=1, weight_beta=0, aliases=("auto",), strategy="weighted"):
    """Alpha and beta behind one alias; beta costs more, so `cost` (decided by the ext_proc)
    picks alpha like weights 1:0 (which Envoy routes alone) do."""
    return dump(
        provider("alpha", fakes["alpha"].url + "/v1", [model("a1")]),
        provider("beta", fakes["beta"].url + "/v1", [model("b1", inputPricePer1M=50)]),
        policy(
            "main",
            list(aliases),
            [backend("alpha", "a1", weight=weight_alpha), backend("beta", "b1", weight=weight_beta)],
            strategy=strategy,
        ),
    )


def served(gateway, alias="auto", n=20) -> Counter:
    with openai.OpenAI(base_url=gateway.url, api_key="x", max_retries=0) as client:
        return Counter(
            client.chat.completions.with_raw_response.create(
                model=alias, messages=[{"role": "user", "content": "hi"}]
            ).headers["x-signalbox-provider"]
            for _ in range(n)
        )


def kill_extproc(gateway) -> None:
    for name, proc in gateway.processes.items():
        if name.startswith("extproc"):
            proc.kill()
            proc.wait()


def test_edit_applies_and_bad_edit_keeps_last_good(fakes, tmp_path):
    gw = start_gateway(tmp_path, two_way(fakes, weight_alpha=1, weight_beta=0))
    try:
        assert served(gw) == {"alpha": 20}
        source = Path(gw.paths[0]) / "resources.yaml"

        source.write_text(two_way(fakes, weight_alpha=0, weight_beta=1, aliases=("auto", "extra")))
        started = time.monotonic()
        assert gw.apply().ok
        assert wait_for(lambda: served(gw, n=1) == {"beta": 1})
        assert wait_for(lambda: served(gw, "extra", n=1) == {"beta": 1})  # new route in Envoy too
        print(f"reload visible after {time.monotonic() - started:.2f}s")
        assert served(gw) == {"beta": 20}

        source.write_text(source.read_text().replace("weight: 1", "weight: -4"))
        result = gw.apply()
        assert not result.ok and any("spec.backends" in p.path for p in result.problems)
        assert gw.generation == 2
        # Nothing was published, so nothing can change later: the data plane still reports and
        # serves generation 2 (no waiting in the hope that a reload would have shown by now).
        assert read_config(gw.config_file).generation == 2
        assert httpx.get(f"{gw.admin_url}/healthz").json()["generation"] == 2
        assert served(gw) == {"beta": 20}
    finally:
        gw.stop()


def test_extproc_unreachable_fails_closed_by_default(fakes, tmp_path):
    gw = start_gateway(tmp_path, two_way(fakes, strategy="cost"))
    try:
        assert served(gw, n=2) == {"alpha": 2}
        kill_extproc(gw)
        r = httpx.post(f"{gw.url}/chat/completions", json={"model": "auto", "messages": []})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "routing_unavailable"
        assert len(fakes["alpha"].requests()) == 2  # nothing slipped through unrouted
    finally:
        gw.stop()


def test_compiled_policies_keep_serving_while_the_extproc_is_down(fakes, tmp_path):
    """Envoy routes a compiled policy alone: the ext_proc's absence does not reach it."""
    decided = policy("decided", ["decided"], [backend("alpha", "a1"), backend("beta", "b1")], strategy="cost")
    gw = start_gateway(tmp_path, two_way(fakes) + "---\n" + dump(decided))
    try:
        kill_extproc(gw)
        assert served(gw, n=5) == {"alpha": 5}
        # ... and the ext_proc was down all along: a decided alias still fails closed.
        r = httpx.post(f"{gw.url}/chat/completions", json={"model": "decided", "messages": []})
        assert r.status_code == 503 and r.json()["error"]["code"] == "routing_unavailable"
    finally:
        gw.stop()


def test_extproc_unreachable_fails_open_when_configured(fakes, tmp_path):
    gw = start_gateway(tmp_path, two_way(fakes, strategy="cost"), failure_mode="open")
    try:
        kill_extproc(gw)
        r = httpx.post(f"{gw.url}/chat/completions", json={"model": "auto", "messages": []})
        assert r.status_code == 200
        assert r.headers["x-fake-provider"] == "alpha"
    finally:
        gw.stop()


def test_validate_prints_every_problem_and_exits_nonzero(tmp_path, capsys):
    assert cli_main(["validate", "-f", str(ROOT / "examples" / "quickstart")]) == 0
    out = capsys.readouterr().out
    # The quickstart's backends differ in capabilities: every policy there reads the prompt.
    assert "valid: 3 provider(s)" in out and "4 policy(ies) (0 compiled, 4 decided)" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        dump(
            provider("p", "http://127.0.0.1:1/v1", [model("m", quality=7)]),
            policy("q", ["auto"], [backend("p", "m"), backend("nobody", "m")], strategy="sometimes"),
        )
    )
    assert cli_main(["validate", "-f", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "2 problem(s)" in err or "3 problem(s)" in err
    assert "spec.models[0].quality" in err and "spec.strategy" in err


def test_examples_for_real_providers_validate():
    assert cli_main(["validate", "-f", str(ROOT / "examples" / "providers")]) == 0
    # The pair the README's "Install in a cluster" applies.
    readme_pair = [ROOT / "examples" / "providers" / "openai.yaml", ROOT / "examples" / "policies" / "openai-auto.yaml"]
    assert cli_main(["validate", *(f"-f={p}" for p in readme_pair)]) == 0


def test_signalbox_up_serves_the_quickstart(tmp_path):
    """The README's first command, as a newcomer runs it (on ports free on this machine: the
    gateway's picked by `--port 0`, the embedded fakes' moved to free ones)."""
    quickstart = tmp_path / "quickstart"
    quickstart.mkdir()
    moved = {port: str(free_port()) for port in ("18081", "18082", "18083")}
    for f in (ROOT / "examples" / "quickstart").glob("*.yaml"):
        text = f.read_text()
        for port, free in moved.items():
            text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free}")
        (quickstart / f.name).write_text(text)
    proc = subprocess.Popen(
        [sys.executable, "-m", "signalbox.cli", "up", "-f", str(quickstart), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    console: list[str] = []
    try:
        line = proc.stdout.readline()
        found = re.search(r"Signalbox gateway ready: (http://127\.0\.0\.1:\d+)/v1", line)
        assert found, line  # the first line a newcomer sees
        root = found.group(1)
        threading.Thread(target=lambda: console.extend(proc.stdout), daemon=True).start()
        with openai.OpenAI(base_url=f"{root}/v1", api_key="any", max_retries=0) as client:
            reply = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hello"}])
            assert reply.system_fingerprint == "fast-local"
            code = client.chat.completions.with_raw_response.create(
                model="by-task", messages=[{"role": "user", "content": "Write a Python function to parse CSV"}]
            )
            assert code.headers["x-signalbox-provider"] == "smart-local"
            # The cross-provider fallback policy, served to an OpenAI client by the Anthropic model.
            claude = client.chat.completions.with_raw_response.create(
                model="claude-first", messages=[{"role": "user", "content": "hello"}]
            )
            assert claude.headers["x-signalbox-provider"] == "claude-local"
            assert claude.parse().choices[0].message.content == "[claude-local] answer from claude-sonnet-local"
        # And to the Anthropic SDK pointed at the gateway, streaming.
        ant = anthropic.Anthropic(base_url=root, api_key="any", max_retries=0)
        with (
            ant,
            ant.messages.stream(
                model="claude-first", max_tokens=64, messages=[{"role": "user", "content": "hello"}]
            ) as stream,
        ):
            assert "".join(stream.text_stream).startswith("chunk0 ")
        # ... and, translated, from the quickstart's OpenAI-compatible models.
        ant = anthropic.Anthropic(base_url=root, api_key="any", max_retries=0)
        with ant:
            raw = ant.messages.with_raw_response.create(
                model="auto", max_tokens=64, messages=[{"role": "user", "content": "hello"}]
            )
            assert raw.headers["x-signalbox-provider"] == "fast-local"
            assert raw.parse().content[0].text == "[fast-local] answer from small-8b-instruct"
            with ant.messages.stream(
                model="auto", max_tokens=64, messages=[{"role": "user", "content": "hello"}]
            ) as stream:
                assert "".join(stream.text_stream).startswith("chunk0 ")
        with openai.OpenAI(base_url=f"{root}/v1", api_key="any", max_retries=0) as client:
            # What Claude cannot do (two answers) goes to the fallback.
            two = client.chat.completions.with_raw_response.create(
                model="claude-first", messages=[{"role": "user", "content": "hello"}], n=2
            )
            assert two.headers["x-signalbox-provider"] == "smart-local"
            assert [c.index for c in two.parse().choices] == [0, 1]  # both answers
        with openai.OpenAI(base_url=f"{root}/v1", api_key="any", max_retries=0) as client:
            assert client.models.retrieve("auto").id == "auto"
        # Each request is summed up on the console from the request log (flushed every second),
        # with the path the client called, the models API's too.
        assert wait_for(lambda: any(" 200 POST /v1/chat/completions  by-task -> smart-local/" in c for c in console))
        assert wait_for(lambda: any(" 200 GET /v1/models/auto  answered by the gateway" in c for c in console))
        # A bad edit is reported and changes nothing; undoing it says the problems are gone.
        policies = quickstart / "policies.yaml"
        good = policies.read_text()
        policies.write_text(good.replace("strategy: weighted", "strategy: wieghted"))
        assert wait_for(lambda: any("kept generation 1: 1 problem(s)" in c for c in console))
        policies.write_text(good)
        assert wait_for(
            lambda: any("no problems left; generation 1 (the same config) stays in force" in c for c in console)
        )
        assert not [c for c in console if "watchfiles" in c]  # its own INFO lines: noise here
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert proc.returncode == 0


def test_feedback_teaches_routing_through_the_gateway(fakes, tmp_path):
    """Quality feedback (POST /v1/feedback with the x-signalbox-decision header) moves a class to
    the better backend. Two ext_proc workers: feedback that reached one teaches both."""
    resources = dump(
        provider("alpha", fakes["alpha"].url + "/v1", [model("a1", inputPricePer1M=0.1, outputPricePer1M=0.1)]),
        provider("beta", fakes["beta"].url + "/v1", [model("b1", inputPricePer1M=1, outputPricePer1M=1)]),
        policy(
            "learn",
            ["learn"],
            [backend("alpha", "a1"), backend("beta", "b1")],
            strategy="cost",
            cost={"qualityTolerance": 0.05},
            learning={"enabled": True, "explorationRate": 0.0, "priorWeight": 2},
        ),
    )
    gw = start_gateway(tmp_path, resources, extproc_workers=2)
    try:
        with openai.OpenAI(base_url=gw.url, api_key="x", max_retries=0) as client:

            def ask():
                raw = client.chat.completions.with_raw_response.create(
                    model="learn", messages=[{"role": "user", "content": "Write a Python function to parse CSV"}]
                )
                return raw.headers["x-signalbox-provider"], raw.headers["x-signalbox-decision"]

            first, decision = ask()
            assert first == "alpha"  # cheaper, and nothing learned yet
            # The client reports alpha's answer for this class as poor, once: one worker hears it.
            r = httpx.post(f"{gw.url}/feedback", json={"decision": decision, "score": 0.0})
            assert r.status_code == 200 and r.json()["backend"] == "default/alpha/a1"
            assert [ask()[0] for _ in range(6)] == ["beta"] * 6  # whichever worker routes it
            bad = httpx.post(f"{gw.url}/feedback", json={"decision": "nonsense", "score": 2})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "decision"
    finally:
        gw.stop()


def test_failed_over_first_choices_are_learned_from(fakes, tmp_path):
    """A learning policy stops choosing first a backend whose requests for this class had to fail
    over, after one request (as soon as its access log entry is in: batched every 100 ms), long
    before Envoy's outlier detection (5 consecutive 5xx) would eject it, and whichever worker
    routes the next request."""
    fakes["flaky2"].behave(status=500)
    resources = dump(
        provider("flaky", fakes["flaky2"].url + "/v1", [model("f", inputPricePer1M=0.1, outputPricePer1M=0.1)]),
        provider("beta", fakes["beta"].url + "/v1", [model("b1", inputPricePer1M=1, outputPricePer1M=1)]),
        policy(
            "learn",
            ["learn"],
            [backend("flaky", "f"), backend("beta", "b1", priority=1)],
            strategy="cost",
            cost={"qualityTolerance": 0.05},
            learning={"enabled": True, "explorationRate": 0.0},
        ),
    )
    gw = start_gateway(tmp_path, resources, extproc_workers=2)
    try:
        assert served(gw, "learn", n=1) == {"beta": 1}  # no request lost, thanks to failover
        request = {"model": "learn", "messages": [{"role": "user", "content": "hi"}]}
        # The lesson arrives with the access log; the explain API shows when it is in.
        assert wait_for(lambda: httpx.post(f"{gw.admin_url}/v1/route", json=request).json()["provider"] == "beta")
        assert served(gw, "learn", n=7) == {"beta": 7}
        assert len(fakes["flaky2"].requests()) == 1  # then beta is chosen first, by every worker
    finally:
        gw.stop()


def test_admin_api_explains_what_the_live_request_did_and_counts_it(fakes, tmp_path):
    resources = dump(
        provider("alpha", fakes["alpha"].url + "/v1", [model("a1", quality=0.5, capabilities=["streaming"])]),
        provider("beta", fakes["beta"].url + "/v1", [model("b1", quality=0.9, capabilities=["streaming", "tools"])]),
        policy("smart", ["smart"], [backend("alpha", "a1"), backend("beta", "b1")], strategy="cost"),
    )
    gw = start_gateway(tmp_path, resources, extproc_workers=1)
    try:
        request = {"model": "smart", "messages": [{"role": "user", "content": "Prove that sqrt(2) is irrational"}]}
        explained = httpx.post(f"{gw.admin_url}/v1/route", json=request).json()
        with openai.OpenAI(base_url=gw.url, api_key="x", max_retries=0) as client:
            live = client.chat.completions.with_raw_response.create(**request)
        assert live.headers["x-signalbox-provider"] == explained["provider"] == "beta"
        assert live.headers["x-signalbox-reason"] == explained["reason"]
        assert explained["classification"]["complexity"] == "expert"
        assert {c["backend"]: c["kept"] for c in explained["candidates"]} == {
            "default/alpha/a1": True,
            "default/beta/b1": True,
        }

        tools = {**request, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}
        dropped = httpx.post(f"{gw.admin_url}/v1/route", json=tools).json()["candidates"]
        assert {"backend": "default/alpha/a1", "kept": False, "reason": "lacks tools"} in dropped

        models = httpx.get(f"{gw.admin_url}/v1/models").json()["data"]
        assert models[0]["backends"][1]["quality"] == 0.9 and models[0]["backends"][1]["healthy"] is True
        httpx.post(f"{gw.url}/chat/completions", json={"model": "nope"})
        metrics = httpx.get(f"{gw.admin_url}/metrics").text
        assert (
            'signalbox_requests_total{model="b1",outcome="routed",policy="smart",provider="beta",'
            'strategy="cost",tier="semantic"} 1.0'
        ) in metrics
        assert 'outcome="model_not_found"' in metrics
        assert "signalbox_config_generation 1.0" in metrics
        assert httpx.get(f"{gw.admin_url}/healthz").json() == {"status": "ok", "generation": 1}
    finally:
        gw.stop()


def test_tokens_and_cost_are_counted_for_plain_and_streamed_responses(fakes, tmp_path):
    resources = dump(
        provider("alpha", fakes["alpha"].url + "/v1", [model("a1", inputPricePer1M=2.0, outputPricePer1M=8.0)]),
        policy("paid", ["paid"], [backend("alpha", "a1")]),
    )
    gw = start_gateway(tmp_path, resources, extproc_workers=2)
    # Generated text that looks like usage must not be counted as usage.
    fakes["alpha"].behave(content='Example: {"usage": {"prompt_tokens": 999, "completion_tokens": 999}}')
    try:
        with openai.OpenAI(base_url=gw.url, api_key="x", max_retries=0) as client:
            client.chat.completions.create(
                model="paid", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-fake-delay-ms": "150"}
            )
            chunks = list(
                client.chat.completions.create(
                    model="paid",
                    messages=[{"role": "user", "content": "hi"}],
                    stream=True,
                    extra_headers={"x-fake-chunks": "5", "x-fake-chunk-delay-ms": "100"},
                )
            )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "".join(f"chunk{i} " for i in range(5))  # the stream is intact
        asked = fakes["alpha"].requests()[-1]
        assert asked["stream"] and asked["stream_options"] == {"include_usage": True}  # the client did not ask

        def metric(name, **labels):
            wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            for line in httpx.get(f"{gw.admin_url}/metrics").text.splitlines():
                if line.startswith(f"{name}{{{wanted}}}"):
                    return float(line.rsplit(" ", 1)[1])
            return None

        common = {
            "gen_ai_request_model": "a1",
            "gen_ai_provider_name": "openai_compatible",
            "provider": "alpha",
            "policy": "paid",
        }
        # The fake reports 10 prompt tokens, and 7 completion tokens (plain) or 5 (one per chunk, streamed).
        assert wait_for(lambda: metric("gen_ai_client_token_usage_total", gen_ai_token_type="input", **common) == 20)
        assert metric("gen_ai_client_token_usage_total", gen_ai_token_type="output", **common) == 12
        expected = (20 * 2.0 + 12 * 8.0) / 1e6
        spent = metric("signalbox_cost_usd_total", model="a1", policy="paid", provider="alpha")
        assert abs(spent - expected) < 1e-12
        # Durations from the routing decision: the plain answer waited 150 ms, the stream's five
        # chunks came 100 ms apart, and its first chunk came before the other four.
        genai = {"gen_ai_request_model": "a1", "gen_ai_provider_name": "openai_compatible", "provider": "alpha"}
        assert metric("gen_ai_server_request_duration_seconds_count", **genai) == 2
        assert metric("gen_ai_server_time_to_first_token_seconds_count", **genai) == 1
        duration = metric("gen_ai_server_request_duration_seconds_sum", **genai)
        first_token = metric("gen_ai_server_time_to_first_token_seconds_sum", **genai)
        assert duration >= 0.55 and first_token <= duration - 0.55
    finally:
        gw.stop()


def test_header_matched_policies_and_hash_keys_reach_the_one_message_router_phase(fakes, tmp_path):
    """The router phase gets no headers message: the headers policies match on or hash by come
    as attributes of the body message, so a team's policy must still win for its requests."""
    team = policy("team", ["auto"], [backend("beta", "b1")])
    team["spec"]["match"]["headers"] = [{"name": "X-Team", "value": "ml"}]
    resources = dump(
        provider("alpha", fakes["alpha"].url + "/v1", [model("a1")]),
        provider("beta", fakes["beta"].url + "/v1", [model("b1")]),
        policy("everyone", ["auto"], [backend("alpha", "a1")]),
        team,
    )
    gw = start_gateway(tmp_path, resources)
    try:
        with openai.OpenAI(base_url=gw.url, api_key="x", max_retries=0) as client:

            def policy_of(**headers) -> str:
                raw = client.chat.completions.with_raw_response.create(
                    model="auto", messages=[{"role": "user", "content": "hi"}], extra_headers=headers
                )
                return raw.headers["x-signalbox-policy"] + "->" + raw.headers["x-signalbox-provider"]

            assert policy_of(**{"x-team": "ml"}) == "team->beta"
            assert policy_of(**{"x-team": "other"}) == "everyone->alpha"
            assert policy_of() == "everyone->alpha"
    finally:
        gw.stop()


def _children(pid: int) -> set[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _processes_naming(needles: list[str]) -> set[int]:
    """Live processes whose command line contains any of `needles` (from /proc), whoever their
    parent now is: an orphan is adopted by init and is no longer anyone's child."""
    found = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        pid = int(cmdline.parent.name)
        if pid != os.getpid() and any(n in text for n in needles) and _alive(pid):
            found.add(pid)
    return found


@pytest.mark.parametrize("when", ["workers", "fake provider", "envoy"])
def test_signalbox_up_stopped_while_it_starts_leaves_nothing_running(tmp_path, when):
    """SIGTERM during startup (a test that gave up, a supervisor) once ended `signalbox up` alone
    and left its fake providers and ext_proc workers running, orphaned; then a SIGTERM that
    landed between a fake provider's start and its recording left that one running (seen in
    CI). Stopped as each kind of process starts, nothing it started may outlive it."""
    marker = {"workers": "extproc", "fake provider": "fake-provider", "envoy": "envoy-bootstrap"}[when]
    proc, _, needles = _up_on_free_ports(tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not any(marker in _cmdline(pid) for pid in _children(proc.pid)):
            assert proc.poll() is None and time.monotonic() < deadline, f"no {when} started"
            time.sleep(0.005)
        proc.terminate()
        proc.wait(timeout=30)
        _nothing_left_within(needles, 10)
    finally:
        _kill_what_is_left(proc, needles)


def _up_on_free_ports(tmp_path: Path) -> tuple[subprocess.Popen, Path, list[str]]:
    """`signalbox up` on the quickstart with its fake providers on free ports: the process, its
    work dir, and what names a process it starts (for finding any left running)."""
    quickstart = tmp_path / "quickstart"
    quickstart.mkdir()
    work = tmp_path / "work"
    needles = [str(work)]
    for f in (ROOT / "examples" / "quickstart").glob("*.yaml"):
        text = f.read_text()
        for port in ("18081", "18082", "18083"):
            free = free_port()
            text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free}")
            needles.append(f"--port {free}")
        (quickstart / f.name).write_text(text)
    proc = subprocess.Popen(
        [sys.executable, "-m", "signalbox.cli", "up", "-f", str(quickstart), "--port", "0", "--workdir", str(work)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, work, needles


def test_signalbox_up_killed_leaves_nothing_running(tmp_path):
    """`signalbox up` killed (SIGKILL: it cannot stop what it started) left its ext_proc workers
    and fake providers running for good, holding the gateway's sockets, ports and state files
    (Envoy went with it). Each now watches the process that started it."""
    proc, work, needles = _up_on_free_ports(tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not (work / "envoy-admin.address").exists():  # workers, fakes and Envoy all started
            assert proc.poll() is None and time.monotonic() < deadline, "signalbox up did not start"
            time.sleep(0.05)
        assert any("extproc" in _cmdline(pid) for pid in _children(proc.pid))
        proc.kill()
        proc.wait(timeout=10)
        _nothing_left_within(needles, 15)  # the children check their parent every second
    finally:
        _kill_what_is_left(proc, needles)


def _nothing_left_within(needles: list[str], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while left := _processes_naming(needles):
        assert time.monotonic() < deadline, [_cmdline(pid) for pid in left]
        time.sleep(0.05)


def _kill_what_is_left(proc: subprocess.Popen, needles: list[str]) -> None:
    """What a failure of these tests would otherwise leave running."""
    if proc.poll() is None:
        proc.kill()
    for pid in _processes_naming(needles):
        os.kill(pid, signal.SIGKILL)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_config_that_does_not_compile_stops_the_workers_started_while_it_compiled(fakes, tmp_path):
    """`signalbox up` starts its ext_proc workers while it compiles; a config that does not
    compile must not leave them running behind the error."""
    from signalbox.local import LocalGateway, StartupError

    (tmp_path / "resources.yaml").write_text(
        dump(
            provider("alpha", fakes["alpha"].url + "/v1", [model("a1")]),
            policy("broken", ["x"], [backend("nowhere", "a1")]),  # no such provider
        )
    )
    gateway = LocalGateway(
        paths=[str(tmp_path / "resources.yaml")],
        port=0,
        workdir=tmp_path / "work",
        start_fakes=False,
        extproc_workers=2,
    )
    with pytest.raises(StartupError, match="do not compile"):
        gateway.start()
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / "work")], capture_output=True, text=True).stdout
    assert leftovers.strip() == "", leftovers


def test_the_start_writes_its_keys_while_envoy_warms_and_before_envoy_routes(fakes, tmp_path, monkeypatch):
    """Creating a key file per provider took up to a second of the 2,000-provider fleet's start
    on a slow disk, ahead of everything else. Only the listener written last reaches the keys,
    so the start goes on meanwhile: the config and Envoy's backend clusters appear while the
    key writer is held, and the first request still carries its provider's key."""
    from signalbox import gatewayfiles

    work = tmp_path / "work"
    clusters = Path(gatewayfiles.envoygen.resource_file(str(work / gatewayfiles.ENVOY_DIR), "cds.json"))
    written_meanwhile: list[bool] = []
    real = gatewayfiles.write_credentials

    def held_until_the_start_went_on(*args, **kwargs):
        # Without the change this runs before the config is written: the clusters never come.
        went_on = wait_for(lambda: clusters.exists() and (work / gatewayfiles.CONFIG_FILE).exists(), timeout=10)
        written_meanwhile.append(went_on)
        real(*args, **kwargs)

    monkeypatch.setattr(gatewayfiles, "write_credentials", held_until_the_start_went_on)
    key = "sk-alpha-start-key"
    gateway = start_gateway(
        tmp_path,
        dump(
            provider("alpha", fakes["alpha"].url + "/v1", [model("a1")], auth={"env": "ALPHA_START_KEY"}),
            policy("main", ["auto"], [backend("alpha", "a1")]),
        ),
        env={"ALPHA_START_KEY": key},
    )
    try:
        assert written_meanwhile == [True]
        assert served(gateway, n=1) == Counter({"alpha": 1})
        sent = fakes["alpha"].requests()[-1]["headers"]
        assert {k.lower(): v for k, v in sent.items()}["authorization"] == f"Bearer {key}"
    finally:
        gateway.stop()
