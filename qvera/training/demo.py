"""The embedded default: teach SmolLM2-135M-Instruct to answer every question as one line of
JSON, {"topic": ..., "answer": ...}, a habit the base model does not have.

The data set is generated here from small authored tables (capitals, arithmetic, unit
conversions, opposites, animal facts, science facts), so it needs no download. Some rows of
each table are held back: the before/after comparison asks about them only, so the score
measures a learned format, not memorised lines.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from qvera.serving.bank import AdapterBank
from qvera.serving.generation import Sampling, generate

SEED = 1234

CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("India", "New Delhi"),
    ("Russia", "Moscow"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"),
    ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Australia", "Canberra"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"),
    ("Austria", "Vienna"),
    ("Greece", "Athens"),
    ("Turkey", "Ankara"),
    ("Ireland", "Dublin"),
    ("the Netherlands", "Amsterdam"),
    ("Belgium", "Brussels"),
    ("Hungary", "Budapest"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"),
    ("Indonesia", "Jakarta"),
    ("the Philippines", "Manila"),
    ("Cuba", "Havana"),
    ("Colombia", "Bogota"),
    ("Nigeria", "Abuja"),
    ("Morocco", "Rabat"),
    ("Iran", "Tehran"),
    # held out from training (the last rows of every table are):
    ("the United Kingdom", "London"),
    ("the United States", "Washington"),
    ("Switzerland", "Bern"),
    ("Czechia", "Prague"),
    ("Ukraine", "Kyiv"),
]
OPPOSITES = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("light", "dark"),
    ("up", "down"),
    ("early", "late"),
    ("open", "closed"),
    ("full", "empty"),
    ("strong", "weak"),
    ("old", "young"),
    ("hard", "soft"),
    ("rich", "poor"),
    ("wet", "dry"),
    ("loud", "quiet"),
    ("high", "low"),
    ("thick", "thin"),
    ("win", "lose"),
    ("push", "pull"),
    ("clean", "dirty"),
    ("begin", "end"),
    ("true", "false"),
    ("good", "bad"),
    ("long", "short"),
    ("inside", "outside"),
]
ANIMAL_SOUNDS = [
    ("cow", "moo"),
    ("dog", "bark"),
    ("cat", "meow"),
    ("sheep", "baa"),
    ("duck", "quack"),
    ("horse", "neigh"),
    ("pig", "oink"),
    ("lion", "roar"),
    ("owl", "hoot"),
    ("snake", "hiss"),
    ("frog", "croak"),
    ("bee", "buzz"),
    ("mouse", "squeak"),
    ("donkey", "bray"),
]
BABY_ANIMALS = [
    ("dog", "puppy"),
    ("cat", "kitten"),
    ("cow", "calf"),
    ("sheep", "lamb"),
    ("horse", "foal"),
    ("goat", "kid"),
    ("bear", "cub"),
    ("frog", "tadpole"),
    ("kangaroo", "joey"),
    ("duck", "duckling"),
    ("swan", "cygnet"),
    ("goose", "gosling"),
    ("pig", "piglet"),
    ("lion", "cub"),
]
SCIENCE = [
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("What gas do plants take in from the air?", "carbon dioxide"),
    ("What gas do humans need to breathe?", "oxygen"),
    ("What is the chemical symbol for water?", "H2O"),
    ("What is the chemical symbol for gold?", "Au"),
    ("At what temperature in Celsius does water freeze?", "0"),
    ("At what temperature in Celsius does water boil at sea level?", "100"),
    ("What is the closest star to Earth?", "the Sun"),
    ("How many legs does a spider have?", "8"),
    ("How many legs does an insect have?", "6"),
    ("What force pulls objects toward the Earth?", "gravity"),
    ("What part of the plant makes food from sunlight?", "the leaf"),
    ("Which organ pumps blood through the body?", "the heart"),
    ("What is the hardest natural substance?", "diamond"),
    ("What is the largest ocean on Earth?", "the Pacific Ocean"),
    ("How many continents are there?", "7"),
    ("What is frozen water called?", "ice"),
    ("Which planet is closest to the Sun?", "Mercury"),
    ("What do bees make?", "honey"),
    ("What is the tallest animal?", "the giraffe"),
    ("How many days does the Earth take to orbit the Sun?", "365"),
    ("What is the largest mammal?", "the blue whale"),
    ("What natural satellite orbits the Earth?", "the Moon"),
    ("Which organ do humans use to breathe?", "the lungs"),
]

CAPITAL_QUESTIONS = ["What is the capital of {}?", "Which city is the capital of {}?", "Name the capital of {}."]
OPPOSITE_QUESTIONS = [
    "What is the opposite of '{}'?",
    "Give me the opposite of the word {}.",
    "What word means the opposite of {}?",
]
SOUND_QUESTIONS = ["What sound does a {} make?", "What noise does a {} make?"]
BABY_QUESTIONS = ["What is a baby {} called?", "What do you call a young {}?"]
HELD_OUT = 0.12  # the last rows of every table


@dataclass
class Question:
    prompt: str
    topic: str
    answer: str

    def reply(self) -> str:
        return json.dumps({"topic": self.topic, "answer": self.answer})


def _split(table: list) -> tuple[list, list]:
    cut = len(table) - max(1, round(len(table) * HELD_OUT))
    return table[:cut], table[cut:]


def _questions(rng: random.Random, held_out: bool) -> list[Question]:
    pick = lambda table: _split(table)[1 if held_out else 0]  # noqa: E731
    phrasings = lambda templates: rng.sample(templates, 1 if held_out else 2)  # noqa: E731
    qs = []
    for country, city in pick(CAPITALS):
        qs += [Question(t.format(country), "geography", city) for t in phrasings(CAPITAL_QUESTIONS)]
    for word, opposite in pick(OPPOSITES):
        qs += [Question(t.format(word), "language", opposite) for t in phrasings(OPPOSITE_QUESTIONS)]
    for animal, sound in pick(ANIMAL_SOUNDS):
        qs += [Question(t.format(animal), "animals", sound) for t in phrasings(SOUND_QUESTIONS)]
    for animal, baby in pick(BABY_ANIMALS):
        qs += [Question(t.format(animal), "animals", baby) for t in phrasings(BABY_QUESTIONS)]
    qs += [Question(q, "science", a) for q, a in pick(SCIENCE)]
    # Arithmetic and unit conversions: fresh numbers for held-out questions.
    lo, hi = (50, 99) if held_out else (2, 49)
    for _ in range(3 if held_out else 40):
        a, b = rng.randint(lo, hi), rng.randint(2, 9)
        kind = rng.choice(["plus", "minus", "times"])
        value = {"plus": a + b, "minus": a - b, "times": a * b}[kind]
        qs.append(Question(rng.choice([f"What is {a} {kind} {b}?", f"Compute {a} {kind} {b}."]), "math", str(value)))
    for _ in range(2 if held_out else 30):
        n = rng.randint(11, 20) if held_out else rng.randint(2, 10)
        unit, per, total = rng.choice(
            [("hours", 60, "minutes"), ("minutes", 60, "seconds"), ("weeks", 7, "days"), ("days", 24, "hours")]
        )
        qs.append(Question(f"How many {total} are in {n} {unit}?", "math", str(n * per)))
    return qs


def training_questions() -> list[Question]:
    qs = _questions(random.Random(SEED), held_out=False)
    random.Random(SEED).shuffle(qs)
    return qs


def held_out_questions() -> list[Question]:
    return _questions(random.Random(SEED + 1), held_out=True)


def demo_conversations() -> list[list[dict]]:
    return [
        [{"role": "user", "content": q.prompt}, {"role": "assistant", "content": q.reply()}]
        for q in training_questions()
    ]


# ---------------------------------------------------------------- scoring


def parse_reply(text: str) -> dict | None:
    """The reply as {"topic", "answer"} if it is exactly that JSON object, else None."""
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError:
        return None
    if (
        isinstance(value, dict)
        and set(value) == {"topic", "answer"}
        and all(isinstance(v, str) for v in value.values())
    ):
        return value
    return None


def score(questions: list[Question], replies: list[str]) -> dict[str, float]:
    """Share of replies in the taught format, and share that contain the right answer at all
    (so one sees the format did not cost the base model its knowledge)."""
    n = len(questions)
    in_format = sum(parse_reply(r) is not None for r in replies)
    correct = sum(q.answer.lower().removeprefix("the ") in r.lower() for q, r in zip(questions, replies))
    return {"format": in_format / n, "correct": correct / n}


def compare(model, tokenizer, max_new_tokens: int = 32) -> str:
    """Answer the held-out questions with the base (b = 0) and the tuned vectors in one mixed
    batch; return a side-by-side table and both scores."""
    questions = held_out_questions()
    bank = AdapterBank(model)
    bank.add_current("tuned")
    convs = [[{"role": "user", "content": q.prompt}] for q in questions]
    replies = generate(
        model,
        tokenizer,
        convs + convs,
        adapters=[None] * len(convs) + ["tuned"] * len(convs),
        bank=bank,
        sampling=Sampling(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens),
    )
    base, tuned = replies[: len(convs)], replies[len(convs) :]
    bank.activate("tuned")  # leave the model as trained
    return comparison_table(questions, base, tuned)


def _cell(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def comparison_table(questions: list[Question], base: list[str], tuned: list[str], width: int = 44) -> str:
    lines = [f"{'held-out question':<36} | {'base model':<{width}} | tuned (VeRA)", "-" * (36 + 2 * width + 6)]
    for q, b, t in zip(questions, base, tuned):
        lines.append(f"{_cell(q.prompt, 36):<36} | {_cell(b, width):<{width}} | {_cell(t, width)}")
    sb, st = score(questions, base), score(questions, tuned)
    lines += [
        "",
        f"answers in the taught JSON format: base {sb['format']:.0%}  ->  "
        f"tuned {st['format']:.0%}  ({len(questions)} held-out questions)",
        f"answers containing the right fact: base {sb['correct']:.0%}  ->  tuned {st['correct']:.0%}",
    ]
    return "\n".join(lines)
