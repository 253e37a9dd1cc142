"""The built-in `instructions` prompt source: synthetic assistant-style requests for `distill`.

Medusa heads learn the base model's replies, so the replies must look like the ones it will be
asked to speed up. The only real chat data installable here (chitchat-dataset) is small talk,
and heads trained on small-talk replies are rarely right on writing, coding or maths answers.
This module crosses task templates with subjects, one list per kind of request (writing,
explanation, advice, coding, maths, reasoning, summarising real chitchat messages, role-play),
to make thousands of distinct requests. All templates and subjects were written for this project;
none is an evaluation question.
"""

from __future__ import annotations

import itertools
import random

Chat = list[dict]

TOPICS = [
    "remote work", "urban gardening", "electric cars", "learning a second language", "public libraries",
    "volunteering", "minimalism", "space tourism", "recycling plastics", "social media and teenagers",
    "city bike lanes", "the four-day work week", "home cooking", "video games as art", "renewable energy",
    "online privacy", "local farmers markets", "traveling on a budget", "adopting a rescue dog", "board games",
    "morning routines", "learning to code", "coffee culture", "national parks", "handwritten letters",
    "public transport", "the history of jazz", "school uniforms", "smart homes", "reading fiction",
]
CONCEPTS = [
    "photosynthesis", "inflation", "supply and demand", "black holes", "the immune system", "machine learning",
    "plate tectonics", "the French Revolution", "compound interest", "natural selection", "the water cycle",
    "blockchain", "climate change", "the Renaissance", "vaccines", "gravity", "the stock market",
    "the Industrial Revolution", "DNA", "opportunity cost", "the greenhouse effect", "electric circuits",
    "the Roman Empire", "encryption", "the scientific method", "antibiotic resistance", "the Cold War",
    "neural networks", "ocean tides", "democracy",
]
ACTIVITIES = [
    "public speaking", "saving money", "sleeping better", "cooking healthy meals", "running a first marathon",
    "studying for exams", "managing stress", "starting a small business", "learning the guitar", "job interviews",
    "writing a novel", "keeping houseplants alive", "time management", "making new friends in a new city",
    "negotiating a salary", "staying focused while working from home", "learning to draw", "reducing screen time",
    "planning a wedding", "training a puppy",
]
CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "merges two sorted lists", "counts how often each word appears in a text",
    "finds the second largest number in a list", "removes duplicates from a list while keeping the order",
    "converts Celsius to Fahrenheit", "checks whether a string is a palindrome", "returns the n-th Fibonacci number",
    "flattens a nested list", "computes the greatest common divisor of two numbers", "validates an email address",
    "finds the longest word in a sentence", "sorts a list of dictionaries by a key", "reads a CSV file and sums a column",
    "implements binary search", "transposes a matrix", "counts the vowels in a string", "groups words that are anagrams",
    "returns the running average of a list",
]
LANGUAGES = ["Python", "JavaScript", "C++", "Java", "Rust", "Go"]
PERSONAS = [
    "a tour guide in Rome", "a pirate captain", "a personal trainer", "a medieval blacksmith", "a detective in 1920s London",
    "a friendly librarian", "a chef in a busy restaurant", "an astronaut on the space station", "a wise old wizard",
    "a football coach at half time", "a museum curator", "a customer support agent for a phone company",
]
ROLE_REQUESTS = [
    "Introduce yourself to a newcomer.", "Give me advice for my first day.", "Tell me about a typical day in your life.",
    "Describe the most memorable moment of your career.", "Explain what you need me to do next.",
]
NAMES = ["Alice", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas"]
THINGS = ["apples", "books", "marbles", "stamps", "cookies", "pencils"]

TEMPLATES = {
    "writing": (
        [
            "Write a short blog post about {x}.", "Write a persuasive paragraph arguing for {x}.",
            "Compose a short poem about {x}.", "Draft a friendly email to a colleague about {x}.",
            "Write a catchy product announcement related to {x}.", "Write the opening paragraph of a story about {x}.",
            "Write a short speech for a town meeting about {x}.", "Give me five creative titles for an article about {x}.",
        ],
        TOPICS,
    ),
    "explanation": (
        [
            "Explain {x} to a high school student.", "What is {x} and why does it matter?",
            "Describe {x} in simple terms, with an example.", "What are the most common misconceptions about {x}?",
            "Summarize the key ideas behind {x} in a few paragraphs.", "How would you teach {x} to a ten-year-old?",
        ],
        CONCEPTS,
    ),
    "advice": (
        [
            "Give me five tips for {x}.", "How can I get better at {x}?", "What are the pros and cons of {x}?",
            "Make a one-week plan for {x}.", "What mistakes do beginners make with {x}?",
        ],
        ACTIVITIES,
    ),
    "coding": (
        ["Write a {lang} function that {x}.", "Write a {lang} function that {x}, and explain how it works."],
        CODE_TASKS,
    ),
    "roleplay": (["Pretend you are {x}. {request}"], PERSONAS),
}


def _math_requests(rng: random.Random, count: int) -> list[str]:
    makers = [
        lambda: f"Solve for x: {rng.randint(2, 9)}x + {rng.randint(1, 30)} = {rng.randint(31, 99)}. Show your steps.",
        lambda: f"What is {rng.choice([5, 10, 12, 15, 20, 25, 30, 40])}% of {rng.randint(40, 900)}? Explain how you got it.",
        lambda: f"A train travels {rng.randint(60, 600)} km in {rng.randint(2, 8)} hours. What is its average speed?",
        lambda: f"Find the area and circumference of a circle with a radius of {rng.randint(2, 15)} cm.",
        lambda: f"A jacket costs ${rng.randint(30, 200)} and is discounted by {rng.choice([10, 15, 20, 25, 30])}%. What is the final price?",
        lambda: f"What is the sum of all whole numbers from 1 to {rng.randint(10, 200)}?",
        lambda: f"If I invest ${rng.randint(1, 20) * 500} at {rng.randint(2, 8)}% simple interest for {rng.randint(2, 10)} years, how much interest do I earn?",
        lambda: f"A rectangle is {rng.randint(3, 20)} m long and {rng.randint(2, 12)} m wide. What are its area and perimeter?",
    ]
    return [rng.choice(makers)() for _ in range(count)]


def _reasoning_requests(rng: random.Random, count: int) -> list[str]:
    def sharing():
        a, b = rng.sample(NAMES, 2)
        n, k = rng.randint(10, 40), rng.randint(2, 9)
        return f"{a} has {n} {rng.choice(THINGS)} and gives {k} to {b}. Then {b} gives half of theirs back. {b} started with {rng.randint(2, 12)}. How many does each have now? Think step by step."

    def ordering():
        a, b, c = rng.sample(NAMES, 3)
        return f"{a} is taller than {b}, and {b} is taller than {c}. Who is the shortest, and how do you know?"

    def ages():
        a, b = rng.sample(NAMES, 2)
        return f"{a} is {rng.randint(2, 4)} times as old as {b}. In {rng.randint(3, 10)} years {a} will be {rng.randint(30, 60)}. How old is {b} now? Explain your reasoning."

    def week():
        return f"If today is {rng.choice(['Monday', 'Tuesday', 'Wednesday', 'Thursday', 'Friday'])}, what day of the week will it be in {rng.randint(10, 100)} days?"

    return [rng.choice([sharing, ordering, ages, week])() for _ in range(count)]


def _summary_requests(messages: list[str], rng: random.Random, count: int) -> list[str]:
    asks = [
        "Summarize this message in one sentence: \"{m}\"",
        "What is the tone of this message, and why? \"{m}\"",
        "Rewrite this message to sound more formal: \"{m}\"",
        "Suggest a thoughtful reply to this message: \"{m}\"",
    ]
    messages = [m for m in messages if len(m) >= 60]
    return [rng.choice(asks).format(m=rng.choice(messages)) for _ in range(count)] if messages else []


def instruction_prompts(seed: int, chat_messages: list[str] = ()) -> list[Chat]:
    """Distinct single-turn requests, shuffled, kinds interleaved so any prefix mixes all kinds.

    chat_messages: real messages to summarise and rewrite (the chitchat openers); optional.
    """
    rng = random.Random(seed)
    by_kind: dict[str, list[str]] = {}
    for kind, (templates, subjects) in TEMPLATES.items():
        requests = []
        for template, subject in itertools.product(templates, subjects):
            if "{lang}" in template:
                requests += [template.format(x=subject, lang=language) for language in LANGUAGES]
            elif "{request}" in template:
                requests += [template.format(x=subject, request=request) for request in ROLE_REQUESTS]
            else:
                requests.append(template.format(x=subject))
        by_kind[kind] = requests
    by_kind["math"] = _math_requests(rng, 300)
    by_kind["reasoning"] = _reasoning_requests(rng, 300)
    by_kind["summary"] = _summary_requests(list(chat_messages), rng, 300)
    for requests in by_kind.values():
        rng.shuffle(requests)
    seen, prompts = set(), []
    for group in itertools.zip_longest(*by_kind.values()):
        for request in group:
            if request is not None and request not in seen:
                seen.add(request)
                prompts.append([{"role": "user", "content": request}])
    return prompts
