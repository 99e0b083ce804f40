"""Rollouts through a real Envoy with the openai SDK (issue 17): a shadow changes nothing a
client gets but its own header, even when the candidate is broken; a canary serves its share,
sticky per user; the request log records the rollout of each request."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest

from tests.factories import backend, dump, model, policy, provider

from .conftest import start_gateway
from .test_lifecycle import wait_for

pytestmark = pytest.mark.dataplane
ASK = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def resources(fakes, rollout: dict, candidate_healthy: bool = True) -> str:
    return dump(
        provider("alpha", fakes["alpha"].url + "/v1", [model("m")]),
        provider("beta", fakes["beta"].url + "/v1", [model("m")], healthy=candidate_healthy),
        policy("live", ["auto"], [backend("alpha", "m")], rollout=rollout),
        policy("next", ["auto-next"], [backend("beta", "m")]),
    )


def test_a_shadow_changes_nothing_the_client_gets_but_its_header(fakes, tmp_path):
    gw = start_gateway(tmp_path / "shadow", resources(fakes, {"candidate": "next"}))
    broken = start_gateway(tmp_path / "broken", resources(fakes, {"candidate": "next"}, candidate_healthy=False))
    try:
        answers = {}
        for name, g in (("shadow", gw), ("broken", broken)):
            with openai.OpenAI(base_url=g.url, api_key="x", max_retries=0) as client:
                raw = client.chat.completions.with_raw_response.create(model="auto", **ASK)
                answers[name] = (raw.headers, raw.parse())
        for headers, body in answers.values():
            assert headers["x-signalbox-provider"] == "alpha" and headers["x-signalbox-policy"] == "live"
            assert body.choices[0].message.content  # served by the live policy's backend
        assert answers["shadow"][0]["x-signalbox-rollout"] == "shadow:next:default/beta/m:differs"
        assert answers["broken"][0]["x-signalbox-rollout"] == "shadow:next:error"
        assert not fakes["beta"].requests()  # a shadow decides; it sends nothing
        log = Path(gw.workdir) / "requests.log"

        def logged() -> list[str]:
            lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
            return [x.get("rollout") for x in lines if x.get("event") == "request"]

        assert wait_for(lambda: "shadow:next:default/beta/m:differs" in logged()), logged()
        explained = httpx.post(f"{gw.admin_url}/v1/route", json={"model": "auto", **ASK}).json()
        assert explained["provider"] == "alpha" and explained["rollout"]["shadow"] == "next"
        assert explained["rollout"]["backend"] == "default/beta/m"
    finally:
        gw.stop()
        broken.stop()


def test_a_canary_serves_its_share_sticky_per_user(fakes, tmp_path):
    rollout = {"candidate": "next", "mode": "canary", "percent": 20, "stickyHeader": "x-user-id"}
    gw = start_gateway(tmp_path, resources(fakes, rollout))
    try:
        sides: Counter[str] = Counter()
        with openai.OpenAI(base_url=gw.url, api_key="x", max_retries=0) as client:
            for user in range(300):
                raw = client.chat.completions.with_raw_response.create(
                    model="auto", extra_headers={"x-user-id": f"u{user}"}, **ASK
                )
                side = raw.headers["x-signalbox-rollout"]
                assert raw.headers["x-signalbox-provider"] == ("beta" if side == "canary:next" else "alpha")
                sides[side] += 1
            again = {
                client.chat.completions.with_raw_response.create(
                    model="auto", extra_headers={"x-user-id": "u3"}, **ASK
                ).headers["x-signalbox-rollout"]
                for _ in range(4)
            }
        assert 0.12 <= sides["canary:next"] / 300 <= 0.28, sides  # 20 % of 300 callers, +- 2.7 sigma
        assert len(again) == 1
    finally:
        gw.stop()
