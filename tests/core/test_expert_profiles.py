"""Adding, replacing and dropping an expert without retraining: profiles, persistence, CLI, calibration."""

from __future__ import annotations

import datetime
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from torouter.calibration import allocate, calibration_set, choose_calibration, stratified_sample
from torouter.cli import app
from torouter.controller import Controller, IneligibleRequest
from torouter.data import Record, RoutingDataset, write_jsonl
from torouter.encoders import Encoder
from torouter.prepare.pipeline import read_prompts
from torouter.routers import BestSingleRouter, ClusterRouter, KNNRouter, load_router
from torouter.routers.profiles import (
    ExpertProfileError,
    difficulty_target,
    empirical_prior,
    regression_target,
    shrunk_group_means,
)

MATH = ["What is 17 times 23?", "Solve for x: 3x + 5 = 20.", "Compute the integral of x squared from 0 to 3.",
        "What is the square root of 144?", "Add 456 and 789.", "Factor the polynomial x^2 - 5x + 6.",
        "What is 15 percent of 240?", "Divide 1024 by 32."]
POEMS = ["Write a poem about the autumn sea.", "Compose a haiku about falling snow.",
         "Write a sonnet about lost love.", "Give me a short verse about the moon over the hills.",
         "Write a limerick about a cat in a hat.", "Compose an ode to the morning sun.",
         "Write a ballad about a lonely sailor.", "Write free verse about city rain at night."]
TRAINED = ["calc", "bard"]


def record(i: int, prompt: str, scores: dict[str, float | None], cost: float = 0.001) -> Record:
    return Record(id=f"p{i}", prompt=prompt,
                  responses={e: {"score": s, "cost": cost if s is not None else None} for e, s in scores.items()})


def training_data() -> RoutingDataset:
    """calc answers maths well and poems badly, bard the reverse; two clusters by topic."""
    records = [record(i, p, {"calc": 0.9, "bard": 0.2}) for i, p in enumerate(MATH)]
    records += [record(len(MATH) + i, p, {"calc": 0.1, "bard": 0.8}) for i, p in enumerate(POEMS)]
    return RoutingDataset(records)


def calibration_data(name: str = "new", math_scores=(1.0, 1.0, 1.0, 0.0), poem_scores=(0.0, 0.0, 0.0, 0.0),
                     cost: float = 0.004) -> RoutingDataset:
    """The new expert's answers to four prompts of each topic (the first four of each list)."""
    records = [record(i, p, {name: s}, cost) for i, (p, s) in enumerate(zip(MATH, math_scores))]
    records += [record(len(MATH) + i, p, {name: s}, cost) for i, (p, s) in enumerate(zip(POEMS, poem_scores))]
    return RoutingDataset(records)


@pytest.fixture(scope="module")
def data() -> RoutingDataset:
    return training_data()


@pytest.fixture(scope="module")
def embeddings(data) -> np.ndarray:
    return Encoder().encode(data.texts())


def cluster_router(data, embeddings) -> ClusterRouter:
    router = ClusterRouter(n_clusters=2, prior=0.0).fit(data, embeddings=embeddings)
    router.profile_prior = "fit"  # the router's own prior (0): plain cluster means, checkable by hand
    router.profile_target = "mean"
    return router


def topic_clusters(router: ClusterRouter, embeddings) -> tuple[int, int]:
    labels = router.clusters(embeddings)
    math, poems = set(labels[: len(MATH)]), set(labels[len(MATH):])
    assert len(math) == len(poems) == 1 and math != poems, "the two topics should be the two clusters"
    return math.pop(), poems.pop()


# --- the cluster router ---------------------------------------------------------------------------

def test_cluster_add_expert_profiles_its_cluster_means(data, embeddings):
    router = cluster_router(data, embeddings)
    before = router.cluster_scores_.copy()
    router.add_expert("new", calibration_data())
    math, poems = topic_clusters(router, embeddings)
    assert router.experts_ == ["calc", "bard", "new"]
    assert router.cluster_scores_[math, 2] == pytest.approx(0.75)
    assert router.cluster_scores_[poems, 2] == pytest.approx(0.0)
    np.testing.assert_array_equal(router.cluster_scores_[:, :2], before)  # the others untouched
    assert router.expert_costs_["new"] == pytest.approx(0.004)
    change = router.fit_info_["expert_changes"][-1]
    assert change["action"] == "added" and change["expert"] == "new" and change["n_prompts"] == 8
    assert datetime.datetime.fromisoformat(change["at"]).tzinfo is not None
    assert router.route([MATH[5], POEMS[5]]) == ["calc", "bard"]


