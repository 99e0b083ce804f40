"""Rollouts through a real Envoy with the openai SDK (issue 17): a shadow changes nothing a
client gets but its own header, even when the candidate is broken; a canary serves its share,
sticky per user; the request log records the rollout of each request."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest

from tests.factories import backend, dump, model, policy, provider

from .conftest import log_entries, start_gateway
from .test_lifecycle import wait_for

pytestmark = pytest.mark.dataplane
ASK = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def resources(fakes, rollout: dict | None, candidate_healthy: bool = True) -> str:
    return dump(
        provider("alpha", fakes["alpha"].url + "/v1", [model("m")]),
        provider("beta", fakes["beta"].url + "/v1", [model("m")], healthy=candidate_healthy),
        # Decided with or without a rollout (cost), so the two answers can be compared.
        policy("live", ["auto"], [backend("alpha", "m")], strategy="cost", rollout=rollout),
        policy("next", ["auto-next"], [backend("beta", "m")]),
    )


def test_a_shadow_changes_nothing_the_client_gets_but_its_header(fakes, tmp_path):
    gw = start_gateway(tmp_path / "shadow", resources(fakes, {"candidate": "next"}))
    broken = start_gateway(tmp_path / "broken", resources(fakes, {"candidate": "next"}, candidate_healthy=False))
    plain = start_gateway(tmp_path / "plain", resources(fakes, None))
    try:
        answers, raws = {}, {}
        for name, g in (("plain", plain), ("shadow", gw), ("broken", broken)):
            fakes["alpha"].reset()  # each gateway's request is the fake's first: the same answer
            with openai.OpenAI(base_url=g.url, api_key="x", max_retries=0) as client:
                raw = client.chat.completions.with_raw_response.create(model="auto", **ASK)
                answers[name] = (raw.headers, raw.parse())
                raws[name] = raw.http_response
        for headers, body in answers.values():
            assert headers["x-signalbox-provider"] == "alpha" and headers["x-signalbox-policy"] == "live"
            assert body.choices[0].message.content  # served by the live policy's backend

        # Byte for byte what the gateway without a rollout answers, but the shadow's own header
        # and what differs per request or per gateway (time, request id, the signed decision).
        def comparable(response: httpx.Response) -> tuple[dict, dict]:
            varying = {"date", "x-request-id", "x-signalbox-decision", "x-envoy-upstream-service-time"}
            headers = {k: v for k, v in response.headers.items() if k not in varying | {"x-signalbox-rollout"}}
            return headers, {k: v for k, v in json.loads(response.content).items() if k != "created"}

        assert comparable(raws["shadow"]) == comparable(raws["plain"]) == comparable(raws["broken"])
        assert "x-signalbox-rollout" not in raws["plain"].headers
        assert answers["shadow"][0]["x-signalbox-rollout"] == "shadow:next:default/beta/m:differs"
        assert answers["broken"][0]["x-signalbox-rollout"] == "shadow:next:error"
        assert not fakes["beta"].requests()  # a shadow decides; it sends nothing
        log = Path(gw.workdir) / "requests.log"

        def logged() -> list[str]:
            return [x.get("rollout") for x in log_entries(log) if x.get("event") == "request"]

        assert wait_for(lambda: "shadow:next:default/beta/m:differs" in logged()), logged()
        explained = httpx.post(f"{gw.admin_url}/v1/route", json={"model": "auto", **ASK}).json()
        assert explained["provider"] == "alpha" and explained["rollout"]["shadow"] == "next"
        assert explained["rollout"]["backend"] == "default/beta/m"
        # The run's figures so far: the request above, counted by whichever worker decided it.
        assert wait_for(
            lambda: (
                httpx.post(f"{gw.admin_url}/v1/route", json={"model": "auto", **ASK}).json()["rollout"]["figures"][
                    "differs"
                ]
                >= 1
            )
        )
    finally:
        gw.stop()
        broken.stop()
        plain.stop()


def test_a_canary_serves_its_share_sticky_per_user(fakes, tmp_path):
    """20 % of 2,000 users (each its own x-user-id) are served by the candidate, within 3 points;
    a user asking again stays on its side. The first 100 go through the openai SDK, the rest
    through plain HTTP (faster; the same requests)."""
    rollout = {"candidate": "next", "mode": "canary", "percent": 20, "stickyHeader": "x-user-id"}
    gw = start_gateway(tmp_path, resources(fakes, rollout))
    try:
        sides: Counter[str] = Counter()
        first_side: dict[str, str] = {}
        with openai.OpenAI(base_url=gw.url, api_key="x", max_retries=0) as client:
            for user in range(100):
                raw = client.chat.completions.with_raw_response.create(
                    model="auto", extra_headers={"x-user-id": f"u{user}"}, **ASK
                )
                side = raw.headers["x-signalbox-rollout"]
                assert raw.headers["x-signalbox-provider"] == ("beta" if side == "canary:next" else "alpha")
                sides[side] += 1
                first_side[f"u{user}"] = side
        with httpx.Client(base_url=gw.url, timeout=30) as http:
            for user in range(100, 2000):
                r = http.post("/chat/completions", json={"model": "auto", **ASK}, headers={"x-user-id": f"u{user}"})
                assert r.status_code == 200
                sides[r.headers["x-signalbox-rollout"]] += 1
            for user in ("u3", "u42", "u77"):
                again = {
                    http.post("/chat/completions", json={"model": "auto", **ASK}, headers={"x-user-id": user}).headers[
                        "x-signalbox-rollout"
                    ]
                    for _ in range(3)
                }
                assert again == {first_side[user]}  # sticky
        assert sum(sides.values()) == 2000 and set(sides) == {"canary:next", "live"}
        assert 0.17 <= sides["canary:next"] / 2000 <= 0.23, sides
    finally:
        gw.stop()


def test_a_canary_whose_candidate_fails_pauses_and_the_live_policy_serves_everyone(fakes, tmp_path):
    """The candidate's only backend answers 500: once 5 of its requests failed (past 50 %), the
    gateway pauses the rollout, and every later request is the live policy's and succeeds."""
    fakes["beta"].behave(status=500)
    rollout = {"candidate": "next", "mode": "canary", "percent": 100, "minRequests": 5, "maxErrorRate": 0.5}
    gw = start_gateway(tmp_path, resources(fakes, rollout))
    try:
        with openai.OpenAI(base_url=gw.url, api_key="x", max_retries=0) as client:
            for _ in range(5):
                with pytest.raises(openai.InternalServerError):
                    client.chat.completions.create(model="auto", **ASK)
        with httpx.Client(base_url=gw.url, timeout=30) as http:
            # The failures reach the ext_proc in Envoy's access log batches: ask until they have.
            def paused() -> bool:
                r = http.post("/chat/completions", json={"model": "auto", **ASK})
                return r.headers.get("x-signalbox-rollout") == "paused:next" and r.status_code == 200

            assert wait_for(paused)
        before = len(fakes["beta"].requests())
        with openai.OpenAI(base_url=gw.url, api_key="x", max_retries=0) as client:
            for _ in range(10):
                raw = client.chat.completions.with_raw_response.create(model="auto", **ASK)
                assert raw.headers["x-signalbox-rollout"] == "paused:next"
                assert raw.headers["x-signalbox-provider"] == "alpha" and raw.parse().choices[0].message.content
        assert len(fakes["beta"].requests()) == before  # nothing more for the failing candidate
        metrics = httpx.get(f"{gw.admin_url}/metrics").text
        assert 'signalbox_rollout_pauses_total{candidate="next",policy="live"} 1.0' in metrics
    finally:
        gw.stop()


