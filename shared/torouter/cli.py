"""The ``torouter`` command line: train, route, evaluate, prepare and import routing data.

Commands built on the adapters (``serve``, ``demo``) come from installed packages as
``torouter.commands`` plugins, so the core never imports them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Optional

import typer
import typer.main
import typer.models

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train and evaluate TO-Router style LLM routers.")
import_app = typer.Typer(no_args_is_help=True, help="Convert published routing benchmarks, and prompts from an "
                                                    "application's traffic, to torouter JSONL.")
app.add_typer(import_app, name="import")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _writable(*paths: Optional[Path], folder: bool = False) -> None:
    """Refuse, before any work is spent, outputs that cannot be written where they are asked for."""
    from .data import OutputPathError, check_writable

    for path in paths:
        if path is None:
            continue
        try:
            check_writable(path, folder=folder)
        except OutputPathError as exc:
            _fail(str(exc))


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """An output that fails while being written (a full disk) is a clear error, not a traceback."""
    try:
        yield
    except OSError as exc:
        _fail(f"{path}: cannot write: {exc.strerror or exc}")


def _load_dataset(path: Path):
    from .data import DataError, RoutingDataset

    try:
        return RoutingDataset.from_jsonl(path)
    except DataError as exc:
        _fail(str(exc))


def _load_router(path: Path):
    from .routers import RouterFileError, load_router

    try:
        return load_router(path)
    except (RouterFileError, ValueError) as exc:
        _fail(str(exc))


@app.command()
def train(
    data: Path = typer.Argument(..., help="Routing data (JSONL)."),
    method: str = typer.Option("mlp", help="Router: knn, cluster, mlp or bert (also random, best-single)."),
    out: Path = typer.Option(..., help="Directory to save the trained router in."),
    temperature: Optional[float] = typer.Option(None, help="Soft-label temperature T (mlp, bert; default 10)."),
    encoder: Optional[str] = typer.Option(None, help="Sentence encoder / BERT model id or path (default MiniLM)."),
    k: Optional[int] = typer.Option(None, help="Neighbours for knn (default: chosen by cross-validation)."),
    clusters: Optional[int] = typer.Option(None, help="k-means clusters for cluster (default: chosen by cross-validation)."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs (mlp, bert)."),
    seed: Optional[int] = typer.Option(None, help="Random seed."),
    device: Optional[str] = typer.Option(None, help="torch device (default: cuda if available, else cpu)."),
    backend: Optional[str] = typer.Option(
        None, help="What runs the encoder (knn, cluster, mlp): sentence-transformers (default), onnx, onnx-int8 "
                   "or static (model2vec, fastest); saved with the router."),
):
    """Fit a router on routing data and save it."""
    from .routers import get_router_class, make_router
    from .routers.base import check_replaceable

    try:
        cls = get_router_class(method)
    except ValueError as exc:
        _fail(str(exc))
    given = {"temperature": temperature, "encoder": encoder, "k": k, "n_clusters": clusters, "epochs": epochs,
             "seed": seed, "device": device, "backend": backend}
    given = {key: value for key, value in given.items() if value is not None}
    unused = sorted(set(given) - set(cls._param_names()))
    if unused:
        flags = {"n_clusters": "clusters"}
        _fail(f"router {method!r} does not use {', '.join('--' + flags.get(u, u) for u in unused)}")
    _writable(out, folder=True)  # before training, which may take hours
    try:
        check_replaceable(out)
    except FileExistsError as exc:
        _fail(str(exc))
    if backend is not None:
        from .encoders import check_backend

        try:
            check_backend(backend)
        except ValueError as exc:
            _fail(str(exc))
    dataset = _load_dataset(data)
    router = make_router(method, **given)
    try:
        router.fit(dataset)
    except (ValueError, ImportError) as exc:  # ImportError: a --backend whose packages are not installed
        _fail(str(exc))
    try:
        router.save(out)
    except FileExistsError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{out}: cannot save the router: {exc.strerror or exc}")
    info = ", ".join(f"{k}={v}" for k, v in router.fit_info_.items())
    typer.echo(f"trained {method} router on {len(dataset)} prompts over {len(router.experts_)} experts "
               f"({info}); saved to {out}")


@app.command()
def route(
    router_dir: Path = typer.Argument(..., help="Saved router directory."),
    data: Path = typer.Argument(..., help="Prompts (routing-data JSONL; only id and prompt are read)."),
    out: Path = typer.Option(..., help="Where to write one {id, expert} line per record."),
    cost_weight: float = typer.Option(0.0, help="Quality units given up per dollar saved (0: quality only)."),
    max_cost: Optional[float] = typer.Option(None, help="Skip experts whose expected cost exceeds this."),
    engine: str = typer.Option("local", help="Where the work runs: local (this process) or ray (a Ray cluster; "
                                              "needs torouter[ray])."),
    ray_address: Optional[str] = typer.Option(None, help="--engine ray: join this cluster (HOST:PORT, "
                                                         "ray://HOST:PORT or auto) instead of starting Ray here."),
    ray_cpus: Optional[int] = typer.Option(None, min=1, help="--engine ray without --ray-address: CPUs of the "
                                                             "local Ray instance (default: all)."),
):
    """Choose an expert for every prompt of a file."""
    from .data import DataError, iter_prompts, write_jsonl
    from .engines import EngineError, check_engine

    _writable(out)
    router = _load_router(router_dir)
    try:
        ids, prompts = zip(*iter_prompts(data))
    except DataError as exc:
        _fail(str(exc))
    try:
        if check_engine(engine) == "ray":
            from .engines.ray_route import route_on_ray

            experts = route_on_ray(router_dir, list(prompts), cost_weight=cost_weight, max_cost=max_cost,
                                   address=ray_address, num_cpus=ray_cpus)
        else:
            experts = router.route(list(prompts), cost_weight=cost_weight, max_cost=max_cost)
    except EngineError as exc:
        _fail(str(exc))
    with _writing(out):
        write_jsonl(out, ({"id": i, "expert": e} for i, e in zip(ids, experts)))
    typer.echo(f"routed {len(ids)} prompts to {out}")


@app.command("eval")
def evaluate_cmd(
    router_dir: Path = typer.Argument(..., help="Saved router directory."),
    data: Path = typer.Argument(..., help="Held-out routing data (JSONL)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full report as JSON."),
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="Write the cost-quality plot (PNG)."),
):
    """Report the router against every expert, random, best-single and the oracle."""
    import torouter.evaluate as ev

    _writable(json_out, plot_out)
    router = _load_router(router_dir)
    dataset = _load_dataset(data)
    try:
        report = ev.evaluate(router, dataset)
    except ValueError as exc:
        _fail(str(exc))
    ev.print_report(report)
    if json_out:
        with _writing(json_out):
            ev.save_json(report, json_out)
        typer.echo(f"report: {json_out}")
    if plot_out:
        with _writing(plot_out):
            ev.plot(report, plot_out)
        typer.echo(f"plot: {plot_out}")


@app.command()
def edge(
    router_dir: Path = typer.Argument(..., help="Saved router directory."),
    data: Path = typer.Argument(..., help="Held-out routing data (JSONL)."),
    edge_expert: Optional[str] = typer.Option(None, "--edge", help="The local expert (default: the cheapest)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON."),
):
    """Edge-to-cloud: how much can stay on the local expert, at what quality and cost."""
    import torouter.evaluate as ev

    _writable(json_out)
    router = _load_router(router_dir)
    dataset = _load_dataset(data)
    try:
        report = ev.edge_cloud_report(router, dataset, edge=edge_expert)
    except ValueError as exc:
        _fail(str(exc))
    ev.print_edge_report(report)
    if json_out:
        with _writing(json_out):
            ev.save_json(report, json_out)
        typer.echo(f"report: {json_out}")


# --- changing a trained router's experts without retraining it (routers/profiles.py) --------------

def _save_changed(router, out: Path) -> None:
    try:
        router.save(out)
    except FileExistsError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{out}: cannot save the router: {exc.strerror or exc}")


@app.command("add-expert")
def add_expert_cmd(
    router_dir: Path = typer.Argument(..., help="Saved router directory (cluster or knn)."),
    data: Path = typer.Argument(..., help="The new expert's scored answers (routing-data JSONL, as torouter "
                                          "prepare writes it; e.g. on the prompts of torouter calibration-set)."),
    expert: str = typer.Option(..., help="The expert to add; an expert the router has is re-profiled (replaced)."),
    out: Path = typer.Option(..., help="Directory to save the changed router in (may be ROUTER_DIR)."),
):
    """Add (or re-profile) one expert from its scored answers to a calibration sample, without retraining."""
    from .routers.profiles import ExpertProfileError

    _writable(out, folder=True)
    router = _load_router(router_dir)
    dataset = _load_dataset(data)
    replaced = expert in router.experts_
    try:
        router.add_expert(expert, dataset)
    except (ExpertProfileError, ValueError, ImportError) as exc:
        _fail(str(exc))
    _save_changed(router, out)
    n = router.fit_info_["expert_changes"][-1]["n_prompts"]
    typer.echo(f"{'replaced' if replaced else 'added'} expert {expert!r} from {n} scored prompts "
               f"(mean cost ${router.expert_costs_[expert]:.6f}); the router has {len(router.experts_)} experts; "
               f"saved to {out}")


@app.command("drop-expert")
def drop_expert_cmd(
    router_dir: Path = typer.Argument(..., help="Saved router directory (cluster or knn)."),
    expert: str = typer.Option(..., help="The expert to drop."),
    out: Path = typer.Option(..., help="Directory to save the changed router in (may be ROUTER_DIR)."),
):
    """Drop one expert from a router; the others' estimates stay as they were."""
    from .routers.profiles import ExpertProfileError

    _writable(out, folder=True)
    router = _load_router(router_dir)
    try:
        router.drop_expert(expert)
    except ExpertProfileError as exc:
        _fail(str(exc))
    _save_changed(router, out)
    typer.echo(f"dropped expert {expert!r}; the router has {len(router.experts_)} experts; saved to {out}")


