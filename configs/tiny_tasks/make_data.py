"""Writes the synthetic tiny tasks used by configs/tiny.yaml and the tests (seeded).

Run from this folder: python make_data.py. The JSONL files are committed; they are ours
(made here), not copied from any dataset.
"""

import json
import random

WORDS = ["apple", "river", "stone", "cloud", "green", "house", "light", "music", "ocean", "paper", "plant", "table"]


def parity(rng):
    n = rng.randint(0, 99)
    return {"number": n, "label": n % 2}


def compare(rng):
    a, b = rng.sample(range(100), 2)
    return {"a": a, "b": b, "label": int(b > a)}


def copy_word(rng):
    w = rng.choice(WORDS)
    return {"word": w, "target": w}


def write(name, fn, n_train=200, n_test=40, seed=0):
    rng = random.Random(f"{name}-{seed}")
    rows = [fn(rng) for _ in range(n_train + n_test)]
    for split, part in (("train", rows[:n_train]), ("test", rows[n_train:])):
        with open(f"{name}.{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)


if __name__ == "__main__":
    write("tiny_parity", parity)
    write("tiny_compare", compare)
    write("tiny_copy", copy_word)
