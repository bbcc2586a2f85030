"""The command line end to end: synth -> train -> route -> eval, import, and clear failures."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from torouter.cli import app
from torouter.data import RoutingDataset, iter_jsonl
from torouter.synthetic import EXPERTS

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def ok(*args: str):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def fails(*args: str):
    result = invoke(*args)
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.output


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def dataset(workdir):
    out = workdir / "data.jsonl"
    result = ok("synth", "--out", out, "--n", 48, "--seed", 1, "--test-fraction", 0.25)
    assert "wrote 36 training records" in result.output
    return out, workdir / "data.test.jsonl"


@pytest.fixture(scope="module")
def knn_dir(workdir, dataset):
    out = workdir / "knn"
    result = ok("train", dataset[0], "--method", "knn", "--k", 3, "--out", out)
    assert "trained knn router on 36 prompts over 4 experts" in result.output
    return out


@pytest.fixture(scope="module")
def mlp_dir(workdir, dataset):
    out = workdir / "mlp"
    result = ok("train", dataset[0], "--method", "mlp", "--epochs", 5, "--out", out)
    assert "trained mlp router" in result.output
    return out


def test_synth_writes_train_and_test_split(dataset):
    train, test = dataset
    assert len(RoutingDataset.from_jsonl(train)) == 36
    test_set = RoutingDataset.from_jsonl(test)
    assert len(test_set) == 12
    assert test_set.experts == list(EXPERTS)


def test_synth_without_split(tmp_path):
    out = tmp_path / "all.jsonl"
    assert "wrote 10 records" in ok("synth", "--out", out, "--n", 10).output
    assert len(list(iter_jsonl(out))) == 10
    assert not (tmp_path / "all.test.jsonl").exists()


def test_train_saves_loadable_routers(knn_dir, mlp_dir):
    for directory, method in ((knn_dir, "knn"), (mlp_dir, "mlp")):
        config = json.loads((directory / "torouter.json").read_text())
        assert config["method"] == method
    assert json.loads((knn_dir / "torouter.json").read_text())["params"]["k"] == 3
    assert json.loads((mlp_dir / "torouter.json").read_text())["params"]["epochs"] == 5


@pytest.mark.parametrize("router", ["knn", "mlp"])
def test_route_writes_one_line_per_record(router, knn_dir, mlp_dir, dataset, tmp_path):
    directory = {"knn": knn_dir, "mlp": mlp_dir}[router]
    out = tmp_path / "routes.jsonl"
    result = ok("route", directory, dataset[1], "--out", out, "--cost-weight", 0.0)
    assert "routed 12 prompts" in result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [set(line) for line in lines] == [{"id", "expert"}] * 12
    assert [line["id"] for line in lines] == RoutingDataset.from_jsonl(dataset[1]).ids
    assert {line["expert"] for line in lines} <= set(EXPERTS)


def test_route_cost_weight_and_max_cost_pick_cheapest(knn_dir, dataset, tmp_path):
    out = tmp_path / "r.jsonl"
    ok("route", knn_dir, dataset[1], "--out", out, "--cost-weight", 1e6)
    assert {json.loads(x)["expert"] for x in out.read_text().splitlines()} == {"edge-small"}
    ok("route", knn_dir, dataset[1], "--out", out, "--max-cost", 1e-9)
    assert {json.loads(x)["expert"] for x in out.read_text().splitlines()} == {"edge-small"}


def test_route_reads_prompt_only_files(knn_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "q1", "prompt": "What is the capital of Peru?"}) + "\n"
                       + json.dumps({"id": "q2", "prompt": [{"role": "user", "content": "Write Python code."}]}) + "\n")
    out = tmp_path / "r.jsonl"
    ok("route", knn_dir, prompts, "--out", out)
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["q1", "q2"]


def test_eval_writes_json_and_plot(mlp_dir, dataset, tmp_path):
    report_path, plot_path = tmp_path / "report.json", tmp_path / "plot.png"
    result = ok("eval", mlp_dir, dataset[1], "--json", report_path, "--plot", plot_path)
    assert "AIQ" in result.output and "best single expert" in result.output
    report = json.loads(report_path.read_text())
    assert report["n"] == 12
    assert set(report["metrics"]) >= {"aiq", "aiq_experts", "best_single", "quality_at_best_single_cost",
                                      "cost_to_match_best_single", "gap_closed", "cost_range"}
    assert 0.0 <= report["metrics"]["aiq"] <= 1.0
    assert report["router"]["method"] == "mlp"
    assert len(report["router"]["sweep"]) == 61
    assert plot_path.stat().st_size > 1000
    assert plot_path.read_bytes()[:4] == b"\x89PNG"


def _routerbench_csv(path: Path) -> Path:
    models = ["gpt-4-1106-preview", "mistralai/mistral-7b-chat"]
    header = ["", "sample_id", "prompt", "eval_name", *models, *(f"{m}|model_response" for m in models),
              *(f"{m}|total_cost" for m in models), "oracle_model_to_route_to"]
    rows = [["0", "w.1", str(["Q1?"]), "winogrande", "1.0", "", "['A']", "", "0.003", "0.0001", "gpt-4-1106-preview"],
            ["1", "w.2", str(["Q2?"]), "winogrande", "0.0", "1.0", "['B']", "['A']", "0.003", "0.0001",
             "mistralai/mistral-7b-chat"]]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_import_routerbench(tmp_path):
    src = _routerbench_csv(tmp_path / "rb.csv")
    out = tmp_path / "rb.jsonl"
    result = ok("import", "routerbench", src, "--out", out)
    assert "wrote 2 records over 2 experts" in result.output
    data = RoutingDataset.from_jsonl(out)
    assert data.ids == ["w.1", "w.2"]
    assert data.mask.tolist() == [[True, False], [True, True]]


def test_import_refuses_pickle_without_flag(tmp_path):
    pkl = tmp_path / "rb.pkl"
    pkl.write_bytes(b"\x80\x04N.")
    output = fails("import", "routerbench", pkl, "--out", tmp_path / "o.jsonl")
    assert "--allow-pickle" in output
    assert not (tmp_path / "o.jsonl").exists()


def test_import_refuses_other_csv(tmp_path):
    src = tmp_path / "x.csv"
    src.write_text("question,answer\nq,a\n")
    output = fails("import", "routerbench", src, "--out", tmp_path / "o.jsonl")
    assert "not a RouterBench file" in output


# --- failures ---------------------------------------------------------------------------------

def test_train_on_bad_data_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "prompt": "p", "responses": {"m": {"score": 0.5, "cost": 1}}}) + "\n"
                   + '{"id": "b", "prompt": \n')
    output = fails("train", bad, "--method", "knn", "--out", tmp_path / "r")
    assert f"{bad}:2" in output and "malformed JSON" in output
    assert not (tmp_path / "r").exists()


def test_train_on_missing_data_file(tmp_path):
    output = fails("train", tmp_path / "absent.jsonl", "--method", "knn", "--out", tmp_path / "r")
    assert "no such file" in output


def test_train_unknown_method(dataset, tmp_path):
    output = fails("train", dataset[0], "--method", "svm", "--out", tmp_path / "r")
    assert "unknown router method 'svm'" in output


def test_train_rejects_option_the_method_does_not_use(dataset, tmp_path):
    output = fails("train", dataset[0], "--method", "mlp", "--k", 3, "--out", tmp_path / "r")
    assert "router 'mlp' does not use --k" in output
    output = fails("train", dataset[0], "--method", "knn", "--epochs", 3, "--out", tmp_path / "r")
    assert "does not use --epochs" in output
    output = fails("train", dataset[0], "--method", "knn", "--clusters", 3, "--out", tmp_path / "r")
    assert "router 'knn' does not use --clusters" in output


def test_train_cluster_router_then_route(dataset, tmp_path):
    out = tmp_path / "cluster"
    result = ok("train", dataset[0], "--method", "cluster", "--clusters", 3, "--out", out)
    assert "trained cluster router on 36 prompts" in result.output and "cluster_sizes=" in result.output
    assert json.loads((out / "torouter.json").read_text())["params"]["n_clusters"] == 3
    routes = tmp_path / "routes.jsonl"
    ok("route", out, dataset[1], "--out", routes, "--cost-weight", 0.0)
    assert len(routes.read_text().splitlines()) == 12


def test_route_with_missing_router_dir(dataset, tmp_path):
    output = fails("route", tmp_path / "no-router", dataset[1], "--out", tmp_path / "r.jsonl")
    assert "no such directory" in output
    assert not (tmp_path / "r.jsonl").exists()


def test_eval_with_missing_router_dir(dataset, tmp_path):
    output = fails("eval", tmp_path / "no-router", dataset[1])
    assert "not a router directory" in output


def test_route_with_bad_prompts_file(knn_dir, tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"id": "a"}) + "\n")
    output = fails("route", knn_dir, bad, "--out", tmp_path / "r.jsonl")
    assert f"{bad}:1" in output and "missing 'prompt'" in output


def test_eval_with_bad_data(knn_dir, tmp_path):
    bad = tmp_path / "d.jsonl"
    bad.write_text(json.dumps({"id": "a", "prompt": "p", "responses": {"m": {"score": 3, "cost": 1}}}) + "\n")
    output = fails("eval", knn_dir, bad)
    assert f"{bad}:1" in output and "outside [0, 1]" in output


def test_route_with_damaged_router(knn_dir, dataset, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(knn_dir, damaged)
    (damaged / "weights.safetensors").write_bytes(b"junk")
    output = fails("route", damaged, dataset[1], "--out", tmp_path / "r.jsonl")
    assert "checksum mismatch" in output


def test_no_arguments_shows_help():
    result = invoke()
    assert "train" in result.output and "route" in result.output


@pytest.mark.slow
def test_console_script_help():
    script = shutil.which("torouter", path=str(Path(sys.executable).parent)) or shutil.which("torouter")
    assert script, "the torouter console script is not installed"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    for command in ("train", "route", "eval", "import", "synth"):
        assert command in result.stdout


def test_train_knn_with_bad_k(dataset, tmp_path):
    output = fails("train", dataset[0], "--method", "knn", "--k", 0, "--out", tmp_path / "r")
    assert "k must be >= 1" in output
    assert not (tmp_path / "r").exists()


def test_synth_bad_test_fraction(tmp_path):
    result = invoke("synth", "--out", tmp_path / "d.jsonl", "--n", 10, "--test-fraction", 1.5)
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "--test-fraction" in result.output


def test_synth_refuses_zero_records(tmp_path):
    result = invoke("synth", "--out", tmp_path / "d.jsonl", "--n", 0)
    assert result.exit_code != 0
    assert not (tmp_path / "d.jsonl").exists()


# --- outputs that cannot be written: refused before any work, without a traceback -------------

@pytest.fixture
def blocker(tmp_path):
    """A regular file where a folder would have to be."""
    path = tmp_path / "blocker"
    path.write_text("")
    return path


def test_train_refuses_an_unwritable_out_before_training(dataset, blocker, monkeypatch):
    from torouter.routers import KNNRouter

    def must_not_fit(self, *args, **kwargs):
        raise AssertionError("trained although the router could not be saved")

    monkeypatch.setattr(KNNRouter, "fit", must_not_fit)
    output = fails("train", dataset[0], "--method", "knn", "--out", blocker / "r")
    assert f"{blocker / 'r'}: cannot write there: {blocker} is not a folder" in output
    output = fails("train", dataset[0], "--method", "knn", "--out", blocker)
    assert f"{blocker}: cannot write there: it is a file, not a folder" in output


def test_train_refuses_to_replace_a_folder_that_is_not_a_router(dataset, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    output = fails("train", dataset[0], "--method", "knn", "--out", precious)
    assert "holds no saved router" in output and (precious / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("command", ["route", "eval", "edge", "synth", "import", "score"])
def test_other_commands_refuse_an_unwritable_output(command, knn_dir, dataset, blocker, tmp_path):
    target = blocker / "out.json"
    args = {
        "route": ("route", knn_dir, dataset[1], "--out", target),
        "eval": ("eval", knn_dir, dataset[1], "--json", target),
        "edge": ("edge", knn_dir, dataset[1], "--json", target),
        "synth": ("synth", "--out", target),
        "import": ("import", "routerbench", _routerbench_csv(tmp_path / "rb.csv"), "--out", target),
        "score": ("score", dataset[1], "--metric", "exact", "--out", target),
    }[command]
    output = fails(*args)
    assert f"{target}: cannot write there: {blocker} is not a folder" in output


def test_train_on_non_utf8_data_names_the_line(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps({"id": "a", "prompt": "caf\u00e9", "responses": {"m": {"score": 0.5, "cost": 1}}},
                               ensure_ascii=False).encode("latin-1") + b"\n")
    output = fails("train", bad, "--method", "knn", "--out", tmp_path / "r")
    assert f"{bad}:1: not valid UTF-8" in output
