"""Encoder backends: ONNX (float32, int8) and static (model2vec), built offline, cached, saved with a router.

Every artefact is built from the shipped MiniLM package with no network, into a
session-wide temporary cache; the static model is distilled with a small vocabulary
and few PCA dimensions so the build takes seconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("model2vec")
pytest.importorskip("skeletoken")  # model2vec's distillation

from typer.testing import CliRunner  # noqa: E402

from torouter import encoder_backends  # noqa: E402
from torouter.cli import app  # noqa: E402
from torouter.data import RoutingDataset  # noqa: E402
from torouter.encoders import BACKENDS, Encoder, resolve_model  # noqa: E402
from torouter.routers import RouterFileError, load_router, make_router  # noqa: E402
from torouter.routers.base import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402
from torouter.synthetic import make_synthetic  # noqa: E402

PROMPTS = ["How many legs does a spider have?", "Write a Python function that reverses a list.",
           "What is the capital of Peru? " * 80]
# Keeps one- and two-letter tokens and a few words: a vocabulary of a few hundred tokens.
SMALL_VOCABULARY = r"^(?!([a-z]{1,2}|the|what|how|is|of|code|python|list|capital|spider|legs|write)$)"
STATIC_PCA = 16


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private torouter cache holding a small static model distilled for these tests."""
    folder = tmp_path_factory.mktemp("torouter-cache")
    previous = os.environ.get("TOROUTER_CACHE")
    os.environ["TOROUTER_CACHE"] = str(folder)
    encoder_backends.load_backend.cache_clear()
    source = resolve_model(None)
    encoder_backends.build_static(source, encoder_backends.artefact_dir(source) / encoder_backends.STATIC_DIR,
                                  pca_dims=STATIC_PCA, token_remove_pattern=SMALL_VOCABULARY)
    yield folder
    encoder_backends.load_backend.cache_clear()
    if previous is None:
        os.environ.pop("TOROUTER_CACHE", None)
    else:
        os.environ["TOROUTER_CACHE"] = previous


@pytest.fixture(scope="module")
def data():
    return RoutingDataset(make_synthetic(60, seed=3))


def _unit_rows(x):
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-4)


# --- choosing a backend ------------------------------------------------------------------------

def test_backends_are_named_and_unknown_ones_refused(data):
    assert BACKENDS == ("sentence-transformers", "onnx", "onnx-int8", "static")
    with pytest.raises(ValueError, match=r"unknown encoder backend 'tpu'.*onnx-int8"):
        Encoder(backend="tpu")
    with pytest.raises(ValueError, match="unknown encoder backend 'tpu'"):
        make_router("knn", backend="tpu").fit(data)


def test_every_embedding_router_takes_a_backend():
    for method in ("knn", "cluster", "mlp"):
        assert make_router(method).backend == "sentence-transformers"
        assert make_router(method, backend="static").get_params()["backend"] == "static"


def test_a_model_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no model.safetensors"):
        encoder_backends.model_folder(str(tmp_path))


# --- ONNX ----------------------------------------------------------------------------------------

def test_onnx_gives_the_sentence_transformers_embeddings(cache):
    reference = Encoder(device="cpu")
    onnx = Encoder(backend="onnx")
    x, y = onnx.encode(PROMPTS), reference.encode(PROMPTS)
    assert x.shape == y.shape == (3, 384) and x.dtype == np.float32
    np.testing.assert_allclose((x * y).sum(axis=1), 1.0, atol=1e-4)
    assert onnx.max_length == reference.max_length == 256
    assert onnx.count_truncated(PROMPTS) == reference.count_truncated(PROMPTS) == 1
    # the long prompt is read from its end with keep="tail", as sentence-transformers does
    tail = Encoder(backend="onnx", keep="tail").encode(PROMPTS[2:])
    np.testing.assert_allclose((tail * Encoder(device="cpu", keep="tail").encode(PROMPTS[2:])).sum(), 1.0, atol=1e-4)
    # batches of mixed lengths give the same vectors as one prompt at a time
    one_by_one = np.vstack([onnx.encode([p]) for p in PROMPTS])
    np.testing.assert_allclose(x, one_by_one, atol=1e-5)


def test_onnx_int8_is_smaller_and_close(cache):
    x = Encoder(backend="onnx-int8").encode(PROMPTS)
    _unit_rows(x)
    assert ((x * Encoder(backend="onnx").encode(PROMPTS)).sum(axis=1) > 0.9).all()
    folder = encoder_backends.artefact_dir(resolve_model(None))
    int8 = folder / "onnx-int8" / encoder_backends.ONNX_INT8_FILE
    assert int8.stat().st_size < (folder / "onnx" / encoder_backends.ONNX_FILE).stat().st_size / 3


