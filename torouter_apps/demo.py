"""``torouter demo``: the paper's whole pipeline, offline, with real local experts.

1. Data preparation: the 64 shipped prompts (math, code, general knowledge,
   biomedical) go to both local experts (SmolLM2-135M-Instruct and Gemma 3 270M);
   each answer's tokens, latency, cost and reference NLL are recorded and the answer
   is scored against the reference with BERTScore.
2. Router training: soft labels ``softmax(10 * score)`` train an MLP router and a
   fine-tuned BERT router on three quarters of the prompts.
3. Evaluation on the held-out quarter: the table, the cost-quality plot and the
   edge-to-cloud report, written to files.
4. Deployment: a LangChain chain on ``ChatTORouter`` answers new questions, printing
   which expert answered each and why.

Every expert call and score is cached in SQLite and trained routers are reused when
the data has not changed, so a second run takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

from torouter.data import RoutingDataset

DEMO_EXPERTS = Path(str(resources.files("torouter").joinpath("demo_experts.yaml")))
"""The two local experts' manifest, shipped in the core package beside its demo prompts."""

NEW_QUESTIONS = [
    "A baker makes 12 loaves a day for 5 days and sells 41. How many loaves are left?",
    "Write a Python function that returns the largest element of a list.",
    "Which planet is known as the Red Planet?",
    "Does regular aerobic exercise lower resting blood pressure in adults?",
]
EDGE_COST_WEIGHT_SHARE = 0.5  # the chain's cost weight, as a share of the sweep's "only cost matters" end


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _router(method: str, train: RoutingDataset, data_hash: str, directory: Path, console, **params):
    """Load the router saved for this exact training data, or train and save a new one."""
    from torouter.routers import RouterFileError, load_router, make_router

    key = hashlib.sha256(json.dumps([data_hash, method, params], sort_keys=True).encode()).hexdigest()[:16]
    try:
        router = load_router(directory)
        if router.fit_info_.get("demo_key") == key:
            console.print(f"[dim]{method} router: reusing {directory} (same data and settings)[/dim]")
            return router
    except RouterFileError:
        pass
    start = time.perf_counter()
    router = make_router(method, **params).fit(train)
    router.fit_info_["demo_key"] = key
    router.save(directory)
    console.print(f"{method} router trained in {time.perf_counter() - start:.1f}s -> {directory}")
    return router


class PhaseTimer:
    """Seconds spent in each phase of the demo, so a first run shows where its time goes.

    Model loading (on first use the GGUF weights are dequantized, then a converted copy
    is reused) is counted as its own phase, ``convert``, and taken out of the phase it
    happened in.
    """

    PHASES = ("convert", "answer", "score", "train", "evaluate", "chain")

    def __init__(self):
        self.seconds = {phase: 0.0 for phase in self.PHASES}
        from torouter.prepare.local import LOADS

        self.first_use: list[str] = []
        self._loads_seen = len(LOADS)  # loads before the demo started are not its own

    def model_loading(self) -> float:
        """Seconds of model loads since the last call (``torouter.prepare.local.LOADS``)."""
        from torouter.prepare.local import LOADS

        new = LOADS[self._loads_seen:]
        self._loads_seen = len(LOADS)
        self.first_use += [f"{Path(load.source).name} dequantized in {load.seconds:.1f}s"
                           for load in new if load.converted]
        seconds = sum(load.seconds for load in new)
        self.seconds["convert"] += seconds
        return seconds

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += max(0.0, seconds - self.model_loading())

    def table(self, total: float):
        from rich.table import Table

        table = Table(title="demo time by phase")
        table.add_column("phase")
        table.add_column("seconds", justify="right")
        table.add_column("share", justify="right")
        for phase, seconds in self.seconds.items():
            table.add_row(phase, f"{seconds:.1f}", f"{seconds / total:.0%}" if total else "-")
        table.add_row("total", f"{total:.1f}", "100%")
        return table


