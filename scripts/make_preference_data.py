"""Preference pairs for the quickstart task: DPO on top of the quickstart SFT adapter, or ORPO from the base.

    python scripts/make_preference_data.py --adapter adapters/quickstart   # writes data/quickstart/preference*.jsonl
    python scripts/make_preference_data.py --check                          # the shipped files, without a model

Training pairs (preference.jsonl) are built on fresh sentences: first names, last names and cities that occur in
neither split of the task (FRESH_* below), the train split's ages, and the train templates plus a few new ones (none
of the test split's), so the held-out test split stays unseen.
- on-policy negatives: the SFT adapter is sampled SAMPLES times per sentence (temperature TEMPERATURE, seeded); every
  distinct output that fails JSON exact match is a rejected answer, the reference JSON the chosen one;
- rule-made hard negatives on every RULE_EVERY-th sentence: a wrong age (the sentence's distracting number when it has
  one), another city, a misspelt name or city, the city in the name slot, the age as a string.
Held-out pairs (preference_test.jsonl): each of the test split's 100 sentences with one rule-made negative (the kinds
in turn), for held-out preference accuracy; they need no model. Held-out misses (preference_test_misses.jsonl): the
test sentences the SFT adapter gets wrong under greedy decoding, its own output as the rejected answer, read from
the eval.json of `finetune eval adapters/quickstart --data data/quickstart/test.jsonl` (--misses-from): the pairs
where the SFT adapter itself prefers a wrong answer, i.e. what the preference stage has to fix.

Every row is TRL's conversational shape ({prompt: [system, user], chosen: [assistant], rejected: [assistant]}) plus
a `source` column (on-policy, or rule:<kind>) that training ignores. --check regenerates everything made by rule and
checks the on-policy rows: prompts from the fresh sentences, chosen the reference, rejected a real miss.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_task_data as task  # noqa: E402  (the task's own generator: templates, pools, system prompt)

SEED = 13
N_FRESH = 96
SAMPLES, TEMPERATURE, MAX_NEW_TOKENS, BATCH = 4, 1.0, 48, 8
RULE_EVERY = 3
OUT = task.OUT

FRESH_FIRST = task.words("""Agnes Bilal Camille Dario Esther Farid Gustav Hiroshi Imani Joaquin Katya Lorenzo Magnus
Nikhil Oksana Pilar Quentin Rania Soren Talia Ulrich Valentina Wen Ximena Yusuf Zofia Anika Bartek Cyrus Dagny Eitan Fiona
Goran Hana Idris Jana Kai Liesel Mateus Noor""")
FRESH_LAST = task.words("""Abara Bergstrom Castellano Dimitrov Eriksen Fontaine Guerrero Halvorsen Ibrahim Jankowski
Kovacs Lombardi Mwangi Nakamura Oyelaran Petrenko Quiroga Rahman Sorensen Takahashi Urquhart Vasquez Wojcik Xu Yamamoto
Zielinski Achebe Brennan Cardoso Duarte Engel Ferreira Gallo Haas Ishikawa Jovanovic Karimi Leclerc Murphy Nieminen""")
FRESH_CITIES = task.words("""Antwerp Belgrade Cardiff Dundee Edinburgh Florence Glasgow Heidelberg Innsbruck Jaipur
Lausanne Marseille Nagoya Odessa Palermo Reykjavik Sapporo Trondheim Uppsala Verona Windhoek Xalapa Yerevan Zurich
Arequipa Bordeaux Coimbra Debrecen Eindhoven Fukuoka Galway Hobart Izmir Jena Kaunas Linz Mombasa Nantes Oaxaca
Manchester""")
FRESH_TEMPLATES = [
    "Our records show {name}, age {age}, living in {city}.",
    "{name} celebrated a {age}th birthday at home in {city}.",
    "Resident of {city}: {name} ({age}).",
    "{name} has {n} children, is {age}, and lives in {city}.",
    "At the {city} library, {name}, {age}, reads {n} books a month.",
    "{name} | {age} | {city}",
    "{age} years old, {name} calls {city} home.",
    "Newly arrived in {city}, {name} ({age}) rents a room with {n} others.",
]
RULES = ("age", "city", "name_typo", "city_typo", "slot", "age_string")


def fresh_sentences() -> list[dict]:
    """The fresh sentences: {sentence, answer (dict), n (the distracting number or None)}."""
    rng = random.Random(SEED)
    train_pools, _ = task.make_pools(random.Random(task.SEED))
    pools = {"first": FRESH_FIRST, "last": FRESH_LAST, "city": FRESH_CITIES, "age": train_pools["age"]}
    templates = task.TRAIN_TEMPLATES + FRESH_TEMPLATES
    return [_sentence(rng, pools, templates) for _ in range(N_FRESH)]


def _sentence(rng: random.Random, pools: dict[str, list[str]], templates: list[str]) -> dict:
    name = f"{rng.choice(pools['first'])} {rng.choice(pools['last'])}"
    age, city, template = int(rng.choice(pools["age"])), rng.choice(pools["city"]), rng.choice(templates)
    n = rng.choice([d for d in range(2, 30) if d != age])
    return {"sentence": template.format(name=name, age=age, city=city, n=n), "answer": {"name": name, "age": age, "city": city},
            "n": n if "{n}" in template else None}


def test_sentences() -> list[dict]:
    """The test split's sentences with their answers; the distracting number is the sentence's other number."""
    rows = [json.loads(line) for line in (OUT / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    out = []
    for r in rows:
        sentence, answer = r["messages"][1]["content"], json.loads(r["messages"][2]["content"])
        others = [int(x) for x in re.findall(r"\d+", sentence) if int(x) != answer["age"]]
        out.append({"sentence": sentence, "answer": answer, "n": others[0] if others else None})
    return out


def pair(sentence: str, answer: dict, rejected: str, source: str) -> dict:
    return {"prompt": [{"role": "system", "content": task.SYSTEM}, {"role": "user", "content": sentence}],
            "chosen": [{"role": "assistant", "content": render(answer)}],
            "rejected": [{"role": "assistant", "content": rejected}], "source": source}


def render(answer: dict) -> str:
    return json.dumps(answer, ensure_ascii=False)


def rule_negative(item: dict, kind: str, rng: random.Random) -> str:
    """A plausible wrong answer of one kind; never equal to the reference."""
    answer, wrong = item["answer"], dict(item["answer"])
    first, _, last = answer["name"].partition(" ")
    if kind == "age":
        age = item["n"] if item["n"] is not None else answer["age"]
        while age == answer["age"]:
            age = answer["age"] + rng.choice([-10, -3, -2, -1, 1, 2, 3, 10])
        wrong["age"] = age
    elif kind == "city":
        wrong["city"] = rng.choice([c for c in FRESH_CITIES + task.CITIES if c != answer["city"]])
    elif kind == "name_typo":
        wrong["name"] = f"{first} {_typo(last, rng)}" if rng.random() < 0.5 else f"{_typo(first, rng)} {last}"
    elif kind == "city_typo":
        wrong["city"] = _typo(answer["city"], rng)
    elif kind == "slot":
        wrong["name"] = f"{first} {answer['city']}"
    elif kind == "age_string":
        return render({**answer, "age": str(answer["age"])})
    return render(wrong)


def _typo(word: str, rng: random.Random) -> str:
    """A near copy, the adapter's typical miss on unseen names (Elif -> Eleni, Halifax -> Halloween): the ending
    changed, or one inner letter replaced."""
    while True:
        if len(word) <= 3 or rng.random() < 0.5:
            typo = word[: max(2, len(word) - 2)] + rng.choice(["a", "en", "i", "o", "ie", "us"])
        else:
            i = rng.randrange(1, len(word) - 1)
            typo = word[:i] + rng.choice([c for c in "aeiourlnst" if c != word[i]]) + word[i + 1:]
        if typo != word:
            return typo


def rule_pairs(items: list[dict], every: int, seed: int) -> list[tuple[int, dict]]:
    """(sentence index, pair) for every `every`-th sentence, the rule kinds in turn."""
    rng = random.Random(seed)
    out = []
    for k, i in enumerate(range(0, len(items), every)):
        kind = RULES[k % len(RULES)]
        rejected = rule_negative(items[i], kind, rng)
        assert json.loads(rejected) != items[i]["answer"], (kind, items[i])
        out.append((i, pair(items[i]["sentence"], items[i]["answer"], rejected, f"rule:{kind}")))
    return out


def is_miss(output: str, answer: dict) -> bool:
    """JSON exact match fails (as the json_exact_match metric: parsed object equal, age an integer)."""
    try:
        return bool(json.loads(output.strip()) != answer)
    except json.JSONDecodeError:
        return True


def sample_adapter(adapter: str, items: list[dict], cache: Path) -> list[list[str]]:
    """SAMPLES sampled answers per sentence from base + adapter, seeded per batch. Each batch is appended to `cache`
    as it is done, so an interrupted run goes on where it stopped (sampling takes a while on a busy CPU)."""
    import torch

    from finetune.data.prompting import prompt_ids, stop_token_ids
    from finetune.lifecycle.folder import load_adapter

    key = f"{Path(adapter).resolve()} seed={SEED} T={TEMPERATURE} k={SAMPLES} max={MAX_NEW_TOKENS} batch={BATCH}"
    done = [json.loads(line) for line in cache.read_text().splitlines()] if cache.is_file() else []
    out = [d["samples"] for d in done if d["key"] == key]
    out = out[: len(out) // BATCH * BATCH]  # whole batches only: each batch has its own seed
    cache.write_text("".join(json.dumps({"key": key, "samples": b}) + "\n" for b in out), encoding="utf-8")
    model, tok, _ = load_adapter(adapter)
    stops = stop_token_ids(tok, model.generation_config)
    for start in range(len(out), len(items), BATCH):
        prompts = [prompt_ids(tok, pair(i["sentence"], i["answer"], "-", "")["prompt"], chat=True)
                   for i in items[start: start + BATCH]]
        width = max(map(len, prompts))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        torch.manual_seed(SEED * 100_000 + start)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=TEMPERATURE, top_k=0,
                                 top_p=1.0, max_new_tokens=MAX_NEW_TOKENS, num_return_sequences=SAMPLES,
                                 eos_token_id=stops, pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(gen[:, width:], skip_special_tokens=True)
        batch = [texts[j: j + SAMPLES] for j in range(0, len(texts), SAMPLES)]
        with cache.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps({"key": key, "samples": b}) + "\n" for b in batch)
        out += batch
        print(f"sampled {len(out)}/{len(items)} sentences", file=sys.stderr, flush=True)
    return out


def on_policy_pairs(items: list[dict], samples: list[list[str]]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for i, (item, outputs) in enumerate(zip(items, samples, strict=True)):
        misses = list(dict.fromkeys(o.strip() for o in outputs if is_miss(o, item["answer"])))
        out[i] = [pair(item["sentence"], item["answer"], m, "on-policy") for m in misses if m]
    return out


def build_train(items: list[dict], samples: list[list[str]]) -> list[dict]:
    rules = dict(rule_pairs(items, RULE_EVERY, SEED))
    policy = on_policy_pairs(items, samples)
    return [p for i in range(len(items)) for p in ([rules[i]] if i in rules else []) + policy[i]]


def build_test() -> list[dict]:
    return [p for _, p in rule_pairs(test_sentences(), 1, SEED + 1)]


def misses_from(eval_json: Path) -> list[dict]:
    """Pairs from the SFT adapter's greedy misses in a `finetune eval` report on the test split."""
    report = json.loads(eval_json.read_text(encoding="utf-8"))
    answers = {i["sentence"]: i["answer"] for i in test_sentences()}
    out = []
    for example in report["examples"]:
        sentence = example["prompt"][-1]["content"]
        if sentence not in answers:
            raise SystemExit(f"{eval_json}: {sentence!r} is not a sentence of the test split")
        if is_miss(example["adapter"], answers[sentence]):
            out.append(pair(sentence, answers[sentence], example["adapter"].strip(), "on-policy:greedy"))
    return out


