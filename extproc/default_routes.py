"""The built-in semantic tier: task types for requests no rule recognised.

Since issue 16 it is the trained task-type model (`task_model`, `make train-classifier`); the
utterances below, written for Signalbox (not taken from any evaluation set), are part of its
training data. A policy's own semantic routes replace it; `classification.useDefaultRules:
false` turns it off with the default rules.
"""

from __future__ import annotations

import functools

from . import task_model
from .semantic import RouteHit, shared_embedder

# The trained model decides every request a policy's own rules (confidence 0.9) did not: the
# built-in keyword rules (0.7) are below this, and stand only where the model is unsure. With
# the rules first (0.5 here), they decided 601 of just_eval's 800 prompts, 61 % of them right
# where the model was right on 75 %; a policy's default classification scored macro-F1 0.48
# against the model's 0.62 (eval/README.md).
MIN_RULES_CONFIDENCE = 0.8
# Below this probability of its best class the model's answer is not used (the rules' stands).
# In the folds the rules were right less often than the model even there: 0.3 gave macro-F1
# 0.604, 0.2 gave 0.617 (as 0.0 did); nine classes put an unsure answer near 0.11.
MIN_PROBABILITY = 0.2

UTTERANCES: dict[str, list[str]] = {
    "qa": [
        "what is the tallest mountain in africa",
        "who invented the telephone",
        "when did the roman empire fall",
        "where is the headquarters of the united nations",
        "what are the side effects of ibuprofen",
        "how does a vaccine train the immune system",
        "tell me about the history of the printing press",
        "which countries use the euro",
        "how do I renew my passport",
        "what are the steps to change a car tyre",
    ],
    "reasoning": [
        "if all cats are animals and some animals are black, are some cats black",
        "explain why the sky appears blue",
        "compare the advantages of renting versus buying a home",
        "what would happen if the moon disappeared",
        "analyse the causes of the first world war",
        "is it ethical to use animals in medical research",
        "weigh the pros and cons of remote work",
        "solve this riddle about three doors and a prize",
    ],
    "creative": [
        "write a short poem about autumn leaves",
        "tell me a bedtime story about a dragon",
        "write song lyrics about missing home",
        "draft a wedding speech for my best friend",
        "compose a haiku about the ocean",
        "write a cover letter for a marketing job",
        "write a blog post about minimalist living",
        "create a slogan for a coffee shop",
    ],
    "chat": [
        "hi, how are you today",
        "thanks, that was really helpful",
        "can you pretend to be a pirate",
        "let's play a word game",
        "i feel a bit lonely tonight",
        "what do you like to do for fun",
        "act as my personal fitness coach",
        "you are a medieval knight, greet me",
    ],
    "code": [
        "write a function that checks if a number is prime",
        "fix this null pointer exception",
        "how do I read a csv file with pandas",
        "convert this loop into a list comprehension",
        "write a sql query that joins two tables",
        "explain what this regular expression matches",
        "set up a rest api with flask",
        "why does my javascript promise never resolve",
    ],
    "math": [
        "what is the derivative of x squared times sine x",
        "solve for x: 3x + 7 = 22",
        "what is 15 percent of 240",
        "compute the area of a circle with radius 4",
        "how many ways can five people sit in a row",
        "integrate e to the power of 2x",
        "a train travels 300 km in 4 hours, what is its speed",
        "find the probability of rolling two sixes",
    ],
    "summarization": [
        "summarize this article in three bullet points",
        "give me the key points of this meeting transcript",
        "condense this report into one paragraph",
        "what is the main argument of this essay",
        "tl;dr of the following text",
        "write an abstract for this paper",
    ],
    "extraction": [
        "extract all email addresses from this text",
        "list the names and dates mentioned below",
        "pull the prices out of this invoice into json",
        "find every company mentioned in the article",
        "turn this paragraph into a table of ingredients and quantities",
        "identify the entities in this sentence",
    ],
    "translation": [
        "translate this sentence into french",
        "how do you say good morning in japanese",
        "translate the following paragraph to german",
        "what does this spanish phrase mean in english",
        "render this text in italian",
        "translate my email into portuguese",
    ],
}


class TaskTypeRouter:
    """The trained model behind the semantic tier's interface (`classify(text) -> RouteHit`).
    Its answers are named `task-<type>` (the reason shown); learning is kept by
    "<type>/<complexity>", the class a rule's answer has, so what a policy learned before the
    model decided stays its own."""

    def __init__(self, model: task_model.TaskModel):
        self.model = model

    def classify(self, text: str) -> RouteHit | None:
        if not text.strip():
            return None
        label, probability = self.model.predict(task_model.vectors(text, shared_embedder()), text)
        if probability < MIN_PROBABILITY:
            return None
        return RouteHit(f"task-{label}", label, "", round(probability, 4), is_class=False)


@functools.cache
def router() -> TaskTypeRouter:
    """Built once per process: the model never changes with the config."""
    return TaskTypeRouter(task_model.load())
