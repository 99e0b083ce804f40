from signalbox.api.v1alpha1 import config_pb2 as pb
from signalbox.extproc.classify import DEFAULT_RULES, classify, compile_rules, features


def chat(text, **body):
    return {
        "model": "auto",
        "messages": [{"role": "system", "content": "be helpful"}, {"role": "user", "content": text}],
        **body,
    }


def test_features_read_tools_images_json_and_tokens():
    body = chat(
        "describe", tools=[{"type": "function"}], response_format={"type": "json_object"}, max_tokens=50, stream=True
    )
    body["messages"].append(
        {
            "role": "user",
            "content": [{"type": "text", "text": "x" * 400}, {"type": "image_url", "image_url": {"url": "data:"}}],
        }
    )
    f = features(body)
    assert (f.has_tools, f.has_images, f.json_mode, f.stream) == (True, True, True, True)
    assert f.max_output_tokens == 50
    assert f.estimated_tokens > 100 and f.text == "x" * 400


def test_default_rules_tell_code_from_chit_chat():
    code = classify(features(chat("Fix this python function: def add(a, b): return a - b")), DEFAULT_RULES)
    talk = classify(features(chat("Good morning! How was your weekend?")), DEFAULT_RULES)
    unknown = classify(features(chat("purple elephants")), DEFAULT_RULES)
    assert code.task_type == "code" and code.tier == "default" and code.confidence >= 0.6
    assert (talk.task_type, talk.complexity, talk.reason) == ("chat", "simple", "small-talk")
    assert (unknown.task_type, unknown.reason) == ("chat", "no-rule") and unknown.confidence < 0.5


def test_default_complexity_grows_with_length_and_hard_words():
    proof = classify(features(chat("Prove that there are infinitely many primes.")), DEFAULT_RULES)
    long = classify(features(chat("word " * 2000)), DEFAULT_RULES)
    assert proof.complexity == "expert"
    assert long.complexity == "complex"


def test_policy_rules_come_before_defaults_and_respect_conditions():
    rules = compile_rules(
        [
            pb.Rule(
                name="legal",
                keywords=["contract", "clause"],
                task_type="extraction",
                complexity="complex",
                min_tokens=-1,
                max_tokens=-1,
            ),
            pb.Rule(name="tool-use", has_tools=1, complexity="moderate", min_tokens=-1, max_tokens=-1),
        ],
        use_defaults=True,
    )
    legal = classify(features(chat("Summarize this contract clause")), rules)
    assert (legal.task_type, legal.complexity, legal.tier, legal.reason) == ("extraction", "complex", "rules", "legal")
    tools = classify(features(chat("hello", tools=[{"type": "function"}])), rules)
    assert tools.complexity == "moderate" and tools.tier in ("rules", "default")
    no_tools = classify(features(chat("hello")), rules)
    assert no_tools.complexity == "simple"


def test_without_defaults_unmatched_requests_get_low_confidence_chat():
    rules = compile_rules([], use_defaults=False)
    result = classify(features(chat("write a python script")), rules)
    assert (result.task_type, result.tier, result.reason) == ("chat", "default", "no-rule")
