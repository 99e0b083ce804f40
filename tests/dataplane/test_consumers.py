"""Consumers through a real Envoy, with the official SDKs as clients: gateway API keys and JWTs
name a consumer, what it may call is enforced (401/403), and its requests, tokens and dollars
per window are limited (429 with Retry-After at the right request). Two gateways sharing one
real redis-server hold a burst to a small token limit, and fail as configured when Redis stops.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path

import anthropic
import httpx
import jwt
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from signalbox.core.keys import generate_key
from signalbox.extproc.classify import features
from tests.factories import backend, consumer, dump, model, policy, provider
from tests.redis_server import RedisServer
from tests.windows import clear_of_the_hour_edge, clear_of_the_minute_edge

from .conftest import logs, start_gateway
from .test_lifecycle import wait_for

pytestmark = pytest.mark.dataplane

KEY_A, KEY_B, KEY_T, KEY_D = generate_key(), generate_key(), generate_key(), generate_key()
ENV = {"TEAM_A_KEY": KEY_A, "TEAM_B_KEY": KEY_B, "TEAM_T_KEY": KEY_T, "TEAM_D_KEY": KEY_D}
ISSUER = "https://idp.example"
SIGNING = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
# The fake answers every request with 10 prompt and 7 completion tokens; at 1000 USD per 1M
# tokens each way a request costs $0.017.
REQUEST_USD = 17 * 1000 / 1e6
ASK = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def jwks() -> str:
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(SIGNING.public_key()))
    return json.dumps({"keys": [{**public, "kid": "k1", "alg": "RS256", "use": "sig"}]})


def token(key=SIGNING, **claims) -> str:
    body = {"iss": ISSUER, "sub": "ci-bot", "groups": ["robots"], "exp": int(time.time()) + 600, **claims}
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": "k1"})


def resources(fakes, *extra) -> str:
    return dump(
        provider(
            "alpha",
            fakes["alpha"].url + "/v1",
            [model("m", inputPricePer1M=1000, outputPricePer1M=1000)],
        ),
        provider("beta", fakes["beta"].url + "/v1", [model("n")]),
        policy("chat", ["chat"], [backend("alpha", "m")]),
        policy("code", ["code"], [backend("beta", "n")]),
        policy("public", ["public"], [backend("beta", "n")], allowAnonymous=True),
        consumer(
            "team-a", team="payments", apiKey={"env": "TEAM_A_KEY"}, models=["chat"], limits={"requestsPerMinute": 3}
        ),
        consumer("team-b", apiKey={"env": "TEAM_B_KEY"}, policies=["code"]),
        consumer("team-t", apiKey={"env": "TEAM_T_KEY"}, limits={"tokensPerMinute": 40}),
        consumer("team-d", apiKey={"env": "TEAM_D_KEY"}, limits={"budget": {"hourlyUsd": 0.03}}),
        consumer("robots", jwt={"issuer": ISSUER, "jwks": jwks(), "claims": {"groups": "robots"}}, models=["code"]),
        *extra,
    )


def client(gw, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url, api_key=key, max_retries=0)


def metric(gw, name: str, **labels: str) -> float:
    text = httpx.get(f"{gw.admin_url}/metrics").text
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and all(w in line for w in wanted)
    )


@pytest.fixture(scope="module")
def gw(fakes, tmp_path_factory):
    gateway = start_gateway(tmp_path_factory.mktemp("consumers"), resources(fakes), env=ENV, extproc_workers=1)
    yield gateway
    gateway.stop()


def test_a_key_opens_its_own_aliases_only_and_never_reaches_a_provider(gw, fakes):
    with client(gw, KEY_A) as a:
        assert a.chat.completions.create(model="chat", **ASK).choices
        with pytest.raises(openai.PermissionDeniedError) as err:
            a.chat.completions.create(model="code", **ASK)
        assert err.value.code == "model_not_allowed"
    with client(gw, KEY_B) as b:  # allowed by policy
        assert b.chat.completions.create(model="code", **ASK).choices
    with anthropic.Anthropic(base_url=gw.url.removesuffix("/v1"), api_key=KEY_A, max_retries=0) as claude:
        answer = claude.messages.create(model="chat", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        assert answer.content  # x-api-key names the consumer too
    seen = json.dumps(fakes["alpha"].requests() + fakes["beta"].requests())
    assert KEY_A not in seen and KEY_B not in seen
    # The request log names the consumer (Envoy writes it after the answer); no key appears in
    # any log.

    def consumers_logged() -> set[str]:
        text = (Path(gw.workdir) / "requests.log").read_text()
        lines = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
        return {x.get("consumer") for x in lines if x.get("event") == "request"}

    assert wait_for(lambda: {"default/team-a", "default/team-b"} <= consumers_logged()), consumers_logged()
    text = logs(gw)
    assert KEY_A not in text and KEY_B not in text


def test_unknown_missing_and_forged_credentials_get_401_and_anonymous_policies_still_serve(gw):
    for key in ("sbx-not-a-key", token(OTHER), token(exp=int(time.time()) - 3600)):
        with client(gw, key) as c, pytest.raises(openai.AuthenticationError) as err:
            c.chat.completions.create(model="chat", **ASK)
        assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    missing = httpx.post(f"{gw.url}/chat/completions", json={"model": "chat", **ASK})
    assert missing.status_code == 401 and "needs an API key" in missing.json()["error"]["message"]
    with client(gw, "anything") as c:
        assert c.chat.completions.create(model="public", **ASK).choices
    with anthropic.Anthropic(base_url=gw.url.removesuffix("/v1"), api_key="sbx-nope", max_retries=0) as claude:
        with pytest.raises(anthropic.AuthenticationError) as err2:
            claude.messages.create(model="chat", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        assert err2.value.body["error"]["type"] == "authentication_error"


def test_a_jwt_from_the_trusted_issuer_names_its_consumer_by_claims(gw):
    with client(gw, token()) as robot:
        assert robot.chat.completions.create(model="code", **ASK).choices
        with pytest.raises(openai.PermissionDeniedError):
            robot.chat.completions.create(model="chat", **ASK)
    with client(gw, token(groups=["humans"])) as human, pytest.raises(openai.AuthenticationError):
        human.chat.completions.create(model="code", **ASK)
    assert metric(gw, "signalbox_consumer_requests_total", consumer="default/robots", outcome="routed") >= 1


def test_requests_per_minute_refuse_the_fourth_request_with_retry_after(gw):
    clear_of_the_minute_edge()
    with client(gw, KEY_A) as a:
        a.chat.completions.create(model="chat", **ASK)  # earlier tests may have used one: fill up
        statuses = []
        for _ in range(4):
            try:
                a.chat.completions.create(model="chat", **ASK)
                statuses.append(200)
            except openai.RateLimitError as err:
                statuses.append(429)
                assert "3 requests per minute" in err.message and 1 <= int(err.response.headers["retry-after"]) <= 60
                assert err.code == "rate_limit_exceeded"
        assert 429 in statuses and statuses[statuses.index(429) :] == [429] * (4 - statuses.index(429))
    assert metric(gw, "signalbox_limit_refusals_total", subject="consumer:default/team-a", limit="requests_per_minute")


def until_refused(gw, key: str, counted: str, per_request: float, attempts: int) -> list[str]:
    """Requests one at a time, each after the previous one's usage was charged (the access
    log's batch), so a refusal comes at an exact request; outcomes in order."""
    outcomes = []
    consumer_id = "default/team-" + key_names[key]
    with client(gw, key) as c:
        for n in range(1, attempts + 1):
            try:
                c.chat.completions.create(model="chat", **ASK)
                outcomes.append("ok")
            except openai.RateLimitError as err:
                outcomes.append(err.code or "")
                assert 1 <= int(err.response.headers["retry-after"]) <= 3600
                break
            assert wait_for(lambda n=n: metric(gw, counted, consumer=consumer_id) >= per_request * n - 1e-9)
    return outcomes