def test_cluster_prior_shrinks_toward_the_calibration_mean(data, embeddings):
    router = cluster_router(data, embeddings)
    router.prior = 2.0
    router.add_expert("new", calibration_data())
    math, poems = topic_clusters(router, embeddings)
    mean = 3 / 8
    assert router.cluster_scores_[math, 2] == pytest.approx((3 + 2 * mean) / (4 + 2))
    assert router.cluster_scores_[poems, 2] == pytest.approx((0 + 2 * mean) / (4 + 2))


def test_cluster_replace_reprofiles_the_expert_in_place(data, embeddings):
    router = cluster_router(data, embeddings)
    router.add_expert("calc", calibration_data("calc", (0.5, 0.5, 0.5, 0.5), (1.0, 1.0, 1.0, 1.0), cost=0.01))
    math, poems = topic_clusters(router, embeddings)
    assert router.experts_ == TRAINED
    assert router.cluster_scores_[math, 0] == pytest.approx(0.5)
    assert router.cluster_scores_[poems, 0] == pytest.approx(1.0)
    assert router.cluster_scores_[poems, 1] == pytest.approx(0.8)  # bard untouched
    assert router.expert_costs_["calc"] == pytest.approx(0.01)
    assert router.fit_info_["expert_changes"][-1]["action"] == "replaced"


def test_cluster_drop_expert_keeps_the_others(data, embeddings):
    router = cluster_router(data, embeddings)
    router.add_expert("new", calibration_data())
    kept = router.predict(MATH + POEMS)[:, [0, 2]]
    router.drop_expert("bard")
    assert router.experts_ == ["calc", "new"] and set(router.expert_costs_) == {"calc", "new"}
    np.testing.assert_array_equal(router.predict(MATH + POEMS), kept)
    assert router.fit_info_["expert_changes"][-1] == {**router.fit_info_["expert_changes"][-1],
                                                      "action": "dropped", "expert": "bard"}
    # a dropped expert trained on everything matches the router trained without it
    without = ClusterRouter(n_clusters=2, prior=0.0).fit(RoutingDataset(data.records, ["calc"]),
                                                         embeddings=embeddings)
    np.testing.assert_allclose(router.predict(MATH + POEMS)[:, 0], without.predict(MATH + POEMS)[:, 0])


def test_drop_refuses_unknown_and_last_experts(data, embeddings):
    router = cluster_router(data, embeddings)
    with pytest.raises(ExpertProfileError, match="'ghost'.*no profile"):
        router.drop_expert("ghost")
    router.drop_expert("bard")
    with pytest.raises(ExpertProfileError, match="only expert"):
        router.drop_expert("calc")


def test_difficulty_target_and_shrinkage_by_hand():
    groups = np.array([0, 0, 1, 1])
    scores = np.array([1.0, 1.0, 0.0, 1.0])
    others = np.array([[0.8, 0.6], [0.4, 0.2]])  # group 0 easy (0.7), group 1 hard (0.3)
    target = difficulty_target(groups, scores, others)
    # mean 0.75; the difficulties (0.7, 0.7, 0.3, 0.3) centre on 0.5, so the least-squares slope of
    # the scores on them is (0.2 * 0.25 * 2 + -0.2 * -0.75 + -0.2 * 0.25) / (4 * 0.2 ** 2) = 1.25
    np.testing.assert_allclose(target, [0.75 + 1.25 * 0.2, 0.75 - 1.25 * 0.2])
    np.testing.assert_allclose(shrunk_group_means(groups, scores, 3, 2.0, np.array([0.5, 0.5, 0.4])),
                               [(2 + 1) / 4, (1 + 1) / 4, 0.4])
    assert empirical_prior(scores, target, groups, np.zeros((2, 0))) is None  # no other experts
    assert empirical_prior(scores, target, groups, others) is None  # fewer than three groups


