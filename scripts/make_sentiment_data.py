"""Generate the shipped classification example: is a one-sentence movie review positive or negative?

    python scripts/make_sentiment_data.py            # writes data/sentiment/{train,test}.jsonl (deterministic)
    python scripts/make_sentiment_data.py --check    # fails if the files on disk differ from what this script makes

The test split measures what the pretrained encoder brings, not memorisation: its adjectives, the things reviewed
and its sentence templates never occur in the train split (the script asserts it). About one sentence in five is
negated ("was not good" is negative), so spotting a positive word is not enough. Rows are classification format:
{"text": ..., "label": "negative" | "positive"}.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from make_task_data import write_splits  # scripts/ is on sys.path when a script in it runs

SEED = 17
N_TRAIN, N_TEST = 800, 200
NEGATED_SHARE = 0.2
OUT = Path(__file__).resolve().parents[1] / "data" / "sentiment"
LABELS = ("negative", "positive")

TRAIN_WORDS = {
    "positive": ["good", "great", "excellent", "wonderful", "enjoyable", "brilliant", "delightful", "lovely",
                 "fantastic", "charming"],
    "negative": ["bad", "terrible", "awful", "boring", "poor", "dreadful", "horrible", "weak", "disappointing",
                 "annoying"],
}
TEST_WORDS = {
    "positive": ["superb", "outstanding", "marvelous", "splendid", "terrific", "gripping", "moving", "stunning"],
    "negative": ["dull", "atrocious", "mediocre", "tedious", "lousy", "abysmal", "bland", "clumsy"],
}
TRAIN_SUBJECTS = ["movie", "film", "plot", "acting", "soundtrack", "script", "cast", "ending", "dialogue", "story"]
TEST_SUBJECTS = ["direction", "cinematography", "pacing", "screenplay", "finale", "premise"]

TRAIN_TEMPLATES = [
    "The {subject} was {adj}.",
    "What {a_adj} {subject}!",
    "I found the {subject} {adj}.",
    "Honestly, the {subject} is {adj}.",
    "The {subject} felt {adj} from start to finish.",
    "Everyone agreed the {subject} was {adj}.",
    "{A_adj} {subject}, no doubt about it.",
    "My friends thought the {subject} was {adj}.",
]
TRAIN_NEGATED = ["The {subject} was not {adj} at all.", "Nobody would say the {subject} is {adj}."]
TEST_TEMPLATES = [
    "Overall, the {subject} turned out {adj}.",
    "Such {a_adj} {subject}.",
    "The critics called the {subject} {adj}, and they were right.",
    "In my view the {subject} is {adj}.",
]
TEST_NEGATED = ["I would not call the {subject} {adj}.", "The {subject} was hardly {adj}."]


def article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def sentence(template: str, subject: str, adj: str) -> str:
    text = template.format(subject=subject, adj=adj, a_adj=article(adj), A_adj=article(adj).capitalize())
    return text[0].upper() + text[1:]


def make_rows(n: int, words: dict[str, list[str]], subjects: list[str], templates: list[str], negated: list[str],
              rng: random.Random) -> list[dict]:
    rows, seen = [], set()
    while len(rows) < n:
        polarity = rng.choice(LABELS)
        flip = rng.random() < NEGATED_SHARE
        text = sentence(rng.choice(negated if flip else templates), rng.choice(subjects), rng.choice(words[polarity]))
        if text in seen:
            continue
        seen.add(text)
        label = LABELS[1 - LABELS.index(polarity)] if flip else polarity
        rows.append({"text": text, "label": label})
    return rows


def build() -> dict[str, list[dict]]:
    check_disjoint()
    rng = random.Random(SEED)
    return {"train": make_rows(N_TRAIN, TRAIN_WORDS, TRAIN_SUBJECTS, TRAIN_TEMPLATES, TRAIN_NEGATED, rng),
            "test": make_rows(N_TEST, TEST_WORDS, TEST_SUBJECTS, TEST_TEMPLATES, TEST_NEGATED, rng)}


def check_disjoint() -> None:
    for label in LABELS:
        shared = set(TRAIN_WORDS[label]) & set(TEST_WORDS[label] + TEST_WORDS[LABELS[1 - LABELS.index(label)]])
        assert not shared, f"adjectives in both splits: {sorted(shared)}"
    assert not set(TRAIN_SUBJECTS) & set(TEST_SUBJECTS), "a subject is in both splits"
    assert not set(TRAIN_TEMPLATES + TRAIN_NEGATED) & set(TEST_TEMPLATES + TEST_NEGATED), "a template is in both splits"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT, help="Folder for train.jsonl and test.jsonl.")
    parser.add_argument("--check", action="store_true", help="Only compare with the files on disk.")
    args = parser.parse_args(argv)
    return write_splits(build(), args.out, args.check, Path(__file__).name)


if __name__ == "__main__":
    raise SystemExit(main())
