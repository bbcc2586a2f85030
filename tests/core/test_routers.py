"""Every router: fit, predict shape, and the behaviour that makes it that router."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from torouter.data import Record, RoutingDataset
from torouter.encoders import Encoder
from torouter.policy import choose
from torouter.routers import (
    ROUTERS,
    BERTRouter,
    ClusterRouter,
    KNNRouter,
    MLPRouter,
    NotFittedError,
    Router,
    get_router_class,
    make_router,
)
from torouter.routers._training import soft_label_loss
from torouter.synthetic import make_synthetic

NAN = float("nan")
EXPERTS = ["edge-small", "code-7b", "med-7b", "cloud-large"]
LONG_PROMPT = "Explain the following in detail. " + " ".join(f"word{i}" for i in range(400))


# --- fixtures: each router trained once per session -----------------------------------------

@pytest.fixture(scope="session")
def train_set(synthetic_split):
    return synthetic_split[0]


@pytest.fixture(scope="session")
def test_set(synthetic_split):
    return synthetic_split[1]


@pytest.fixture(scope="session")
def train_embeddings(train_set):
    """The training prompts encoded once, shared by every embedding router's fit."""
    return Encoder().encode(train_set.texts())


@pytest.fixture(scope="session")
def knn1(train_set):
    # encodes the training set itself (the path users take)
    return make_router("knn", k=1).fit(train_set)


@pytest.fixture(scope="session")
def knn5(train_set, train_embeddings):
    return make_router("knn", k=5).fit(train_set, embeddings=train_embeddings)


@pytest.fixture(scope="session")
def cluster(train_set, train_embeddings):
    return make_router("cluster", n_clusters=4).fit(train_set, embeddings=train_embeddings)


@pytest.fixture(scope="session")
def mlp(train_set, train_embeddings):
    return make_router("mlp", epochs=30).fit(train_set, embeddings=train_embeddings)


@pytest.fixture(scope="session")
def bert_data():
    records = make_synthetic(12, seed=1)
    records.append(Record("long", LONG_PROMPT, records[0].responses))
    return RoutingDataset(records)


@pytest.fixture(scope="session")
def bert(bert_data):
    return make_router("bert", epochs=1, max_length=32, batch_size=8).fit(bert_data)


@pytest.fixture(scope="session")
def fitted(train_set, knn1, knn5, cluster, mlp):
    return {
        "random": make_router("random", seed=0).fit(train_set),
        "best-single": make_router("best-single").fit(train_set),
        "oracle": make_router("oracle").fit(train_set),
        "knn1": knn1,
        "knn5": knn5,
        "cluster": cluster,
        "mlp": mlp,
    }


def _mean_score(quality, dataset, costs, cost_weight=0.0):
    picks = choose(quality, costs, cost_weight, allowed=dataset.mask)
    return float(dataset.scores[np.arange(len(dataset)), picks].mean())


def _unique_training_prompt(dataset):
    counts = Counter(dataset.texts())
    return next(i for i, t in enumerate(dataset.texts()) if counts[t] == 1)


# --- registry and parameters ----------------------------------------------------------------

def test_registry_names_every_router():
    assert set(ROUTERS) == {"random", "best-single", "oracle", "knn", "cluster", "mlp", "bert"}
    assert get_router_class("knn") is KNNRouter
    assert get_router_class("cluster") is ClusterRouter
    for method, cls in ROUTERS.items():
        assert cls.method == method


def test_make_router_rejects_unknown_method_and_params():
    with pytest.raises(ValueError, match="unknown router method 'svm'"):
        make_router("svm")
    with pytest.raises(ValueError, match=r"router 'mlp' has no parameter\(s\) \['k'\]"):
        make_router("mlp", k=3)


def test_params_and_repr():
    router = make_router("mlp", temperature=5.0, hidden=32)
    params = router.get_params()
    assert params["temperature"] == 5.0 and params["hidden"] == 32 and params["epochs"] == 60
    assert repr(make_router("knn", k=3)).startswith("KNNRouter(k=3, weights='uniform'")
    assert make_router("bert").temperature == 10.0


@pytest.mark.parametrize("method", sorted(ROUTERS))
def test_unfitted_router_refuses_to_predict(method):
    with pytest.raises(NotFittedError, match="not fitted"):
        make_router(method).predict(["hello"])


def test_fit_needs_a_routing_dataset(train_set):
    with pytest.raises(TypeError, match="RoutingDataset"):
        make_router("best-single").fit(train_set.records)


