"""core/models_api.lua, which answers the models API inside Envoy (one model in either SDK's
shape, Anthropic's paginated list), under LuaJIT as in Envoy, with a stand-in for the handle
Envoy passes; and modelsapi.answer, the same API in Python for gateways that list per caller,
held to give the script's answers. Path and query come from clients: hypothesis."""

from __future__ import annotations

import json
from urllib.parse import quote, urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lupa import luajit21

from signalbox.core.envoygen import contract, modelsapi
from signalbox.core.errors import ANTHROPIC_API, RequestError

HARNESS = """
function(hdrs)
  local answer = {}
  local headers = {}
  function headers:get(k) return hdrs[k] end
  local metadata = {}
  function metadata:set(ns, key, value) answer.meta = {ns, key, value} end
  local info = {}
  function info:dynamicMetadata() return metadata end
  local handle = {}
  function handle:headers() return headers end
  function handle:streamInfo() return info end
  function handle:respond(h, b)
    answer.status, answer.reason, answer.body = h[":status"], h["x-signalbox-reason"], b
    answer.kept = answer.meta  -- what the request log can read once the answer is given
  end
  envoy_on_request(handle)
  local kept = answer.kept or {}
  return answer.status, answer.reason, answer.body, kept[1], kept[2], kept[3]
end
"""

ALIASES = ["auto", "balanced", "by-task", "claude-first", "meta-llama/Llama-3.1-70B", 'modèle "rapide"']
ANTHROPIC = {"anthropic-version": "2023-06-01"}


class Models:
    def __init__(self, aliases: list[str]):
        self.lua = luajit21.LuaRuntime()
        self.lua.execute(modelsapi.script(aliases))
        self.run_lua = self.lua.eval(HARNESS)

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str | None, dict]:
        hdrs = self.lua.table_from({":path": path, ":method": "GET", **(headers or {})})
        status, reason, body, *kept = self.run_lua(hdrs)
        assert status is not None, "the script answered nothing"
        # The listener keeps the client's path for the request log after this filter, which
        # answered first: the script keeps it itself (a request logged with path null before).
        assert kept == [contract.METADATA_NS, contract.CLIENT_PATH_KEY, path]
        return int(status), reason, json.loads(body)

    def page(self, **params: object) -> dict:
        status, _, body = self.get(f"{contract.MODELS_PATH}?{urlencode(params)}", ANTHROPIC)
        assert status == 200, body
        return body


@pytest.fixture(scope="module")
def models() -> Models:
    return Models(ALIASES)


@pytest.mark.parametrize("alias", ALIASES)
def test_a_model_is_answered_in_the_shape_of_the_sdk_that_asks(models, alias):
    path = contract.MODEL_PATH_PREFIX + quote(alias, safe="")  # as both SDKs send the id
    assert models.get(path) == (200, None, contract.openai_model(alias))
    assert models.get(path, ANTHROPIC) == (200, None, contract.anthropic_model(alias))


def test_an_unknown_model_is_a_404_in_each_api_naming_it(models):
    status, reason, body = models.get(contract.MODEL_PATH_PREFIX + "gpt-9")
    assert (status, reason) == (404, "model_not_found")
    assert body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    assert "'gpt-9'" in body["error"]["message"]
    status, _, body = models.get(contract.MODEL_PATH_PREFIX + "gpt-9", ANTHROPIC)
    assert status == 404 and body["type"] == "error" and body["error"]["type"] == "not_found_error"
    # The empty id is no model either.
    assert models.get(contract.MODEL_PATH_PREFIX)[0] == 404


def test_anthropic_clients_get_their_list_twenty_at_a_time_by_default():
    aliases = [f"m{i:03d}" for i in range(45)]
    page = Models(aliases).page()
    assert [m["id"] for m in page["data"]] == aliases[:20]
    assert page["data"][0] == contract.anthropic_model("m000")
    assert (page["has_more"], page["first_id"], page["last_id"]) == (True, "m000", "m019")


# Aliases as the config allows them (models.Alias): any text without control characters.
SOME_ALIASES = st.lists(
    st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=12),
    min_size=1,
    max_size=30,
    unique=True,
).map(sorted)


