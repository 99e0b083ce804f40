"""Failover when providers misbehave the ways they really do, through a real Envoy, driven by
the official OpenAI SDK (streaming and not).

Every case steers only the policy's first backend ("primary", `x-fake-only`), then asserts what
the client got, how many attempts each backend saw and when, the wall-clock bound the policy's
deadlines set, and that the gateway still serves a plain request afterwards (a success also
resets Envoy's count of the primary's consecutive failures, so no case ejects it for the next).
"""

from __future__ import annotations

import json
import sqlite3
import time
from email.utils import formatdate

import anthropic
import httpx
import openai
import pytest

from signalbox import gatewayfiles
from signalbox.extproc.sharedstate import COOLDOWN_DB
from tests.dataplane.conftest import start_gateway
from tests.factories import backend, dump, model, policy, provider

pytestmark = pytest.mark.faults

# A Retry-After date 30 s after the moment the test runs.
IN_30_S = "<an HTTP date 30 s from now>"

FIRST_RESPONSE_MS = 1500  # failover.perTryTimeoutMs of the chains
SILENCE_MS = 1000  # failover.idleTimeoutMs of the chains
BUDGET_MS = 3000  # timeoutMs of the policy whose every backend is silent
FIRST_TOKEN_MS = 800  # failover.firstTokenTimeoutMs of the "first-token" chain
# Envoy closes a downstream connection it reset after up to its delayed-close timeout (1 s), and
# these machines are noisy: every upper bound below allows this much on top of the deadline.
SLACK_S = 1.5
CAPS = ["streaming", "json"]


def resources(fakes) -> str:
    def chain(name: str, first: str, on_broken: str = "", **spec) -> dict:
        failover = {"perTryTimeoutMs": FIRST_RESPONSE_MS, "idleTimeoutMs": SILENCE_MS}
        return policy(
            name,
            [name],
            [backend(first, "m"), backend("second", "m", priority=1)],
            strategy="failover",
            failover={**failover, "onBrokenStream": on_broken} if on_broken else failover,
            timeoutMs=8000,
            **spec,
        )

    return dump(
        # Beside "m", a small-window model on the primary and a large-window one on the second.
        *(
            provider(n, fakes[n].url + "/v1", [model("m", capabilities=CAPS), *extra])
            for n, extra in (
                ("primary", [model("small", capabilities=CAPS, contextWindow=8000)]),
                ("second", [model("large", capabilities=CAPS, contextWindow=128000)]),
                ("brittle", []),
            )
        ),
        policy(
            "ctx",
            ["ctx"],
            [backend("primary", "small"), backend("second", "large", priority=1)],
            strategy="failover",
        ),
        chain("chain", "primary"),
        # The same chain decided by the ext_proc (cost reads the prompt): the same retry policy.
        policy(
            "decided",
            ["decided"],
            [backend("primary", "m"), backend("second", "m")],
            strategy="cost",
            failover={"perTryTimeoutMs": FIRST_RESPONSE_MS, "idleTimeoutMs": SILENCE_MS},
            timeoutMs=8000,
        ),
        policy(
            "lone",
            ["lone"],
            [backend("primary", "m")],
            strategy="failover",
            failover={"perTryTimeoutMs": FIRST_RESPONSE_MS},
        ),
        # The primary's server again, with connections Envoy closes after 300 ms idle.
        provider("primary-brief", fakes["primary"].url + "/v1", [model("m", capabilities=CAPS)], idleTimeoutMs=300),
        policy("brief", ["brief"], [backend("primary-brief", "m")], strategy="failover"),
        policy(
            "budget", ["budget"], [backend("primary", "m"), backend("second", "m", priority=1)], timeoutMs=BUDGET_MS
        ),
        chain("circuit", "brittle"),
        # Their streams pass the stream relay: a break ends with an error event, or is continued.
        chain("relay-error", "primary", on_broken="error"),
        chain("relay-continue", "primary", on_broken="continue"),
        # The second fake as an Anthropic backend: a continuation there is an assistant prefill.
        provider("second-claude", fakes["second"].url + "/v1", [model("m", capabilities=CAPS)], type="anthropic"),
        policy(
            "relay-claude",
            ["relay-claude"],
            [backend("primary", "m"), backend("second-claude", "m", priority=1)],
            strategy="failover",
            failover={"perTryTimeoutMs": FIRST_RESPONSE_MS, "idleTimeoutMs": SILENCE_MS, "onBrokenStream": "continue"},
            timeoutMs=8000,
        ),
        policy(
            "first-token",
            ["first-token"],
            [backend("primary", "m"), backend("second", "m", priority=1)],
            strategy="failover",
            failover={"firstTokenTimeoutMs": FIRST_TOKEN_MS, "idleTimeoutMs": SILENCE_MS * 3},
            timeoutMs=8000,
        ),
    )


@pytest.fixture(scope="module")
def gateway(fakes, tmp_path_factory):
    gw = start_gateway(tmp_path_factory.mktemp("faults"), resources(fakes))
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def client(gateway):
    with openai.OpenAI(base_url=gateway.url, api_key="client-token", max_retries=0, timeout=30) as c:
        yield c


def envoy_health(gateway, name: str) -> str:
    """Envoy's health flags of a fake's backend cluster ("healthy", "/failed_eds_health", ...)."""
    clusters = httpx.get(f"http://127.0.0.1:{gateway.admin_port}/clusters").text
    prefix = f"b.default.{name}.m::"
    return next(
        line.rsplit("::", 1)[1] for line in clusters.splitlines() if line.startswith(prefix) and "health_flags" in line
    )


