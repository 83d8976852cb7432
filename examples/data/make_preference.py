"""Generate the preference and GRPO demo datasets (examples/methods/{dpo,orpo,kto,grpo}.yaml).

Like make_support_chat.py: templates, a seeded `random.Random`, no network, the same bytes on
every run, short examples (the demo tokenizer has one token per byte).

- support-dpo(-eval).jsonl: OpenAI's preference format (input.messages, preferred_output,
  non_preferred_output): a question to Northwind Outfitters' support desk, the answer that states
  the shop's policy politely (preferred) and a curt, wrong one of about the same length (dispreferred).
- support-kto(-eval).jsonl: the same answers unpaired, as TRL's prompt/completion/label.
- arithmetic-grpo(-eval).jsonl: "What is a + b?" prompts with the answer in an `answer` field,
  which the GRPO example's stringCheck grader reads as {{item.answer}}.

    python examples/data/make_preference.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEM = "You are Northwind Outfitters' support assistant."

POLICIES = [
    (
        "How long do I have to return {p}?",
        "You can return the {p} within 30 days for a full refund.",
        "You can return the {p} within 9 days for store credit only.",
    ),
    (
        "Is shipping free for {p}?",
        "Shipping is free on orders over $50, so the {p} ships free.",
        "Shipping costs $25 on every order, even for the {p}, sorry.",
    ),
    (
        "Is there a warranty on the {p}?",
        "The {p} has a 2-year warranty against defects.",
        "The {p} has no warranty; defects are on you.",
    ),
    (
        "Can I exchange the {p} for another size?",
        "Yes, exchanges for the {p} are free within 30 days.",
        "No, the {p} cannot be exchanged; buy a new one.",
    ),
]
"""(question, the shop's policy stated politely, a wrong and curt answer of about the same length:
the demo model cannot prefer one by length alone)."""
PRODUCTS = [
    "backpack",
    "boots",
    "jacket",
    "tent",
    "poles",
    "rain shell",
    "fleece",
    "sleeping bag",
    "headlamp",
    "gloves",
]


def pairs(r: random.Random, n: int) -> list[tuple[str, str, str]]:
    out = []
    for _ in range(n):
        q, good, bad = r.choice(POLICIES)
        p = r.choice(PRODUCTS)
        out.append((q.format(p=p), good.format(p=p), bad.format(p=p)))
    return out


def dpo_record(q: str, good: str, bad: str) -> dict:
    return {
        "input": {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]},
        "preferred_output": [{"role": "assistant", "content": good}],
        "non_preferred_output": [{"role": "assistant", "content": bad}],
    }


def kto_records(q: str, good: str, bad: str) -> list[dict]:
    prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
    return [
        {"prompt": prompt, "completion": [{"role": "assistant", "content": good}], "label": True},
        {"prompt": prompt, "completion": [{"role": "assistant", "content": bad}], "label": False},
    ]


def grpo_record(r: random.Random) -> dict:
    a, b = r.randint(0, 4), r.randint(0, 4)
    return {"prompt": [{"role": "user", "content": f"What is {a} + {b}? Answer with the digit."}], "answer": str(a + b)}


def write(name: str, records: list[dict]) -> None:
    with open(HERE / name, "w") as f:
        for rec in records:
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")


def main() -> None:
    r = random.Random(19)
    write("support-dpo.jsonl", [dpo_record(*t) for t in pairs(r, 64)])
    write("support-dpo-eval.jsonl", [dpo_record(*t) for t in pairs(r, 16)])
    write("support-kto.jsonl", [x for t in pairs(r, 32) for x in kto_records(*t)])
    write("support-kto-eval.jsonl", [x for t in pairs(r, 8) for x in kto_records(*t)])
    write("arithmetic-grpo.jsonl", [grpo_record(r) for _ in range(64)])
    write("arithmetic-grpo-eval.jsonl", [grpo_record(r) for _ in range(8)])


if __name__ == "__main__":
    main()
