"""RouterBench import: the CSV layout, unobserved cells, the pickle guard, and the real files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from torouter.data import DataError, RoutingDataset, iter_jsonl, write_jsonl
from torouter.importers import read_routerbench, routerbench_records

ROUTERBENCH_DIR = Path(__file__).resolve().parents[2].parent / "shared/data/routerbench"

MODELS = ["gpt-4-1106-preview", "mistralai/mistral-7b-chat"]
HEADER = ["", "sample_id", "prompt", "eval_name", *MODELS,
          *(f"{m}|model_response" for m in MODELS), *(f"{m}|total_cost" for m in MODELS),
          "oracle_model_to_route_to"]
ROWS = [
    # index, sample_id, prompt (a stringified Python list), eval_name,
    # scores (gpt-4, mistral), responses, costs, oracle
    ["0", "winogrande.dev.1", str(["Pick A or B.\nA) Ian\nB) Dennis\nAnswer:"]), "winogrande",
     "1.0", "0.0", str(["A"]), str(["B"]), "0.00347", "6.92e-05", "gpt-4-1106-preview"],
    ["1", "mbpp.dev.2", str(["Write a function.", "def f(x):"]), "mbpp",
     "1.0", "", "['def f(x): return x']", "", "0.004", "0.0001", "gpt-4-1106-preview"],
    ["2", "arc.dev.3", "A plain prompt, not a list", "arc",
     "0.0", "1.0", "", "['C']", "0.002", "0.00005", "mistralai/mistral-7b-chat"],
]


def _write_csv(path: Path, header=HEADER, rows=ROWS) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def small_csv(tmp_path):
    return _write_csv(tmp_path / "rb.csv")


def test_csv_conversion(small_csv):
    records = read_routerbench([small_csv])
    assert [r.id for r in records] == ["winogrande.dev.1", "mbpp.dev.2", "arc.dev.3"]
    first = records[0]
    # the stringified list becomes its joined text
    assert first.prompt == "Pick A or B.\nA) Ian\nB) Dennis\nAnswer:"
    assert first.task == "winogrande"
    assert first.responses == {
        "gpt-4-1106-preview": {"score": 1.0, "cost": 0.00347, "text": "A"},
        "mistralai/mistral-7b-chat": {"score": 0.0, "cost": 6.92e-05, "text": "B"},
    }
    assert first.extra == {"routerbench_oracle": "gpt-4-1106-preview"}
    assert records[1].prompt == "Write a function.\ndef f(x):"
    assert records[1].responses["gpt-4-1106-preview"]["text"] == "def f(x): return x"
    assert records[2].prompt == "A plain prompt, not a list"


def test_empty_score_cell_is_unobserved(small_csv):
    records = read_routerbench([small_csv])
    mistral = records[1].responses["mistralai/mistral-7b-chat"]
    assert mistral["score"] is None and "text" not in mistral
    data = RoutingDataset(records)
    assert data.experts == MODELS
    assert data.mask.tolist() == [[True, True], [True, False], [True, True]]
    # the mean is over the two observed rows, not three with a zero
    assert data.mean_scores()[1] == pytest.approx(0.5)


def test_score_without_cost_is_unobserved(tmp_path):
    rows = [ROWS[0][:9] + ["", ROWS[0][10]]]  # mistral's cost cell empty
    records = read_routerbench([_write_csv(tmp_path / "rb.csv", rows=rows)])
    assert records[0].responses["mistralai/mistral-7b-chat"]["score"] is None


def test_model_with_no_score_and_no_cost_is_left_out(tmp_path):
    rows = [ROWS[0][:5] + ["", ROWS[0][6], "", ROWS[0][8], "", ROWS[0][10]]]
    records = read_routerbench([_write_csv(tmp_path / "rb.csv", rows=rows)])
    assert list(records[0].responses) == ["gpt-4-1106-preview"]


def test_conversion_round_trips_through_jsonl(small_csv, tmp_path):
    out = tmp_path / "out.jsonl"
    write_jsonl(out, read_routerbench([small_csv]))
    back = list(iter_jsonl(out))
    assert len(back) == 3
    assert back[0].extra == {"routerbench_oracle": "gpt-4-1106-preview"}
    assert json.loads(out.read_text().splitlines()[1])["responses"]["mistralai/mistral-7b-chat"] == {
        "score": None, "cost": 0.0001}


def test_several_files_and_repeated_sample_ids(small_csv, tmp_path):
    other = _write_csv(tmp_path / "other.csv", rows=[ROWS[0]])
    records = read_routerbench([small_csv, other])
    # a repeated sample_id is kept and numbered so ids stay unique
    assert [r.id for r in records] == ["winogrande.dev.1", "mbpp.dev.2", "arc.dev.3", "winogrande.dev.1#2"]


def test_non_numeric_score_names_file_and_row(tmp_path):
    rows = [ROWS[0], ROWS[1][:4] + ["yes"] + ROWS[1][5:]]
    path = _write_csv(tmp_path / "rb.csv", rows=rows)
    with pytest.raises(DataError) as info:
        read_routerbench([path])
    assert f"{path}:3" in str(info.value)
    assert "'gpt-4-1106-preview' is not a number: 'yes'" in str(info.value)


def test_score_out_of_range_is_rejected(tmp_path):
    rows = [ROWS[0][:4] + ["2.0"] + ROWS[0][5:]]
    path = _write_csv(tmp_path / "rb.csv", rows=rows)
    with pytest.raises(DataError, match="outside"):
        read_routerbench([path])


def test_non_routerbench_csv_is_refused(tmp_path):
    path = _write_csv(tmp_path / "other.csv", header=["question", "answer"], rows=[["q", "a"]])
    with pytest.raises(DataError) as info:
        read_routerbench([path])
    assert str(path) in str(info.value)
    assert "not a RouterBench file" in str(info.value) and "sample_id" in str(info.value)


def test_csv_without_model_columns_is_refused(tmp_path):
    path = _write_csv(tmp_path / "x.csv", header=["", "sample_id", "prompt", "eval_name"],
                      rows=[["0", "a", "p", "t"]])
    with pytest.raises(DataError, match="no model score columns"):
        read_routerbench([path])


def test_header_only_csv_has_no_records(tmp_path):
    path = _write_csv(tmp_path / "x.csv", rows=[])
    with pytest.raises(DataError, match="no records found"):
        read_routerbench([path])


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_routerbench([tmp_path / "absent.csv"])


def test_routerbench_records_from_dict_rows():
    rows = [{"sample_id": 5, "prompt": ["a", "b"], "eval_name": "e", "m": 1.0, "m|total_cost": 0.5,
             "m|model_response": ["x"], "Unnamed: 0": 3}]
    (record,) = routerbench_records(rows, "frame")
    assert record.id == "5" and record.prompt == "a\nb"
    assert record.responses == {"m": {"score": 1.0, "cost": 0.5, "text": "x"}}


# --- pickle -----------------------------------------------------------------------------------

@pytest.fixture
def small_pickle(tmp_path):
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({
        "sample_id": ["s1", "s2"],
        "prompt": [["What is 2+2?"], ["Name a prime."]],
        "eval_name": ["math", "math"],
        "m1": [1.0, float("nan")],
        "m2": [0.0, 1.0],
        "m1|model_response": [["4"], None],
        "m2|model_response": [["5"], ["7"]],
        "m1|total_cost": [0.01, 0.01],
        "m2|total_cost": [0.001, 0.001],
        "oracle_model_to_route_to": ["m1", "m2"],
    })
    path = tmp_path / "routerbench_0shot.pkl"
    frame.to_pickle(path)
    return path


def test_pickle_refused_without_allow_pickle(small_pickle):
    with pytest.raises(DataError) as info:
        read_routerbench([small_pickle])
    assert str(small_pickle) in str(info.value)
    assert "allow_pickle" in str(info.value) and "arbitrary code" in str(info.value)


def test_pickle_read_with_allow_pickle(small_pickle):
    records = read_routerbench([small_pickle], allow_pickle=True)
    assert [r.id for r in records] == ["s1", "s2"]
    assert records[0].prompt == "What is 2+2?"
    assert records[0].responses["m1"] == {"score": 1.0, "cost": 0.01, "text": "4"}
    # NaN score: unobserved, not 0
    assert records[1].responses["m1"]["score"] is None
    data = RoutingDataset(records)
    assert data.mask.tolist() == [[True, True], [False, True]]


def test_pickle_of_something_else_is_refused(tmp_path):
    import pickle

    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DataError, match="expected a pandas DataFrame"):
        read_routerbench([path], allow_pickle=True)


# --- the real RouterBench subset ----------------------------------------------------------------

@pytest.mark.skipif(not (ROUTERBENCH_DIR / "winogrande_test.csv").is_file(),
                    reason="RouterBench subset not present")
def test_real_winogrande_test_split():
    records = read_routerbench([ROUTERBENCH_DIR / "winogrande_test.csv"])
    assert len(records) == 380
    data = RoutingDataset(records)
    assert len(data.experts) == 11
    assert "gpt-4-1106-preview" in data.experts
    assert all(r.task == "winogrande" for r in records)
    assert len(set(data.ids)) == 380
    assert set(np.unique(data.scores[data.mask])) <= {0.0, 1.0}
    assert (data.costs[data.mask] > 0).all()
    # prompts are joined text, not the stringified list
    assert not records[0].prompt.startswith("['")


def test_error_line_counts_newlines_inside_cells(tmp_path):
    # row 1's response cell spans two physical lines, so row 2 sits on line 4
    first = ROWS[0][:6] + ["A\nbecause Ian."] + ROWS[0][7:]
    second = ROWS[1][:4] + ["yes"] + ROWS[1][5:]
    path = _write_csv(tmp_path / "rb.csv", rows=[first, second])
    assert path.read_text().count("\n") == 4
    with pytest.raises(DataError) as info:
        read_routerbench([path])
    assert f"{path}:4:" in str(info.value)