def test_artefacts_are_built_once_and_reused(cache, monkeypatch):
    Encoder(backend="onnx").encode(PROMPTS[:1])  # built by now
    folder = encoder_backends.artefact_dir(resolve_model(None))
    assert folder.parent == Path(cache) / "encoders"
    before = (folder / "onnx" / encoder_backends.ONNX_FILE).stat().st_mtime_ns
    encoder_backends.load_backend.cache_clear()

    def refuse(*args, **kwargs):
        raise AssertionError("rebuilt an artefact that is cached")

    monkeypatch.setattr(encoder_backends, "_publish", lambda build, target: target if target.exists() else refuse())
    Encoder(backend="onnx").encode(PROMPTS[:1])
    Encoder(backend="static").encode(PROMPTS[:1])
    assert (folder / "onnx" / encoder_backends.ONNX_FILE).stat().st_mtime_ns == before
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # no half-built leftovers


# --- static ----------------------------------------------------------------------------------------

def test_static_model_is_distilled_offline_and_encodes(cache):
    static = Encoder(backend="static")
    x = static.encode(PROMPTS)
    assert x.shape == (3, STATIC_PCA) and static.dim == STATIC_PCA
    _unit_rows(x)
    np.testing.assert_array_equal(x, static.encode(PROMPTS))
    build = json.loads((encoder_backends.artefact_dir(resolve_model(None)) / "static" / "torouter_build.json")
                       .read_text())
    assert build["pca_dims"] == STATIC_PCA and 50 < build["vocabulary"] < 2000
    with pytest.raises(ValueError, match="head of a prompt only"):
        Encoder(backend="static", keep="tail").encode(PROMPTS)


# --- saved with the router -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["onnx", "static"])
@pytest.mark.parametrize("method", ["knn", "cluster", "mlp"])
def test_router_records_its_backend_and_reloads_with_it(cache, data, tmp_path, backend, method):
    params = {"epochs": 5} if method == "mlp" else {"n_clusters": 3} if method == "cluster" else {}
    router = make_router(method, backend=backend, **params).fit(data)
    path = router.save(tmp_path / method)
    assert json.loads((path / CONFIG_NAME).read_text())["params"]["backend"] == backend
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # artefacts live in the cache
    loaded = load_router(path)
    assert loaded.backend == backend and loaded._encoder().backend == backend
    np.testing.assert_allclose(loaded.predict(PROMPTS), router.predict(PROMPTS), rtol=1e-6)
    dim = STATIC_PCA if backend == "static" else 384
    assert router._encoder().encode(PROMPTS[:1]).shape == (1, dim)


def test_static_token_budget_is_the_default_and_cuts_long_prompts(cache):
    long = " ".join(["spider"] * 40 + ["python"] * 400)
    short = Encoder(backend="static", max_tokens=16)
    assert Encoder(backend="static").max_length == encoder_backends.STATIC_MAX_TOKENS
    assert short.max_length == 16 and short.count_truncated([long, "two words"]) == 1
    # Only the first 16 tokens count: what follows them changes nothing.
    np.testing.assert_allclose(short.encode([long]), short.encode([" ".join(["spider"] * 40)]), atol=1e-6)
    assert not np.allclose(Encoder(backend="static", max_tokens=512).encode([long]), short.encode([long]))
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        Encoder(backend="static", max_tokens=-1).encode(["x"])


def test_a_static_router_keeps_the_token_budget_it_was_trained_with(cache, data, tmp_path, monkeypatch):
    router = make_router("knn", k=3, backend="static").fit(data)
    assert router.fit_info_["encoder_max_length"] == encoder_backends.STATIC_MAX_TOKENS
    path = router.save(tmp_path / "r")
    monkeypatch.setattr(encoder_backends, "STATIC_MAX_TOKENS", 4)  # a later release reads fewer tokens
    loaded = load_router(path)
    assert loaded._encoder().max_length == router.fit_info_["encoder_max_length"]
    long = [" ".join(PROMPTS * 20)]
    np.testing.assert_allclose(loaded.predict(long), router.predict(long), rtol=1e-6)
    assert make_router("knn", k=3, backend="static").fit(data)._encoder().max_length == 4


def test_a_saved_router_with_an_unknown_backend_is_refused_at_load(cache, data, tmp_path):
    path = make_router("knn", k=3, backend="static").fit(data).save(tmp_path / "r")
    config = json.loads((path / CONFIG_NAME).read_text())
    config["params"]["backend"] = "quantum"
    (path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(RouterFileError, match=r"params.backend 'quantum' is not an encoder backend"):
        load_router(path)


def test_cli_train_picks_the_backend(cache, data, tmp_path):
    runner = CliRunner()
    source = tmp_path / "data.jsonl"
    data.to_jsonl(source)
    result = runner.invoke(app, ["train", str(source), "--method", "cluster", "--clusters", "3",
                                 "--backend", "static", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert load_router(tmp_path / "r").backend == "static"
    result = runner.invoke(app, ["train", str(source), "--method", "cluster", "--backend", "gpu",
                                 "--out", str(tmp_path / "r2")])
    assert result.exit_code != 0 and "unknown encoder backend 'gpu'" in result.output
    result = runner.invoke(app, ["train", str(source), "--method", "best-single", "--backend", "onnx",
                                 "--out", str(tmp_path / "r3")])
    assert result.exit_code != 0 and "does not use --backend" in result.output

