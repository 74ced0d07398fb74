"""Generate the quickstart task: pull a person's name, age and city out of one sentence into strict JSON.

    python scripts/make_task_data.py            # writes data/quickstart/{train,test}.jsonl (deterministic)
    python scripts/make_task_data.py --check    # fails if the files on disk differ from what this script makes

The test split measures generalisation, not memorisation: its sentence templates, first names, last names, cities
and ages never occur in the train split (the script asserts it). Some sentences carry a distracting second number
(years lived somewhere, a count of pets, a street number) so copying "the number" is not enough.
Rows are chat format: a system prompt stating the schema, the sentence as the user turn, the JSON as the answer.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 8
N_TRAIN, N_TEST = 800, 100
OUT = Path(__file__).resolve().parents[1] / "data" / "quickstart"
SYSTEM = (
    'Extract the person\'s name, age and city from the text. Reply with one JSON object only, with exactly the keys '
    '"name" (full name, string), "age" (integer) and "city" (string).'
)



def words(text: str) -> list[str]:
    return text.split()


FIRST = words("""Maria James Aisha Lukas Sofia Daniel Yuki Omar Elena Thomas Priya Mateo Hannah Kwame Ingrid Pedro Leila Noah
Chloe Ravi Fatima Oscar Mei Diego Nadia Samuel Astrid Tomas Amara Felix Rosa Hugo Zara Ivan Clara Kenji Lucia Arjun
Greta Marco Selin Jonas Alice Emeka Irene Viktor Naomi Rafael Olga Bruno Keiko Adam Lina Miguel Helga Tariq Julia
Sven Ayla Carlos Freya Dmitri Nora Ahmed Vera Paolo Ines Leon Mira Anton Dalia Emil Sara Kofi Elif Pablo Maya Rohan
Ada Milan Yara Stefan Nia""")
LAST = words("""Lopez Smith Khan Weber Rossi Cohen Tanaka Haddad Petrova Brown Sharma Garcia Schmidt Mensah Larsen Silva Nasser
Wright Dubois Patel Okafor Novak Chen Ramos Ivanova Baker Nilsson Horvat Diallo Fischer Moreno Laurent Ali Popov
Martin Sato Ruiz Iyer Berg Conti Yilmaz Keller Moore Eze Costa Kowalski Levi Ortiz Volkova Santos Mori Nowak Hassan
Vargas Jensen Aziz Becker Lund Torres Kim Bauer Ricci Adeyemi Lindqvist Sousa Park Meyer Castro Varga Hughes Mehta
Romano Okoro Klein Reyes Dahl Singh""")
CITIES = words("""Denver Lisbon Osaka Nairobi Toronto Krakow Lyon Austin Porto Seville Leeds Bergen Valencia Accra Dublin Tampere
Graz Perth Quito Turin Utrecht Malmo Brno Cork Kyoto Lagos Tucson Bilbao Ghent Aarhus Split Geneva Boston Oslo Hanoi
Lima Cairo Hamburg Naples Zagreb Dresden Tbilisi Madison Portland Halifax Auckland Cusco Leipzig Salzburg Bologna
Gdansk Tallinn Riga Vilnius Mumbai Pune Dakar Tunis Rabat Seoul""")

# {n} is a distracting number that is NOT the age.
TRAIN_TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "{name}, {age}, lives in {city}.",
    "Meet {name}: {age} years old, based in {city}.",
    "{name} ({age}) moved to {city} last spring.",
    "At {age}, {name} opened a small bakery in {city}.",
    "Our new colleague {name} is {age} and works from {city}.",
    "{name} lives in {city} and turned {age} this year.",
    "Born and raised in {city}, {name} is now {age}.",
    "{city} resident {name}, aged {age}, won the chess tournament.",
    "The {age}-year-old {name} runs a cafe in {city}.",
    "{name} has lived in {city} for {n} years and is {age} years old.",
    "{name}, age {age}, owns {n} cats and lives in {city}.",
    "Name: {name}. Age: {age}. City: {city}.",
    "{name} is a {age}-year-old teacher from {city}.",
    "Yesterday {name} ({age}) ran {n} kilometres through {city}.",
    "In {city}, {name} celebrated turning {age} with {n} friends.",
    "{name} was {age} when the family settled in {city}.",
    "Profile - {name}, {age} years, {city}.",
    "{name} from {city} is {age}.",
    "Please welcome {name}, who is {age} and comes from {city}.",
    "{name} lives at number {n} on a quiet street in {city}; she is {age}.",
    "Last week {name}, {age}, gave a talk in {city}.",
    "{city} is home to {name}, who is {age} years old.",
    "A {age} year old named {name} lives in {city}.",
    "{name} ({city}, {age}) joined the team {n} months ago.",
    "The volunteer from {city}, {name}, is {age} years of age.",
]
TEST_TEMPLATES = [
    "{name} just turned {age} and rents a flat in {city}.",
    "Having spent {n} years in {city}, {name} is {age} today.",
    "Contact: {name}, {age} y/o, {city}.",
    "{name} is {age}; home is {city}.",
    "This is {name}. {name} is {age} and lives in {city}.",
    "Aged {age}, {name} coaches {n} football teams in {city}.",
    "{name} - {age} - {city}",
    "Our driver today is {name}, a {age}-year-old from {city}.",
    "Originally from {city}, {name} is now {age} and works {n} hours a week.",
    "{name}, who lives in {city}, is {age} years old and has {n} brothers.",
    "Applicant {name} ({age} years) currently resides in {city}.",
    "{city}: {name}, {age}.",
]


def split_values(values: list[str], test_share: float, rng: random.Random) -> tuple[list[str], list[str]]:
    shuffled = sorted(set(values))
    rng.shuffle(shuffled)
    cut = int(len(shuffled) * test_share)
    return shuffled[cut:], shuffled[:cut]


def make_rows(n: int, templates: list[str], pools: dict[str, list[str]], rng: random.Random) -> list[dict]:
    rows, seen = [], set()
    while len(rows) < n:
        name = f"{rng.choice(pools['first'])} {rng.choice(pools['last'])}"
        age, city, template = int(rng.choice(pools["age"])), rng.choice(pools["city"]), rng.choice(templates)
        distractor = rng.choice([d for d in range(2, 30) if d != age])
        text = template.format(name=name, age=age, city=city, n=distractor)
        if text in seen:
            continue
        seen.add(text)
        answer = json.dumps({"name": name, "age": age, "city": city}, ensure_ascii=False)
        rows.append({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text},
                                  {"role": "assistant", "content": answer}]})
    return rows


def make_pools(rng: random.Random) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(train pools, test pools) of first names, last names, cities and ages, each split 75/25 by `rng`."""
    train_pools: dict[str, list[str]] = {}
    test_pools: dict[str, list[str]] = {}
    ages = [str(a) for a in range(18, 90)]
    for key, values in (("first", FIRST), ("last", LAST), ("city", CITIES), ("age", ages)):
        train_pools[key], test_pools[key] = split_values(values, 0.25, rng)
    return train_pools, test_pools


