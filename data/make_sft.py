"""Writes data/sft-train.jsonl and data/sft-val.jsonl: small instruction-following examples made by this script
(our own templates and word lists; nothing downloaded), deterministic for a given seed.

    python data/make_sft.py            # rewrites both files (they are committed, so nobody needs to run this)

The tasks are ones a model of a few million parameters can learn in a minute or two on a CPU: copy a phrase in
capitals, repeat a word, name the next weekday or month, count, spell a digit, and say which of two numbers is
larger. The training file holds conversations (`messages`, some with a system message, some with two turns); the
validation file holds `prompt`/`completion` pairs, so that both shapes ship with the project.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NOUNS = ["door", "garden", "box", "train", "cup", "ship", "river", "hill", "lamp", "bridge", "window", "letter",
         "apple", "candle", "kettle", "ladder", "market", "meadow", "pocket", "ribbon"]
ADJECTIVES = ["red", "quiet", "small", "early", "empty", "old", "green", "bright", "heavy", "narrow", "warm", "blue"]
SYSTEMS = ["You are a helpful assistant.", "Answer briefly.", "Reply with the answer only."]


def task(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(6)
    if kind == 0:
        phrase = f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
        return f"Say it in capitals: {phrase}", phrase.upper()
    if kind == 1:
        word, n = rng.choice(NOUNS), rng.randint(2, 4)
        return f"Repeat the word {word} {DIGITS[n]} times.", " ".join([word] * n)
    if kind == 2:
        i = rng.randrange(len(DAYS))
        return f"Which day comes after {DAYS[i]}?", f"{DAYS[(i + 1) % 7]} comes after {DAYS[i]}."
    if kind == 3:
        i = rng.randrange(len(MONTHS))
        return f"Which month follows {MONTHS[i]}?", f"{MONTHS[(i + 1) % 12]}."
    if kind == 4:
        a = rng.randint(1, 6)
        b = a + rng.randint(2, 4)
        return f"Count from {a} to {b}.", ", ".join(str(x) for x in range(a, b + 1)) + "."
    a, b = rng.sample(range(10, 100), 2)
    return f"Which is larger, {a} or {b}?", f"{max(a, b)} is larger."


def conversation(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    for _ in range(1 if rng.random() < 0.7 else 2):
        prompt, answer = task(rng)
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def main(seed: int = 2024, n_train: int = 400, n_val: int = 60) -> None:
    rng = random.Random(seed)
    here = Path(__file__).resolve().parent
    with open(here / "sft-train.jsonl", "w") as f:
        for _ in range(n_train):
            f.write(json.dumps(conversation(rng)) + "\n")
    with open(here / "sft-val.jsonl", "w") as f:
        for _ in range(n_val):
            prompt, completion = task(rng)
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


if __name__ == "__main__":
    main()
