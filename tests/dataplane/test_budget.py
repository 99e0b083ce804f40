"""Budgets through a real Envoy: spend counted from responses downgrades a policy, then refuses
or keeps it on the cheapest backend; `/v1/budget` and the metrics show the same figures."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from signalbox.core.budget import HOUR
from tests.factories import backend, dump, model, policy, provider
from tests.windows import clear_of_the_hour_edge

from .conftest import start_gateway
from .test_lifecycle import wait_for

pytestmark = pytest.mark.dataplane

# The fake answers every request with 10 prompt and 7 completion tokens.
PREMIUM_USD = 17 * 1000 / 1e6  # 1000 USD per 1M tokens in and out
CHEAP_USD = 17 * 100 / 1e6


def resources(fakes) -> str:
    chain = [backend("alpha", "premium"), backend("gamma", "cheap", priority=1)]
    return dump(
        provider(
            "alpha",
            fakes["alpha"].url + "/v1",
            [model("premium", quality=0.95, inputPricePer1M=1000, outputPricePer1M=1000)],
        ),
        provider(
            "gamma",
            fakes["gamma"].url + "/v1",
            [model("cheap", quality=0.3, inputPricePer1M=100, outputPricePer1M=100)],
        ),
        policy("metered", ["metered"], chain, strategy="failover", budget={"hourlyUsd": 0.05, "downgradeAt": 0.5}),
        policy(
            "thrifty",
            ["thrifty"],
            chain,
            strategy="failover",
            budget={"dailyUsd": 0.02, "downgradeAt": 0.9, "onExhausted": "cheapest"},
        ),
    )


def budget(gw, name: str) -> dict:
    (found,) = [p for p in httpx.get(f"{gw.admin_url}/v1/budget").json()["policies"] if p["policy"] == name]
    return found


def requests_total(metrics: str, **labels: str) -> float:
    """Sum of signalbox_requests_total over the series carrying these labels."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("signalbox_requests_total{") and all(w in line for w in wanted)
    )


def test_budget_downgrades_then_refuses_or_goes_cheapest_counting_exactly_across_workers(fakes, tmp_path):
    clear_of_the_hour_edge()
    gw = start_gateway(tmp_path, resources(fakes), extproc_workers=2)  # two workers, one ledger
    try:
        with openai.OpenAI(base_url=gw.url, api_key="x", max_retries=0) as client:
            spent = {"metered": 0.0, "thrifty": 0.0}
            request = {"messages": [{"role": "user", "content": "hi"}]}

            def ask(alias: str):
                raw = client.chat.completions.with_raw_response.create(model=alias, **request)
                usage = raw.parse().usage
                price = 1000 if raw.headers["x-signalbox-model"] == "premium" else 100
                spent[alias] += (usage.prompt_tokens + usage.completion_tokens) * price / 1e6
                # Counted by whichever worker saw the response; every worker reads the same ledger.
                assert wait_for(lambda: abs(budget(gw, alias)["windows"][0]["spent_usd"] - spent[alias]) < 1e-9), (
                    budget(gw, alias),
                    spent,
                )
                return raw.headers

            # metered: premium until half of $0.05 is spent, then the cheap backend.
            served = [ask("metered")["x-signalbox-model"] for _ in range(2)]
            assert served == ["premium", "premium"] and budget(gw, "metered")["state"] == "downgrade"
            explained = httpx.post(f"{gw.admin_url}/v1/route", json={"model": "metered", **request}).json()
            headers = ask("metered")
            assert headers["x-signalbox-model"] == explained["model"] == "cheap"
            assert headers["x-signalbox-reason"] == explained["reason"]
            assert headers["x-signalbox-reason"].startswith("budget-downgrade:hour-68%:cheapest")
            while spent["metered"] < 0.05:
                assert ask("metered")["x-signalbox-model"] == "cheap"
            # Exhausted: 429 in OpenAI's shape, until the hour resets.
            with pytest.raises(openai.RateLimitError) as refused:
                client.chat.completions.create(model="metered", **request)
            error = refused.value
            assert error.code == "budget_exhausted" and error.type == "insufficient_quota"
            assert "hourly budget of $0.05" in error.message
            assert 0 < int(error.response.headers["retry-after"]) <= HOUR
            assert error.response.headers["x-signalbox-reason"] == "budget_exhausted"

            # thrifty: exhausted after two premium answers, then it stays on the cheapest.
            assert [ask("thrifty")["x-signalbox-model"] for _ in range(2)] == ["premium", "premium"]
            headers = ask("thrifty")
            assert headers["x-signalbox-model"] == "cheap"
            assert headers["x-signalbox-reason"] == "budget-exhausted:day-170%:cheapest"

        metered = budget(gw, "metered")
        (hour,) = metered["windows"]
        assert metered["state"] == "exhausted" and metered["on_exhausted"] == "reject"
        assert hour["remaining_usd"] == 0 and hour["limit_usd"] == 0.05 and hour["remote_usd"] == 0
        assert abs(hour["spent_usd"] - (2 * PREMIUM_USD + 10 * CHEAP_USD)) < 1e-9
        metrics = httpx.get(f"{gw.admin_url}/metrics").text
        assert 'signalbox_budget_remaining_usd{policy="metered",window="hour"} 0.0' in metrics
        # Read from the shared ledger at scrape time: worker 0's metrics include worker 1's spend.
        assert 'signalbox_budget_limit_usd{policy="thrifty",window="day"} 0.02' in metrics
        # Counters are summed over both workers (prometheus_client multiprocess mode).
        assert requests_total(metrics, policy="metered", outcome="routed") == 12  # 2 premium + 10 cheap
        assert requests_total(metrics, policy="metered", outcome="budget_exhausted") == 1
        assert requests_total(metrics, policy="thrifty", outcome="routed") == 3
    finally:
        gw.stop()