key_names = {KEY_T: "t", KEY_D: "d"}


def test_tokens_per_minute_refuse_the_request_after_the_limit_is_used(gw):
    """40 tokens per minute, 17 a request: 17 and 34 are below, 51 is not: the fourth is refused."""
    clear_of_the_minute_edge(30)
    outcomes = until_refused(gw, KEY_T, "signalbox_consumer_tokens_total", 17, 5)
    assert outcomes == ["ok", "ok", "ok", "rate_limit_exceeded"]
    assert metric(gw, "signalbox_limit_refusals_total", limit="tokens_per_minute") == 1


def test_a_consumer_budget_refuses_the_request_after_it_is_spent(gw):
    """$0.03 per hour, $0.017 a request: after two, $0.034 is spent and the third is refused."""
    clear_of_the_hour_edge()
    outcomes = until_refused(gw, KEY_D, "signalbox_consumer_cost_usd_total", REQUEST_USD, 4)
    assert outcomes == ["ok", "ok", "budget_exhausted"]
    assert metric(gw, "signalbox_consumer_cost_usd_total", consumer="default/team-d") == pytest.approx(2 * REQUEST_USD)


def test_revoking_a_consumer_answers_401_within_seconds(gw, fakes, tmp_path):
    with client(gw, KEY_B) as b:
        assert b.chat.completions.create(model="code", **ASK).choices
        config = Path(gw.paths[0]) / "resources.yaml"
        original = config.read_text()
        revoked = original.replace(
            "name: team-b\n  namespace: default\nspec:\n",
            "name: team-b\n  namespace: default\nspec:\n  disabled: true\n",
        )
        assert revoked != original
        config.write_text(revoked)
        start = time.monotonic()
        try:
            assert gw.apply().ok

            def refused() -> bool:
                try:
                    b.chat.completions.create(model="code", **ASK)
                    return False
                except openai.AuthenticationError:
                    return True

            assert wait_for(refused, timeout=10)
            print(f"revoked in {time.monotonic() - start:.2f} s")
        finally:
            config.write_text(original)
            assert gw.apply().ok