def test_fit_rejects_expert_never_observed(train_set):
    data = RoutingDataset(train_set.records[:10], experts=EXPERTS + ["ghost"])
    with pytest.raises(ValueError, match=r"never observed in the training data: \['ghost'\]"):
        make_router("best-single").fit(data)


# --- shapes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["random", "best-single", "oracle", "knn1", "knn5", "cluster", "mlp"])
def test_predict_shape(fitted, train_set, test_set, name):
    router = fitted[name]
    assert router.experts_ == EXPERTS
    prompts = train_set.texts()[:7] if name == "oracle" else test_set.texts()[:7]
    q = router.predict(prompts)
    assert q.shape == (7, 4) and q.dtype == np.float64
    assert np.isfinite(q).all()
    assert router.predict([]).shape == (0, 4)
    with pytest.raises(TypeError, match="wrap a single prompt"):
        router.predict("just one string")
    assert router.fit_info_["n_train"] == len(train_set)


def test_predict_accepts_message_lists(knn1, test_set):
    text = test_set.texts()[0]
    as_messages = [{"role": "system", "content": ""}, {"role": "user", "content": text}]
    np.testing.assert_allclose(knn1.predict([as_messages]), knn1.predict([text]), rtol=1e-6)


def test_costs_and_prices(fitted, train_set):
    router = fitted["best-single"]
    np.testing.assert_allclose(router.costs(), train_set.mean_costs())
    overridden = router.costs({"cloud-large": 0.5})
    assert overridden[3] == 0.5 and overridden[0] == router.costs()[0]
    with pytest.raises(ValueError, match="unknown experts"):
        router.costs({"gpt-9": 1.0})


# --- baselines ------------------------------------------------------------------------------

def test_random_router_is_seeded_and_uniform(train_set):
    a = make_router("random", seed=3).fit(train_set).predict(["x"] * 50)
    b = make_router("random", seed=3).fit(train_set).predict(["x"] * 50)
    c = make_router("random", seed=4).fit(train_set).predict(["x"] * 50)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert ((a >= 0) & (a < 1)).all()
    # its picks at cost_weight 0 spread over every expert
    assert set(a.argmax(axis=1)) == {0, 1, 2, 3}


def test_best_single_always_picks_best_mean_expert(fitted, train_set, test_set):
    router = fitted["best-single"]
    np.testing.assert_allclose(router.predict(["anything"])[0], train_set.mean_scores())
    best = EXPERTS[int(np.argmax(train_set.mean_scores()))]
    assert best == "cloud-large"
    assert set(router.route(test_set.texts())) == {best}


def test_oracle_reads_true_scores_and_rejects_unknown_prompts(fitted, train_set):
    router = fitted["oracle"]
    idx = [_unique_training_prompt(train_set)]
    np.testing.assert_array_equal(router.predict([train_set.texts()[idx[0]]]), train_set.scores[idx])
    with pytest.raises(KeyError, match="only knows the prompts it was fitted on"):
        router.predict(["a prompt it never saw"])


def test_oracle_keeps_unobserved_as_nan():
    data = RoutingDataset([Record("a", "pa", {"x": {"score": 0.3, "cost": 1.0}}),
                           Record("b", "pb", {"x": {"score": 0.6, "cost": 1.0}, "y": {"score": 1.0, "cost": 2.0}})])
    q = make_router("oracle").fit(data).predict(["pa"])
    assert q[0, 0] == 0.3 and np.isnan(q[0, 1])


# --- learned routers beat random --------------------------------------------------------------

@pytest.mark.parametrize("name", ["knn1", "knn5", "cluster", "mlp"])
def test_learned_router_beats_random_on_held_out_data(fitted, test_set, name):
    router = fitted[name]
    costs = router.costs()
    ours = _mean_score(router.predict(test_set.texts()), test_set, costs)
    random = _mean_score(fitted["random"].predict(test_set.texts()), test_set, costs)
    assert ours > random + 0.1, (ours, random)


def test_learned_router_routes_cheaper_with_cost_weight(mlp, test_set):
    costs = mlp.costs()
    q = mlp.predict(test_set.texts())
    free = costs[choose(q, costs, 0.0)].mean()
    thrifty = costs[choose(q, costs, 100.0 / (costs.max() - costs.min()))].mean()
    assert thrifty < free
    assert thrifty == pytest.approx(costs.min())


# --- knn ------------------------------------------------------------------------------------

def test_knn1_copies_nearest_training_prompts_scores(knn1, train_set):
    i = _unique_training_prompt(train_set)
    q = knn1.predict([train_set.texts()[i]])
    np.testing.assert_allclose(q[0], train_set.scores[i], rtol=1e-6)


