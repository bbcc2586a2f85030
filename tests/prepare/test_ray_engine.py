"""The Ray engine of ``prepare``/``score``/``route``: the same records as the local engine, resumable
after a killed driver, a lost worker retried, a failing expert recorded, a bad address refused.

One local Ray instance (2 CPUs) serves the whole module; the resume test's driver joins it
with ``--ray-address`` so that killing the driver leaves the cluster up, as on a real one.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the Ray engine needs the ray extra: pip install 'torouter[ray]'")

from torouter.engines import EngineError  # noqa: E402
from torouter.prepare import ScorerConfig, prepare, rescore  # noqa: E402

TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    # Workers inherit the environment: they import the fake experts from tests/helpers.
    paths = [str(TESTS), *sys.path]
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def _manifest(path, entries):
    text = "experts:\n"
    for name, fn, kwargs, concurrency in entries:
        text += (f"  - name: {name}\n    tier: cloud\n    concurrency: {concurrency}\n    retries: 0\n"
                 f"    python: {{callable: 'helpers.ray_experts:{fn}', kwargs: {json.dumps(kwargs)}}}\n")
    path.write_text(text)
    return path


def _prompts(path, n):
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}", "reference": f"question {i}"})
                            + "\n" for i in range(n)))
    return path


def test_same_records_as_the_local_engine_and_a_failing_expert_is_recorded(cluster, tmp_path):
    experts = _manifest(tmp_path / "experts.yaml", [
        ("alpha", "answer", {"tag": "alpha"}, 4), ("echo", "echo", {"tag": "echo"}, 2),
        ("broken", "broken", {"tag": "broken"}, 1)])
    prompts = _prompts(tmp_path / "prompts.jsonl", 24)
    local = prepare(experts, prompts, tmp_path / "local.jsonl", score="exact", progress=False)
    on_ray = prepare(experts, prompts, tmp_path / "ray.jsonl", score="exact", progress=False, engine="ray")
    assert (tmp_path / "ray.jsonl").read_bytes() == (tmp_path / "local.jsonl").read_bytes()
    assert on_ray.run.calls == local.run.calls == 72
    assert on_ray.run.failed == local.run.failed == {"alpha": 0, "echo": 0, "broken": 24}
    records = [json.loads(line) for line in (tmp_path / "ray.jsonl").read_text().splitlines()]
    assert all(r["responses"]["echo"]["score"] == 1.0 for r in records)
    assert all(r["responses"]["broken"] == {"score": None, "error": "ValueError: broken cannot answer"}
               for r in records)
    assert not (tmp_path / "ray.jsonl.cache.sqlite.shards").exists() or not any(
        (tmp_path / "ray.jsonl.cache.sqlite.shards").glob("*.sqlite"))
    # Run again: everything comes from the cache.
    again = prepare(experts, prompts, tmp_path / "ray.jsonl", score="exact", progress=False, engine="ray")
    assert again.run.calls == 0 and again.cached_calls == 72

    # score --engine ray: the same scores as the local engine.
    rescore(tmp_path / "local.jsonl", tmp_path / "rescored-local.jsonl", ScorerConfig(metric="exact"))
    rescore(tmp_path / "local.jsonl", tmp_path / "rescored-ray.jsonl", ScorerConfig(metric="exact"), engine="ray")
    assert (tmp_path / "rescored-ray.jsonl").read_bytes() == (tmp_path / "rescored-local.jsonl").read_bytes()
    from typer.testing import CliRunner

    from torouter.cli import app

    scored = CliRunner().invoke(app, ["score", str(tmp_path / "local.jsonl"), "--metric", "exact", "--out",
                                      str(tmp_path / "rescored-cli.jsonl"), "--engine", "ray"])
    assert scored.exit_code == 0, scored.output
    assert (tmp_path / "rescored-cli.jsonl").read_bytes() == (tmp_path / "rescored-local.jsonl").read_bytes()


def test_an_expert_that_cannot_start_fails_the_run_as_on_the_local_engine(cluster, tmp_path):
    from torouter.prepare import ManifestError

    (tmp_path / "experts.yaml").write_text(
        "experts:\n  - name: ghost\n    tier: cloud\n    python: {callable: 'helpers.ray_experts:missing'}\n")
    prompts = _prompts(tmp_path / "prompts.jsonl", 2)
    for engine in ("local", "ray"):
        with pytest.raises(ManifestError, match="expert 'ghost': cannot import 'helpers.ray_experts:missing'"):
            prepare(tmp_path / "experts.yaml", prompts, tmp_path / f"{engine}.jsonl", score=None, progress=False,
                    engine=engine)


def test_a_lost_worker_is_retried_and_loses_nothing(cluster, tmp_path):
    marker = tmp_path / "crashed"
    experts = _manifest(tmp_path / "experts.yaml", [
        ("fragile", "crash_once", {"tag": "fragile", "marker": str(marker)}, 2)])
    prompts = _prompts(tmp_path / "prompts.jsonl", 10)
    summary = prepare(experts, prompts, tmp_path / "out.jsonl", score=None, progress=False, engine="ray")
    assert marker.exists()  # a worker did die
    assert summary.run.done == {"fragile": 10} and summary.records == 10
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(r["responses"]["fragile"]["text"] for r in records) == sorted(
        f"fragile: question {i}" for i in range(10))


def _committed(cache):
    """(expert, prompt) of every call committed so far: the run's cache and the workers' shards."""
    found = set()
    for path in [cache, *sorted(cache.with_name(cache.name + ".shards").glob("*.sqlite"))]:
        if not path.exists():
            continue
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
                rows = db.execute("SELECT result FROM calls").fetchall()
        except sqlite3.Error:  # a shard being created
            continue
        found |= {tuple(json.loads(r[0])["text"].split(": ", 1)) for r in rows}
    return found


@pytest.mark.slow
def test_killed_driver_resumes_without_losing_or_repeating_calls(cluster, tmp_path):
    n_prompts, names = 60, ("alpha", "beta")
    log = tmp_path / "calls.log"
    experts = _manifest(tmp_path / "experts.yaml", [
        (name, "answer", {"tag": name, "delay": 0.05, "log": str(log)}, 2) for name in names])
    prompts = _prompts(tmp_path / "prompts.jsonl", n_prompts)
    out, cache = tmp_path / "data.jsonl", tmp_path / "calls.sqlite"
    command = [sys.executable, "-m", "torouter.cli", "prepare", "--experts", str(experts), "--prompts",
               str(prompts), "--out", str(out), "--cache", str(cache), "--score", "exact", "--no-progress",
               "--engine", "ray", "--ray-address", cluster]
    total = n_prompts * len(names)

    first = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(_committed(cache)) < 20:
        assert first.poll() is None, first.stderr.read().decode()
        assert time.monotonic() < deadline, "the first run made no progress"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(3)  # Ray ends the killed driver's workers
    done_before = _committed(cache)
    assert 20 <= len(done_before) < total and not out.exists()
    log.rename(tmp_path / "first.log")

    second = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    made_again = [tuple(line.split("\t")) for line in log.read_text().splitlines()]
    assert not set(made_again) & done_before                    # no finished call was made again
    assert len(made_again) == total - len(done_before)          # every other call exactly once
    assert sorted(made_again) == sorted({(n, f"question {i}") for n in names for i in range(n_prompts)}
                                        - done_before)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(f"q{i}" for i in range(n_prompts))
    assert all(len(r["responses"]) == 2 for r in records)


def test_a_bad_ray_address_is_a_clear_error(cluster, tmp_path):
    experts = _manifest(tmp_path / "experts.yaml", [("alpha", "answer", {"tag": "alpha"}, 1)])
    prompts = _prompts(tmp_path / "prompts.jsonl", 2)
    with pytest.raises(EngineError, match=r"127\.0\.0\.1:1.*cannot reach a Ray cluster"):
        prepare(experts, prompts, tmp_path / "out.jsonl", score=None, progress=False, engine="ray",
                ray_address="127.0.0.1:1")
    with pytest.raises(EngineError, match="expected HOST:PORT"):
        prepare(experts, prompts, tmp_path / "out.jsonl", score=None, progress=False, engine="ray",
                ray_address="not an address")
    assert not (tmp_path / "out.jsonl").exists()


def test_route_on_ray_chooses_what_the_local_engine_chooses(cluster, tmp_path):
    from typer.testing import CliRunner

    from torouter.cli import app
    from torouter.data import RoutingDataset, write_jsonl
    from torouter.routers import make_router
    from torouter.synthetic import make_synthetic

    records = make_synthetic(120, 0)
    router = make_router("knn", k=5, backend="static")
    router.fit(RoutingDataset(records[:80]))
    router.save(tmp_path / "router")
    write_jsonl(tmp_path / "prompts.jsonl", records[80:])
    runner = CliRunner()
    for engine in ("local", "ray"):
        result = runner.invoke(app, ["route", str(tmp_path / "router"), str(tmp_path / "prompts.jsonl"), "--out",
                                     str(tmp_path / f"{engine}.jsonl"), "--engine", engine, "--cost-weight", "2"])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "ray.jsonl").read_bytes() == (tmp_path / "local.jsonl").read_bytes()
    assert len((tmp_path / "ray.jsonl").read_text().splitlines()) == 40

    bad = runner.invoke(app, ["route", str(tmp_path / "router"), str(tmp_path / "prompts.jsonl"), "--out",
                              str(tmp_path / "bad.jsonl"), "--engine", "ray", "--ray-address", "127.0.0.1:1"])
    assert bad.exit_code == 2 and "cannot reach a Ray cluster" in bad.output
