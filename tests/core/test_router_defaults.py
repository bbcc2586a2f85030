"""Defaults: the k-NN router picks k by cross-validation at fit time, and every default beats best-single."""

from __future__ import annotations

import json

import numpy as np
import pytest

from torouter.data import Record, RoutingDataset
from torouter.policy import choose
from torouter.routers import RouterFileError, load_router, make_router
from torouter.routers.base import CONFIG_NAME
from torouter.routers.knn import K_GRID, cross_validated_errors


def _grouped(n_per_group: int, noise: bool, seed: int = 0):
    """Two groups of prompts on orthogonal directions; expert a wins group 0 with chance .8, b group 1.

    With ``noise`` the 0/1 scores are drawn, so averaging many neighbours estimates the
    chance better than one; without, each prompt's scores are its group's exactly.
    """
    rng = np.random.default_rng(seed)
    records, vectors = [], []
    for i in range(2 * n_per_group):
        group = i % 2
        chance = np.array([0.8, 0.2]) if group == 0 else np.array([0.2, 0.8])
        scores = (rng.random(2) < chance).astype(float) if noise else chance
        records.append(Record(f"p{i}", f"prompt {i}", {"a": {"score": float(scores[0]), "cost": 1.0},
                                                        "b": {"score": float(scores[1]), "cost": 1.0}}))
        direction = np.eye(2)[group] + 0.05 * rng.standard_normal(2)
        vectors.append(direction / np.linalg.norm(direction))
    return RoutingDataset(records), np.asarray(vectors, dtype=np.float32)


def test_default_knn_chooses_k_by_cross_validation_and_says_so():
    data, x = _grouped(150, noise=True)
    router = make_router("knn").fit(data, embeddings=x)
    assert router.k is None
    info = router.fit_info_
    errors = {int(k): v for k, v in info["k_cv_error"].items()}
    assert info["k"] == router.k_ == min(errors, key=errors.get)
    assert set(errors) <= set(K_GRID) and "cross-validation" in info["k_chosen_by"]
    # noisy 0/1 scores: many neighbours estimate each group's chance far better than one
    assert router.k_ >= 20 and errors[1] > 1.5 * errors[router.k_]  # 2p(1-p) against p(1-p)


def test_without_noise_the_smallest_exact_k_wins():
    data, x = _grouped(30, noise=False)
    errors = cross_validated_errors(x, data.scores, "uniform")
    assert max(errors) < 48  # k is never larger than a training fold
    router = make_router("knn").fit(data, embeddings=x)
    assert router.k_ == 1  # every k up to a group's size is exact; ties go to the smallest


def test_an_explicit_k_is_kept_without_cross_validation():
    data, x = _grouped(20, noise=True)
    router = make_router("knn", k=7).fit(data, embeddings=x)
    assert router.k_ == 7 and "k_cv_error" not in router.fit_info_


def test_the_chosen_k_is_saved_and_reloaded(tmp_path):
    data, x = _grouped(60, noise=True)
    router = make_router("knn").fit(data, embeddings=x)
    path = router.save(tmp_path / "knn")
    config = json.loads((path / CONFIG_NAME).read_text())
    assert config["params"]["k"] is None and config["state"]["k"] == router.k_
    assert config["fit_info"]["k"] == router.k_
    loaded = load_router(path)
    assert loaded.k_ == router.k_
    np.testing.assert_allclose(loaded.predict_embeddings(x), router.predict_embeddings(x))


def test_a_router_saved_before_k_was_chosen_loads_with_its_params_k(tmp_path):
    data, x = _grouped(20, noise=True)
    path = make_router("knn", k=3).fit(data, embeddings=x).save(tmp_path / "old")
    config = json.loads((path / CONFIG_NAME).read_text())
    config["state"] = {}  # as written by earlier versions
    (path / CONFIG_NAME).write_text(json.dumps(config))
    assert load_router(path).k_ == 3
    config["params"]["k"] = None  # neither params nor state say k: a damaged file
    (path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(RouterFileError, match="number of neighbours k"):
        load_router(path)


def _mean_score(router, quality, data):
    picks = choose(quality, router.costs(), 0.0, allowed=data.mask)
    return float(data.scores[np.arange(len(data)), picks].mean())


@pytest.mark.parametrize("method", ["knn", "cluster", "mlp"])
def test_every_default_router_beats_the_best_single_expert(method):
    """Two specialists, each best on its own group: routing with the defaults beats either one alone."""
    data, x = _grouped(200, noise=True)
    order = np.random.default_rng(1).permutation(len(data))
    train, test = order[:300], order[300:]
    best = make_router("best-single").fit(data.subset(train))
    router = make_router(method).fit(data.subset(train), embeddings=x[train])
    held_out = data.subset(test)
    routed = _mean_score(router, router.predict_embeddings(x[test]), held_out)
    single = _mean_score(best, best.predict(held_out.texts()), held_out)
    assert routed > single + 0.15  # about .8 routed against .5 for either specialist alone