def test_given_embeddings_match_the_routers_own_encoding(knn1, knn5, train_embeddings, train_set):
    np.testing.assert_allclose(knn1.embeddings_, train_embeddings, atol=1e-5)
    np.testing.assert_array_equal(knn5.embeddings_, train_embeddings)
    with pytest.raises(ValueError, match="3 embeddings for 180 prompts"):
        make_router("knn").fit(train_set, embeddings=train_embeddings[:3])


def test_knn_with_k_above_n_averages_every_training_prompt(train_set, train_embeddings):
    router = make_router("knn", k=10_000).fit(train_set, embeddings=train_embeddings)
    q = router.predict(["What is the capital of Peru?"])
    np.testing.assert_allclose(q[0], train_set.mean_scores(), rtol=1e-5)


@pytest.fixture(scope="module")
def partial():
    """Two prompts; expert e1 is missing from B, e2 is null on C... (see each test)."""
    return RoutingDataset([
        Record("A", "How do I reverse a list in Python?", {"e1": {"score": 0.8, "cost": 1.0},
                                                            "e2": {"score": 0.2, "cost": 2.0}}),
        Record("B", "What is the capital of Kenya?", {"e2": {"score": 0.6, "cost": 2.0}}),
    ])


def test_knn_estimate_ignores_unobserved_neighbours(partial):
    router = make_router("knn", k=2).fit(partial)
    q = router.predict(["How do I reverse a list in Python?"])
    # both records are neighbours; e1 is observed on A alone: 0.8, not (0.8 + 0) / 2
    np.testing.assert_allclose(q[0], [0.8, 0.4], rtol=1e-6)


def test_knn_falls_back_to_mean_when_no_neighbour_observed(partial):
    router = make_router("knn", k=1).fit(partial)
    q = router.predict(["What is the capital of Kenya?"])
    # B's nearest is B, where e1 is unobserved: its training mean (0.8) stands in, not 0 or NaN
    np.testing.assert_allclose(q[0], [0.8, 0.6], rtol=1e-6)


def test_knn_distance_weights_by_hand(partial):
    router = make_router("knn", k=2, weights="distance").fit(partial)
    router.embeddings_ = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    q = router.predict_embeddings(np.array([[0.6, 0.8]], dtype=np.float32))
    # sims .6 (A), .8 (B); e1 only on A -> .8; e2 -> (.6*.2 + .8*.6) / 1.4
    np.testing.assert_allclose(q[0], [0.8, 0.6 / 1.4], rtol=1e-6)
    uniform = make_router("knn", k=2).fit(partial)
    uniform.embeddings_ = router.embeddings_
    np.testing.assert_allclose(uniform.predict_embeddings(np.array([[0.6, 0.8]], dtype=np.float32))[0],
                               [0.8, 0.4], rtol=1e-6)


@pytest.mark.parametrize("params, message", [({"k": 0}, "k must be >= 1"),
                                             ({"weights": "cosine"}, "weights must be")])
def test_knn_rejects_bad_params(partial, params, message):
    with pytest.raises(ValueError, match=message):
        make_router("knn", **params).fit(partial)


# --- cluster --------------------------------------------------------------------------------

def _two_groups():
    """Four prompts in two obvious groups; e2 is unobserved on one 'cook' prompt."""
    code = {"e1": {"score": 1.0, "cost": 1.0}, "e2": {"score": 0.0, "cost": 2.0}}
    return RoutingDataset([
        Record("c1", "code", code), Record("c2", "code", code),
        Record("k1", "cook", {"e1": {"score": 0.0, "cost": 1.0}, "e2": {"score": 1.0, "cost": 2.0}}),
        Record("k2", "cook", {"e1": {"score": 0.5, "cost": 1.0}}),
    ])


def test_cluster_estimates_are_shrunk_cluster_means_by_hand():
    data = _two_groups()
    x = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float32)
    router = make_router("cluster", n_clusters=2, prior=1.0).fit(data, embeddings=x)
    q = router.predict_embeddings(np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32))
    overall = data.mean_scores()  # e1: 2.5 / 4 observed, e2: 1 / 3
    np.testing.assert_allclose(overall, [0.625, 1 / 3])
    # code cluster: e1 (2 + .625) / (2 + 1), e2 (0 + 1/3) / (2 + 1)
    # cook cluster: e1 (.5 + .625) / (2 + 1), e2 (1 + 1/3) / (1 + 1): one observation there
    np.testing.assert_allclose(q[0], [2.625 / 3, 1 / 9], rtol=1e-6)
    np.testing.assert_allclose(q[1], [1.125 / 3, 2 / 3], rtol=1e-6)
    assert sorted(router.fit_info_["cluster_sizes"]) == [2, 2]
    exact = make_router("cluster", n_clusters=2, prior=0.0).fit(data, embeddings=x)
    np.testing.assert_allclose(exact.predict_embeddings(x[[0, 2]]), [[1.0, 0.0], [0.25, 1.0]])


