"""Choosing an engine needs no Ray: an unknown engine and a missing Ray are clear errors, and a run
resumed on the local engine still takes the calls a killed Ray run left in its shards."""

import json
import sys

import pytest

from torouter.engines import EngineError
from torouter.prepare import CallCache, prepare


def test_an_unknown_engine_is_refused(tmp_path):
    with pytest.raises(EngineError, match="unknown engine 'spark'; choose one of: local, ray"):
        prepare([], [{"id": "a", "prompt": "x"}], tmp_path / "out.jsonl", score=None, engine="spark")


def test_the_ray_engine_without_ray_says_how_to_install_it(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from torouter.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    (tmp_path / "experts.yaml").write_text(
        "experts:\n  - name: a\n    tier: cloud\n    python: {callable: 'json:dumps'}\n")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"id": "q", "prompt": "x"}) + "\n")
    result = CliRunner().invoke(app, ["prepare", "--experts", str(tmp_path / "experts.yaml"), "--prompts",
                                      str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "out.jsonl"),
                                      "--score", "none", "--engine", "ray"])
    assert result.exit_code == 2
    assert "pip install 'torouter[ray]'" in result.output
    assert not (tmp_path / "out.jsonl").exists()


def test_the_local_engine_resumes_from_the_shards_of_a_killed_ray_run(tmp_path):
    (tmp_path / "experts.yaml").write_text(
        "experts:\n  - name: a\n    tier: cloud\n    retries: 0\n    python: {callable: 'json:dumps'}\n")
    prompts = [{"id": f"q{i}", "prompt": f"p{i}"} for i in range(3)]
    out = tmp_path / "out.jsonl"
    first = prepare(tmp_path / "experts.yaml", prompts, out, score=None, progress=False)
    assert first.run.calls == 3
    # Move the finished calls into a worker shard, as a Ray run killed before its driver copied them leaves it.
    cache = tmp_path / "out.jsonl.cache.sqlite"
    shards = tmp_path / "out.jsonl.cache.sqlite.shards"
    shards.mkdir()
    with CallCache(shards / "block.sqlite") as shard:
        shard.merge(cache)
    cache.unlink()
    again = prepare(tmp_path / "experts.yaml", prompts, out, score=None, progress=False)
    assert again.run.calls == 0 and again.cached_calls == 3
    assert not list(shards.glob("*.sqlite"))


def test_actor_pools_hold_each_experts_concurrency_exactly():
    from torouter.engines.ray_prepare import pool_size

    for concurrency in (1, 3, 8, 64, 100, 128, 67):
        for workers in (1, 2, 4, 16):
            for heavy in (False, True):
                actors = pool_size(concurrency, workers, heavy)
                assert concurrency % actors == 0  # actors x calls in flight each == concurrency
                if heavy:
                    assert actors <= workers  # one model per worker
                else:
                    assert concurrency // actors <= 64
    assert pool_size(8, 2, heavy=False) == 1      # a hosted API's calls share one actor
    assert pool_size(100, 2, heavy=False) == 2    # ... up to 64 in flight each
    assert pool_size(6, 4, heavy=True) == 3       # a local model: as many actors as workers allow
