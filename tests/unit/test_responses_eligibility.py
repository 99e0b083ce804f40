"""Which backends a Responses client may be sent to (issue 14): one that serves the Responses
API takes any request as it is; one reached by translation only what chat can express."""

from __future__ import annotations

import json

import pytest

from signalbox.core.compiler import compile_config
from signalbox.core.errors import RequestError
from signalbox.extproc import decide
from signalbox.extproc.runtime import RuntimeTable
from signalbox.extproc.strategies import SelectionState
from tests.factories import backend, model, policy, provider


def table() -> RuntimeTable:
    result = compile_config(
        [
            provider("native", "https://api.openai.com/v1", [model("n", inputPricePer1M=9)], type="openai"),
            provider("compat", "http://vllm:8000/v1", [model("c", inputPricePer1M=1)]),
        ],
        [
            policy("both", ["both"], [backend("native", "n"), backend("compat", "c")], strategy="cost"),
            policy("compat", ["compat"], [backend("compat", "c")]),
        ],
    )
    assert result.ok, result.problems
    return RuntimeTable.from_config(result.config)


def route(alias: str, **fields) -> str:
    raw = json.dumps({"model": alias, "input": "and then?", **fields}).encode()
    return decide.decide(table(), SelectionState(), "/v1/responses", {}, raw).selection.choice.backend.id


def test_state_only_a_responses_provider_keeps_goes_to_it_and_the_rest_to_the_cheapest():
    assert route("both") == "default/compat/c"  # translatable: the cheaper backend
    assert route("both", previous_response_id="resp_1") == "default/native/n"  # only the native one can


def test_state_no_backend_can_keep_is_a_clear_400():
    with pytest.raises(RequestError) as caught:
        route("compat", previous_response_id="resp_1")
    assert caught.value.status == 400 and "previous_response_id" in caught.value.message


def test_only_openai_itself_serves_the_responses_api_unless_a_provider_says_so():
    result = compile_config(
        [
            provider("o", "https://api.openai.com/v1", [model("m")], type="openai"),
            provider("v", "http://vllm:8000/v1", [model("m")]),
            provider("v2", "http://vllm2:8000/v1", [model("m")], responsesApi=True),
            provider("oo", "https://api.openai.com/v1", [model("m")], type="openai", responsesApi=False),
        ],
        [],
    )
    assert {p.name: p.responses_api for p in result.config.providers} == {
        "o": True,
        "v": False,
        "v2": True,
        "oo": False,
    }