def test_cluster_without_prior_falls_back_to_overall_mean_where_an_expert_is_unobserved():
    data = RoutingDataset([
        Record("c1", "code", {"e1": {"score": 1.0, "cost": 1.0}, "e2": {"score": 0.2, "cost": 2.0}}),
        Record("k1", "cook", {"e1": {"score": 0.0, "cost": 1.0}}),
    ])
    x = np.array([[1, 0], [0, 1]], dtype=np.float32)
    router = make_router("cluster", n_clusters=2, prior=0.0).fit(data, embeddings=x)
    np.testing.assert_allclose(router.predict_embeddings(x), [[1.0, 0.2], [0.0, 0.2]])


def test_cluster_caps_clusters_at_distinct_prompts():
    data = _two_groups()
    x = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float32)
    router = make_router("cluster", n_clusters=50).fit(data, embeddings=x)
    assert router.centroids_.shape == (2, 2)


def _six_tasks(per_task: int = 30, seed: int = 0):
    """Six well-separated groups of prompts; expert j answers group j only (plus a little noise)."""
    rng = np.random.default_rng(seed)
    records, rows = [], []
    for g in range(6):
        for i in range(per_task):
            responses = {f"e{j}": {"score": float(j == g) if rng.random() > 0.1 else float(j != g), "cost": 1.0}
                         for j in range(6)}
            records.append(Record(f"t{g}-{i}", f"task {g} prompt {i}", responses))
            row = np.zeros(6, dtype=np.float32)
            row[g] = 1.0
            rows.append(row + rng.normal(0, 0.05, 6).astype(np.float32))
    return RoutingDataset(records), np.array(rows)


def test_cluster_chooses_its_cluster_count_by_cross_validated_routing():
    data, x = _six_tasks()
    router = make_router("cluster").fit(data, embeddings=x)
    cv = {int(k): v for k, v in router.fit_info_["n_clusters_cv_score"].items()}
    # Four clusters must merge tasks that want different experts; six separate them, and more
    # clusters route no better, so the smaller count wins.
    assert cv[4] < cv[6]
    assert router.fit_info_["n_clusters"] == 6 == len(router.centroids_)
    assert "cross-validation" in router.fit_info_["n_clusters_chosen_by"]
    routed = router.predict_embeddings(x).argmax(axis=1)
    assert (routed == np.repeat(np.arange(6), 30)).all()


def test_cluster_count_falls_back_to_the_default_on_too_few_prompts():
    router = make_router("cluster").fit(_two_groups(), embeddings=np.array([[1, 0], [1, 0], [0, 1], [0, 1]],
                                                                            dtype=np.float32))
    assert router.fit_info_["n_clusters_cv_score"] == {}
    assert "too few prompts" in router.fit_info_["n_clusters_chosen_by"]
    assert len(router.centroids_) == 2  # the default, capped at the distinct prompts


def test_cluster_cross_validation_routes_only_to_observed_experts():
    from torouter.routers.cluster import CLUSTER_GRID, cross_validated_routing

    data, x = _six_tasks()
    full = cross_validated_routing(x, data.scores, prior=5.0)
    assert set(full) == set(CLUSTER_GRID) and full[6] > 0.85
    scores = data.scores.copy()
    scores[:, 0] = np.nan  # the only good expert for task 0 is never observed: its prompts earn ~0.1
    missing = cross_validated_routing(x, scores, prior=5.0)
    assert all(np.isfinite(v) for v in missing.values())
    assert missing[6] < full[6] - 0.1


@pytest.mark.parametrize("params, message", [({"n_clusters": 0}, "n_clusters must be >= 1"),
                                             ({"n_clusters": 2.5}, "n_clusters must be >= 1 or None"),
                                             ({"prior": -1.0}, "prior must be >= 0")])
def test_cluster_rejects_bad_params(params, message):
    with pytest.raises(ValueError, match=message):
        make_router("cluster", **params).fit(_two_groups(), embeddings=np.eye(4, dtype=np.float32))