@settings(max_examples=60, deadline=None)
@given(aliases=SOME_ALIASES, limit=st.integers(1, 12))
def test_paging_forwards_and_backwards_visits_every_model_once_in_order(aliases, limit):
    models = Models(aliases)
    seen, after = [], None
    while True:
        page = models.page(limit=limit, **({"after_id": after} if after is not None else {}))
        ids = [m["id"] for m in page["data"]]
        assert len(ids) <= limit
        seen += ids
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == aliases
    before = aliases[-1]
    back = [before]  # the pages before the last model, then it
    while True:
        page = models.page(limit=limit, before_id=before)
        back = [m["id"] for m in page["data"]] + back
        if not page["has_more"]:
            break
        before = page["first_id"]
    assert back == aliases


def test_bad_page_parameters_are_400s_naming_them(models):
    for query, says in (
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=2.5", "limit"),
        ("limit=ten", "limit"),
        ("after_id=auto&before_id=auto", "after_id and before_id"),
        ("after_id=gone", "'gone'"),
    ):
        status, reason, body = models.get(f"{contract.MODELS_PATH}?{query}", ANTHROPIC)
        assert (status, reason) == (400, "invalid_parameter"), query
        assert body["error"]["type"] == "invalid_request_error" and says in body["error"]["message"]


def test_the_end_of_the_list_is_an_empty_last_page(models):
    page = models.page(after_id=ALIASES[-1])
    assert page == {"data": [], "has_more": False, "first_id": None, "last_id": None}


@settings(max_examples=300, deadline=None)
@given(
    rest=st.text(max_size=40) | st.binary(max_size=40).map(lambda b: quote(b, safe="/?&=%+#")),
    anthropic=st.booleans(),
    listing=st.booleans(),
)
def test_any_path_and_query_gets_a_json_answer_never_a_script_error(models, rest, anthropic, listing):
    # Envoy gives the script the request's :path as the client sent it: any bytes after the
    # route's prefix, escapes and all.
    path = (contract.MODELS_PATH + "?" if listing else contract.MODEL_PATH_PREFIX) + rest
    status, _, body = models.get(path, ANTHROPIC if anthropic or listing else None)
    assert status in (200, 400, 404)
    if status != 200:
        error = body["error"]
        assert isinstance(error["message"], str) and error["type"]


# --------------------------------------------------------------- the same API, answered in Python
# A gateway with consumers lists per caller, so there the ext_proc answers the models API
# (modelsapi.answer) over the aliases the caller may see: the same contract as the script's.


def python_get(aliases: list[str], path: str, headers: dict[str, str] | None = None) -> tuple[int, str | None, dict]:
    anthropic = modelsapi.ANTHROPIC_HEADER in (headers or {})
    try:
        return 200, None, json.loads(modelsapi.answer(aliases, path, anthropic))
    except RequestError as err:
        return err.status, err.code, json.loads(err.body_for(ANTHROPIC_API if anthropic else ""))


@settings(max_examples=400, deadline=None)
@given(
    rest=st.text(max_size=40) | st.binary(max_size=40).map(lambda b: quote(b, safe="/?&=%+#")),
    anthropic=st.booleans(),
    listing=st.booleans(),
    prefix=st.sampled_from([contract.MODELS_PATH, "/openai/models", "/openai/v1/models"]),
)
def test_python_answers_any_models_request_as_the_script_does(models, rest, anthropic, listing, prefix):
    path = (prefix + "?" if listing else prefix + "/") + rest
    headers = ANTHROPIC if anthropic else None
    if listing and not anthropic:  # OpenAI's plain listing is a direct response, not the script
        assert python_get(ALIASES, path) == (200, None, json.loads(contract.models_listing(ALIASES)))
    else:
        assert python_get(ALIASES, path, headers) == models.get(path, headers)


@settings(max_examples=60, deadline=None)
@given(aliases=SOME_ALIASES, limit=st.integers(1, 12), cursor=st.integers(0, 29), before=st.booleans())
def test_python_pages_as_the_script_does(aliases, limit, cursor, before):
    at = aliases[cursor % len(aliases)]
    query = urlencode({"limit": limit, ("before_id" if before else "after_id"): at})
    path = f"{contract.MODELS_PATH}?{query}"
    assert python_get(aliases, path, ANTHROPIC) == Models(aliases).get(path, ANTHROPIC)


def test_only_the_models_paths_are_models_paths():
    for path in ("/v1/models", "/v1/models/x?y=1", "/openai/models", "/openai/v1/models/a/b"):
        assert modelsapi.is_models_path(path), path
    for path in ("/v1/modelsx", "/v1/chat/completions", "/models", "/openai/deployments/x/chat/completions"):
        assert not modelsapi.is_models_path(path), path
