"""Generate fastlm's demo instruction data set (event sentence -> one-line JSON record).

The task: given a short English sentence describing an event, answer with exactly one line of
JSON with the four keys ``who``, ``what``, ``where`` and ``when``, e.g.::

    Maria is meeting the dentist in Lisbon on Friday at 3 pm.
    {"who": "Maria", "what": "meeting the dentist", "where": "Lisbon", "when": "Friday 3 pm"}

A small instruction-tuned model never answers in exactly this shape by itself (it writes prose,
Markdown code fences, multi-line JSON or other keys), so a short LoRA run visibly changes its
behaviour.

Everything is hand-written below and sampled with a seeded ``random.Random``: running this
script again reproduces the committed ``demo_instructions.jsonl`` and ``demo_eval.jsonl`` byte
for byte.  Run it with::

    python -m fastlm.data.make_demo_data            # rewrite the files next to this script
    python -m fastlm.data.make_demo_data --out-dir /tmp/x
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20250611
N_TRAIN = 480
N_EVAL = 12
TRAIN_FILE = "demo_instructions.jsonl"
EVAL_FILE = "demo_eval.jsonl"
KEYS = ("who", "what", "where", "when")


def _items(text: str) -> list[str]:
    """Split a "|"-separated block of items (kept compact for reading)."""
    return [item.strip() for item in text.split("|") if item.strip()]


# Paraphrases of the instruction; the answer format is the same for all of them.
INSTRUCTIONS = [
    "Extract the event as JSON.",
    "Extract the event as JSON.",
    "Turn this sentence into an event record.",
    "Convert the event to JSON.",
]

# Who.  The *_EVAL lists are only used for held-out prompts.
PEOPLE = _items(
    """
    Maria | Tom | Aisha | Kenji | Lena | Omar | Priya | Lucas | Sofia | Daniel | Mei | Carlos |
    Fatima | Jonas | Grace | Ivan | Nadia | Pedro | Emma | Yusuf | Chloe | Rahul | Ana | Oliver |
    Hana | Dr. Patel | Mrs. Novak | Mr. Okafor | Coach Rivera | my sister | our manager |
    the new intern | Maria and Tom | Lena and Jonas | the twins | the sales team | my parents |
    the book club
    """
)
PEOPLE_EVAL = ["Beatriz", "Samuel", "Dr. Lindqvist", "Ravi and Elena"]
# These take "are", not "is".
PLURAL = ["Maria and Tom", "Lena and Jonas", "the twins", "my parents", "Ravi and Elena"]

# What: a verb phrase in -ing form, used verbatim as the "what" value.
ACTIVITIES = _items(
    """
    meeting the dentist | having lunch with a client | giving a talk on batteries |
    playing tennis | visiting the museum | picking up the keys | signing the lease |
    running a half marathon | taking a pottery class | celebrating a birthday |
    interviewing for a job | presenting the quarterly report | watching a jazz concert |
    repairing the bike | meeting the landlord | hosting a board game night | attending a wedding |
    teaching a yoga class | seeing the eye doctor | reviewing the budget |
    launching the new website | collecting the passports | rehearsing the play |
    volunteering at the food bank | moving into a new flat | touring the factory |
    pitching to investors | shopping for a sofa | recording a podcast | planting trees |
    renewing the car insurance | hiking the coastal trail | opening a bakery |
    judging a cooking contest | fixing the heating | sitting the driving test |
    selling old furniture | meeting the architect | painting the kitchen | studying for the exam
    """
)
ACTIVITIES_EVAL = ["tasting local cheeses", "returning the rental car", "meeting the accountant"]

# Where: cities take "in", venues take "at"; the place without its preposition is "where".
CITIES = _items(
    """
    Lisbon | Nairobi | Osaka | Berlin | Toronto | Lima | Cairo | Oslo | Mumbai | Denver | Seoul |
    Dublin | Porto | Krakow | Austin | Melbourne | Marseille | Accra | Hanoi | Quito
    """
)
VENUES = _items(
    """
    the city library | the town hall | Central Station | the community centre | the main office |
    Riverside Park | the old harbour | the university gym | Café Luna | the Grand Hotel |
    St. Mary's Hospital | the airport
    """
)
PLACES = [("in", c) for c in CITIES] + [("at", v) for v in VENUES]
PLACES_EVAL = [("in", "Reykjavik"), ("in", "Valparaiso"), ("at", "the botanical garden")]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]  # "on"
RELATIVE_DAYS = ["tomorrow", "today", "next Monday", "next Thursday", "this Saturday"]  # no "on"
TIMES = _items(
    """
    3 pm | 9 am | 10:30 am | noon | 6:45 pm | 8 pm | 11 am | 2:15 pm | 7 am | 4:30 pm | midnight |
    1 pm
    """
)

# Sentence templates.  {be} is "is"/"are", {on_day} is "on Friday" or "tomorrow", {at_time} is
# "at 3 pm".  Every template contains all four fields.
TEMPLATES = [
    "{who} {be} {what} {prep} {place} {on_day} {at_time}.",
    "{who} {be} {what} {prep} {place} {at_time} {on_day}.",
    "{On_day} {at_time}, {who} {be} {what} {prep} {place}.",
    "{Prep} {place}, {who} {be} {what} {on_day} {at_time}.",
    "{who} will be {what} {prep} {place} {on_day} {at_time}.",
    "{On_day} at {time} {who} will be {what} {prep} {place}.",
    "Reminder: {who} {be} {what} {prep} {place} {on_day} {at_time}.",
    "Heads up, {who} {be} {what} {on_day} {at_time} {prep} {place}.",
    "Just so you know, {who} {be} {what} {prep} {place} {at_time} {on_day}.",
    "{who} {be} going to be {what} {prep} {place} {on_day} {at_time}.",
    "Note for the calendar: {who}, {what}, {prep} {place}, {on_day} {at_time}.",
]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _sentence(rng: random.Random, people, activities, places) -> tuple[str, dict[str, str]]:
    who = rng.choice(people)
    plural = who in PLURAL
    what = rng.choice(activities)
    prep, place = rng.choice(places)
    if rng.random() < 0.3:
        day = rng.choice(RELATIVE_DAYS)
        on_day = day
    else:
        day = rng.choice(DAYS)
        on_day = f"on {day}"
    time = rng.choice(TIMES)
    template = rng.choice(TEMPLATES)
    if template.startswith("{who}"):
        who = _cap(who)  # "my sister" -> "My sister"; the value is copied as written
    text = template.format(
        who=who,
        be="are" if plural else "is",
        what=what,
        prep=prep,
        Prep=_cap(prep),
        place=place,
        on_day=on_day,
        On_day=_cap(on_day),
        at_time=f"at {time}",
        time=time,
    )
    text = _cap(text)
    record = dict(zip(KEYS, (who, what, place, f"{day} {time}")))
    return text, record


def _example(rng: random.Random, people, activities, places) -> dict[str, str]:
    text, record = _sentence(rng, people, activities, places)
    return {
        "instruction": rng.choice(INSTRUCTIONS),
        "input": text,
        "output": json.dumps(record, ensure_ascii=False),
    }


def generate(seed: int = SEED) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Return ``(train, eval)`` records; deterministic for a given seed."""
    rng = random.Random(seed)
    train: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(train) < N_TRAIN:
        ex = _example(rng, PEOPLE, ACTIVITIES, PLACES)
        if ex["input"] not in seen:
            seen.add(ex["input"])
            train.append(ex)

    # Held-out prompts: always "Extract the event as JSON."; each one uses at least one
    # name, activity or place that never occurs in the training split.
    eval_rng = random.Random(seed + 1)
    evals: list[dict[str, str]] = []
    while len(evals) < N_EVAL:
        k = len(evals) % 3
        people = PEOPLE_EVAL if k == 0 else PEOPLE
        activities = ACTIVITIES_EVAL if k == 1 else ACTIVITIES
        places = PLACES_EVAL if k == 2 else PLACES
        text, record = _sentence(eval_rng, people, activities, places)
        if text in seen:
            continue
        seen.add(text)
        evals.append(
            {
                "instruction": INSTRUCTIONS[0],
                "input": text,
                "output": json.dumps(record, ensure_ascii=False),
            }
        )
    return train, evals


def _dumps(records: list[dict[str, str]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write(out_dir: str | Path | None = None, seed: int = SEED) -> tuple[Path, Path]:
    """Write the train and eval jsonl files into ``out_dir`` (default: this package)."""
    out = Path(out_dir) if out_dir is not None else Path(__file__).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    train, evals = generate(seed)
    train_path, eval_path = out / TRAIN_FILE, out / EVAL_FILE
    train_path.write_text(_dumps(train), encoding="utf-8", newline="\n")
    eval_path.write_text(_dumps(evals), encoding="utf-8", newline="\n")
    return train_path, eval_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=None, help="default: next to this script")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    for path in write(args.out_dir, args.seed):
        print(path)


if __name__ == "__main__":
    main()