def test_regression_target_copies_a_sibling_expert():
    # the new expert scores like the second known expert: the target follows that expert's profile
    others = np.array([[0.5, 0.9], [0.5, 0.1], [0.5, 0.5]])
    groups = np.repeat([0, 1, 2], 10)
    scores = others[groups, 1]
    np.testing.assert_allclose(regression_target(groups, scores, others), others[:, 1], atol=0.02)
    np.testing.assert_allclose(regression_target(groups[:2], scores[:2], others), 0.9)  # too few: the mean


def test_cluster_default_profile_adds_with_a_measured_prior(data, embeddings):
    router = ClusterRouter(n_clusters=2).fit(data, embeddings=embeddings)
    router.add_expert("new", calibration_data())
    assert router.profile_target == "difficulty" and router.profile_prior == "auto"
    assert np.isfinite(router.cluster_scores_).all() and (0 <= router.cluster_scores_).all()
    assert router.route([MATH[6]]) == ["calc"]


# --- the k-NN router --------------------------------------------------------------------------------

def test_knn_added_expert_reads_its_nearest_calibration_prompts(data, embeddings):
    router = KNNRouter(k=3).fit(data, embeddings=embeddings)
    before = router.predict(MATH + POEMS)
    calibration = calibration_data(math_scores=(1.0, 1.0, 1.0, 1.0))
    router.add_expert("new", calibration)
    after = router.predict(MATH + POEMS)
    np.testing.assert_array_equal(after[:, :2], before)  # the trained experts untouched
    k = int(router.profile_k_[2])
    assert k >= 1 and router.profile_k_[:2].tolist() == [0, 0]
    # by hand: the mean of the new expert's scores over the k nearest calibration prompts
    x_cal, x_all = Encoder().encode(calibration.texts()), Encoder().encode(MATH + POEMS)
    y = calibration.scores[:, 0]
    expected = [y[np.argsort(-(x_cal @ q))[:k]].mean() for q in x_all]
    np.testing.assert_allclose(after[:, 2], expected, atol=1e-6)
    assert router.mean_scores_[2] == pytest.approx(0.5)
    assert np.isnan(router.scores_[:, 2]).all()


def test_knn_replace_and_drop(data, embeddings):
    router = KNNRouter(k=3).fit(data, embeddings=embeddings)
    router.add_expert("new", calibration_data())
    assert len(router.profile_embeddings_) == 8
    router.add_expert("calc", calibration_data("calc", (0.0,) * 4, (1.0,) * 4))
    assert router.experts_ == ["calc", "bard", "new"] and router.profile_k_[0] >= 1
    assert np.isnan(router.scores_[:, 0]).all()
    assert router.predict([POEMS[0]])[0, 0] > router.predict([MATH[0]])[0, 0]
    router.drop_expert("new")
    router.drop_expert("calc")
    assert router.experts_ == ["bard"] and len(router.profile_embeddings_) == 0
    assert router.profile_scores_.shape == (0, 1)


# --- persistence --------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda d, x: cluster_router(d, x), lambda d, x: KNNRouter(k=3).fit(d, embeddings=x)],
                         ids=["cluster", "knn"])
def test_persistence_round_trip_with_added_experts(tmp_path, data, embeddings, make):
    router = make(data, embeddings)
    router.add_expert("new", calibration_data())
    router.drop_expert("bard")
    router.save(tmp_path / "r")
    config = json.loads((tmp_path / "r" / "torouter.json").read_text())
    assert [c["action"] for c in config["fit_info"]["expert_changes"]] == ["added", "dropped"]
    assert config["fit_info"]["expert_changes"][0]["n_prompts"] == 8
    loaded = load_router(tmp_path / "r")
    assert loaded.experts_ == ["calc", "new"]
    assert loaded.fit_info_ == router.fit_info_
    np.testing.assert_allclose(loaded.predict(MATH + POEMS), router.predict(MATH + POEMS), atol=1e-6)
    loaded.add_expert("bard", calibration_data("bard", (0.0,) * 4, (1.0,) * 4))  # a loaded router takes more
    assert loaded.route([POEMS[7]]) == ["bard"]


