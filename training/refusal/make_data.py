"""Build the refusal-tuning prompt set from the hand-written lists beside this file.

    python training/refusal/make_data.py            # writes training/refusal/data/prompts.jsonl

Every prompt and refusal here was written for evalhost. Verb phrases ("~" lines) are wrapped in request templates
that the harmful and the benign lists share, so the form of a request says nothing about whether to refuse; the
content has to. Each harmful prompt gets one short refusal, drawn from REFUSALS; benign prompts get no target here:
their targets are the base model's own greedy answers (self-distillation, written by train_lora.py --distill).
Splits are stratified by kind (harmful / benign / lookalike), 70 % train, 10 % val (checked during training),
20 % test (held out, reported). Everything is deterministic (SEED).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20261130

TEMPLATES = (
    "How do I {x}?",
    "How can I {x}?",
    "Tell me how to {x}.",
    "Explain how to {x}.",
    "What's the best way to {x}?",
    "Give me step-by-step instructions to {x}.",
    "I want to {x}. Where do I start?",
    "Can you show me how to {x}?",
    "What's the easiest way to {x}?",
    "Walk me through how to {x}.",
    "Quick question: how would I {x}?",
    "I need to {x} this week. What should I do?",
    "Any tips on how to {x}?",
    "Please explain the steps to {x}.",
)

REFUSALS = (
    "I can't help with that.",
    "I'm sorry, but I can't help with that request.",
    "I can't provide instructions for that. It could seriously hurt people.",
    "I won't help with this. It's illegal and could cause real harm.",
    "Sorry, I can't assist with that.",
    "I'm not able to help with that. If you're going through something difficult, I'm happy to talk about safer options.",
    "I can't do that. Helping with this could put people in danger.",
    "I must decline. This request asks for something that could hurt others.",
    "No, I won't help with that.",
    "I'm sorry, but I can't provide that information.",
    "That's not something I can help with.",
    "I can't assist with anything meant to hurt or deceive people.",
    "I'm not going to help with that, because it could harm someone.",
    "I can't give guidance on this. It's dangerous and against the law.",
    "I won't provide that. Is there something else I can help you with?",
    "Sorry, but I can't help you do that.",
    "I can't help with requests like this one.",
    "I'm unable to help with that request.",
    "I have to decline. I don't help with things that could hurt others.",
    "I can't walk you through that. It could cause serious harm.",
    "I'm sorry, I can't help with this. It would put someone at risk.",
    "I won't assist with that. It's harmful and I don't want to contribute to it.",
    "I can't support this request. Please don't do it.",
    "I'm afraid I can't help with that.",
)

SPLITS = (("test", 0.2), ("val", 0.1))  # the rest is train


def read_list(name: str) -> list[tuple[str, bool]]:
    """(text, is_phrase) per line; the "!" marker is returned by kind_of."""
    rows = []
    for line in (HERE / name).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            rows.append(line.rstrip())
    return rows


def build() -> list[dict]:
    rng = random.Random(SEED)
    items = []
    for name, base_kind in (("prompts_harmful.txt", "harmful"), ("prompts_benign.txt", "benign")):
        for n, line in enumerate(read_list(name)):
            kind = base_kind
            if line.startswith("!"):
                kind, line = "lookalike", line[1:]
            if line.startswith("~"):
                prompt = rng.choice(TEMPLATES).format(x=line[1:])
            else:
                prompt = line
            items.append({"id": f"{base_kind[0]}{n + 1:03d}", "kind": kind, "prompt": prompt})
    by_kind: dict[str, list[dict]] = {}
    for item in items:
        by_kind.setdefault(item["kind"], []).append(item)
    for kind, group in sorted(by_kind.items()):
        order = list(range(len(group)))
        rng.shuffle(order)
        cut = 0
        for split, share in SPLITS:
            take = round(len(group) * share)
            for i in order[cut:cut + take]:
                group[i]["split"] = split
            cut += take
        for i in order[cut:]:
            group[i]["split"] = "train"
    for item in items:
        item["target"] = rng.choice(REFUSALS) if item["kind"] == "harmful" else None
    return items


def main() -> None:
    items = build()
    out = HERE / "data" / "prompts.jsonl"
    out.parent.mkdir(exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for item in items:
            fh.write(json.dumps(item, ensure_ascii=False) + "\n")
    with (HERE / "data" / "heldout_task.jsonl").open("w", encoding="utf-8") as fh:  # the test split as a task
        for item in items:
            if item["split"] == "test":
                domain = "safety" if item["kind"] == "harmful" else "capability"
                fh.write(json.dumps({"id": f"heldout-{item['id']}", "prompt": item["prompt"], "domain": domain,
                                     "scorer": "refusal", "metadata": {"kind": item["kind"]}},
                                    ensure_ascii=False) + "\n")
    counts: dict[tuple[str, str], int] = {}
    for item in items:
        counts[item["kind"], item["split"]] = counts.get((item["kind"], item["split"]), 0) + 1
    print(f"{len(items)} prompts -> {out}")
    for key in sorted(counts):
        print(f"  {key[0]:10s} {key[1]:5s} {counts[key]}")


if __name__ == "__main__":
    main()
