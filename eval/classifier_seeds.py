"""Everyday requests written for Signalbox, by task type, to train the task-type classifier.

The labelled data in ../shared/data covers qa, reasoning, code, math and creative writing well
(benchmarks and just_eval's GPT-4 labels) but has no summarization, extraction or translation
and little small talk. These templates and fillers were written here for those gaps (and a few
everyday forms of the others); they generate a fixed, reproducible set (`seeds()`).
"""

from __future__ import annotations

import itertools
import random

DOCS = ["article", "email thread", "meeting notes", "report", "paper", "chapter", "transcript", "contract"]
TOPICS = [
    "the quarterly budget",
    "climate policy",
    "a new phone launch",
    "our hiring plan",
    "the city council vote",
    "a football match",
    "remote work",
    "a product recall",
    "the history of tea",
    "solar panels",
]
LANGUAGES = ["French", "German", "Spanish", "Japanese", "Italian", "Portuguese", "Dutch", "Korean", "Polish"]
PHRASES = [
    "where is the train station",
    "I would like a table for two",
    "the meeting is moved to Friday",
    "thank you for your patience",
    "please sign the attached form",
    "happy birthday, my friend",
    "the package arrives tomorrow",
    "how much does this cost",
]
THINGS = [
    "names",
    "dates",
    "email addresses",
    "prices",
    "phone numbers",
    "company names",
    "addresses",
    "product codes",
    "amounts",
    "deadlines",
]
SOURCES = [
    "this invoice",
    "the text below",
    "these receipts",
    "this CV",
    "the log lines below",
    "this web page",
    "the following paragraph",
    "this order confirmation",
]
LANGS = ["python", "javascript", "rust", "go", "java", "sql", "bash", "typescript", "c++"]
TASKS = [
    "reverse a linked list",
    "parse a CSV file",
    "debounce a function",
    "read a JSON config",
    "retry an HTTP request",
    "merge two sorted lists",
    "validate an email address",
    "paginate a query",
]
SUBJECTS = [
    "autumn",
    "a lighthouse keeper",
    "first love",
    "a lost cat",
    "the sea",
    "a rainy Monday",
    "a robot learning to paint",
    "my grandmother's kitchen",
]
FORMS = ["poem", "short story", "limerick", "song", "haiku", "fable", "toast", "product description"]