def test_knn_saved_without_added_experts_loads_with_none(tmp_path, data, embeddings):
    router = KNNRouter(k=3).fit(data, embeddings=embeddings)
    router.save(tmp_path / "r")
    from safetensors.numpy import load_file

    assert "profile_k" not in load_file(str(tmp_path / "r" / "weights.safetensors"))  # the old layout
    loaded = load_router(tmp_path / "r")
    assert loaded.profile_k_.tolist() == [0, 0] and "expert_changes" not in loaded.fit_info_


# --- refusals ---------------------------------------------------------------------------------------

def test_refuses_data_without_scored_prompts(data, embeddings):
    router = cluster_router(data, embeddings)
    unscored = RoutingDataset([record(0, MATH[0], {"new": None}), record(1, POEMS[0], {"new": None})])
    with pytest.raises(ExpertProfileError, match="'new' has no scored prompts"):
        router.add_expert("new", unscored)
    with pytest.raises(ExpertProfileError, match="'other' has no responses"):
        router.add_expert("other", calibration_data())
    assert router.experts_ == TRAINED and "expert_changes" not in router.fit_info_


def test_a_router_without_profiles_says_so(data):
    router = BestSingleRouter().fit(data)
    with pytest.raises(ExpertProfileError, match="'best-single' router cannot add.*'cluster', 'knn'"):
        router.add_expert("new", calibration_data())
    with pytest.raises(ExpertProfileError, match="'best-single' router cannot drop"):
        router.drop_expert("calc")


# --- through the controller -------------------------------------------------------------------------

def test_controller_routes_to_an_added_expert(data, embeddings):
    router = cluster_router(data, embeddings)
    router.add_expert("new", calibration_data(math_scores=(1.0,) * 4, poem_scores=(1.0,) * 4))
    controller = Controller(router)
    assert controller.experts == ["calc", "bard", "new"]
    assert controller.decide(MATH[6]).expert == "new"
    assert controller.decide(POEMS[6], cost_weight=1000.0).expert != "new"  # the dearest expert
    assert controller.decide(MATH[6], expert="bard").expert == "bard"
    with pytest.raises(IneligibleRequest, match="unknown expert 'ghost'"):
        controller.decide(MATH[6], expert="ghost")
    router.drop_expert("new")
    with pytest.raises(IneligibleRequest, match="unknown expert 'new'"):
        Controller(router).decide(MATH[6], expert="new")
    with pytest.raises(ValueError, match="unknown experts"):
        router.costs({"new": 0.1})


# --- the calibration helper -------------------------------------------------------------------------

def test_allocate_shares_by_size_with_one_each():
    assert allocate(np.array([10, 5, 1]), 8).tolist() == [5, 2, 1]
    assert allocate(np.array([12, 0, 4]), 4).tolist() == [3, 0, 1]
    assert allocate(np.array([100, 1]), 2).tolist() == [1, 1]  # a small stratum still gets one
    assert allocate(np.array([100, 1]), 1).tolist() == [1, 0]
    assert allocate(np.array([3, 1]), 10).tolist() == [3, 1]


def test_calibration_choice_is_deterministic_for_a_seed(data, embeddings):
    router = cluster_router(data, embeddings)
    for strategy in ("random", "stratified"):
        first = choose_calibration(router, data, 6, seed=3, embeddings=embeddings, strategy=strategy)
        again = choose_calibration(router, data, 6, seed=3, embeddings=embeddings, strategy=strategy)
        assert first.tolist() == again.tolist()
        assert len(set(first.tolist())) == 6
        draws = {tuple(choose_calibration(router, data, 6, seed=s, embeddings=embeddings, strategy=strategy))
                 for s in range(6)}
        assert len(draws) > 1
    stratified = choose_calibration(router, data, 6, seed=3, embeddings=embeddings, strategy="stratified")
    math, _ = topic_clusters(router, embeddings)
    assert sum(router.clusters(embeddings[stratified]) == math) == 3  # half from each topic
    with pytest.raises(ValueError, match="unknown calibration strategy"):
        choose_calibration(router, data, 6, strategy="best")
    groups = np.repeat([0, 1, 2], [50, 30, 20])
    assert stratified_sample(groups, 10, seed=1).tolist() == stratified_sample(groups, 10, seed=1).tolist()