def check_disjoint() -> None:
    _, test_pools = task.make_pools(random.Random(task.SEED))
    for key, fresh in (("first", FRESH_FIRST), ("last", FRESH_LAST), ("city", FRESH_CITIES)):
        assert not set(fresh) & set(task.FIRST + task.LAST + task.CITIES), f"a fresh {key} is in the task's pools"
    assert not set(FRESH_TEMPLATES) & set(task.TEST_TEMPLATES + task.TRAIN_TEMPLATES)
    assert not {str(i["answer"]["age"]) for i in fresh_sentences()} & set(test_pools["age"]), "a test age in the pairs"


def check(out: Path) -> list[str]:
    """What differs between the shipped files and what this script makes (empty: all good)."""
    problems = []
    if (out / "preference_test.jsonl").read_text(encoding="utf-8") != task.render(build_test()):
        problems.append("preference_test.jsonl differs from the rule-made pairs on the test split")
    shipped = [json.loads(line) for line in (out / "preference.jsonl").read_text(encoding="utf-8").splitlines()]
    items = fresh_sentences()
    if [r for r in shipped if r["source"] != "on-policy"] != [p for _, p in rule_pairs(items, RULE_EVERY, SEED)]:
        problems.append("the rule-made pairs of preference.jsonl differ from what this script makes")
    answers = {i["sentence"]: i["answer"] for i in items}
    for k, row in enumerate(r for r in shipped if r["source"] == "on-policy"):
        sentence = row["prompt"][1]["content"]
        if sentence not in answers or row["chosen"][0]["content"] != render(answers[sentence]) or not is_miss(
                row["rejected"][0]["content"], answers[sentence]):
            problems.append(f"on-policy pair {k}: not a fresh sentence with its reference and a real miss")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", help="The quickstart SFT adapter to sample on-policy negatives from.")
    parser.add_argument("--out", type=Path, default=OUT, help="Folder for preference.jsonl and preference_test.jsonl.")
    parser.add_argument("--check", action="store_true", help="Only check the files on disk (no model needed).")
    parser.add_argument("--misses-from", type=Path, metavar="EVAL_JSON",
                        help="Only write preference_test_misses.jsonl from the SFT adapter's eval.json on the test split.")
    parser.add_argument("--cache", type=Path, help="Sampled answers so far, so an interrupted run resumes (default: "
                        "<adapter's parent>/.work/preference_samples.jsonl).")
    args = parser.parse_args(argv)
    check_disjoint()
    if args.check:
        problems = check(args.out)
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0
    if args.misses_from:
        rows = misses_from(args.misses_from)
        (args.out / "preference_test_misses.jsonl").write_text(task.render(rows), encoding="utf-8")
        print(f"wrote {len(rows)} pairs to {args.out / 'preference_test_misses.jsonl'}")
        return 0
    if not args.adapter:
        parser.error("--adapter is needed to sample on-policy negatives (or use --check)")
    items = fresh_sentences()
    cache = args.cache or Path(args.adapter).parent / ".work" / "preference_samples.jsonl"
    cache.parent.mkdir(parents=True, exist_ok=True)
    train = build_train(items, sample_adapter(args.adapter, items, cache))
    for name, rows in (("preference.jsonl", train), ("preference_test.jsonl", build_test())):
        (args.out / name).write_text(task.render(rows), encoding="utf-8")
        kinds = {r["source"]: sum(x["source"] == r["source"] for x in rows) for r in rows}
        print(f"wrote {len(rows)} pairs to {args.out / name}: {kinds}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