def run_demo(out: str | Path = "runs/demo", bert_epochs: int = 6, questions: list[str] | None = None,
             console=None) -> dict[str, Any]:
    """Run the demo end to end; returns the evaluation reports and the chain's answers."""
    from rich.console import Console
    from rich.rule import Rule

    from torouter import evaluate as ev
    from torouter.prepare import demo_prompts, load_manifest, prepare

    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    timer = PhaseTimer()
    manifest = load_manifest(DEMO_EXPERTS)

    console.print(Rule("1. data preparation: every prompt to every expert, answers scored with BERTScore"))
    prompts = demo_prompts()
    phase = time.perf_counter()
    summary = prepare(manifest, prompts, out / "data.jsonl", score="bertscore", cache=out / "calls.sqlite")
    prepare_s = time.perf_counter() - phase
    # The runner's own time leaves out the model loading before it; the rest is scoring.
    timer.add("score", prepare_s - summary.run.elapsed_s)
    timer.seconds["answer"] += summary.run.elapsed_s
    for note in timer.first_use:
        console.print(f"first use: {note} (kept converted in the cache for later runs)")
    console.print(f"{summary.records} prompts x {len(manifest.experts)} experts "
                  f"({summary.cached_calls} calls from the cache) -> {summary.out}")
    for problem in summary.problems:
        console.print(f"[yellow]scoring problem: {problem}[/yellow]")

    console.print(Rule("2. router training on soft labels softmax(10 * score)"))
    data = RoutingDataset.from_jsonl(out / "data.jsonl")
    train, test = data.split(0.25, seed=0)
    data_hash = _sha256(out / "data.jsonl")
    phase = time.perf_counter()
    console.print(f"{len(train)} training prompts, {len(test)} held out")
    routers = {
        "mlp": _router("mlp", train, data_hash, out / "routers" / "mlp", console, temperature=10.0),
        "bert": _router("bert", train, data_hash, out / "routers" / "bert", console, temperature=10.0,
                        epochs=bert_epochs, batch_size=8, lr=1e-4, max_length=128),
    }

    timer.add("train", time.perf_counter() - phase)

    console.print(Rule("3. evaluation on the held-out prompts"))
    phase = time.perf_counter()
    reports = {}
    for method, router in routers.items():
        report = ev.evaluate(router, test)
        ev.print_report(report)
        ev.save_json(report, out / f"eval_{method}.json")
        ev.plot(report, out / f"cost_quality_{method}.png",
                title=f"torouter demo: {method} router on {len(test)} held-out prompts")
        reports[method] = report
    edge_name = next(e.name for e in manifest.experts if e.tier == "edge")
    edge_report = ev.edge_cloud_report(routers["mlp"], test, edge=edge_name)
    ev.print_edge_report(edge_report)
    ev.save_json(edge_report, out / "edge_to_cloud.json")
    console.print(f"reports: {out}/eval_mlp.json, eval_bert.json, edge_to_cloud.json; "
                  f"plots: {out}/cost_quality_mlp.png, cost_quality_bert.png")

    timer.add("evaluate", time.perf_counter() - phase)

    console.print(Rule("4. a LangChain chain on ChatTORouter answering new questions"))
    phase = time.perf_counter()
    answers = answer_with_chain(routers["mlp"], manifest, questions or NEW_QUESTIONS, console)
    timer.add("chain", time.perf_counter() - phase)
    elapsed = time.perf_counter() - start
    console.print()
    console.print(timer.table(elapsed))
    console.print(f"demo finished in {elapsed:.0f}s; everything is in {out}/")
    return {"reports": reports, "edge_to_cloud": edge_report, "answers": answers, "seconds": elapsed,
            "phases": dict(timer.seconds)}


def answer_with_chain(router, manifest, questions: list[str], console) -> list[dict[str, Any]]:
    """Route the questions through ``prompt | ChatTORouter`` (one ``batch``) and say who answered each and why."""
    from langchain_core.prompts import ChatPromptTemplate

    from langchain_torouter import ChatManifestExpert, ChatTORouter
    from torouter.evaluate import default_cost_weights

    costs = router.costs()
    weights = default_cost_weights(costs)
    cost_weight = weights[int(len(weights) * EDGE_COST_WEIGHT_SHARE)]
    llm = ChatTORouter(experts=ChatManifestExpert.from_manifest(manifest), router=router, cost_weight=cost_weight)
    chain = ChatPromptTemplate.from_messages([("user", "{question}")]) | llm
    console.print(f"cost_weight = {cost_weight:.4g} (quality units per dollar); expected $/call: "
                  + ", ".join(f"{e} {c:.2e}" for e, c in zip(router.experts_, costs)))
    answers = []
    # One batch: the router decides for every question in one call, and the questions that go to
    # the same local expert are answered together in one batch of its model.
    messages = chain.batch([{"question": question} for question in questions])
    for question, message in zip(questions, messages):
        meta = message.response_metadata["torouter"]
        scores = meta["scores"]
        why = ", ".join(f"{e}: predicted {scores[e]:.3f} - {cost_weight:.3g} x ${c:.2e}"
                        f" = {scores[e] - cost_weight * c:.3f}" for e, c in zip(router.experts_, costs))
        console.print(f"\n[bold]Q:[/bold] {question}\n[bold]{meta['expert']}[/bold] answered ({why})")
        console.print(f"[bold]A:[/bold] {message.content.strip()[:300]}")
        answers.append({"question": question, "expert": meta["expert"], "scores": scores,
                        "answer": message.content})
    return answers
