"""The embedded default: teach SmolLM2-135M-Instruct to answer every question as one line of
JSON, {"answer": ..., "topic": ...}, a habit the base model does not have.

The data set is generated here from small authored tables (capitals, small sums, opposites,
animal facts, science facts), so it needs no download. Some rows of each table are held back:
the before/after comparison asks about them only, so the score measures a learned format, not
memorised lines.

Each "answer" is a whole sentence in the base model's own phrasing ("The capital of France is
Paris."), and the tables hold facts a 135M model mostly knows. Bare one-word answers, and sums
it cannot compute, taught it to fill the answer slot with a guess: the tuned model lost facts
the base knew (Kyiv became Lviv). With sentences it reaches the fact the way it always has.
The answer comes before the topic for the same reason: taught to name a topic first, the model
answered after its own label ("geography": Alaska for Hawaii, "volcanoes": Etna for Vesuvius)
and kept fewer of the general questions the base got right (docs/quality.md).

Forgetting is measured on general-knowledge questions unlike the training data
(`data/general_knowledge.json`, qvera's own authored set): the demo scores its `demo` and
`study` splits (320 questions), base against tuned, by the same whole-word match as the taught
facts.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path

from qvera.generation.bank import AdapterBank
from qvera.generation.decode import GREEDY, generate

SEED = 1234
# In a clone (make demo, an editable install) the repository's data folder sits two levels up.
GENERAL_KNOWLEDGE = Path(__file__).resolve().parents[2] / "data" / "general_knowledge.json"
GENERAL_SPLITS = ("demo", "replay", "study")  # the demo's; free for training; the quality study's
# The demo's general-knowledge line scores every split it never trains on: its own 50 questions
# and the quality study's 270. On 50 alone one question is 2 points, and bf16 rounding that
# changes with the batch's shape flips one or two near-tied greedy answers (docs/quality.md).
SCORED_SPLITS = ("demo", "study")
ANSWERS_FILE = "demo_answers.jsonl"  # every reply of the before/after comparison, in the run folder

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
# (question, the taught answer sentence, the fact it must contain)
SCIENCE = [
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet.", "Mars"),
    (
        "What is the largest planet in our solar system?",
        "Jupiter is the largest planet in our solar system.",
        "Jupiter",
    ),
    ("What gas do plants take in from the air?", "Plants take in carbon dioxide from the air.", "carbon dioxide"),
    ("What gas do humans need to breathe?", "Humans need oxygen to breathe.", "oxygen"),
    ("What is the chemical formula for water?", "The chemical formula for water is H2O.", "H2O"),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au.", "Au"),
    ("At what temperature in Celsius does water freeze?", "Water freezes at 0 degrees Celsius.", "0"),
    (
        "At what temperature in Celsius does water boil at sea level?",
        "Water boils at 100 degrees Celsius at sea level.",
        "100",
    ),
    ("What is the closest star to Earth?", "The Sun is the closest star to Earth.", "Sun"),
    ("How many legs does a spider have?", "A spider has 8 legs.", "8"),
    ("How many legs does an insect have?", "An insect has 6 legs.", "6"),
    ("What force pulls objects toward the Earth?", "Gravity pulls objects toward the Earth.", "gravity"),
    ("What part of the plant makes food from sunlight?", "The leaf makes food from sunlight.", "leaf"),
    ("Which organ pumps blood through the body?", "The heart pumps blood through the body.", "heart"),
    ("What is the hardest natural substance?", "Diamond is the hardest natural substance.", "diamond"),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth.", "Pacific"),
    ("How many continents are there?", "There are 7 continents.", "7"),
    ("What is frozen water called?", "Frozen water is called ice.", "ice"),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun.", "Mercury"),
    ("What do bees make?", "Bees make honey.", "honey"),
    ("What is the tallest animal?", "The giraffe is the tallest animal.", "giraffe"),
    ("How many days does the Earth take to orbit the Sun?", "The Earth takes 365 days to orbit the Sun.", "365"),
    ("What is the largest mammal?", "The blue whale is the largest mammal.", "blue whale"),
    ("What natural satellite orbits the Earth?", "The Moon orbits the Earth.", "Moon"),
    ("Which organ do humans use to breathe?", "Humans breathe with their lungs.", "lungs"),
]
# Other spellings or words a right answer may use instead of the fact in the tables.
ALSO_RIGHT = {"Kyiv": ("Kiev",), "bray": ("hee-haw", "hee haw")}

CAPITAL_QUESTIONS = ["What is the capital of {}?", "Which city is the capital of {}?", "Name the capital of {}."]
OPPOSITE_QUESTIONS = [
    "What is the opposite of '{}'?",
    "Give me the opposite of the word {}.",
    "What word means the opposite of {}?",
]
SOUND_QUESTIONS = ["What sound does a {} make?", "What noise does a {} make?"]
BABY_QUESTIONS = ["What is a baby {} called?", "What do you call a young {}?"]
SENTENCE_END = re.compile(r"(?<=[.!?])\s")
HELD_OUT = 0.12  # the last rows of every table
SUMS = 20  # small sums in the training data


@dataclass(frozen=True)
class Question:
    """One demo question with the sentence it teaches and the fact the score looks for."""

    prompt: str
    topic: str
    answer: str  # the whole sentence taught inside the JSON, phrased as the base model would say it
    fact: str  # the word or number a right answer must contain
    also: tuple[str, ...] = ()  # other spellings or words that count as the fact

    def reply(self) -> str:
        return taught_json(self.answer, self.topic)

    def answered_by(self, text: str) -> bool:
        """Whether `text` states the fact (as a whole word, so "100" does not count for "0")."""
        spellings = (self.fact, *self.also, *ALSO_RIGHT.get(self.fact, ()))
        return any(re.search(rf"(?<!\w){re.escape(f)}(?!\w)", text, re.IGNORECASE) for f in spellings)


def taught_json(answer: str, topic: str) -> str:
    """The taught format: one line of JSON, the answer first (see the module's docstring)."""
    return json.dumps({"answer": answer, "topic": topic})


def _split(table: list) -> tuple[list, list]:
    cut = len(table) - max(1, round(len(table) * HELD_OUT))
    return table[:cut], table[cut:]


def _questions(rng: random.Random, held_out: bool) -> list[Question]:
    pick = lambda table: _split(table)[1 if held_out else 0]  # noqa: E731
    phrasings = lambda templates: rng.sample(templates, 1 if held_out else 2)  # noqa: E731
    qs = []
    for country, city in pick(CAPITALS):
        sentence = f"The capital of {country} is {city}."
        qs += [Question(t.format(country), "geography", sentence, city) for t in phrasings(CAPITAL_QUESTIONS)]
    for word, opposite in pick(OPPOSITES):
        sentence = f"The opposite of {word} is {opposite}."
        qs += [Question(t.format(word), "language", sentence, opposite) for t in phrasings(OPPOSITE_QUESTIONS)]
    for animal, sound in pick(ANIMAL_SOUNDS):
        sentence = f"A {animal} says {sound}."
        qs += [Question(t.format(animal), "animals", sentence, sound) for t in phrasings(SOUND_QUESTIONS)]
    for animal, baby in pick(BABY_ANIMALS):
        sentence = f"A baby {animal} is called a {baby}."
        qs += [Question(t.format(animal), "animals", sentence, baby) for t in phrasings(BABY_QUESTIONS)]
    qs += [Question(q, "science", sentence, fact) for q, sentence, fact in pick(SCIENCE)]
    # Small sums: fresh numbers for held-out questions.
    lo, hi = (11, 20) if held_out else (1, 10)
    for _ in range(2 if held_out else SUMS):
        a, b = rng.randint(lo, hi), rng.randint(1, 9)
        kind, value = rng.choice([("plus", a + b), ("minus", a - b)])
        prompt = rng.choice([f"What is {a} {kind} {b}?", f"Compute {a} {kind} {b}."])
        qs.append(Question(prompt, "math", f"{a} {kind} {b} is {value}.", str(value)))
    return qs


def training_questions() -> list[Question]:
    """The questions the demo trains on (fixed seed: the same every run)."""
    qs = _questions(random.Random(SEED), held_out=False)
    random.Random(SEED).shuffle(qs)
    return qs


def held_out_questions() -> list[Question]:
    """The questions the training data never asks: the last rows of every table."""
    return _questions(random.Random(SEED + 1), held_out=True)


def general_questions(split: str, path: Path = GENERAL_KNOWLEDGE) -> list[Question]:
    """One split of the general-knowledge set: `demo` (scored by the demo), `replay` (never
    scored, free for training) or `study` (the quality study's, scored by the demo too); the
    answer is the fact, its accepted alternatives in `also`."""
    if split not in GENERAL_SPLITS:
        raise ValueError(f"unknown general-knowledge split {split!r}; use one of {', '.join(GENERAL_SPLITS)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the demo runs from a clone of the repository (make demo)")
    return [
        Question(row["question"], row["topic"], row["answer"], row["answer"], tuple(row["also"]))
        for row in json.loads(path.read_text())
        if row["split"] == split
    ]


def whole_sentences(reply: str) -> str | None:
    """The reply up to its last sentence end (a reply cut off mid-sentence loses the cut
    sentence), or None when it has no sentence end."""
    text = " ".join(reply.split())
    ends = [m.start() for m in SENTENCE_END.finditer(text + " ")]
    return text[: ends[-1]] if ends else None


def replay_reply(question: Question, reply: str) -> str | None:
    """A replayed general question's answer in the demo's format: the whole sentences of the
    base's own reply inside the taught JSON, so the adapter learns the format and keeps what
    the base said (None when the reply has no whole sentence)."""
    sentence = whole_sentences(reply)
    return taught_json(sentence, question.topic) if sentence else None


def demo_conversations() -> list[list[dict]]:
    """The demo's training set as chat conversations, the taught JSON as the answer."""
    return [
        [{"role": "user", "content": q.prompt}, {"role": "assistant", "content": q.reply()}]
        for q in training_questions()
    ]


# ---------------------------------------------------------------- scoring


def parse_reply(text: str) -> dict | None:
    """The reply as {"answer", "topic"} if it is exactly that JSON object (either order), else None."""
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
    """Share of replies in the taught format, share that state the right fact at all (so one
    sees the format did not cost the base model its knowledge), and how many (`right`)."""
    n = len(questions)
    in_format = sum(parse_reply(r) is not None for r in replies)
    right = sum(q.answered_by(r) for q, r in zip(questions, replies))
    return {"format": in_format / n, "correct": right / n, "right": right}


def compare(model, tokenizer, output_dir: str | Path | None = None, max_new_tokens: int = 48) -> str:
    """Answer the held-out questions and the general-knowledge ones with the base (b = 0) and
    the tuned vectors in one mixed batch; return a side-by-side table and the scores, and
    write every reply to `output_dir`/demo_answers.jsonl when given."""
    general = [q for split in SCORED_SPLITS for q in general_questions(split)]
    sets = {"held-out": held_out_questions(), "general": general}
    questions = [q for qs in sets.values() for q in qs]
    bank = AdapterBank(model)
    bank.add_current("tuned")
    convs = [[{"role": "user", "content": q.prompt}] for q in questions]
    replies = generate(
        model,
        tokenizer,
        convs + convs,
        adapters=[None] * len(convs) + ["tuned"] * len(convs),
        bank=bank,
        sampling=replace(GREEDY, max_new_tokens=max_new_tokens),
    )
    bank.activate("tuned")  # leave the model as trained
    base, tuned = replies[: len(convs)], replies[len(convs) :]
    n = len(sets["held-out"])
    table = comparison_table(sets["held-out"], base[:n], tuned[:n], sets["general"], base[n:], tuned[n:])
    if output_dir is None:
        return table
    path = Path(output_dir) / ANSWERS_FILE
    write_answers(path, sets, base, tuned)
    return f"{table}\nevery reply in full:              {path}"


def write_answers(path: Path, sets: dict[str, list[Question]], base: list[str], tuned: list[str]) -> None:
    """One JSON line per question: its set, the fact, both full replies and whether each is right."""
    questions = [(name, q) for name, qs in sets.items() for q in qs]
    with open(path, "w") as f:
        for (name, q), b, t in zip(questions, base, tuned):
            row = {"set": name, "question": q.prompt, "fact": q.fact, "base": b, "tuned": t}
            row |= {"base_right": q.answered_by(b), "tuned_right": q.answered_by(t)}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def shown(reply: str) -> str:
    """What the table shows of a reply: the "answer" field of the taught JSON, else the text."""
    parsed = parse_reply(reply)
    return parsed["answer"] if parsed is not None else reply


def _cell(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def comparison_table(
    questions: list[Question],
    base: list[str],
    tuned: list[str],
    general: list[Question] = (),
    general_base: list[str] = (),
    general_tuned: list[str] = (),
    width: int = 44,
) -> str:
    """Base and tuned answers side by side (the tuned one's "answer" field; + marks a reply
    that states the fact), with the scores under them; the general-knowledge share when given."""
    lines = [
        f"{'held-out question':<36} |   {'base model':<{width}} |   tuned (VeRA), its answer",
        "-" * (44 + 2 * width),
    ]
    for q, b, t in zip(questions, base, tuned):
        mark_b, mark_t = ("+" if q.answered_by(r) else " " for r in (b, t))
        lines.append(
            f"{_cell(q.prompt, 36):<36} | {mark_b} {_cell(b, width):<{width}} | {mark_t} {_cell(shown(t), width)}"
        )
    sb, st = score(questions, base), score(questions, tuned)
    lines += [
        "",
        f"answers in the taught JSON format: base {sb['format']:.0%}  ->  tuned {st['format']:.0%}  "
        f"({len(questions)} held-out questions)",
        f"answers containing the right fact: base {sb['correct']:.0%}  ->  tuned {st['correct']:.0%}",
    ]
    if general:
        # Counts beside the shares: a question or two either way rounds to the same percent.
        gb, gt = score(general, general_base), score(general, general_tuned)
        lines.append(
            f"general knowledge kept (right):    base {gb['correct']:.0%} ({gb['right']})  ->  "
            f"tuned {gt['correct']:.0%} ({gt['right']})  ({len(general)} questions unlike the training data)"
        )
    return "\n".join(lines)