def test_captured_requests_replay_offline_to_the_decisions_live_made(fakes, tmp_path, capsys):
    """`--capture-prompts` records routed requests (keys redacted); `signalbox replay` decides
    them again: under the same config every decision is the one live made, under a candidate
    that prefers the other backend every one changes, and the report says so."""
    from signalbox.cli import main as cli_main

    def config(strategy: str, backends):
        return dump(
            provider("alpha", fakes["alpha"].url + "/v1", [model("m", inputPricePer1M=1, outputPricePer1M=1)]),
            provider("beta", fakes["beta"].url + "/v1", [model("m", inputPricePer1M=9, outputPricePer1M=9)]),
            policy("live", ["auto"], backends, strategy=strategy),
        )

    # Live: cost routing (decided by the ext_proc, so captured) picks the cheaper alpha. The
    # candidate fails over from beta first.
    live = config("cost", [backend("alpha", "m"), backend("beta", "m")])
    candidate_dir = tmp_path / "candidate"
    candidate_dir.mkdir()
    (candidate_dir / "policies.yaml").write_text(
        config("failover", [backend("beta", "m"), backend("alpha", "m", priority=1)])
    )
    gw = start_gateway(tmp_path / "gw", live, capture_prompts=True)
    try:
        with openai.OpenAI(base_url=gw.url, api_key="x", max_retries=0) as client:
            for n in range(6):
                text = f"question {n}: my key is sk-{'a1' * 12}, what is the capital of France?"
                client.chat.completions.create(model="auto", messages=[{"role": "user", "content": text}], max_tokens=5)
        captured = Path(gw.workdir) / "captured.jsonl"
        assert wait_for(lambda: captured.exists() and len(captured.read_text().splitlines()) == 6)
        text = captured.read_text()
        assert "sk-a1a1" not in text and "[redacted]" in text and "authorization" not in text.lower()
        same, changed = tmp_path / "same.json", tmp_path / "changed.json"
        live_dir = Path(gw.paths[0])
        assert cli_main(["replay", "--log", str(captured), "-f", str(live_dir), "--output", str(same)]) == 0
        assert (
            cli_main(
                [
                    "replay",
                    "--log",
                    str(captured),
                    "-f",
                    str(candidate_dir),
                    "--before",
                    str(live_dir),
                    "--output",
                    str(changed),
                    "--plot",
                    str(tmp_path / "replay.png"),
                ]
            )
            == 0
        )
        assert "live" in capsys.readouterr().out
        unchanged = json.loads(same.read_text())["policies"]["live"]
        assert unchanged["requests"] == 6 and unchanged["changed"] == 0
        # The request log (no bodies) replays the same requests: the capture beside it has them.
        request_log, from_log = Path(gw.workdir) / "requests.log", tmp_path / "from-log.json"

        def logged() -> int:
            lines = [json.loads(x) for x in request_log.read_text().splitlines() if x.startswith("{")]
            return sum(x.get("event") == "request" for x in lines)

        assert wait_for(lambda: logged() == 6)
        assert cli_main(["replay", "--log", str(request_log), "-f", str(live_dir), "--output", str(from_log)]) == 0
        assert json.loads(from_log.read_text())["policies"] == json.loads(same.read_text())["policies"]
        moved = json.loads(changed.read_text())["policies"]["live"]
        assert moved["changed"] == 6
        assert moved["estimated_cost_after_usd"] > 5 * moved["estimated_cost_before_usd"]  # beta costs 9x
        assert (tmp_path / "replay.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        gw.stop()


def test_replaying_a_canarys_capture_under_its_config_gives_the_decisions_live_made(fakes, tmp_path):
    """A canary at 50 % by x-user-id, with a candidate that sends code to beta; 24 users, half
    asking for code. Replayed under the config that served them, every request lands on the
    side and backend it did live; at 100 % the live side's users move to the candidate, and only
    their code requests change backend."""
    from signalbox.cli import main as cli_main

    def config(percent: float) -> str:
        return dump(
            provider("alpha", fakes["alpha"].url + "/v1", [model("m", inputPricePer1M=1, outputPricePer1M=1)]),
            provider("beta", fakes["beta"].url + "/v1", [model("m", inputPricePer1M=5, outputPricePer1M=5)]),
            policy(
                "live",
                ["auto"],
                [backend("alpha", "m"), backend("beta", "m")],
                strategy="cost",
                rollout={"candidate": "next", "mode": "canary", "percent": percent, "stickyHeader": "x-user-id"},
            ),
            policy(
                "next",
                ["auto-next"],
                [backend("alpha", "m"), backend("beta", "m")],
                strategy="classified",
                routes=[{"taskTypes": ["code"], "backends": ["beta/m"]}, {"backends": ["alpha/m"]}],
            ),
        )

    gw = start_gateway(tmp_path / "gw", config(50), capture_prompts=True)
    live: dict[str, tuple[str, str]] = {}
    try:
        with openai.OpenAI(base_url=gw.url, api_key="x", max_retries=0) as client:
            for n in range(24):
                text = "write a python function that reverses a list" if n % 2 else "tell me a joke about cats"
                raw = client.chat.completions.with_raw_response.create(
                    model="auto",
                    messages=[{"role": "user", "content": text}],
                    max_tokens=5,
                    extra_headers={"x-user-id": f"user-{n}"},
                )
                live[f"user-{n}"] = (raw.headers["x-signalbox-rollout"], raw.headers["x-signalbox-provider"])
        captured = Path(gw.workdir) / "captured.jsonl"
        assert wait_for(lambda: captured.exists() and len(captured.read_text().splitlines()) == 24)
        sides = Counter(side for side, _ in live.values())
        assert sides["canary:next"] and sides["live"]  # both sides served
        assert {p for side, p in live.values() if side == "canary:next"} == {"alpha", "beta"}

        def replay(resources: str, name: str) -> dict[str, dict]:
            folder = tmp_path / name
            folder.mkdir()
            (folder / "policies.yaml").write_text(resources)
            out = tmp_path / f"{name}.jsonl"
            assert cli_main(["replay", "--log", str(captured), "-f", str(folder), "--decisions", str(out)]) == 0
            records = {json.loads(x)["request_id"]: json.loads(x) for x in captured.read_text().splitlines()}
            return {records[d["request_id"]]["headers"]["x-user-id"]: d for d in map(json.loads, out.open())}

        same = replay(config(50), "same")
        assert len(same) == 24
        for user, (side, provider_name) in live.items():
            assert same[user]["rollout"] == side
            assert same[user]["after"] == same[user]["before"] == f"default/{provider_name}/m"
        full = replay(config(100), "full")
        assert {d["rollout"] for d in full.values()} == {"canary:next"}
        moved = {u for u, d in full.items() if d["after"] != d["before"]}
        assert moved and all(live[u][0] == "live" and "beta" in full[u]["after"] for u in moved)
    finally:
        gw.stop()


def test_a_mirror_gets_copies_the_client_never_sees_and_its_cost_is_counted_apart(fakes, tmp_path):
    """Every request of `live` is copied to beta (priced apart): the client's streams come from
    alpha as without the mirror, beta gets whole-answer copies with its own model, and the
    gateway's metrics count beta's tokens and cost as the mirror's, not as routed spend."""
    resources = dump(
        provider("alpha", fakes["alpha"].url + "/v1", [model("m")]),
        provider("beta", fakes["beta"].url + "/v1", [model("m", upstreamName="beta-next", inputPricePer1M=2)]),
        policy("live", ["auto"], [backend("alpha", "m")], mirror={"provider": "beta", "model": "m", "percent": 100}),
    )
    gw = start_gateway(tmp_path, resources)
    try:
        with openai.OpenAI(base_url=gw.url, api_key="x", max_retries=0) as client:
            for _ in range(4):
                with client.chat.completions.with_streaming_response.create(model="auto", stream=True, **ASK) as raw:
                    assert raw.headers["x-signalbox-provider"] == "alpha"
                    chunks = [c for c in raw.parse() if c.choices and c.choices[0].delta.content]
                    assert chunks
        assert wait_for(lambda: len(fakes["beta"].requests()) == 4)
        copies = fakes["beta"].requests()
        assert {c["model"] for c in copies} == {"beta-next"} and not any(c["stream"] for c in copies)
        assert len(fakes["alpha"].requests()) == 4

        def mirror_metrics() -> str:
            text = httpx.get(f"{gw.admin_url}/metrics").text
            done = 'signalbox_mirror_requests_total{backend="default/beta/m",outcome="2xx",policy="live"} 4.0'
            return text if done in text else ""

        assert wait_for(mirror_metrics)
        text = mirror_metrics()
        cost = re.search(r'signalbox_mirror_cost_usd_total\{backend="default/beta/m",policy="live"\} (\S+)', text)
        assert cost and float(cost.group(1)) > 0
        assert 'signalbox_cost_usd_total{model="m",policy="live",provider="beta"}' not in text
        explained = httpx.post(f"{gw.admin_url}/v1/route", json={"model": "auto", **ASK}).json()
        assert explained["mirror"] == {"backend": "default/beta/m", "percent": 100.0}
    finally:
        gw.stop()