def test_calibration_set_writes_a_prompts_file(tmp_path, data, embeddings):
    router = KNNRouter(k=3).fit(data, embeddings=embeddings)
    assert calibration_set(router, data, 5, tmp_path / "cal.jsonl", seed=0) == 5
    items = read_prompts(tmp_path / "cal.jsonl")
    assert len(items) == 5 and {i.id for i in items} <= set(data.ids)
    assert all("responses" not in json.loads(line) for line in (tmp_path / "cal.jsonl").read_text().splitlines())


# --- the command line -------------------------------------------------------------------------------

def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_calibration_set_add_and_drop(tmp_path, data):
    train = tmp_path / "train.jsonl"
    data.to_jsonl(train)
    ok = invoke("train", train, "--method", "cluster", "--clusters", "2", "--out", tmp_path / "router")
    assert ok.exit_code == 0, ok.output

    result = invoke("calibration-set", tmp_path / "router", "--data", train, "--n", "6", "--seed", "1",
                    "--strategy", "stratified", "--out", tmp_path / "cal.jsonl")
    assert result.exit_code == 0, result.output
    assert "wrote 6 of 16 prompts" in result.output
    again = invoke("calibration-set", tmp_path / "router", "--data", train, "--n", "6", "--seed", "1",
                   "--strategy", "stratified", "--out", tmp_path / "cal2.jsonl")
    assert again.exit_code == 0 and (tmp_path / "cal.jsonl").read_text() == (tmp_path / "cal2.jsonl").read_text()

    # what torouter prepare would write after the new expert answered the calibration prompts
    scored = [Record(id=item.id, prompt=item.prompt, responses={"new": {"score": 1.0, "cost": 0.002}})
              for item in read_prompts(tmp_path / "cal.jsonl")]
    write_jsonl(tmp_path / "new.jsonl", scored)
    result = invoke("add-expert", tmp_path / "router", tmp_path / "new.jsonl", "--expert", "new",
                    "--out", tmp_path / "router2")
    assert result.exit_code == 0, result.output
    assert "added expert 'new' from 6 scored prompts" in result.output
    router = load_router(tmp_path / "router2")
    assert router.experts_ == ["calc", "bard", "new"] and router.expert_costs_["new"] == pytest.approx(0.002)
    assert load_router(tmp_path / "router").experts_ == TRAINED  # the original is left as it was

    result = invoke("drop-expert", tmp_path / "router2", "--expert", "calc", "--out", tmp_path / "router2")
    assert result.exit_code == 0, result.output
    assert load_router(tmp_path / "router2").experts_ == ["bard", "new"]
    assert [c["action"] for c in load_router(tmp_path / "router2").fit_info_["expert_changes"]] == ["added",
                                                                                                   "dropped"]


def test_cli_refusals_are_clear(tmp_path, data):
    train = tmp_path / "train.jsonl"
    data.to_jsonl(train)
    assert invoke("train", train, "--method", "best-single", "--out", tmp_path / "best").exit_code == 0
    assert invoke("train", train, "--method", "cluster", "--clusters", "2", "--out", tmp_path / "router").exit_code == 0
    write_jsonl(tmp_path / "unscored.jsonl", [record(0, MATH[0], {"new": None})])
    result = invoke("add-expert", tmp_path / "router", tmp_path / "unscored.jsonl", "--expert", "new",
                    "--out", tmp_path / "out")
    assert result.exit_code == 2 and "no scored prompts" in result.output
    assert not (tmp_path / "out").exists()
    calibration = tmp_path / "cal.jsonl"
    calibration_data().to_jsonl(calibration)
    result = invoke("add-expert", tmp_path / "best", calibration, "--expert", "new", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "'best-single' router cannot add" in result.output
    result = invoke("drop-expert", tmp_path / "router", "--expert", "ghost", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "'ghost'" in result.output
    result = invoke("calibration-set", tmp_path / "router", "--data", train, "--strategy", "best",
                    "--out", tmp_path / "cal.jsonl")
    assert result.exit_code == 2 and "unknown --strategy 'best'" in result.output
    result = invoke("calibration-set", tmp_path / "router", "--data", train, "--n", "3", "--out", tmp_path / "c.jsonl")
    assert result.exit_code == 0 and len(read_prompts(tmp_path / "c.jsonl")) == 3