TEMPLATES: dict[str, list[str]] = {
    "summarization": [
        "Summarize this {doc} about {topic} in {n} bullet points.",
        "Can you give me a short summary of the {doc} below? It is about {topic}.",
        "TL;DR of the following {doc} on {topic}, please.",
        "Condense this {doc} into {n} sentences for my manager: {topic}.",
        "What are the key takeaways from this {doc} about {topic}?",
        "Write an executive summary of the attached {doc} on {topic}.",
        "Boil this {doc} down to one paragraph: it covers {topic}.",
    ],
    "extraction": [
        "Which {thing} appear in this message? {snippet}",
        "What are the {thing} in: {snippet}",
        "Can you find the {thing} here and list them? {snippet}",
        "Extract all the {thing} from {source}.",
        "List every {thing} mentioned in {source} as JSON.",
        "Pull the {thing} and the {thing2} out of {source} into a table.",
        "Find the {thing} in {source} and return them one per line.",
        "Parse {source} and give me the {thing} as a CSV.",
        "From {source}, get the {thing}; ignore everything else.",
    ],
    "translation": [
        "Translate '{phrase}' into {lang}.",
        "How do you say '{phrase}' in {lang}?",
        "Please translate this sentence to {lang}: {phrase}.",
        "Translate the following email from English to {lang}: {phrase}.",
        "What is '{phrase}' in {lang}, formally and informally?",
        "Render this in {lang} for a sign at the hotel: {phrase}.",
        # Asked as questions: over few words the largest class (qa) took these.
        "What does '{foreign}' mean in English?",
        "What's the {lang} word for '{word}'?",
        "How would I write '{phrase}' in {lang}?",
        "Any idea what '{foreign}' means?",
    ],
    "chat": [
        "Hi there! How is your day going?",
        "Good morning! Any plans for the weekend?",
        "Thanks a lot, that really helped me out.",
        "I'm bored, talk to me about anything.",
        "Can you be my study buddy for tonight?",
        "Pretend you are a friendly barista and take my order.",
        "You're a pirate captain now; greet your new crew member {name}.",
        "I had a rough day at work and just want to chat.",
        "Tell me something nice, I'm feeling down.",
        "Let's role-play: you are my personal trainer, I'm {name}.",
        "Hey, what's up?",
        "Nice to meet you, I'm {name}!",
        "Pretend you are {role}. Stay in character and answer my questions.",
        "Act as {role} and greet me.",
        "If you were {role}, what would your day look like? Answer in character.",
        "Imagine you are {role}. Tell me about yourself.",
        "Let's role-play: you are {role} and I am {name}.",
        "You are {role}. I'll ask you questions; reply as they would.",
    ],
    "code": [
        "Write a {lang} function to {task}.",
        "How do I {task} in {lang}?",
        "My {lang} code to {task} throws an error, can you fix it?",
        "Refactor this {lang} snippet that tries to {task}.",
        "Write unit tests in {lang} for a function that should {task}.",
        "Explain what this {lang} code does; it is supposed to {task}.",
        "Why does my {lang} {artifact} {symptom}?",
        "What's the difference between {concepts} in {lang}?",
        "How can I {webtask}?",
    ],
    "creative": [
        "Write a {form} about {subject}.",
        "Compose a {form} about {subject} for my friend {name}.",
        "Can you write a funny {form} about {subject}?",
        "I need a {form} about {subject} for a school assignment.",
        "Write a heartfelt {form} inspired by {subject}.",
        # Writing that is not fiction is creative work too (just_eval's "writing").
        "Write a {wform} about {topic}.",
        "Draft a {wform} on {topic}. Make it engaging and keep it under {n}00 words.",
        "Help me write a {wform} about {topic}. What points should it make?",
        "Can you write a {wform} arguing for {topic}? Include an introduction and a conclusion.",
        "I have to write a {wform} on {topic}; please write a first draft.",
        "Write a {wform} for {name}, who cares about {topic}.",
    ],
    # Puzzles, deductions, estimates and what-ifs: asked like questions, so qa (the largest
    # class, and just_eval's few reasoning prompts) took them.
    "reasoning": [
        "{name} is taller than {name2}, and {name2} is taller than {name3}. Who is the shortest? Explain.",
        "If every {group} in our office owns a {pet}, and {name} owns no {pet}, what can we conclude about {name}?",
        "You have {coins} coins and one is heavier. With a balance scale, how few weighings find it? Explain.",
        "If the day after tomorrow is {day}, what day was the day before yesterday? Show how you got it.",
        "What would have happened if {counterfactual}? Think through the consequences step by step.",
        "Estimate how many {countable}. Walk me through your reasoning.",
        "{name} finished before {name2} but after {name3}. Who came first, and how do you know?",
        "Three boxes are labelled wrongly: apples, oranges, and mixed. You may take one fruit from one box."
        " How do you fix the labels?",
        "Is this argument valid: all {group}s are busy, {name} is busy, so {name} is a {group}? Why or why not?",
        "Which statement must be false if {name} always lies and {name2} always tells the truth,"
        " and {name} says {name2} lied?",
        "A clock shows {hour}:15. What is the angle between the hands? Reason it out.",
        "Find the flaw in this reasoning: {flaw}",
        "What is the next item in the pattern {pattern}, and what is the rule?",
        "Two trains leave at the same time towards each other; which one is closer to the first city"
        " when they meet? Explain.",
        "Five people stand in a line: {name} is behind {name2}, {name3} is first, and nobody is behind {name4}."
        " Give the order.",
        "Roughly how much {quantity}? Give an order-of-magnitude estimate and the assumptions behind it.",
        "Which conclusion follows: some {group}s are {name}'s friends, and all of {name}'s friends cycle?",
        "Sales fell after we lowered prices. List the possible explanations and how to tell them apart.",
        "We must seat {n} guests so that no two {group}s sit together. Is that possible at a round table? Why?",
        "Given that {premise}, what can you infer, and what can't you?",
    ],
}
# Short conversational turns: with few words the model leans on its biases (qa, the largest
# class, took "hi", "lol" and "bye"), so the greetings, thanks and goodbyes are spelled out.
SHORT_TURNS = [
    "hi",
    "hi!",
    "hey",
    "hey there",
    "hello",
    "hello!",
    "hiya",
    "yo",
    "good morning",
    "good evening",
    "good night",
    "morning!",
    "thanks",
    "thanks!",
    "thank you",
    "thx",
    "cheers",
    "much appreciated",
    "cool, thanks",
    "great, thank you!",
    "ok",
    "okay",
    "ok cool",
    "got it",
    "sounds good",
    "nice",
    "awesome",
    "perfect",
    "lol",
    "haha",
    "haha that's funny",
    "bye",
    "bye!",
    "see you later",
    "talk to you tomorrow",
    "have a nice day",
    "goodnight, sleep well",
    "sorry",
    "no worries",
    "you're welcome",
    "I'm back",
    "are you there?",
    "how's your day?",
    "how have you been?",
    "what are you up to?",
    "I'm tired",
    "I'm so happy today!",
    "that made my day",
    "you're funny",
    "tell me about yourself",
    "who are you?",
    "what's your name?",
    "do you have feelings?",
    "can we just talk for a bit?",
    "I miss my dog",
    "ugh, Mondays",
    "wish me luck!",
    "guess what happened today",
]
FOREIGN = [
    "merci beaucoup",
    "wie geht's",
    "hasta luego",
    "arigatou gozaimasu",
    "buon appetito",
    "saudade",
    "dank je wel",
    "na zdrowie",
]
WORDS = ["umbrella", "library", "butterfly", "Tuesday", "grandmother", "receipt", "lighthouse", "spoon"]
ARTIFACTS = ["script", "loop", "unit test", "query", "recursive function", "web server"]
SYMPTOMS = ["hang forever", "return None", "run so slowly", "print everything twice", "crash on empty input"]
CONCEPTS = ["a list and a tuple", "let and const", "an interface and a class", "a process and a thread"]
WEB_TASKS = [
    "make a button rounded with CSS",
    "read a query parameter in Express",
    "fetch JSON in a React component",
    "run a Flask app in Docker",
    "undo my last git commit",
]
ITEMS = ["notebook", "coffee", "train ticket", "pizza", "t-shirt"]
SNIPPETS = [
    "Invoice 2231 from Baker Ltd, due 14 June, total 310 EUR.",
    "Dr. Patel will see Mr. Gomez on Tuesday at 10am in Leeds.",
    "Call Maria on +44 20 7946 0018 or write to maria@example.org before Friday.",
    "The shipment of 40 chairs left Rotterdam on 2 March and reaches Oslo on 9 March.",
    "Ticket #5521: user anna.k reported the outage at 14:02 UTC from the Madrid office.",
]
WRITING_FORMS = [
    "persuasive essay",
    "cover letter",
    "blog post",
    "product review",
    "personal statement",
    "speech",
    "press release",
    "newsletter",
    "LinkedIn post",
    "thank-you note",
    "wedding toast",
    "eulogy",
    "short bio",
    "opinion piece",
    "lesson plan",
    "business plan",
    "complaint letter",
    "tweet thread",
    "marketing email",
    "movie review",
]
ROLES = [
    "a detective",
    "a pirate captain",
    "Sherlock Holmes",
    "a medieval knight",
    "a tour guide in Rome",
    "a grumpy wizard",
    "my therapist",
    "a job interviewer",
    "an astronaut on Mars",
    "a customer at a bakery",
    "a famous chef",
    "a time traveller from 1850",
]
GROUPS = ["manager", "engineer", "teacher", "student", "nurse", "musician"]
PETS = ["cat", "dog", "bicycle", "umbrella", "car"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
COUNTERFACTUALS = [
    "the printing press had never been invented",
    "humans could photosynthesise",
    "the Roman Empire had never fallen",
    "electricity had been discovered a thousand years earlier",
    "the dinosaurs had survived",
    "nobody had ever invented money",
]
COUNTABLES = [
    "piano tuners work in a city of a million people",
    "words a person speaks in a lifetime",
    "golf balls fit in a school bus",
    "grains of rice are eaten in a country each day",
    "times a heart beats in a year",
    "trees grow in a large park",
]
FLAWS = [
    "I wore my lucky socks and we won, so the socks made us win.",
    "Everyone I know likes jazz, so most people like jazz.",
    "If it rains the street is wet; the street is wet, so it rained.",
    "This diet worked for my uncle, so it works for everybody.",
]
QUANTITIES = [
    "paper does an office of 200 people use in a year",
    "electricity does a small town use in a winter day",
    "coffee is drunk in a big city every morning",
    "data does a video call of an hour send",
]
PREMISES = [
    "every light in the house is off and the fridge is humming",
    "the dog did not bark during the night",
    "the shop's sales doubled but its profit stayed the same",
    "all the tickets sold out and the hall is half empty",
]
PATTERNS = ["2, 6, 12, 20, 30", "J, F, M, A, M", "1, 1, 2, 3, 5, 8", "O, T, T, F, F, S, S"]
NAMES = ["Ana", "Ben", "Chloe", "Dev", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Julia"]


def seeds(per_class: int = 120, seed: int = 7) -> list[tuple[str, str]]:
    """(text, task type) pairs, `per_class` of each class above (fewer if the templates give fewer)."""
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    for label, templates in TEMPLATES.items():
        texts: set[str] = set()
        for template in itertools.islice(itertools.cycle(templates), per_class * 8):
            texts.add(
                template.format(
                    doc=rng.choice(DOCS),
                    topic=rng.choice(TOPICS),
                    n=rng.randint(2, 6),
                    thing=rng.choice(THINGS),
                    thing2=rng.choice(THINGS),
                    source=rng.choice(SOURCES),
                    phrase=rng.choice(PHRASES),
                    lang=rng.choice(LANGUAGES if label == "translation" else LANGS),
                    task=rng.choice(TASKS),
                    form=rng.choice(FORMS),
                    subject=rng.choice(SUBJECTS),
                    name=rng.choice(NAMES),
                    wform=rng.choice(WRITING_FORMS),
                    foreign=rng.choice(FOREIGN),
                    word=rng.choice(WORDS),
                    artifact=rng.choice(ARTIFACTS),
                    symptom=rng.choice(SYMPTOMS),
                    concepts=rng.choice(CONCEPTS),
                    webtask=rng.choice(WEB_TASKS),
                    a=rng.randint(3, 95),
                    b=rng.randint(100, 2400),
                    sq=rng.choice([16, 49, 81, 144, 225, 400, 625]),
                    item=rng.choice(ITEMS),
                    snippet=rng.choice(SNIPPETS),
                    role=rng.choice(ROLES),
                    name2=rng.choice(NAMES),
                    name3=rng.choice(NAMES),
                    name4=rng.choice(NAMES),
                    quantity=rng.choice(QUANTITIES),
                    premise=rng.choice(PREMISES),
                    group=rng.choice(GROUPS),
                    pet=rng.choice(PETS),
                    coins=rng.choice([8, 9, 12, 27]),
                    day=rng.choice(DAYS),
                    counterfactual=rng.choice(COUNTERFACTUALS),
                    countable=rng.choice(COUNTABLES),
                    hour=rng.randint(1, 12),
                    flaw=rng.choice(FLAWS),
                    pattern=rng.choice(PATTERNS),
                )
            )
            if len(texts) >= per_class:
                break
        out += [(t, label) for t in sorted(texts)]
    return out + [(t, "chat") for t in SHORT_TURNS]