def build() -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    train_pools, test_pools = make_pools(rng)
    splits = {"train": make_rows(N_TRAIN, TRAIN_TEMPLATES, train_pools, rng),
              "test": make_rows(N_TEST, TEST_TEMPLATES, test_pools, rng)}
    check_disjoint(train_pools, test_pools)
    return splits


def check_disjoint(train: dict[str, list[str]], test: dict[str, list[str]]) -> None:
    for key in train:
        shared = set(train[key]) & set(test[key])
        assert not shared, f"{key} values shared by train and test: {sorted(shared)}"
    assert not set(TRAIN_TEMPLATES) & set(TEST_TEMPLATES), "a template is in both splits"


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_splits(splits: dict[str, list[dict]], out: Path, check: bool, script: str) -> int:
    """Write each split to out/<split>.jsonl, or (check) only compare with the files there: 1 when one differs.
    Shared by the seeded data generators in scripts/."""
    for split, rows in splits.items():
        path = out / f"{split}.jsonl"
        if check:
            if not path.is_file() or path.read_text(encoding="utf-8") != render(rows):
                print(f"{path} differs from what {script} generates; rerun it", file=sys.stderr)
                return 1
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(rows), encoding="utf-8")
        print(f"wrote {len(rows)} rows to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT, help="Folder for train.jsonl and test.jsonl.")
    parser.add_argument("--check", action="store_true", help="Only compare with the files on disk.")
    args = parser.parse_args(argv)
    return write_splits(build(), args.out, args.check, Path(__file__).name)


if __name__ == "__main__":
    raise SystemExit(main())