def test_embedding_router_counts_truncated_prompts(partial):
    data = RoutingDataset(partial.records + [Record("L", LONG_PROMPT, {"e1": {"score": 0.1, "cost": 1.0}})])
    router = make_router("knn").fit(data)
    assert router.fit_info_["truncated"] == 1
    assert router.fit_info_["encoder_max_length"] > 0


# --- soft-label training masks unobserved experts ---------------------------------------------

def test_soft_label_loss_ignores_masked_experts():
    mask = torch.tensor([[True, False, True], [True, True, True]])
    targets = torch.tensor([[0.7, 0.0, 0.3], [0.2, 0.5, 0.3]])
    logits = torch.tensor([[1.0, 5.0, 0.0], [0.1, 0.2, 0.3]], requires_grad=True)
    loss = soft_label_loss(logits, targets, mask)
    loss.backward()
    # the masked logit gets no gradient and does not change the loss
    assert logits.grad[0, 1] == 0.0
    other = torch.tensor([[1.0, -50.0, 0.0], [0.1, 0.2, 0.3]])
    assert float(soft_label_loss(other, targets, mask)) == pytest.approx(loss.item())
    # by hand: row 0 softmax over the observed logits [1, 0] only
    p = torch.log_softmax(torch.tensor([1.0, 0.0]), dim=0)
    row0 = -(0.7 * p[0] + 0.3 * p[1])
    row1 = -(targets[1] * torch.log_softmax(logits[1].detach(), dim=0)).sum()
    assert loss.item() == pytest.approx(float((row0 + row1) / 2), rel=1e-6)


def test_mlp_masked_expert_is_not_learned_as_zero():
    # e2 scores 1.0 wherever it is observed (even rows) and is unobserved on odd rows; e1 scores 0.5.
    # Read as 0 on the odd rows, e2 would lose to e1 there; masked out, e2 wins everywhere.
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(64, 8)).astype(np.float32)
    records = []
    for i in range(64):
        responses = {"e1": {"score": 0.5, "cost": 1.0}}
        if i % 2 == 0:
            responses["e2"] = {"score": 1.0, "cost": 1.0}
        elif i % 4 == 1:
            responses["e2"] = {"score": None, "cost": 1.0}  # null score: unobserved too
        records.append(Record(f"r{i}", f"prompt {i}", responses))
    data = RoutingDataset(records)
    assert data.mask[:, 1].sum() == 32
    router = MLPRouter(hidden=16, epochs=100, dropout=0.0, lr=1e-2, device="cpu").fit(data, embeddings=emb)
    q = router.predict_embeddings(emb)
    assert np.isfinite(q).all()
    assert (q[1::2, 1] > q[1::2, 0]).all()
    assert (q[:, 1] > q[:, 0]).all()


# --- mlp ------------------------------------------------------------------------------------

def test_mlp_offset_puts_predictions_on_score_scale(mlp, train_set, train_embeddings):
    q = mlp.predict_embeddings(train_embeddings)
    # fit_offset makes the mean prediction over observed entries match the mean observed score
    assert q[train_set.mask].mean() == pytest.approx(train_set.scores[train_set.mask].mean(), abs=1e-5)
    assert np.isfinite(mlp.fit_info_["final_loss"])


def test_mlp_is_reproducible_from_its_seed(train_set, train_embeddings):
    def fit(seed):
        router = make_router("mlp", epochs=3, seed=seed).fit(train_set, embeddings=train_embeddings)
        return router.predict_embeddings(train_embeddings[:5])

    np.testing.assert_array_equal(fit(5), fit(5))
    assert not np.allclose(fit(5), fit(6))


# --- bert -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_bert_router_fits_and_predicts(bert, bert_data):
    assert isinstance(bert, BERTRouter) and isinstance(bert, Router)
    q = bert.predict(["What is the capital of Japan?", "Write a Python function that reverses a string."])
    assert q.shape == (2, 4) and np.isfinite(q).all()
    # never silently truncated: the long prompt is counted
    assert bert.fit_info_["truncated"] == 1
    assert bert.fit_info_["max_length"] == 32
    assert np.isfinite(bert.fit_info_["final_loss"])
    # the offset puts the mean prediction on the training scores' scale
    tq = bert.predict(bert_data.texts())
    assert tq[bert_data.mask].mean() == pytest.approx(bert_data.scores[bert_data.mask].mean(), abs=1e-4)
    assert bert.route(["What is the capital of Japan?"])[0] in EXPERTS
