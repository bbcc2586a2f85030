"""Calibration samples: which training prompts to send to a new expert so a router can add it.

An expert is added to a ``cluster`` or ``knn`` router from its scored answers to a
few hundred prompts (``Router.add_expert``). Two ways to choose them, deterministic
for a seed:

* ``random`` (the default): a plain random sample of the training prompts;
* ``stratified``: drawn over the router's own clusters (for a ``cluster`` router) or
  k-means clusters of the training prompts (any other router), each cluster getting
  its share of ``n`` by size (largest remainders, at least one prompt per cluster while
  ``n`` allows), at random within a cluster.

Stratifying was expected to help, since an added expert's profile is a mean score per
cluster; measured leave-one-expert-out on RouterBench and RouterDC it did not: at
``n = 100`` it lands further from full retraining than a random sample of the same
size (benchmarks/README.md, "Adding an expert"), hence the default.

``calibration_set`` writes the chosen prompts as a prompts JSONL that ``torouter
prepare --prompts`` reads as it is, to be answered by the new expert and scored.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .data import RoutingDataset, write_jsonl
from .routers.base import EmbeddingRouter, Router

STRATA = 8
"""k-means clusters drawn over when the router has none of its own."""


def strata(router: Router, embeddings: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each prompt's stratum: the router's cluster, or a k-means cluster of the embeddings."""
    from .routers.cluster import ClusterRouter, _normalise

    if isinstance(router, ClusterRouter):
        return router.clusters(embeddings)
    from sklearn.cluster import KMeans

    x = _normalise(embeddings)
    k = min(STRATA, len(np.unique(x, axis=0)))
    return KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x).labels_


def allocate(sizes: np.ndarray, n: int) -> np.ndarray:
    """How many of ``n`` prompts each stratum gets: its share by size, largest remainders first,
    at least one per non-empty stratum while ``n`` allows, never more than it holds."""
    sizes = np.asarray(sizes, dtype=np.int64)
    n = min(int(n), int(sizes.sum()))
    quota = np.zeros(len(sizes), dtype=np.int64)
    nonempty = np.flatnonzero(sizes)
    if n >= len(nonempty):
        quota[nonempty] = 1
    while quota.sum() < n:
        exact = (n * sizes / sizes.sum()) - quota
        exact[quota >= sizes] = -np.inf
        quota[int(np.argmax(exact))] += 1
    return quota


STRATEGIES = ("random", "stratified")


def choose_calibration(router: Router, dataset: RoutingDataset, n: int, seed: int = 0,
                       embeddings: np.ndarray | None = None, strategy: str = "random") -> np.ndarray:
    """Indices (sorted) of the ``n`` prompts of ``dataset`` to send to a new expert.

    ``embeddings`` (``stratified`` only) may pass ``dataset``'s prompts already encoded
    with the router's encoder.
    """
    if n < 1:
        raise ValueError(f"a calibration sample needs n >= 1 prompts, got {n}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown calibration strategy {strategy!r}; choose one of {list(STRATEGIES)}")
    if strategy == "random":
        if n >= len(dataset):
            return np.arange(len(dataset))
        return np.sort(np.random.default_rng(seed).choice(len(dataset), size=n, replace=False))
    if embeddings is None:
        embeddings = _encode(router, dataset.texts())
    if len(embeddings) != len(dataset):
        raise ValueError(f"{len(embeddings)} embeddings for {len(dataset)} prompts")
    if n >= len(dataset):
        return np.arange(len(dataset))
    return stratified_sample(strata(router, np.asarray(embeddings), seed), n, seed)


def stratified_sample(groups: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices (sorted) of ``n`` items drawn at random within strata ``groups``, ``allocate``'s share each."""
    groups = np.asarray(groups)
    quota = allocate(np.bincount(groups), n)
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(groups == g), size=int(q), replace=False)
              for g, q in enumerate(quota) if q]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def _encode(router: Router, texts: list[str]) -> np.ndarray:
    if isinstance(router, EmbeddingRouter):
        return router._embed(texts)
    from .encoders import Encoder

    return Encoder().encode(texts)


def prompt_rows(dataset: RoutingDataset, indices: np.ndarray) -> list[dict[str, Any]]:
    """The chosen records as prompts-file rows ``{id, prompt, reference, task}`` (responses left out)."""
    rows = []
    for i in indices:
        record = dataset.records[int(i)]
        row: dict[str, Any] = {"id": record.id, "prompt": record.prompt}
        if record.reference is not None:
            row["reference"] = record.reference
        if record.task is not None:
            row["task"] = record.task
        rows.append(row)
    return rows


def calibration_set(router: Router, dataset: RoutingDataset, n: int, out: str | os.PathLike,
                    seed: int = 0, strategy: str = "random") -> int:
    """Write the ``n`` chosen prompts of ``dataset`` to ``out`` (prompts JSONL); returns the count."""
    indices = choose_calibration(router, dataset, n, seed, strategy=strategy)
    return write_jsonl(out, prompt_rows(dataset, indices))