@app.command("calibration-set")
def calibration_set_cmd(
    router_dir: Path = typer.Argument(..., help="Saved router directory."),
    data: Path = typer.Option(..., help="The router's training data (JSONL): the prompts to choose from "
                                        "(a router keeps no prompt texts)."),
    n: int = typer.Option(100, min=1, help="How many prompts to choose (each costs one call of the new expert)."),
    out: Path = typer.Option(..., help="Prompts JSONL to write, for torouter prepare --prompts."),
    seed: int = typer.Option(0, help="Random seed (the same seed chooses the same prompts)."),
    strategy: str = typer.Option("random", help="random (measured best) or stratified (over the router's "
                                                "clusters)."),
):
    """Choose the prompts a new expert should answer so a router can add it (a seeded sample)."""
    from .calibration import STRATEGIES, calibration_set

    if strategy not in STRATEGIES:
        _fail(f"unknown --strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    _writable(out)
    router = _load_router(router_dir)
    dataset = _load_dataset(data)
    try:
        with _writing(out):
            count = calibration_set(router, dataset, n, out, seed=seed, strategy=strategy)
    except (ValueError, ImportError) as exc:
        _fail(str(exc))
    typer.echo(f"wrote {count} of {len(dataset)} prompts to {out}; answer and score them with "
               f"torouter prepare --prompts {out}, then torouter add-expert")


@import_app.command("routerbench")
def import_routerbench(
    files: list[Path] = typer.Argument(..., help="RouterBench CSV files (or its pickle, with --allow-pickle)."),
    out: Path = typer.Option(..., help="Output routing data (JSONL)."),
    allow_pickle: bool = typer.Option(False, help="Read .pkl files (runs code in them: trusted files only)."),
):
    """Convert RouterBench data into torouter's routing-data format."""
    from .data import DataError, write_jsonl
    from .importers import read_routerbench

    _writable(out)
    try:
        records = read_routerbench(files, allow_pickle=allow_pickle)
    except DataError as exc:
        _fail(str(exc))
    with _writing(out):
        write_jsonl(out, records)
    experts = {name for r in records for name in r.responses}
    typer.echo(f"wrote {len(records)} records over {len(experts)} experts to {out}")


def _write_traffic(rows: list, out: Path, dedup: bool, similar: Optional[float], max_prompts: Optional[int],
                   seed: int, what: str) -> None:
    """Dedup, sample and write imported prompts, saying what was kept."""
    from .data import DataError, write_jsonl
    from .traffic import dedup_prompts, sample_prompts, task_counts

    read = len(rows)
    dropped = 0
    try:
        if dedup or similar is not None:
            rows, dropped = dedup_prompts(rows, similar)
        if max_prompts is not None:
            rows = sample_prompts(rows, max_prompts, seed)
    except DataError as exc:
        _fail(str(exc))
    if not rows:
        _fail(f"no prompts found in the given {what} files")
    with _writing(out):
        write_jsonl(out, rows)
    tasks = ", ".join(f"{t} {n}" for t, n in sorted(task_counts(rows).items()))
    typer.echo(f"wrote {len(rows)} prompts to {out} ({read} read, {dropped} repeats dropped; tasks: {tasks})")


_DEDUP_HELP = "Drop repeated prompts (same text up to case, spacing and punctuation)."
_SIMILAR_HELP = "Also drop near-identical prompts: word 3-shingle Jaccard at least this (0-1)."
_MAX_HELP = "Keep at most N prompts: a sample stratified by task."


@import_app.command("openai")
def import_openai(
    files: list[Path] = typer.Argument(..., help='OpenAI chat-format JSONL files: {"messages": [...]} per line.'),
    out: Path = typer.Option(..., help="Prompts JSONL for torouter prepare --prompts."),
    include_answers: bool = typer.Option(False, help="Keep each line's final assistant message as 'answer'."),
    dedup: bool = typer.Option(True, help=_DEDUP_HELP),
    similar: Optional[float] = typer.Option(None, help=_SIMILAR_HELP),
    max_prompts: Optional[int] = typer.Option(None, help=_MAX_HELP),
    seed: int = typer.Option(0, help="Seed of the --max-prompts sample."),
):
    """Prompts from OpenAI chat-format logs, ready for torouter prepare."""
    from .data import DataError
    from .traffic import read_openai_chat

    _writable(out)
    try:
        rows = read_openai_chat(files, include_answers=include_answers)
    except DataError as exc:
        _fail(str(exc))
    _write_traffic(rows, out, dedup, similar, max_prompts, seed, "OpenAI chat")


@import_app.command("langsmith")
def import_langsmith(
    files: list[Path] = typer.Argument(..., help="LangSmith run exports (JSON list of runs, or JSONL)."),
    out: Path = typer.Option(..., help="Prompts JSONL for torouter prepare --prompts."),
    include_answers: bool = typer.Option(False, help="Keep each run's output text as 'answer'."),
    dedup: bool = typer.Option(True, help=_DEDUP_HELP),
    similar: Optional[float] = typer.Option(None, help=_SIMILAR_HELP),
    max_prompts: Optional[int] = typer.Option(None, help=_MAX_HELP),
    seed: int = typer.Option(0, help="Seed of the --max-prompts sample."),
):
    """Prompts from the llm and chat_model runs of a LangSmith export, ready for torouter prepare."""
    from .data import DataError
    from .traffic import read_langsmith_runs

    _writable(out)
    try:
        rows = read_langsmith_runs(files, include_answers=include_answers)
    except DataError as exc:
        _fail(str(exc))
    _write_traffic(rows, out, dedup, similar, max_prompts, seed, "LangSmith")


@app.command()
def synth(
    out: Path = typer.Option(..., help="Output routing data (JSONL)."),
    n: int = typer.Option(240, min=1, help="Number of prompts."),
    seed: int = typer.Option(0, help="Random seed."),
    test_fraction: float = typer.Option(0.0, min=0.0, max=0.9,
                                        help="Also write a held-out split of this share next to OUT."),
):
    """Write a small synthetic routing dataset (simulated scores) to try the pipeline on."""
    from .data import RoutingDataset, write_jsonl
    from .synthetic import make_synthetic

    test_path = out.with_name(out.stem + ".test" + out.suffix)
    _writable(out, test_path if test_fraction > 0 else None)
    records = make_synthetic(n, seed)
    if test_fraction > 0:
        train_set, test_set = RoutingDataset(records).split(test_fraction, seed)
        with _writing(out):
            write_jsonl(out, train_set.records)
        with _writing(test_path):
            write_jsonl(test_path, test_set.records)
        typer.echo(f"wrote {len(train_set)} training records to {out} and {len(test_set)} to {test_path}")
    else:
        with _writing(out):
            write_jsonl(out, records)
        typer.echo(f"wrote {len(records)} records to {out}")


def _judge_setup(judge: Optional[str], mode: Optional[str], anchor: Optional[str], config: Optional[Path]):
    """The judge settings the --judge* options give (None when no judge is asked for)."""
    from .prepare import JudgeConfig, JudgeError, load_judge_config

    if config is not None:
        return load_judge_config(config, judge, mode=mode, anchor=anchor)
    if judge is None:
        if mode is not None or anchor is not None:
            raise JudgeError("--judge-mode and --judge-anchor need --judge SPEC (or --judge-config)")
        return None
    return JudgeConfig(judge=judge, mode=mode or "pointwise", anchor=anchor)  # type: ignore[arg-type]


def _echo_judge(summary) -> None:
    """The judge's calls and cost, apart from the experts'."""
    if summary is None:
        return
    typer.echo(f"  judge {summary.judge} ({summary.mode}): {summary.scored}/{summary.answers} answers scored, "
               f"{summary.calls_made} calls made, {summary.cached_calls} from the cache, {summary.failed_calls} "
               f"failed, {summary.malformed} unreadable after retries ({summary.retried} retried); judge cost "
               f"${summary.total_cost:.6f} (${summary.cost_per_prompt:.6f} and {summary.calls_per_prompt:.1f} "
               f"calls per labelled prompt)")


def _echo_plan(plan) -> None:
    """What a prepare run will call and its expected cost, printed before any call is made."""
    sel = plan.selection
    notes = [f"{sel.read} read"]
    if sel.duplicates:
        notes.append(f"{sel.duplicates} repeats dropped")
    if sel.sampled_from is not None:
        notes.append(f"sampled {plan.prompts} of {sel.sampled_from}, stratified by task")
    tasks = ", ".join(f"{t} {n}" for t, n in sorted(sel.tasks.items()))
    typer.echo(f"plan: {plan.prompts} prompts ({'; '.join(notes)}; tasks: {tasks})")
    for name, p in plan.experts.items():
        typer.echo(f"  {name}: {p.calls} calls to make, {p.cached} cached; about {p.input_tokens} input and at most "
                   f"{p.output_tokens} output tokens, ${p.dollars:.6f}")
    if plan.judge is not None:
        typer.echo(f"  judge {plan.judge_name}: about {plan.judge.calls} calls (at most, before the cache), "
                   f"${plan.judge.dollars:.6f}")
    typer.echo(f"  expected cost at most ${plan.total_dollars:.6f} (${plan.dollars_per_prompt:.6f} per prompt)")


@app.command()
def prepare(
    experts: Path = typer.Option(..., help="Experts manifest (YAML): how to build each expert, its price and tier."),
    prompts: str = typer.Option(..., help="Prompts JSONL {id, prompt, reference, task}, or a named source: "
                                          "demo, arc-challenge, gsm8k, mbpp, pubmedqa."),
    out: Path = typer.Option(..., help="Routing data to write (JSONL)."),
    score: str = typer.Option("auto", help="Metric: bertscore, exact, choice, numeric, code, judge or none; or one "
                                           "per task: gsm8k=numeric,mbpp=code,*=judge. auto: the benchmarks' "
                                           "natural metric (gsm8k numeric, mbpp code, arc/pubmedqa choice), "
                                           "bertscore for other tasks."),
    judge: Optional[str] = typer.Option(None, help="Judge for the judge metric: an init_chat_model string "
                                                   "(openai:gpt-4o-mini), hf:MODEL / pypi:PKG (local), "
                                                   "python:mod:fn, llamaindex:mod.Class or experts.yaml#NAME."),
    judge_mode: Optional[str] = typer.Option(None, help="pointwise (grade on a rubric, default) or pairwise "
                                                        "(win rate against --judge-anchor, both orders)."),
    judge_anchor: Optional[str] = typer.Option(None, help="pairwise: the expert every answer is compared with."),
    judge_config: Optional[Path] = typer.Option(None, help="YAML: judge, mode, anchor, rubric, template, low, "
                                                           "high, attempts, tasks: {TASK: {rubric, template}}."),
    cache: Optional[Path] = typer.Option(None, help="SQLite call cache (default: OUT.cache.sqlite)."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N prompts."),
    dedup: bool = typer.Option(False, help="Drop repeated prompts (same text up to case, spacing, punctuation)."),
    similar: Optional[float] = typer.Option(None, help="Also drop near-identical prompts: word 3-shingle "
                                                       "Jaccard at least this (0-1, e.g. 0.8)."),
    max_prompts: Optional[int] = typer.Option(None, help="Label at most N prompts: a sample stratified by task."),
    seed: int = typer.Option(0, help="Seed of the --max-prompts sample."),
    dry_run: bool = typer.Option(False, help="Print the planned calls and their expected cost; call nothing."),
    retry_failed: bool = typer.Option(False, help="Call again the (prompt, expert) pairs that failed before."),
    scorer_model: Optional[str] = typer.Option(None, help="BERTScore model id or path (default: offline MiniLM)."),
    layer: Optional[int] = typer.Option(None, help="BERTScore layer (needed for models bert-score does not know)."),
    device: Optional[str] = typer.Option(None, help="torch device for scoring (default: cuda if available)."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
    durable: bool = typer.Option(False, help="fsync every cached call (survives power loss, slower)."),
    sandbox: Optional[str] = typer.Option(None, help="code: 'namespaces' (default) or 'rlimits' (weaker: only "
                                                     "inside a disposable container; see SECURITY.md). "
                                                     "Default: $TOROUTER_SANDBOX."),
    engine: str = typer.Option("local", help="Where the work runs: local (this process) or ray (a Ray cluster; "
                                              "needs torouter[ray])."),
    ray_address: Optional[str] = typer.Option(None, help="--engine ray: join this cluster (HOST:PORT, "
                                                         "ray://HOST:PORT or auto) instead of starting Ray here."),
    ray_cpus: Optional[int] = typer.Option(None, min=1, help="--engine ray without --ray-address: CPUs of the "
                                                             "local Ray instance (default: all)."),
):
    """Query every expert on every prompt, score the answers and write routing data (resumable)."""
    from .data import DataError
    from .engines import EngineError
    from .prepare import CacheError, JudgeError, ManifestError, PrepareError, ScoreError, ScorerConfig
    from .prepare import prepare as run_prepare

    from .prepare.pipeline import plan_prepare, select_prompts

    metric = None if score == "none" else score
    try:
        options = ScorerConfig(model=scorer_model, num_layers=layer, device=device, sandbox=sandbox)
        judging = _judge_setup(judge, judge_mode, judge_anchor, judge_config)
        items, selection = select_prompts(prompts, limit=limit, dedup=dedup, similarity=similar,
                                          max_prompts=max_prompts, seed=seed)
        plan = plan_prepare(experts, items, metric, judge=judging, scorer_options=options, selection=selection,
                            cache=cache or out.with_name(out.name + ".cache.sqlite"), retry_failed=retry_failed)
        _echo_plan(plan)
        if dry_run:
            typer.echo("dry run: no call made, nothing written")
            return
        summary = run_prepare(experts, items, out, score=metric, cache=cache, retry_failed=retry_failed,
                              progress=progress, durable=durable, judge=judging, scorer_options=options,
                              engine=engine, ray_address=ray_address, ray_cpus=ray_cpus)
    except (DataError, ManifestError, PrepareError, ScoreError, CacheError, JudgeError, EngineError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.secho("interrupted: finished calls are saved in the cache; run the same command to resume",
                    err=True)
        raise typer.Exit(code=130) from None
    run = summary.run
    typer.echo(f"{summary.records} records to {out}: {run.calls} calls made "
               f"({run.calls_per_s:.1f}/s), {summary.cached_calls} from the cache {summary.cache}")
    failed = 0
    for name, s in summary.experts.items():
        mean = f"{s.mean_score:.3f}" if s.mean_score is not None else "-"
        typer.echo(f"  {name}: {s.answered} answered, {s.failed} failed, mean score {mean}, "
                   f"total cost ${s.total_cost:.6f}")
        failed += s.failed
    _echo_judge(summary.judge)
    for problem in summary.problems[:5]:
        typer.secho(f"  not scored: {problem}", err=True)
    if failed:
        typer.echo(f"{failed} calls failed (recorded as errors, score null); --retry-failed calls them again")


@app.command()
def score(
    data: Path = typer.Argument(..., help="Routing data whose recorded answers to (re)score."),
    metric: str = typer.Option("bertscore", help="bertscore, exact, choice, numeric, code or judge; or one per "
                                                 "task: gsm8k=numeric,*=judge (auto: the benchmarks' natural "
                                                 "metrics, bertscore for the rest)."),
    out: Path = typer.Option(..., help="Where to write the rescored routing data."),
    judge: Optional[str] = typer.Option(None, help="Judge for the judge metric (see prepare --judge)."),
    judge_mode: Optional[str] = typer.Option(None, help="pointwise (default) or pairwise."),
    judge_anchor: Optional[str] = typer.Option(None, help="pairwise: the expert every answer is compared with."),
    judge_config: Optional[Path] = typer.Option(None, help="Judge settings YAML (see prepare --judge-config)."),
    cache: Optional[Path] = typer.Option(None, help="SQLite cache of judge calls (default: OUT.cache.sqlite)."),
    model: Optional[str] = typer.Option(None, help="BERTScore model id or path (default: offline MiniLM)."),
    layer: Optional[int] = typer.Option(None, help="BERTScore layer (needed for models bert-score does not know)."),
    batch_size: int = typer.Option(64, help="BERTScore batch size."),
    device: Optional[str] = typer.Option(None, help="torch device (default: cuda if available)."),
    timeout: float = typer.Option(10.0, help="code: seconds each answer's tests may run."),
    memory_mb: int = typer.Option(1024, help="code: memory limit per answer in MiB."),
    sandbox: Optional[str] = typer.Option(None, help="code: 'namespaces' (default) or 'rlimits' (weaker: only "
                                                     "inside a disposable container; see SECURITY.md). "
                                                     "Default: $TOROUTER_SANDBOX."),
    engine: str = typer.Option("local", help="Where the work runs: local (this process) or ray (a Ray cluster; "
                                              "needs torouter[ray])."),
    ray_address: Optional[str] = typer.Option(None, help="--engine ray: join this cluster (HOST:PORT, "
                                                         "ray://HOST:PORT or auto) instead of starting Ray here."),
    ray_cpus: Optional[int] = typer.Option(None, min=1, help="--engine ray without --ray-address: CPUs of the "
                                                             "local Ray instance (default: all)."),
):
    """Score recorded answers against each record's reference."""
    from .data import DataError
    from .engines import EngineError
    from .prepare import CacheError, JudgeError, ManifestError, PrepareError, ScoreError, ScorerConfig, rescore

    _writable(out)
    try:
        options = ScorerConfig(model=model, num_layers=layer, batch_size=batch_size, device=device,
                               timeout_s=timeout, memory_mb=memory_mb, sandbox=sandbox)
        judging = _judge_setup(judge, judge_mode, judge_anchor, judge_config)
        summary = rescore(data, out, metric, progress=True, judge=judging, cache=cache, scorer_options=options,
                          engine=engine, ray_address=ray_address, ray_cpus=ray_cpus)
    except (DataError, ScoreError, PrepareError, JudgeError, ManifestError, CacheError, EngineError) as exc:
        _fail(str(exc))
    typer.echo(f"scored {summary.scored} answers in {summary.records} records with {metric}; wrote {out}")
    for name, mean in summary.mean_score.items():
        typer.echo(f"  {name}: mean score {mean:.3f}")
    _echo_judge(summary.judge)
    for problem in summary.problems[:5]:
        typer.secho(f"  not scored: {problem}", err=True)
    if summary.unscored:
        typer.echo(f"{summary.unscored} answers could not be scored (score null)")


COMMAND_PLUGINS = "torouter.commands"
"""Entry-point group of commands other packages add to ``torouter`` (``torouter_apps`` adds serve and demo)."""


def _command_name(command: typer.models.CommandInfo) -> str:
    if command.name:
        return command.name
    return typer.main.get_command_name(command.callback.__name__ if command.callback else "")


def _unavailable(plugin: EntryPoint, exc: BaseException) -> Callable[..., None]:
    """A stand-in for a plugin's command that failed to load: it says why, whatever it is given."""
    message = (f"the {plugin.name!r} command could not be loaded from {plugin.value} "
               f"({type(exc).__name__}: {exc}); reinstall the package that provides it "
               "(in a checkout: pip install -e .)")

    def unavailable(ctx: typer.Context) -> None:
        _fail(message)

    return unavailable


def add_plugin_commands(target: typer.Typer, plugins: Optional[Iterable[EntryPoint]] = None) -> list[str]:
    """Add the commands of installed ``torouter.commands`` plugins to ``target``; returns their names.

    Each entry point names a function that takes a Typer app and adds commands to it
    (``plugins`` defaults to the installed ones). Commands come in plugin-name order,
    after the core's. A plugin that fails to import or to register leaves, under its
    entry-point name, a command that reports the failure and how to fix it, so every
    other command still works; a command whose name is already taken (a core command,
    or an earlier plugin's) is not added, and a warning says so.
    """
    if plugins is None:
        plugins = entry_points(group=COMMAND_PLUGINS)
    taken = {_command_name(command) for command in target.registered_commands}
    taken |= {group.name for group in target.registered_groups if group.name}
    added: list[str] = []
    seen: set[str] = set()
    for plugin in sorted(plugins, key=lambda p: p.name):
        if plugin.name in seen:  # the same distribution found twice on the path
            continue
        seen.add(plugin.name)
        scratch = typer.Typer()
        try:
            plugin.load()(scratch)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the core commands down
            if plugin.name not in taken:
                target.command(plugin.name, help=f"Unavailable: its plugin {plugin.value} failed to load.",
                               context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
                               add_help_option=False)(_unavailable(plugin, exc))
                taken.add(plugin.name)
            continue
        for command in scratch.registered_commands:
            name = _command_name(command)
            if name in taken:
                typer.secho(f"warning: plugin {plugin.value} adds a command {name!r} that already exists; "
                            "ignored", fg=typer.colors.YELLOW, err=True)
                continue
            target.registered_commands.append(command)
            taken.add(name)
            added.append(name)
    return added


add_plugin_commands(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