def test_two_gateways_sharing_redis_hold_bursts_to_token_and_budget_limits_and_fail_as_configured(fakes, tmp_path):
    """Two gateways (two replicas) count in one real Redis. Bursts of 40 concurrent requests
    against 400 tokens per minute, and against $0.2 per hour, admit what the limit allows plus
    at most one request's estimate. Then Redis stops in the middle of a burst: from then on the
    fail-open consumer is served uncounted and the fail-closed one gets 503 limits_unavailable;
    nothing else (no 500, no reset)."""
    clear_of_the_minute_edge(40)
    clear_of_the_hour_edge()
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis").start()
    keys = {name: generate_key() for name in ("burst", "spender", "lenient", "strict")}
    env = {**ENV, **{f"{name.upper()}_KEY": key for name, key in keys.items()}}
    extra = (
        consumer("burst", apiKey={"env": "BURST_KEY"}, limits={"tokensPerMinute": 400}),
        consumer("spender", apiKey={"env": "SPENDER_KEY"}, limits={"budget": {"hourlyUsd": 0.2}}),
        consumer("lenient", apiKey={"env": "LENIENT_KEY"}, limits={"requestsPerMinute": 1000}),
        consumer(
            "strict", apiKey={"env": "STRICT_KEY"}, limits={"requestsPerMinute": 1000, "whenStoreUnavailable": "refuse"}
        ),
    )
    text = resources(fakes, *extra)
    for i in range(2):
        (tmp_path / f"gw{i}").mkdir()
    gateways = [
        start_gateway(tmp_path / f"gw{i}", text, env=env, redis_url=server.url, extproc_workers=1) for i in range(2)
    ]
    body = {"model": "chat", "messages": ASK["messages"], "max_tokens": 20}
    # What each request holds while in flight: its prompt estimate plus max_tokens, above the 17
    # tokens it really uses (and so its cost above the real $0.017).
    estimate = features(body).estimated_tokens + 20
    estimate_usd = estimate * 1000 / 1e6

    def ask(i: int, name: str) -> int:
        gw = gateways[i % 2]
        headers = {"authorization": f"Bearer {keys[name]}"}
        return httpx.post(f"{gw.url}/chat/completions", json=body, headers=headers, timeout=30).status_code

    try:
        fakes["alpha"].behave(delay_ms=300)  # all of a burst is in flight together
        with concurrent.futures.ThreadPoolExecutor(80) as pool:
            tokens = pool.map(lambda i: ask(i, "burst"), range(40))
            dollars = pool.map(lambda i: ask(i, "spender"), range(40))
            by_tokens, by_dollars = list(tokens), list(dollars)
        assert set(by_tokens) <= {200, 429} and set(by_dollars) <= {200, 429}, (by_tokens, by_dollars)
        admitted, spent = by_tokens.count(200), by_dollars.count(200)
        print(
            f"bursts: {admitted}/40 admitted at {estimate} tokens held against 400 per minute; "
            f"{spent}/40 at ${estimate_usd:.4f} held against $0.2 per hour"
        )
        # Overshoot at most one estimate, and no room left unused.
        assert admitted * 17 <= 400 + estimate and 400 // estimate <= admitted < 40, (admitted, estimate)
        assert spent * REQUEST_USD <= 0.2 + estimate_usd and int(0.2 // estimate_usd) <= spent < 40, spent

        fakes["alpha"].behave(delay_ms=50)
        outcomes: list[tuple[str, bool, concurrent.futures.Future]] = []
        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            for i in range(40):
                if i == 20:
                    server.stop()  # mid-burst: requests before it are in flight
                stopped = i >= 20
                for name in ("lenient", "strict"):
                    outcomes.append((name, stopped, pool.submit(ask, i, name)))
                time.sleep(0.01)
        after = {(name, stopped, f.result()) for name, stopped, f in outcomes}
        assert {s for name, stopped, s in after if name == "lenient"} == {200}, after  # fails open
        assert {s for name, stopped, s in after if name == "strict" and stopped} == {503}, after  # fails closed
        assert {s for name, stopped, s in after if name == "strict" and not stopped} <= {200, 503}, after
        for gw in gateways:
            assert metric(gw, "signalbox_limit_store_errors_total", operation="admit", outcome="allowed") >= 1
            assert metric(gw, "signalbox_limit_store_errors_total", operation="admit", outcome="refused") >= 1
    finally:
        fakes["alpha"].behave(delay_ms=0)
        for gw in gateways:
            gw.stop()
        server.stop()


def test_each_caller_lists_and_retrieves_only_the_aliases_it_may_call(gw):
    """The models API, which Envoy answers alone on a gateway without consumers, lists per
    caller once they exist (the ext_proc answers it), in both SDKs' shapes."""
    root = gw.url.removesuffix("/v1")
    with client(gw, KEY_A) as a:
        assert [m.id for m in a.models.list()] == ["chat"]
        assert a.models.retrieve("chat").id == "chat"
        with pytest.raises(openai.NotFoundError) as hidden:
            a.models.retrieve("code")  # another team's alias is not theirs to see
        assert hidden.value.code == "model_not_found"
    with client(gw, KEY_B) as b:
        assert [m.id for m in b.models.list()] == ["code"]  # given by policy
    with client(gw, token()) as robot:
        assert [m.id for m in robot.models.list()] == ["code"]
    with anthropic.Anthropic(base_url=root, api_key=KEY_A, max_retries=0) as claude:
        assert [m.id for m in claude.models.list(limit=1)] == ["chat"]
        assert claude.models.retrieve("chat").display_name == "chat"
        with pytest.raises(anthropic.NotFoundError):
            claude.models.retrieve("code")
    # Anonymous callers (no key, or one that names nobody) see what serves anonymous callers.
    assert [m["id"] for m in httpx.get(f"{gw.url}/models").json()["data"]] == ["public"]
    with client(gw, "sbx-not-a-key") as stranger:
        assert [m.id for m in stranger.models.list()] == ["public"]
    azure = httpx.get(f"{root}/openai/models", headers={"api-key": KEY_A}).json()
    assert [m["id"] for m in azure["data"]] == ["chat"]


def test_feedback_comes_from_callers_of_the_policy_it_teaches(gw):
    """Feedback moves what every caller of a policy gets: with consumers, it needs a caller who
    may call that policy (the decision token alone is not enough)."""
    # team-b (no request limits: other tests here spend team-a's 3 a minute) calls `code`.
    with client(gw, KEY_B) as b:
        raw = b.chat.completions.with_raw_response.create(model="code", **ASK)
    teach = {"decision": raw.headers["x-signalbox-decision"], "score": 1}
    mine = httpx.post(f"{gw.url}/feedback", json=teach, headers={"authorization": f"Bearer {KEY_B}"})
    assert mine.status_code == 200 and mine.json()["policy"] == "code"
    anonymous = httpx.post(f"{gw.url}/feedback", json=teach)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
    other_team = httpx.post(f"{gw.url}/feedback", json=teach, headers={"x-api-key": KEY_A})
    assert other_team.status_code == 403 and other_team.json()["error"]["code"] == "model_not_allowed"
    with client(gw, "anyone") as c:  # a policy that serves anonymous callers takes theirs
        public = c.chat.completions.with_raw_response.create(model="public", **ASK)
    token = public.headers["x-signalbox-decision"]
    assert httpx.post(f"{gw.url}/feedback", json={"decision": token, "score": 0.5}).status_code == 200


def test_the_explain_api_names_the_consumer_and_answers_what_live_would(gw):
    body = {"model": "chat", **ASK}
    explained = httpx.post(f"{gw.admin_url}/v1/route", json=body, headers={"x-api-key": KEY_A}).json()
    assert explained["consumer"] == "default/team-a" and explained["model"] == "m"
    named = httpx.post(f"{gw.admin_url}/v1/route?consumer=default/team-b", json=body)
    assert named.status_code == 403 and named.json()["error"]["code"] == "model_not_allowed"
    anonymous = httpx.post(f"{gw.admin_url}/v1/route", json=body)
    assert anonymous.status_code == 401
    public = httpx.post(f"{gw.admin_url}/v1/route", json={**body, "model": "public"}).json()
    assert public["consumer"] == "anonymous"


def test_a_jwks_fetched_by_envoy_from_the_issuers_url_verifies_tokens(fakes, tmp_path):
    """`jwksUri`: Envoy fetches the keys itself (a cluster of its own for the issuer's host)."""
    import http.server
    import threading

    document = jwks().encode()

    class Keys(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(document)))
            self.end_headers()
            self.wfile.write(document)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Keys)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    remote = consumer("remote-bots", jwt={"issuer": ISSUER, "jwksUri": url, "claims": {"sub": "ci-bot"}})
    text = dump(
        provider("beta", fakes["beta"].url + "/v1", [model("n")]),
        policy("code", ["code"], [backend("beta", "n")]),
        remote,
    )
    gw = start_gateway(tmp_path, text, extproc_workers=1)
    try:
        with client(gw, token()) as bot:
            assert bot.chat.completions.create(model="code", **ASK).choices
        with client(gw, token(OTHER)) as forged, pytest.raises(openai.AuthenticationError):
            forged.chat.completions.create(model="code", **ASK)
        # No policy here serves anonymous callers: listing the models needs a key or token too.
        with client(gw, "sbx-not-a-key") as stranger, pytest.raises(openai.AuthenticationError) as refused:
            stranger.models.list()
        assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
        with client(gw, token()) as bot:
            assert [m.id for m in bot.models.list()] == ["code"]
    finally:
        gw.stop()
        server.shutdown()