def test_a_burst_of_concurrent_requests_is_held_to_the_budget_by_what_is_in_flight(fakes, tmp_path):
    """Without holds every request of a burst is admitted on the spend before it (nothing yet)."""
    clear_of_the_hour_edge()
    limit = 0.05
    gw = start_gateway(
        tmp_path,
        dump(
            provider(
                "alpha",
                fakes["alpha"].url + "/v1",
                [model("premium", inputPricePer1M=1000, outputPricePer1M=1000)],
            ),
            policy("burst", ["burst"], [backend("alpha", "premium")], strategy="failover", budget={"hourlyUsd": limit}),
        ),
        extproc_workers=2,
    )
    # About the 10 + 7 tokens the fake reports, so what is held is close to what is then spent.
    request = {
        "model": "burst",
        "max_tokens": 7,
        "messages": [{"role": "user", "content": "Summarise the plot of Hamlet briefly"}],
    }
    try:
        with openai.OpenAI(base_url=gw.url, api_key="x", max_retries=0) as client:
            results: dict[int, object] = {}

            def call(n: int) -> None:
                try:
                    results[n] = client.chat.completions.create(**request, extra_headers={"x-fake-delay-ms": "5000"})
                except openai.APIError as exc:
                    results[n] = exc

            threads: list[threading.Thread] = []
            held = 0.0
            while not any(isinstance(r, openai.RateLimitError) for r in results.values()):
                assert len(threads) < 10, "a burst of 10 slow requests was admitted whole"
                n = len(threads)
                threads.append(threading.Thread(target=call, args=(n,)))
                threads[-1].start()
                # An admitted request holds its cost before Envoy forwards it; a refused one returns.
                assert wait_for(
                    lambda n=n, held=held: budget(gw, "burst")["windows"][0]["in_flight_usd"] > held or n in results
                )
                held = budget(gw, "burst")["windows"][0]["in_flight_usd"]
            (hour,) = budget(gw, "burst")["windows"]
            admitted = len(threads) - 1
            per_request = hour["in_flight_usd"] / admitted
            assert hour["spent_usd"] == 0  # nothing has finished: only holds refused the last one
            assert (admitted - 1) * per_request < limit <= admitted * per_request + 1e-12
            refused = results[len(threads) - 1]
            assert isinstance(refused, openai.RateLimitError) and refused.code == "budget_exhausted"
            assert "requests in flight hold" in refused.message and refused.response.headers["retry-after"] == "2"

            for t in threads:
                t.join()
            assert all(not isinstance(results[n], Exception) for n in range(admitted))
            # The real costs replace the holds.
            assert wait_for(lambda: budget(gw, "burst")["windows"][0]["in_flight_usd"] == 0)
            assert abs(budget(gw, "burst")["windows"][0]["spent_usd"] - admitted * PREMIUM_USD) < 1e-9
            print(f"burst: {admitted} admitted at ${per_request:.4f} held each, spent ${admitted * PREMIUM_USD:.3f}")
    finally:
        gw.stop()


def test_a_stream_from_a_provider_that_reports_no_usage_still_spends_its_budget(fakes, tmp_path):
    """A provider that refuses `stream_options` (`streamUsage: false`) streams without usage: the
    gateway counted such an answer as free, and a budget over it never moved. It is charged an
    estimate now (its prompt as estimated, output from the stream's size, at most max_tokens)."""
    clear_of_the_hour_edge()
    yaml_text = dump(
        provider(
            "alpha",
            fakes["alpha"].url + "/v1",
            [model("premium", inputPricePer1M=1000, outputPricePer1M=1000)],
            streamUsage=False,
        ),
        policy("metered", ["metered"], [backend("alpha", "premium")], strategy="failover", budget={"hourlyUsd": 50}),
    )
    gw = start_gateway(tmp_path, yaml_text)
    try:
        with openai.OpenAI(base_url=gw.url, api_key="x", max_retries=0) as client:
            chunks = list(
                client.chat.completions.create(
                    model="metered", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=20
                )
            )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert all(c.usage is None for c in chunks)  # the provider reported none
        assert "stream_options" not in fakes["alpha"].requests()[-1]["body"]
        assert wait_for(lambda: budget(gw, "metered")["windows"][0]["spent_usd"] > 0), budget(gw, "metered")
        spent = budget(gw, "metered")["windows"][0]["spent_usd"]
        assert spent <= (100 + 20) * 1000 / 1e6  # at most a generous prompt estimate and max_tokens
        metrics = httpx.get(f"{gw.admin_url}/metrics").text
        counted = [line for line in metrics.splitlines() if line.startswith("signalbox_usage_estimated_total{")]
        assert len(counted) == 1 and 'provider="alpha"' in counted[0] and counted[0].endswith(" 1.0"), counted
    finally:
        gw.stop()
