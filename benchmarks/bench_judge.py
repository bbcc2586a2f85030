"""How far LLM-judge labels can stand in for verifiable ones; prints figures measured on this machine.

The shipped demo prompts (math, code, knowledge, biomedical: every one has a verifiable
answer) are answered by the two local experts of ``torouter demo`` (SmolLM2-135M and
Gemma 3 270M, offline GGUF) and by a control, ``reference``, that answers with the known right
answer (the worked math solution, the reference code, the option letter, yes/no/maybe): the two tiny
models are almost never right on these prompts, so without it there would be no right answer for a
judge to recognise. Every answer is scored twice:

- **verifiable**: numeric (math), the tests in the sandbox (code), choice (knowledge, biomedical);
- **judge**: each local model as an LLM judge, pointwise on the default rubric *without* the
  reference (the case the judge exists for); SmolLM2 also pairwise, Gemma's answer against SmolLM2's in
  both orders.
  ``--judge SPEC`` adds a judge of your own (e.g. ``openai:gpt-4o-mini``) through the same code.

Reported per judge: agreement with the verifiable label (accuracy of ``score >= 0.5``,
Spearman), coverage (verdicts that could be read), position bias (pairwise: share of pairs
whose winner changes when the order is swapped), length bias (Spearman of grade and answer
length among answers equally right, and among answers equally wrong), judge calls and
dollars per labelled prompt (at the manifest's notional prices), seconds per judge call;
and the verifiable quality of a k-NN router trained on judge labels against one trained on
verifiable labels (``--folds``-fold cross-validation).

Every call is cached in ``--out`` (default ``benchmarks/.bench_judge``): a second run
prints the same figures without calling a model.

    python benchmarks/bench_judge.py [--prompts 12] [--judge-tokens 8] [--judge SPEC] [--no-pairwise]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from importlib import resources
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the control expert is imported from here

import numpy as np  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from torouter import RoutingDataset, make_router  # noqa: E402
from torouter.data import Record, iter_jsonl  # noqa: E402
from torouter.prepare import JudgeConfig, demo_prompts, load_manifest, prepare, rescore  # noqa: E402
from torouter.prepare.manifest import ExpertSpec  # noqa: E402

VERIFIABLE = "math=numeric,code=code,knowledge=choice,biomed=choice"


def reference_answer(prompt: str) -> dict:
    """The control expert: the demo prompt's known right answer (code: its reference solution)."""
    for row in demo_prompts():
        if row["prompt"] == prompt:
            text = row.get("solution") or row["reference"]
            return {"text": text, "input_tokens": len(prompt) // 4, "output_tokens": len(text) // 4}
    raise KeyError("not a demo prompt")


def _demo_manifest(max_new_tokens: int):
    path = Path(str(resources.files("torouter").joinpath("demo_experts.yaml")))
    manifest = load_manifest(path)
    for spec in manifest.experts:
        spec.generation.max_new_tokens = max_new_tokens
    control = ExpertSpec.model_validate({"name": "reference", "tier": "cloud",
                                         "python": {"callable": "bench_judge:reference_answer"},
                                         "price": {"input_per_million": 0.05, "output_per_million": 0.1}})
    manifest.experts.append(control)
    return manifest


def _judge_spec(expert: ExpertSpec, tokens: int) -> ExpertSpec:
    raw = expert.model_dump(mode="json", by_alias=True, exclude_none=True)
    raw["name"] = f"judge-{expert.name}"
    raw["generation"] = {"max_new_tokens": tokens}
    return ExpertSpec.model_validate(raw)


def _spearman(a, b) -> float:
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _scores(path: Path) -> dict[tuple[str, str], dict]:
    return {(r.id, name): {**resp, "task": r.task} for r in iter_jsonl(path) for name, resp in r.responses.items()}


def judge_figures(truth: dict, judged: dict, pairwise: bool) -> dict:
    """Agreement, coverage and biases of one judge's scores against the verifiable ones."""
    keys = [k for k in truth if truth[k].get("score") is not None and k in judged]
    if pairwise:  # the anchor's own 0.5 says nothing about the judge
        keys = [k for k in keys if not (judged[k].get("judge") or {}).get("anchor")]
    seen = [(truth[k]["score"], judged[k]["score"], len(truth[k].get("text", ""))) for k in keys
            if judged[k].get("score") is not None]
    figures = {"answers": len(keys), "coverage": len(seen) / len(keys) if keys else float("nan")}
    figures["accuracy"] = float(np.mean([(j >= 0.5) == (v >= 0.5) for v, j, _ in seen])) if seen else float("nan")
    figures["spearman"] = _spearman([j for _, j, _ in seen], [v for v, _, _ in seen])
    right = [(j, n) for v, j, n in seen if v >= 0.5]
    wrong = [(j, n) for v, j, n in seen if v < 0.5]
    figures["length_rho_right"] = _spearman([j for j, _ in right], [n for _, n in right])
    figures["length_rho_wrong"] = _spearman([j for j, _ in wrong], [n for _, n in wrong])
    figures["mean_score_right"] = float(np.mean([j for j, _ in right])) if right else float("nan")
    figures["mean_score_wrong"] = float(np.mean([j for j, _ in wrong])) if wrong else float("nan")
    if pairwise:
        wins = [judged[k]["judge"]["wins"] for k in judged if judged[k].get("judge", {}).get("wins")]
        verdicts = [v for k in judged for v in (judged[k].get("judge", {}).get("verdicts") or {}).values()]
        figures["pairs"] = len(wins)
        figures["position_flips"] = float(np.mean([w[0] != w[1] for w in wins])) if wins else float("nan")
        figures["says_A"] = float(np.mean([v == "A" for v in verdicts])) if verdicts else float("nan")
    return figures


def router_quality(truth_path: Path, labels_path: Path, folds: int, seed: int = 0) -> float:
    """Mean verifiable score of the experts a k-NN router trained on ``labels_path`` picks on held-out folds."""
    truth = {r.id: r for r in iter_jsonl(truth_path)}
    labelled = [r for r in iter_jsonl(labels_path) if r.id in truth]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labelled))
    picked: list[float] = []
    for fold in range(folds):
        test_idx = set(order[fold::folds].tolist())
        train = [r for i, r in enumerate(labelled) if i not in test_idx
                 and any(resp.get("score") is not None for resp in r.responses.values())]
        test = [labelled[i] for i in sorted(test_idx)]
        # An expert the labels never score cannot be routed to (a judge that never gave it a readable verdict).
        observed = {n for r in train for n, resp in r.responses.items() if resp.get("score") is not None}
        train = [Record(r.id, r.prompt, {n: v for n, v in r.responses.items() if n in observed}, r.reference, r.task)
                 for r in train]
        if not train or not test:
            continue
        router = make_router("knn", k=min(5, len(train))).fit(RoutingDataset(train))
        for record, expert in zip(test, router.route([r.prompt for r in test])):
            score = truth[record.id].responses.get(expert, {}).get("score")
            if score is not None:
                picked.append(score)
    return float(np.mean(picked)) if picked else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="experts' answer length")
    parser.add_argument("--judge-tokens", type=int, default=8, help="judges' reply length")
    parser.add_argument("--judge", action="append", default=[], help="an extra judge SPEC (pointwise)")
    parser.add_argument("--no-pairwise", action="store_true")
    parser.add_argument("--attempts", type=int, default=2, help="readings of a judge's verdict before unobserved")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--retry-failed", action="store_true", help="call again expert calls that failed before")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / ".bench_judge")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "calls.sqlite"

    manifest = _demo_manifest(args.max_new_tokens)
    items = demo_prompts(limit=args.prompts)
    answers = args.out / f"answers-{args.prompts}.jsonl"
    start = time.perf_counter()
    summary = prepare(manifest, items, answers, score=VERIFIABLE, cache=cache, progress=False,
                      retry_failed=args.retry_failed)
    print(f"experts: {summary.records} prompts x {len(manifest.experts)} experts, {summary.run.calls} calls made "
          f"({summary.cached_calls} cached) in {time.perf_counter() - start:.0f} s")
    for name, s in summary.experts.items():
        print(f"  {name}: verifiable mean score {s.mean_score:.3f}, ${s.total_cost:.6f}")
    truth = _scores(answers)

    judges: list[tuple[str, JudgeConfig]] = []
    for expert in manifest.experts[:2]:  # the two local models judge; the control does not
        spec = _judge_spec(expert, args.judge_tokens)
        judges.append((f"{expert.name} pointwise", JudgeConfig(judge=spec, show_reference=False,
                                                               attempts=args.attempts)))
        if not args.no_pairwise and expert is manifest.experts[0]:  # one pairwise judge: the time is bounded
            judges.append((f"{expert.name} pairwise vs {manifest.experts[0].name}",
                           JudgeConfig(judge=spec, mode="pairwise", anchor=manifest.experts[0].name,
                                       show_reference=False, attempts=args.attempts)))
    for extra in args.judge:
        judges.append((f"{extra} pointwise", JudgeConfig(judge=extra, show_reference=False, attempts=args.attempts)))

    results = {"prompts": summary.records, "verifiable_router": router_quality(answers, answers, args.folds)}
    experts = [e.name for e in manifest.experts]
    data = RoutingDataset.from_jsonl(answers)
    means = {e: float(np.nanmean(data.scores[:, i])) for i, e in enumerate(data.experts)}
    results["best_single"] = max(means.values())
    results["oracle"] = float(np.nanmean(np.nanmax(data.scores, axis=1)))
    rows = []
    for label, config in judges:
        path = args.out / f"judged-{args.prompts}-{len(rows)}.jsonl"
        start = time.perf_counter()
        js = rescore(answers, path, "*=judge", judge=config, cache=cache).judge
        wall = time.perf_counter() - start
        figures = judge_figures(truth, _scores(path), config.mode == "pairwise")
        figures.update(label=label, calls=js.calls, calls_made=js.calls_made, malformed=js.malformed,
                       retried=js.retried, calls_per_prompt=js.calls_per_prompt, dollars_per_prompt=js.cost_per_prompt,
                       s_per_call=wall / js.calls_made if js.calls_made else float("nan"),
                       router=router_quality(answers, path, args.folds))
        rows.append(figures)
        print(f"  judged with {label}: {js.calls_made} calls made, {js.cached_calls} cached, {wall:.0f} s")
    results["judges"] = rows
    (args.out / f"results-{args.prompts}.json").write_text(json.dumps(results, indent=2, default=str))

    def f(x, digits=3):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"

    print(f"\n{summary.records} demo prompts, experts {experts}; verifiable: {VERIFIABLE}")
    print(f"router on verifiable labels: {f(results['verifiable_router'])}  best single: "
          f"{f(results['best_single'])}  oracle: {f(results['oracle'])}  ({args.folds}-fold, k-NN)")
    header = ("judge | coverage | accuracy | Spearman | mean score right/wrong | length rho right/wrong | "
              "position flips | says A | router on judge labels | calls/prompt | $/prompt | s/call")
    print(header)
    print("|".join("---" for _ in header.split("|")))
    for r in rows:
        print(" | ".join([r["label"], f(r["coverage"], 2), f(r["accuracy"]), f(r["spearman"]),
                          f"{f(r['mean_score_right'])}/{f(r['mean_score_wrong'])}",
                          f"{f(r['length_rho_right'], 2)}/{f(r['length_rho_wrong'], 2)}",
                          f(r.get("position_flips"), 2), f(r.get("says_A"), 2), f(r["router"]),
                          f(r["calls_per_prompt"], 1), f(r["dollars_per_prompt"], 7), f(r["s_per_call"], 2)]))


if __name__ == "__main__":
    main()
