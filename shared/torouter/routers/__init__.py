"""Routers by method name: ``make_router("mlp", temperature=10)``, ``load_router(path)``."""

from __future__ import annotations

from .base import NotFittedError, Router, RouterFileError
from .baselines import BestSingleRouter, OracleRouter, RandomRouter
from .bert import BERTRouter
from .cluster import ClusterRouter
from .knn import KNNRouter
from .mlp import MLPRouter

ROUTERS: dict[str, type[Router]] = {
    cls.method: cls
    for cls in (RandomRouter, BestSingleRouter, OracleRouter, KNNRouter, ClusterRouter, MLPRouter, BERTRouter)
}


def get_router_class(method: str) -> type[Router]:
    try:
        return ROUTERS[method]
    except KeyError:
        raise ValueError(f"unknown router method {method!r}; choose one of {sorted(ROUTERS)}") from None


def make_router(method: str, **params) -> Router:
    cls = get_router_class(method)
    unknown = set(params) - set(cls._param_names())
    if unknown:
        raise ValueError(f"router {method!r} has no parameter(s) {sorted(unknown)}; it takes {cls._param_names()}")
    return cls(**params)


def load_router(path) -> Router:
    return Router.load(path)


__all__ = ["ROUTERS", "Router", "RouterFileError", "NotFittedError", "make_router", "load_router",
           "get_router_class", "RandomRouter", "BestSingleRouter", "OracleRouter", "KNNRouter",
           "ClusterRouter", "MLPRouter", "BERTRouter"]
