"""A planted difficulty pattern for per-prompt learning (issue 16), shared by the unit test
(one gateway) and the replica test (feedback on one replica, decisions on another).

In one class, prompts of one kind are too hard for the cheap backend and prompts of another
kind are not: only the prompts themselves tell the kinds apart, so class-level learning cannot.
"""

from __future__ import annotations

import json
import random

from signalbox.core.compiler import compile_config
from signalbox.extproc import decide
from signalbox.extproc.decisions import DecisionSigner
from signalbox.extproc.runtime import RuntimeTable
from signalbox.extproc.strategies import SelectionState
from tests.factories import backend, model, policy, provider

# Two kinds of request, written for these tests: proofs (hard for the cheap backend) and
# greetings (easy for both).
HARD = [
    "Prove that there are infinitely many primes of the form {a}k+{b} using Dirichlet characters.",
    "Give a rigorous epsilon-delta proof that the function x^{a} is uniformly continuous on [0, {b}].",
    "Prove by induction that the sum of the first {a} odd cubes has a closed form, and derive it for n={b}.",
    "Show that every group of order {a}{b} is solvable, citing the Sylow theorems you use.",
]
EASY = [
    "Say hello to my friend {a} and wish them a nice day.",
    "Write a short friendly greeting for my neighbour {a} who turned {b} today.",
    "Greet the new colleague {a} warmly in one sentence.",
    "Send a cheerful good morning message to {a}, who lives in room {b}.",
]
NAMES = ["Ana", "Bo", "Chen", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo"]
# The feedback events after which the router must route both kinds right (stated in the README).
EVENTS = 40


def prompt(rng: random.Random, hard: bool) -> str:
    template = rng.choice(HARD if hard else EASY)
    return template.format(a=rng.choice(NAMES) if not hard else rng.randint(3, 9), b=rng.randint(2, 60))


def table(per_prompt: bool, exploration: float = 0.0) -> RuntimeTable:
    providers = [
        provider("cheap", "http://127.0.0.1:9/v1", [model("m", inputPricePer1M=0.1, outputPricePer1M=0.1)]),
        provider("strong", "http://127.0.0.1:9/v1", [model("m", inputPricePer1M=10, outputPricePer1M=10)]),
    ]
    learner = policy(
        "learner",
        ["auto"],
        [backend("cheap", "m"), backend("strong", "m")],
        strategy="cost",
        # Cheapest backend expected within 0.25 of the best: the policy's quality target.
        cost={"qualityTolerance": 0.25},
        learning={"enabled": True, "explorationRate": exploration, "priorWeight": 2, "perPrompt": per_prompt},
        classification={"useDefaultRules": False},
    )
    result = compile_config(providers, [learner])
    assert result.ok, result.problems
    return RuntimeTable.from_config(result.config)


def route(t: RuntimeTable, state: SelectionState, text: str):
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": text}]}).encode()
    return decide.decide(t, state, "/v1/chat/completions", {}, body)


def teach(state: SelectionState, per_prompt: bool, events: int, seed: int = 1) -> set[str]:
    """Feedback on `events` routed requests (the score the chosen backend earned; a third of
    them explore, as `learning.explorationRate` does live); the classes they fell in."""
    t, signer = table(per_prompt, exploration=0.3), DecisionSigner()
    rng = random.Random(seed)
    classes = set()
    for n in range(events):
        hard = n % 2 == 0
        outcome = route(t, state, prompt(rng, hard))
        chosen = outcome.selection.choice.backend.provider.name
        token = signer.token("learner", outcome.classification.class_key, outcome.selection.choice.backend.id)
        if outcome.vector is not None:
            state.remember(token, outcome.vector)  # as the servicer does
        score = 0.0 if hard and chosen == "cheap" else 1.0
        decide.apply_feedback(t, state, json.dumps({"decision": token, "score": score}).encode(), signer)
        classes.add(outcome.classification.class_key)
    return classes


def accuracy(state: SelectionState, per_prompt: bool, seed: int = 2) -> tuple[float, set[str]]:
    """The share of 200 fresh prompts routed right (hard -> strong, easy -> cheap) without
    exploring, by the same policy (learning is kept by name), and their classes."""
    t, rng = table(per_prompt), random.Random(seed)
    right, classes = 0, set()
    for n in range(200):
        hard = n % 2 == 0
        outcome = route(t, state, prompt(rng, hard))
        classes.add(outcome.classification.class_key)
        right += outcome.selection.choice.backend.provider.name == ("strong" if hard else "cheap")
    return right / 200, classes


def learn_live(per_prompt: bool, events: int, seed: int = 1) -> tuple[float, set[str]]:
    """Teach one gateway's state, then score it."""
    state = SelectionState(rng=random.Random(0))
    taught = teach(state, per_prompt, events, seed)
    right, classes = accuracy(state, per_prompt, seed + 1)
    return right, taught | classes
