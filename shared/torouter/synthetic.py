"""A small synthetic routing dataset for trying torouter without any expert to call.

Prompts are real questions from four domains built from templates; the four
fictional experts' scores are drawn from per-domain distributions (a cheap edge
model good at trivia, a code model, a biomedical model and an expensive generalist),
so there is something for a router to learn. The scores are simulated, not measured:
use ``torouter import routerbench`` or ``torouter prepare`` for real data.
"""

from __future__ import annotations

import numpy as np

from .data import Record

EXPERTS = {
    # name: (cost per call in $, mean score per domain)
    "edge-small": (2e-5, {"math": 0.35, "code": 0.25, "trivia": 0.80, "biomed": 0.35}),
    "code-7b": (2e-4, {"math": 0.60, "code": 0.85, "trivia": 0.55, "biomed": 0.40}),
    "med-7b": (3e-4, {"math": 0.40, "code": 0.30, "trivia": 0.60, "biomed": 0.85}),
    "cloud-large": (3e-3, {"math": 0.90, "code": 0.88, "trivia": 0.88, "biomed": 0.86}),
}

_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun"]
_ITEMS = ["apples", "marbles", "books", "stamps", "coins", "pencils", "tickets", "cookies"]
_COUNTRIES = ["France", "Japan", "Kenya", "Peru", "Canada", "Norway", "Egypt", "Vietnam", "Chile", "Poland"]
_THINGS = ["the Eiffel Tower", "the Great Wall", "the printing press", "the telephone", "penicillin",
           "the Mona Lisa", "the theory of relativity", "the World Wide Web"]
_FUNCS = ["reverses a string", "checks whether a number is prime", "merges two sorted lists",
          "counts the vowels in a word", "returns the n-th Fibonacci number", "flattens a nested list",
          "removes duplicates from a list while keeping order", "computes the greatest common divisor"]
_DRUGS = ["metformin", "aspirin", "warfarin", "atorvastatin", "amoxicillin", "lisinopril", "insulin", "ibuprofen"]
_CONDITIONS = ["type 2 diabetes", "hypertension", "atrial fibrillation", "asthma", "migraine",
               "rheumatoid arthritis", "chronic kidney disease", "hypothyroidism"]

_TEMPLATES = {
    "math": [
        "{a} has {x} {item}. {b} gives {a} {y} more, then {a} gives away {z}. How many {item} does {a} have now?",
        "A train travels {x} km in {y} hours. What is its average speed in km per hour?",
        "What is {x} multiplied by {y}, minus {z}?",
        "{a} buys {x} {item} at {y} dollars each and pays with a {w} dollar bill. How much change is due?",
        "Solve for n: {x} * n + {y} = {w}.",
    ],
    "code": [
        "Write a Python function that {f}.",
        "Implement in Python a function that {f}, with a docstring and tests.",
        "How would you write a function that {f}? Give Python code.",
        "Fix this Python function so that it {f}: def f(x): return x",
    ],
    "trivia": [
        "What is the capital of {c}?",
        "Who is credited with {t}?",
        "In which year was {t} first presented to the public?",
        "Which continent is {c} on?",
        "What language is most widely spoken in {c}?",
    ],
    "biomed": [
        "What is the mechanism of action of {d}?",
        "Is {d} a first-line treatment for {k}? Answer yes, no or maybe.",
        "What are the common adverse effects of {d} in patients with {k}?",
        "Which biomarkers are used to monitor {k}?",
        "Does {d} interact with treatments for {k}?",
    ],
}


def make_synthetic(n: int = 240, seed: int = 0) -> list[Record]:
    """``n`` records spread evenly over the four domains, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    domains = list(_TEMPLATES)
    records = []
    for i in range(n):
        domain = domains[i % len(domains)]
        template = _TEMPLATES[domain][rng.integers(len(_TEMPLATES[domain]))]
        prompt = template.format(
            a=rng.choice(_NAMES), b=rng.choice(_NAMES), item=rng.choice(_ITEMS), c=rng.choice(_COUNTRIES),
            t=rng.choice(_THINGS), f=rng.choice(_FUNCS), d=rng.choice(_DRUGS), k=rng.choice(_CONDITIONS),
            x=int(rng.integers(2, 90)), y=int(rng.integers(2, 40)), z=int(rng.integers(1, 20)),
            w=int(rng.integers(100, 500)))
        responses = {}
        for name, (cost, means) in EXPERTS.items():
            score = float(np.clip(rng.normal(means[domain], 0.12), 0.0, 1.0))
            output_tokens = int(rng.integers(20, 200))
            input_tokens = len(prompt.split()) * 4 // 3
            responses[name] = {
                "score": round(score, 4),
                "cost": round(cost * (1 + (input_tokens + output_tokens) / 400), 8),
                "latency_s": round(output_tokens / (120 if name == "edge-small" else 40) + 0.05, 3),
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "nll": round(float(3.0 - 2.5 * score + rng.normal(0, 0.1)), 4),
            }
        records.append(Record(id=f"synthetic-{i}", prompt=prompt, responses=responses, task=domain))
    return records
