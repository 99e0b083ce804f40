import json

from signalbox.extproc.accounting import Usage, UsageReader, cost_usd


def sse(*events):
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def test_usage_from_a_json_body_in_pieces():
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 30}}).encode()
    reader = UsageReader(streaming=False)
    for i in range(0, len(body), 7):
        reader.feed(body[i : i + 7])
    assert reader.finish() == Usage(12, 30)


def test_usage_from_the_last_sse_chunk_even_split_across_body_chunks():
    stream = sse(
        {"choices": [{"delta": {"content": "hi"}}]},
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}},
    )
    reader = UsageReader(streaming=True)
    for i in range(0, len(stream), 5):  # lines are cut anywhere
        reader.feed(stream[i : i + 5])
    assert reader.finish() == Usage(9, 4)


def test_no_usage_or_garbage_counts_nothing():
    for streaming, data in (
        (False, b"not json"),
        (False, b'{"usage": {"prompt_tokens": "x"}}'),
        (True, sse({"choices": []})),
    ):
        reader = UsageReader(streaming=streaming)
        reader.feed(data)
        assert reader.finish() is None


def test_cost_from_prices_per_million_tokens():
    assert cost_usd(Usage(1_000_000, 500_000), 2.0, 8.0) == 6.0
    assert cost_usd(Usage(10, 7), 0.1, 0.4) == (10 * 0.1 + 7 * 0.4) / 1e6
