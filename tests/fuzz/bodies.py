"""Generators of hostile request bodies, shared by the phase-function and real-Envoy fuzz tests.

Two kinds, as a fuzzer of a JSON API needs both: structure-aware bodies (OpenAI-shaped, with
every field the gateway reads given wrong types, extreme numbers, lone surrogates, deep
nesting, huge strings) and byte-level mutations of valid bodies (flips, cuts, insertions),
which reach the parser's error paths that well-formed JSON never does.

How many cases run is set by the environment so `make test` runs a bounded slice and
`make fuzz` the full count: SIGNALBOX_FUZZ_EXAMPLES (phase functions, hypothesis examples per
test) and SIGNALBOX_FUZZ_ENVOY (requests through a real Envoy).
"""

from __future__ import annotations

import json
import os
import random

from hypothesis import strategies as st

PHASE_EXAMPLES = int(os.environ.get("SIGNALBOX_FUZZ_EXAMPLES", "1500"))
ENVOY_CASES = int(os.environ.get("SIGNALBOX_FUZZ_ENVOY", "1500"))

ALIASES = ["auto", "balanced", "by-task", "budgeted", "embed", "unknown-alias", "", "a" * 300]

_weird_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["\ud800", "\udfff", "a\ud83d", "\x00", "\u202e", "```python\ndef f(): pass```", "?" * 500]),
    st.text(alphabet=st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010), max_size=5),
)
_weird_number = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**400, 1e308, -0.0]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)
_scalar = st.one_of(st.none(), st.booleans(), _weird_number, _weird_text)
_json = st.recursive(
    _scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
_content = st.one_of(
    _weird_text,
    st.none(),
    st.lists(
        st.one_of(
            st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(_weird_text, _json)}),
            st.fixed_dictionaries({"type": st.just("image_url"), "image_url": _json}),
            _json,
        ),
        max_size=3,
    ),
    _json,
)
_message = st.one_of(
    st.fixed_dictionaries(
        {"role": st.one_of(st.sampled_from(["user", "system", "assistant", "tool"]), _scalar), "content": _content}
    ),
    _json,
)
_optional = {
    "messages": st.one_of(st.lists(_message, max_size=4), _json),
    "prompt": st.one_of(_weird_text, st.lists(st.one_of(_weird_text, st.integers()), max_size=3), _json),
    "input": st.one_of(_weird_text, st.lists(_weird_text, max_size=3), _json),
    "max_tokens": st.one_of(_weird_number, _json),
    "max_completion_tokens": st.one_of(_weird_number, _json),
    "stream": st.one_of(st.booleans(), _scalar),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), _json),
    "tools": st.one_of(st.lists(_json, max_size=2), _json),
    "response_format": st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["json_object", "text"])}), _json),
    "temperature": _weird_number,
}


def _nest(depth: int) -> str:
    return "[" * depth + "]" * depth


# OpenAI-shaped bodies: a model (mostly an alias that exists) and any subset of the fields the
# gateway reads, each from the weird values above.
structured_bodies = st.builds(
    lambda model, fields: {"model": model, **fields},
    st.one_of(st.sampled_from(ALIASES), _scalar),
    st.fixed_dictionaries({}, optional=_optional),
)


def encode(body: object) -> bytes:
    """JSON as a client library would send it, lone surrogates kept as escapes."""
    return json.dumps(body, ensure_ascii=True, allow_nan=True).encode()


VALID = [
    {"model": "auto", "messages": [{"role": "user", "content": "hello"}]},
    {"model": "by-task", "messages": [{"role": "user", "content": "Write a Python function"}], "stream": True},
    {"model": "budgeted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20},
    {"model": "embed", "input": ["a", "b"]},
]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four byte-level edits of a valid body."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        at = rng.randrange(len(out) + 1)
        if op == 0 and out:
            out[min(at, len(out) - 1)] = rng.randrange(256)
        elif op == 1:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 2:
            del out[at : at + rng.randint(1, 8)]
        elif op == 3:
            out[at:at] = rng.choice([b'"\\ud800"', b"\\u0000", b"[[[[", b"}", b"1e999", b"-", b'"model":', b"\xff\xfe"])
        elif op == 4:
            out = out[:at]
        else:
            out[at:at] = _nest(rng.randint(100, 5000)).encode()
    return bytes(out)


mutated_bodies = st.builds(
    lambda base, seed: mutate(encode(base), random.Random(seed)),
    st.sampled_from(VALID),
    st.integers(min_value=0, max_value=2**32),
)

raw_bodies = st.one_of(
    structured_bodies.map(encode),
    mutated_bodies,
    st.binary(max_size=64),
    st.integers(min_value=1, max_value=100_000).map(lambda d: ('{"model":"auto","x":' + _nest(d) + "}").encode()),
)