def resting(gateway) -> bool:
    """The ext_proc has the primary cooling down (what its ADS server tells Envoy)."""
    models = httpx.get(f"{gateway.admin_url}/v1/models").json()["data"]
    return any(b["backend"] == "default/primary/m" and "cooling_down" in b for m in models for b in m["backends"])


def wait_for(check, what: str, timeout: float = 5.0) -> float:
    """Poll `check` until it holds; returns when (time.time())."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return time.time()


@pytest.fixture(autouse=True)
def still_serving(request):
    """After each case: the gateway answers a plain request from the chain's first backend.

    Cases that end with the primary cooling down (a 429's Retry-After, a rejected key) would
    leave it out of the next case: its cooldown is dropped, and the ext_proc's ADS server marks
    its endpoint healthy again."""
    yield
    if "client" not in request.fixturenames:
        return
    gateway = request.getfixturevalue("gateway")
    with sqlite3.connect(gateway.workdir / gatewayfiles.STATE_DIR / COOLDOWN_DB) as db:
        db.execute("DELETE FROM cooldowns")
    wait_for(lambda: not resting(gateway), "the primary's rest to end")
    for name in ("primary", "second"):  # (a case may have rested the second too)
        wait_for(lambda name=name: envoy_health(gateway, name) == "healthy", f"Envoy to have the {name} healthy")
    client = request.getfixturevalue("client")

    def primary_serves() -> bool:
        # Envoy's aggregate clusters take up to about a second to route to a host back in health.
        raw = client.chat.completions.with_raw_response.create(
            model="chain", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.http_response.status_code == 200
        return raw.headers["x-signalbox-provider"] == "primary"

    wait_for(primary_serves, "the primary to serve again after the case")


def fault(**spec) -> dict[str, str]:
    """Headers that make only the primary misbehave."""
    return {"x-fake-only": "primary", "x-fake-fault": json.dumps(spec)}


def ask(client, alias: str, headers: dict[str, str], stream: bool = False):
    """(status, served-by header, who wrote the answer (the fake's fingerprint), error, seconds,
    request id, text) of one SDK call."""
    started = time.monotonic()
    text, error, status, served, request_id, origin = "", None, None, None, None, None
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=alias, messages=[{"role": "user", "content": "hello"}], stream=stream, extra_headers=headers
        )
        status, served = raw.http_response.status_code, raw.headers.get("x-signalbox-provider")
        request_id = raw.headers.get("x-request-id")
        if stream:
            for chunk in raw.parse():
                origin = origin or chunk.system_fingerprint
                text += "".join(c.delta.content or "" for c in chunk.choices)
        else:
            completion = raw.parse()
            origin, text = completion.system_fingerprint, completion.choices[0].message.content or ""
    except openai.APIStatusError as exc:
        status, error, request_id = exc.status_code, exc, exc.response.headers.get("x-request-id")
    except Exception as exc:  # a stream that broke: httpx's protocol error, as the SDK raises it
        error = exc
    return status, served, origin, error, time.monotonic() - started, request_id, text


def log_lines(gateway, request_id: str) -> list[dict]:
    """The request log's attempt lines and request line of one request (Envoy flushes each second)."""
    path = gateway.workdir / "requests.log"
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(t) for t in path.read_text().splitlines()] if path.exists() else []
        mine = [e for e in lines if e["request_id"] == request_id]
        if any(e["event"] == "request" for e in mine):
            return mine
        assert time.monotonic() < deadline, f"no request log line for {request_id}"
        time.sleep(0.1)


def attempts(fakes, name: str) -> list[float]:
    return [r["at"] for r in fakes[name].requests()]


@pytest.mark.parametrize("alias", ["chain", "decided"])
@pytest.mark.parametrize(
    "case,spec,status",
    [
        ("429 with Retry-After in seconds", {"retry_after": "30"}, 429),
        # The date is made when the test runs (IN_30_S): made at collection, it could have
        # passed by then in a long session.
        ("429 with Retry-After as a date", {"retry_after": IN_30_S}, 429),
        ("429 without Retry-After", {}, 429),
        ("429 with retry-after-ms", {"retry_after_ms": 30000}, 429),
        ("500", {}, 500),
        ("503 with Retry-After", {"retry_after": "5"}, 503),
        ("401 (revoked key)", {}, 401),
        ("403", {}, 403),
    ],
)
def test_an_error_status_moves_to_the_next_backend_at_once(
    gateway, client, fakes, scorecard, alias, case, spec, status
):
    if spec.get("retry_after") == IN_30_S:
        spec = {**spec, "retry_after": formatdate(time.time() + 30, usegmt=True)}
    headers = {**fault(**spec), "x-fake-status": str(status)}
    got, served, origin, error, took, _, _text = ask(client, alias, headers)
    rests = status in (429, 401, 403) or (status == 503 and bool(spec))
    if rests:  # and the backend cools down (its length is the next tests' subject)
        wait_for(lambda: resting(gateway), "the primary to cool down")
    measured = f"{got} from {served} in {took * 1000:.0f} ms; primary tried {len(attempts(fakes, 'primary'))}x"
    expected = "the next backend answers at once" + ("; the backend cools down" if rests else "")
    scorecard(f"{case} ({alias})", expected, measured + ("; cooling down" if rests else ""))
    assert (got, served, error) == (200, "second", None)
    assert origin == "second"
    assert len(attempts(fakes, "primary")) == 1 and len(attempts(fakes, "second")) == 1
    assert took < 1.0  # no wait for the Retry-After: it concerns the backend that sent it


WRONG_ANSWERS = {"html": "a 200 web page", "redirect": "a redirect (307)"}


@pytest.mark.parametrize("kind", list(WRONG_ANSWERS))
@pytest.mark.parametrize("alias", ["chain", "decided"])
def test_a_web_page_or_a_redirect_for_an_answer_moves_to_the_next_backend(
    gateway, client, fakes, scorecard, alias, kind
):
    """A 200 web page (the provider's site behind a wrong base URL, a proxy's login page) or a
    redirect (http:// for an https:// API, a login in front of it) is no answer: the next backend
    answers, and the request log says why the first was passed over."""
    got, served, origin, error, took, request_id, _ = ask(client, alias, fault(kind=kind))
    scorecard(
        f"{WRONG_ANSWERS[kind]} instead of an answer ({alias})",
        "the next backend answers at once",
        f"{got} from {served} in {took * 1000:.0f} ms; primary tried {len(attempts(fakes, 'primary'))}x",
    )
    assert (got, served, error) == (200, "second", None) and origin == "second"
    assert len(attempts(fakes, "primary")) == 1 and took < 1.0
    moved = [line["moved_on"] for line in log_lines(gateway, request_id) if line["event"] == "attempt"]
    assert moved == ["not_api", None]


def test_a_web_page_from_the_only_backend_is_a_502_each_sdk_reads(gateway, client, fakes, scorecard):
    """The last backend's web page reaches the client as a 502 `upstream_not_api` in its own
    API's shape, not as a page its SDK cannot parse."""
    fakes["primary"].behave(fault={"kind": "html", "times": 2})  # this case's two requests
    got, _, _, error, _, _, _ = ask(client, "lone", {})
    with (
        anthropic.Anthropic(base_url=gateway.url.removesuffix("/v1"), api_key="client-token", max_retries=0) as claude,
        pytest.raises(anthropic.APIStatusError) as refused,
    ):
        claude.messages.create(model="lone", max_tokens=8, messages=[{"role": "user", "content": "hello"}])
    scorecard(
        "a 200 web page from the only backend",
        "502 upstream_not_api in each client's API",
        f"{got} {error.response.json()['error']['code'] if error is not None else None}",
    )
    assert got == 502 and isinstance(error, openai.APIStatusError)
    assert error.response.json()["error"]["code"] == "upstream_not_api"
    assert refused.value.status_code == 502 and refused.value.response.json()["type"] == "error"


@pytest.mark.parametrize("stream", [False, True])
def test_a_reset_before_any_header_moves_to_the_next_backend(client, fakes, scorecard, stream):
    got, served, origin, error, took, _, _text = ask(client, "chain", fault(kind="reset"), stream=stream)
    scorecard(
        f"reset before headers ({'stream' if stream else 'plain'})",
        "the next backend answers at once",
        f"{got} from {served} in {took * 1000:.0f} ms",
    )
    assert (got, served, error) == (200, "second", None) and origin == "second"
    assert took < 1.0


@pytest.mark.parametrize(
    "case,spec,stream",
    [
        ("no response at all", {"kind": "hang"}, False),
        ("no response at all (stream)", {"kind": "hang"}, True),
        ("slow answer (non-streamed)", {"first_token_ms": 60_000}, False),
    ],
)
def test_a_silent_backend_is_abandoned_at_its_deadline_and_not_tried_again(
    client, fakes, scorecard, case, spec, stream
):
    got, served, origin, error, took, _, _text = ask(client, "chain", fault(**spec), stream=stream)
    primary, second = attempts(fakes, "primary"), attempts(fakes, "second")
    deadline = min(FIRST_RESPONSE_MS, SILENCE_MS) / 1000
    scorecard(
        case,
        f"abandoned after {deadline:.1f} s (first-response / silence deadline), the next backend answers",
        f"{got} from {served} after {took:.2f} s; primary tried {len(primary)}x",
    )
    assert (got, served, error) == (200, "second", None) and origin == "second"
    assert len(primary) == 1 and len(second) == 1
    assert deadline - 0.1 <= second[0] - primary[0] < deadline + SLACK_S
    assert took < deadline + SLACK_S


def test_a_stream_whose_first_token_is_late_moves_to_the_next_backend_before_the_client_sees_it(
    client, fakes, scorecard
):
    """Headers at once, then no token: the first-token deadline abandons the backend for the next
    one, although its headers came in time (Envoy's own timer stops at headers)."""
    got, served, origin, error, took, _, text = ask(client, "first-token", fault(first_token_ms=60_000), stream=True)
    primary, second = attempts(fakes, "primary"), attempts(fakes, "second")
    deadline = FIRST_TOKEN_MS / 1000
    scorecard(
        "stream whose headers come at once, then no first token",
        f"abandoned at the first-token deadline ({deadline:.1f} s) for the next backend, one clean stream",
        f"{got} from {served} after {took:.2f} s; primary tried {len(primary)}x, "
        f"the next backend {second[0] - primary[0]:.2f} s after it"
        if primary and second
        else f"{got} from {served}",
    )
    assert (got, served, error) == (200, "second", None) and origin == "second"
    assert text == "chunk0 chunk1 chunk2 chunk3 chunk4 "  # one answer, nothing of the late one
    assert len(primary) == 1 and len(second) == 1
    assert deadline - 0.1 <= second[0] - primary[0] < deadline + SLACK_S
    assert took < deadline + SLACK_S


def holds(gateway) -> float:
    """Answers whose headers waited for their first bytes (the first-token filter), so far."""
    metrics = httpx.get(f"{gateway.admin_url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("signalbox_first_token_holds_total{")
    )


@pytest.mark.parametrize("stream", [True, False])
def test_a_first_token_in_time_is_served_whole_by_the_first_backend(gateway, client, fakes, stream):
    before = holds(gateway)
    got, served, origin, error, _took, _, text = ask(client, "first-token", fault(first_token_ms=200), stream=stream)
    assert (got, served, error, origin) == (200, "primary", None, "primary")
    assert text == ("chunk0 chunk1 chunk2 chunk3 chunk4 " if stream else "[primary] answer from m")
    assert len(attempts(fakes, "second")) == 0
    # Only a stream's headers wait: a JSON answer's come with its body, holding them gains nothing.
    assert holds(gateway) - before == (1 if stream else 0)


def test_a_silent_only_backend_is_not_retried_and_the_client_gets_a_504(client, fakes, scorecard):
    got, _served, _, error, took, _, _ = ask(client, "lone", fault(kind="hang"))
    tried = len(attempts(fakes, "primary"))
    scorecard(
        "the only backend is silent",
        f"504 after {FIRST_RESPONSE_MS / 1000:.1f} s, one attempt",
        f"{got} after {took:.2f} s; tried {tried}x",
    )
    assert got == 504 and isinstance(error, openai.APIStatusError)
    assert error.response.json()["error"]["message"]  # an OpenAI-shaped error, not an empty body
    assert tried == 1
    assert FIRST_RESPONSE_MS / 1000 - 0.1 <= took < FIRST_RESPONSE_MS / 1000 + SLACK_S


def test_every_backend_silent_ends_inside_the_policys_budget(client, fakes, scorecard):
    silent = {"x-fake-fault": json.dumps({"kind": "hang"})}  # every backend, not only the primary
    got, _, _, error, took, _, _ = ask(client, "budget", silent)
    scorecard(
        "every backend silent, no per-backend deadline",
        f"the call ends at the policy's budget ({BUDGET_MS / 1000:.0f} s) with a 504",
        f"{got} after {took:.2f} s",
    )
    assert got == 504 and error is not None
    assert BUDGET_MS / 1000 - 0.1 <= took < BUDGET_MS / 1000 + SLACK_S


# How a stream breaks after it started: (what the scorecard calls it, the fault, Envoy's flag).
BREAKS = [
    ("stream cut after 2 chunks", {"kind": "cut", "after": 2}, "UPE"),
    ("stream stalls after 2 chunks", {"kind": "stall", "after": 2}, "UT"),
]


@pytest.mark.parametrize("how,spec,flag", BREAKS)
def test_a_stream_that_breaks_after_it_started_never_ends_normally_and_counts_as_failed(
    gateway, client, fakes, scorecard, how, spec, flag
):
    case = f"{how}, onBrokenStream: close"
    got, served, _origin, error, took, request_id, text = ask(client, "chain", fault(**spec), stream=True)
    scorecard(
        case,
        "the client's stream ends with an error (never a normal end); logged and counted as failed",
        f"{type(error).__name__} after {took:.2f} s with {len(text.split())} chunks "
        "(onBrokenStream: close, the default: Envoy cuts the connection)",
    )
    assert (got, served) == (200, "primary")
    assert error is not None, "a broken stream reached the client as a normal end"
    assert text == "chunk0 chunk1 "  # what was sent before the break, nothing invented
    if spec["kind"] == "stall":
        assert took < SILENCE_MS / 1000 + SLACK_S
    assert len(attempts(fakes, "second")) == 0  # a started answer is not retried elsewhere
    lines = log_lines(gateway, request_id)
    request = next(e for e in lines if e["event"] == "request")
    assert request["status"] == 200 and request["flags"] == flag
    assert request["completion_tokens"] is None  # no usage: nothing billed as a completion
    metrics = httpx.get(f"{gateway.admin_url}/metrics").text
    assert f'signalbox_broken_responses_total{{flag="{flag}",model="m",provider="primary"}}' in metrics


def relayed(gateway, policy: str, outcome: str) -> float:
    """signalbox_relayed_streams_total of `policy` and `outcome`."""
    metrics = httpx.get(f"{gateway.admin_url}/metrics").text
    line = f'signalbox_relayed_streams_total{{outcome="{outcome}",policy="relay-{policy}"}} '
    return next((float(t.split(" ")[1]) for t in metrics.splitlines() if t.startswith(line)), 0.0)


def relayed_lines(gateway, request_id: str) -> list[dict]:
    """The request lines of what the relay sent for the client's request `request_id`."""
    path = gateway.workdir / "requests.log"
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(t) for t in path.read_text().splitlines()]
        mine = [e for e in lines if e["event"] == "request" and e.get("relay_of") == request_id]
        if mine:
            return mine
        assert time.monotonic() < deadline, f"no relayed request line for {request_id}"
        time.sleep(0.1)


def no_relay_headers_reached(fakes) -> bool:
    return not any(
        h.lower().startswith("x-signalbox-relay") for f in fakes.values() for r in f.requests() for h in r["headers"]
    )


@pytest.mark.parametrize("how,spec,flag", BREAKS)
def test_a_relayed_stream_that_breaks_ends_with_an_error_event_in_the_clients_format(
    gateway, client, fakes, scorecard, how, spec, flag
):
    case = f"{how}, onBrokenStream: error"
    before = relayed(gateway, "error", "error")
    got, served, _origin, error, took, request_id, text = ask(client, "relay-error", fault(**spec), stream=True)
    scorecard(
        case,
        "a well-formed error event in the client's stream format (no [DONE]); logged and counted as failed",
        f"{type(error).__name__} ({getattr(error, 'code', None)}) after {took:.2f} s with {len(text.split())} chunks",
    )
    assert (got, served) == (200, "primary")
    # The SDK read an error event (APIError with its body), not a connection that broke under it.
    assert isinstance(error, openai.APIError) and not isinstance(error, openai.APIConnectionError), repr(error)
    assert error.code == "stream_broken" and "incomplete" in error.message
    assert text == "chunk0 chunk1 "
    if spec["kind"] == "stall":
        assert took < SILENCE_MS / 1000 + SLACK_S
    assert len(attempts(fakes, "second")) == 0
    assert relayed(gateway, "error", "error") == before + 1
    # The provider's attempt is logged as the broken answer it was, and billed nothing.
    client_line = next(e for e in log_lines(gateway, request_id) if e["event"] == "request")
    assert client_line["path"] == "/v1/chat/completions"
    relayed_request = relayed_lines(gateway, request_id)[-1]
    assert (relayed_request["status"], relayed_request["flags"]) == (200, flag)
    assert relayed_request["completion_tokens"] is None
    assert no_relay_headers_reached(fakes)


def test_a_relayed_stream_that_breaks_is_continued_on_the_next_backend(gateway, client, fakes, scorecard):
    before = relayed(gateway, "continue", "continued")
    ids: set[str] = set()
    started = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(
        model="relay-continue",
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
        extra_headers=fault(kind="cut", after=2),
    )
    text, error = "", None
    try:
        for chunk in raw.parse():
            ids.add(chunk.id)
            text += "".join(c.delta.content or "" for c in chunk.choices)
    except Exception as exc:
        error = exc
    took = time.monotonic() - started
    continued = fakes["second"].requests()
    scorecard(
        "stream cut after 2 chunks, onBrokenStream: continue",
        "continued on the next backend, one uninterrupted stream",
        f"{'one stream' if error is None and len(ids) == 1 else repr(error)} of "
        f"{len(text.split())} chunks in {took:.2f} s (2 from the primary, then the second's); "
        f"the second was given the {len('chunk0 chunk1 ')} characters sent",
    )
    assert error is None, repr(error)
    assert len(ids) == 1  # one answer, under the first answer's id
    assert text == "chunk0 chunk1 " + "chunk0 chunk1 chunk2 chunk3 chunk4 "
    assert len(continued) == 1
    # An OpenAI-API backend has no prefill: it is given the text, then asked to go on from it.
    messages = continued[0]["body"]["messages"]
    assert messages[0] == {"role": "user", "content": "hello"}
    assert messages[1] == {"role": "assistant", "content": "chunk0 chunk1 "}
    assert messages[2]["role"] == "user" and "Continue" in messages[2]["content"]
    assert relayed(gateway, "continue", "continued") == before + 1
    assert no_relay_headers_reached(fakes)


def test_a_fallback_that_refuses_the_continuation_leads_to_the_error_event(gateway, client, fakes, scorecard):
    """The next backend answering the continuation with its own 400: the client gets the clean
    error event of its stream, never that backend's refusal."""
    fakes["second"].behave(status=400)
    before = relayed(gateway, "continue", "error")
    got, served, _origin, error, took, _id, text = ask(
        client, "relay-continue", fault(kind="cut", after=2), stream=True
    )
    refused = [r for r in fakes["second"].requests() if r["api"] == "openai"]
    scorecard(
        "stream cut after 2 chunks, onBrokenStream: continue, the next backend refuses (400)",
        "the clean error event of the client's stream, not the fallback's 400",
        f"{type(error).__name__} ({getattr(error, 'code', None)}) after {took:.2f} s with {len(text.split())} chunks; "
        f"the fallback asked {len(refused)}x",
    )
    assert (got, served) == (200, "primary")
    assert isinstance(error, openai.APIError) and not isinstance(error, openai.APIConnectionError), repr(error)
    assert error.code == "stream_broken" and text == "chunk0 chunk1 "
    assert len(refused) == 1
    assert relayed(gateway, "continue", "error") == before + 1


def test_an_anthropic_client_continued_on_a_prefill_backend_sees_one_message(gateway, fakes, scorecard):
    """A Messages client, its answer translated from the primary's chat stream, continued on an
    Anthropic backend: the text sent is the start of that backend's answer (an assistant turn
    last, no instruction), and the SDK accumulates one message."""
    with (
        anthropic.Anthropic(base_url=gateway.url.removesuffix("/v1"), api_key="client-token", max_retries=0) as ant,
        ant.messages.stream(
            model="relay-claude",
            max_tokens=64,
            messages=[{"role": "user", "content": "hello"}],
            # Chunks 50 ms apart: both reach the client, translated, before the cut.
            extra_headers={**fault(kind="cut", after=2), "x-fake-chunk-delay-ms": "50"},
        ) as stream,
    ):
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    continued = fakes["second"].requests()
    scorecard(
        "Messages stream cut after 2 chunks, continued on an Anthropic backend",
        "continued with the text sent as the start of the backend's answer (prefill); one message",
        f"one message of {len(text.split())} chunks, stop_reason {final.stop_reason}; "
        f"the backend's last turn: {continued[-1]['body']['messages'][-1]['role'] if continued else None}",
    )
    assert len(continued) == 1 and continued[0]["api"] == "anthropic"
    # The text sent is the start of the backend's answer, without its trailing space (Anthropic
    # refuses one), and the continuation's leading space is not doubled.
    last = continued[0]["body"]["messages"][-1]
    assert last == {"role": "assistant", "content": [{"type": "text", "text": "chunk0 chunk1"}]}
    assert text == "chunk0 chunk1 " + "chunk0 chunk1 chunk2 chunk3 chunk4 "
    assert final.content[0].text == text and final.stop_reason == "end_turn"
    assert no_relay_headers_reached(fakes)


def test_a_responses_client_gets_the_apis_error_event(gateway, client):
    events = []
    stream = client.responses.create(
        model="relay-error", input="hello", stream=True, extra_headers=fault(kind="cut", after=2)
    )
    for event in stream:
        events.append(event)
    kinds = [e.type for e in events]
    assert kinds[-1] == "error" and "response.completed" not in kinds
    assert events[-1].code == "stream_broken"


def test_a_relayed_stream_that_does_not_break_passes_whole(gateway, client, fakes):
    before = relayed(gateway, "continue", "complete")
    got, served, _origin, error, _took, _id, text = ask(client, "relay-continue", {}, stream=True)
    assert (got, served, error) == (200, "primary", None)
    assert text == "chunk0 chunk1 chunk2 chunk3 chunk4 "
    assert relayed(gateway, "continue", "complete") == before + 1
    # A JSON answer is not relayed: nothing in it can break half-way.
    got, served, _origin, error, _took, _id, _text = ask(client, "relay-continue", {})
    assert (got, served, error) == (200, "primary", None)
    assert relayed(gateway, "continue", "complete") == before + 1


def test_a_client_that_leaves_a_relayed_stream_is_not_continued_for(gateway, fakes):
    """The client closing its side is not the provider's stream breaking: nothing is asked of
    the next backend."""
    before = relayed(gateway, "continue", "client_left")
    body = {"model": "relay-continue", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    slow = {"authorization": "Bearer client-token", "x-fake-chunks": "50", "x-fake-chunk-delay-ms": "100"}
    with httpx.stream("POST", f"{gateway.url}/chat/completions", json=body, headers=slow, timeout=10) as response:
        assert response.status_code == 200
        next(response.iter_raw())
    wait_for(lambda: relayed(gateway, "continue", "client_left") == before + 1, "the relay to see the client leave")
    assert len(attempts(fakes, "second")) == 0 and len(attempts(fakes, "primary")) == 1


def test_a_client_cannot_forge_the_relays_header(gateway):
    response = httpx.post(
        f"{gateway.url}/chat/completions",
        json={"model": "relay-error", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        headers={"authorization": "Bearer client-token", "x-signalbox-relay": "e30.forged"},
    )
    assert response.status_code == 403
    assert "gateway's own header" in response.json()["error"]["message"]


def test_a_stream_without_done_ends_promptly_with_its_usage(gateway, client, fakes, scorecard):
    got, served, _origin, error, took, request_id, text = ask(client, "chain", fault(kind="no_done"), stream=True)
    request = next(e for e in log_lines(gateway, request_id) if e["event"] == "request")
    scorecard(
        "stream ends without [DONE]",
        "finished promptly, usage reported",
        f"{got} in {took * 1000:.0f} ms, {request['prompt_tokens']}+{request['completion_tokens']} tokens logged",
    )
    assert (got, served, error) == (200, "primary", None) and text.count("chunk") == 5
    assert took < 1.0
    assert (request["prompt_tokens"], request["completion_tokens"]) == (10, 5)


@pytest.mark.parametrize(
    "case,kind,code",
    [
        ("context length exceeded, no larger window in the chain", "context_length", "context_length_exceeded"),
        ("content policy", "content_filter", "content_filter"),
    ],
)
def test_a_refusal_about_the_request_is_returned_with_the_providers_reason_not_retried(
    client, fakes, scorecard, case, kind, code
):
    got, _, _, error, _, _, _ = ask(client, "chain", fault(kind=kind))
    body = error.response.json() if isinstance(error, openai.APIStatusError) else {}
    scorecard(
        case,
        "returned to the client with the provider's code, not retried as it is",
        f"{got} {body.get('error', {}).get('code')}; next backend tried {len(attempts(fakes, 'second'))}x",
    )
    assert got == 400 and body["error"]["code"] == code
    assert "[primary]" in body["error"]["message"]  # the provider's own reason
    assert len(attempts(fakes, "primary")) == 1 and len(attempts(fakes, "second")) == 0


def test_a_flapping_backend_loses_no_request(client, fakes, scorecard):
    fakes["primary"].behave(status=500, fault={"every": 2})
    answers = [ask(client, "chain", {}) for _ in range(10)]
    fakes["primary"].behave()
    served = [a[1] for a in answers]
    scorecard(
        "flapping (every other request fails)",
        "no request lost",
        f"{sum(a[0] == 200 for a in answers)}/10 answered, {served.count('second')} by the next backend",
    )
    assert all(a[0] == 200 for a in answers)
    assert served.count("second") == 5 and served.count("primary") == 5


def test_a_backend_failing_repeatedly_is_taken_out_for_every_request(gateway, client, fakes, scorecard):
    fakes["brittle"].behave(status=500)
    answers = [ask(client, "circuit", {}) for _ in range(20)]
    answered_at = time.time()
    tried = len(attempts(fakes, "brittle"))

    def explained() -> dict | None:
        # The explain API reads the ejection from Envoy's outlier event log (extproc/outliers.py).
        models = httpx.get(f"{gateway.admin_url}/v1/models").json()["data"]
        rests = [b.get("cooling_down") for m in models for b in m["backends"] if b["backend"] == "default/brittle/m"]
        return next((r for r in rests if r), None)

    took = wait_for(explained, "the explain API to show the ejection") - answered_at
    rest = explained()
    # Envoy's own count of the ejection. Not its ejections_active gauge: the rest that mirrors
    # the ejection sends the backend's cluster again (extproc/xds.py), Envoy builds it anew and
    # its outlier detector starts from nothing, so the gauge reads 0 from then on (CI saw it
    # read before and after that). A counter keeps its value across the cluster's rebuild.
    stats = httpx.get(f"http://127.0.0.1:{gateway.admin_port}/stats", params={"filter": "ejections_enforced_total"})
    ejected = [line for line in stats.text.splitlines() if "brittle" in line and line.endswith(": 1")]
    metrics = httpx.get(f"{gateway.admin_url}/metrics").text
    counted = 'signalbox_backend_cooldowns_total{model="m",provider="brittle",reason="ejected"} 1.0' in metrics
    scorecard(
        "a backend failing repeatedly",
        "taken out for all requests after 5 failures (Envoy outlier detection); in metrics and the explain API",
        f"20/20 answered; the failing backend saw {tried} of 20; ejected: {bool(ejected)}; "
        f"explain: {rest['reason'] if rest else None} {max(took, 0):.1f} s after the last answer; metric: {counted}",
    )
    assert all(a[0] == 200 and a[1] == "second" for a in answers)
    assert tried == 5  # then ejected: later requests go straight to the next backend
    assert ejected and rest and rest["reason"] == "ejected" and counted


def out(gateway) -> bool:
    return "failed_eds_health" in envoy_health(gateway, "primary")


@pytest.mark.parametrize("alias", ["chain", "decided"])
def test_a_retry_after_keeps_every_request_off_the_backend_until_it_has_passed(
    gateway, client, fakes, scorecard, alias
):
    rest = 2.0
    fakes["primary"].behave(status=429, fault={"retry_after": f"{rest:.0f}", "times": 1})
    got, served, *_ = ask(client, alias, {})
    limited_at = attempts(fakes, "primary")[0]
    assert (got, served) == (200, "second")
    wait_for(lambda: out(gateway), "Envoy to take the primary out")
    during = [ask(client, alias, {})[1] for _ in range(5)]
    back_at = wait_for(lambda: not out(gateway), "the primary back", timeout=rest + 3)
    after = ask(client, alias, {})[1]
    tried = attempts(fakes, "primary")
    scorecard(
        f"429 with Retry-After: {rest:.0f}, then more requests ({alias})",
        f"the backend rests {rest:.0f} s for every request (all workers), then serves again",
        f"during: {during.count('second')}/5 to the next backend; back after {back_at - limited_at:.2f} s",
    )
    assert during == ["second"] * 5
    assert len(tried) == 2 and tried[1] - limited_at >= rest  # nothing reached it while it rested
    assert rest <= back_at - limited_at < rest + SLACK_S
    assert after == "primary"


@pytest.mark.parametrize("alias", ["lone", "decided"])
def test_when_every_backend_left_rests_the_client_is_refused_at_once_in_its_own_api(
    gateway, client, fakes, scorecard, alias
):
    """A request whose every backend left rests is not sent to a provider that said "not now":
    the resting listener (each backend cluster's degraded second host) refuses it at once with
    a 429 `backends_resting` in the client's API shape, and its provider sees nothing. (Before,
    Envoy's panic mode sent it to the resting backend.) `decided` has a second backend, which
    the case makes rest as well."""
    fakes["primary"].behave(status=429, fault={"retry_after": "30", "times": 1})
    ask(client, alias, {"x-fake-only": "primary"})
    wait_for(lambda: out(gateway), "Envoy to take the primary out")
    if alias == "decided":  # the second rests too (one 429 of its own, steered by headers)
        limited = {"x-fake-only": "second", "x-fake-status": "429", "x-fake-fault": json.dumps({"retry_after": "30"})}
        ask(client, alias, limited)
        wait_for(lambda: "failed_eds_health" in envoy_health(gateway, "second"), "Envoy to take the second out")
    before = {name: len(attempts(fakes, name)) for name in ("primary", "second")}
    got, _served, _, error, took, request_id, _ = ask(client, alias, {})
    with (
        anthropic.Anthropic(base_url=gateway.url.removesuffix("/v1"), api_key="client-token", max_retries=0) as claude,
        pytest.raises(anthropic.RateLimitError) as refused,
    ):
        claude.messages.create(model=alias, max_tokens=8, messages=[{"role": "user", "content": "hello"}])
    after = {name: len(attempts(fakes, name)) for name in ("primary", "second")}
    scorecard(
        f"every backend left rests ({alias})",
        "429 backends_resting at once, in each client's API; no provider called",
        f"{got} in {took * 1000:.0f} ms; provider calls during: {sum(after.values()) - sum(before.values())}",
    )
    assert got == 429 and isinstance(error, openai.RateLimitError)
    assert error.response.json()["error"]["code"] == "backends_resting"
    assert refused.value.response.json()["type"] == "error"  # Anthropic's shape
    assert refused.value.response.json()["error"]["type"] == "rate_limit_error"
    assert after == before
    assert took < SLACK_S
    # The request log says the gateway passed each backend over itself (the provider not called).
    lines = log_lines(gateway, request_id)
    assert [line["moved_on"] for line in lines if line["event"] == "attempt"] and all(
        line["moved_on"] == "resting" and line["status"] == 429 for line in lines if line["event"] == "attempt"
    )


def test_low_rate_limit_headers_steer_requests_away_before_a_429(gateway, client, fakes, scorecard):
    fakes["primary"].behave(fault={"remaining": 0, "times": 1})  # 200, "x-ratelimit-remaining-requests: 0"
    first = ask(client, "chain", {})[1]
    wait_for(lambda: out(gateway), "Envoy to take the primary out")
    during = ask(client, "chain", {})[1]
    back = wait_for(lambda: not out(gateway), "the primary back", timeout=4)
    scorecard(
        "answers say 0 requests remain (x-ratelimit-remaining-requests)",
        "new requests go elsewhere until the window resets, before any 429",
        f"next request to {during}; primary back {back - attempts(fakes, 'primary')[0]:.2f} s later",
    )
    assert (first, during) == ("primary", "second")
    assert len(attempts(fakes, "primary")) == 1  # no 429 was needed


def test_a_rejected_key_fails_over_and_rests_its_backend(gateway, client, fakes, scorecard):
    fakes["primary"].behave(status=401)  # a revoked key stays revoked
    try:
        first = ask(client, "decided", {})[1]
        wait_for(lambda: out(gateway), "Envoy to take the primary out")
        # The ext_proc keeps a decided request off the resting backend by itself, at once.
        decided = ask(client, "decided", {})[1]
        tried = len(attempts(fakes, "primary"))

        # Envoy's workers take an endpoint's new health from its main thread a moment after its
        # admin shows it (seen lagging once on a loaded CI machine): within seconds, compiled
        # requests stay off the primary too. One that still reached it failed over.
        def chain_avoids_primary() -> bool:
            before = len(attempts(fakes, "primary"))
            served = ask(client, "chain", {})[1]
            assert served == "second"
            return len(attempts(fakes, "primary")) == before

        wait_for(chain_avoids_primary, "compiled requests to stay off the resting primary")
        chain = ask(client, "chain", {})[1]
        models = httpx.get(f"{gateway.admin_url}/v1/models").json()["data"]
    finally:
        fakes["primary"].behave(status=200)
    rests = [
        b["cooling_down"]
        for m in models
        for b in m["backends"]
        if b["backend"] == "default/primary/m" and "cooling_down" in b
    ]
    scorecard(
        "401 from a provider (revoked key)",
        "fails over; the backend rests (every request) and the explain API says why",
        f"served by {first}, then {[decided, chain]}; explain: {rests[0]['reason'] if rests else None}",
    )
    assert first == "second" and [decided, chain] == ["second", "second"]
    assert tried == 1  # the decided request after the rest never tried the primary
    assert rests and rests[0]["reason"] == "key_rejected"


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_too_long_for_the_backend_goes_to_one_with_a_larger_window(client, fakes, scorecard, stream):
    got, served, origin, error, took, _, _ = ask(client, "ctx", fault(kind="context_length"), stream=stream)
    arrived = fakes["second"].requests()
    scorecard(
        f"context length exceeded, a larger window next in the chain ({'stream' if stream else 'plain'})",
        "the backend with the larger window answers",
        f"{got} from {served} in {took * 1000:.0f} ms",
    )
    assert (got, served, origin, error) == (200, "second", "second", None)
    assert len(attempts(fakes, "primary")) == 1 and [r["model"] for r in arrived] == ["large"]


def test_a_malformed_event_is_dropped_and_the_stream_goes_on(gateway, client, fakes, scorecard):
    got, served, origin, error, _took, request_id, text = ask(
        client, "chain", fault(kind="malformed", after=1), stream=True
    )
    request = next(e for e in log_lines(gateway, request_id) if e["event"] == "request")
    scorecard(
        "a malformed SSE event mid-stream",
        "dropped; the rest of the stream and its usage arrive",
        f"{'an error' if error else 'a normal end'}, {text.count('chunk')}/5 chunks, "
        f"{request['completion_tokens']} output tokens logged",
    )
    assert (got, served, origin, error) == (200, "primary", "primary", None)
    assert text == "chunk0 chunk1 chunk2 chunk3 chunk4 "
    assert request["completion_tokens"] == 5


# The primary's server keep-alive in the test below, between the two gateways' idle timeouts.
SERVER_KEEPALIVE_MS = 600


def test_a_server_that_closes_idle_connections_first_costs_no_request(gateway, fakes, client, scorecard):
    """A server closes a connection idle past its keep-alive (vLLM's and llama.cpp's after 5 s); a
    request Envoy sends on it as it closes is dropped unanswered, and with one backend the client
    gets a 503 (more: a needless failover, the backend counted as failing). Envoy must close an
    idle connection first: with the provider's idle timeout below the server's keep-alive, the
    request after an idle pause goes on a new connection and is answered there."""
    stale = fault(kind="stale", keepalive_ms=SERVER_KEEPALIVE_MS)
    pause_s = 1.5 * SERVER_KEEPALIVE_MS / 1000  # the idle time between the two requests

    def after_a_pause(alias: str):
        assert ask(client, alias, {})[0] == 200  # a connection, kept alive after its answer
        time.sleep(pause_s)
        return ask(client, alias, stale)

    status, served, *_ = after_a_pause("brief")  # Envoy's 300 ms < the server's 600 ms
    # The control: "lone" keeps idle connections 4 s (the default for plain HTTP), longer than
    # this server does, so Envoy reuses one the server has dropped.
    control, *_ = after_a_pause("lone")
    scorecard(
        "server closes idle connections first (keep-alive shorter than Envoy's)",
        "idle timeout below the server's keep-alive: the request goes on a new connection, answered",
        f"{status} from {served} after {pause_s:.1f} s idle; with Envoy's idle timeout above the server's: {control}",
    )
    assert (status, served) == (200, "primary-brief")
    assert control == 503
    assert ask(client, "lone", {})[0] == 200  # a success: the primary's failure count starts again


def test_a_redirect_from_the_only_backend_is_a_502_the_sdk_does_not_follow(gateway, client, fakes, scorecard):
    """Passed on, a backend's redirect made the SDK follow it past the gateway, the prompt sent
    straight to where it pointed (the fake's redirect loop: 20 direct requests, then a
    connection error). The client gets a 502 `upstream_not_api` without a Location instead."""
    got, _, _, error, _, _, _ = ask(client, "lone", fault(kind="redirect"))
    paths = [r["path"] for r in fakes["primary"].requests()]
    scorecard(
        "a redirect from the only backend",
        "502 upstream_not_api, nothing followed",
        f"{got} {error.response.json()['error']['code'] if error is not None else None}; provider saw {paths}",
    )
    assert got == 502 and isinstance(error, openai.APIStatusError)
    assert error.response.json()["error"]["code"] == "upstream_not_api"
    assert "location" not in error.response.headers
    assert paths == ["/v1/chat/completions"]  # the gateway's attempt alone: no request followed it
