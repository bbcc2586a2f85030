"""The router interface and its on-disk format.

A router is a scikit-learn style estimator: hyper-parameters in ``__init__``,
``fit(dataset)`` learns state (attributes ending in ``_``), ``predict(prompts)``
returns an ``(n_prompts, n_experts)`` array of quality estimates on the score scale
(NaN where a router knows nothing about an expert), and ``save``/``load`` use a
directory holding ``torouter.json`` plus safetensors weights. Loading never unpickles.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..data import Prompt, RoutingDataset, prompt_text
from ..policy import choose

FORMAT = "torouter-router"
FORMAT_VERSION = 1
CONFIG_NAME = "torouter.json"
WEIGHTS_NAME = "weights.safetensors"


class RouterFileError(ValueError):
    """A router directory that is missing, truncated, tampered with or of another format."""


class NotFittedError(RuntimeError):
    pass


class Router:
    """Base class: subclasses implement ``_fit``, ``_predict`` and their state's (de)serialisation."""

    method: ClassVar[str] = ""

    # --- scikit-learn style parameters --------------------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p != "self"]

    def get_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._param_names()}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"

    # --- fitting and prediction ---------------------------------------------------------
    def fit(self, dataset: RoutingDataset) -> Router:
        if not isinstance(dataset, RoutingDataset):
            raise TypeError(f"fit expects a RoutingDataset, got {type(dataset).__name__}")
        costs = dataset.mean_costs()
        missing = [e for e, c in zip(dataset.experts, costs) if np.isnan(c)]
        if missing:
            raise ValueError(f"experts never observed in the training data: {missing}")
        self.experts_ = list(dataset.experts)
        self.expert_costs_ = {e: float(c) for e, c in zip(self.experts_, costs)}
        self.fit_info_: dict[str, Any] = {"n_train": len(dataset)}
        self._fit(dataset)
        return self

    def predict(self, prompts: Sequence[Prompt]) -> np.ndarray:
        """Predicted quality of every expert for every prompt, shape ``(n, n_experts)``."""
        self._check_fitted()
        if isinstance(prompts, (str, dict)):
            raise TypeError("predict expects a list of prompts; wrap a single prompt in a list")
        texts = [p if isinstance(p, str) else prompt_text(p) for p in prompts]
        if not texts:
            return np.zeros((0, len(self.experts_)))
        return np.asarray(self._predict(texts), dtype=np.float64)

    def route(self, prompts: Sequence[Prompt], cost_weight: float = 0.0,
              max_cost: float | None = None, prices: dict[str, float] | None = None) -> list[str]:
        """The chosen expert's name for each prompt."""
        picks = choose(self.predict(prompts), self.costs(prices), cost_weight, max_cost)
        return [self.experts_[i] for i in picks]

    def costs(self, prices: dict[str, float] | None = None) -> np.ndarray:
        """Expected cost per query of each expert: the training mean unless ``prices`` overrides it."""
        self._check_fitted()
        prices = prices or {}
        unknown = set(prices) - set(self.experts_)
        if unknown:
            raise ValueError(f"prices given for unknown experts {sorted(unknown)}; known: {self.experts_}")
        return np.array([float(prices.get(e, self.expert_costs_[e])) for e in self.experts_])

    def _check_fitted(self) -> None:
        if not hasattr(self, "experts_"):
            raise NotFittedError(f"{type(self).__name__} is not fitted; call fit(dataset) or load(path)")

    def _fit(self, dataset: RoutingDataset) -> None:
        raise NotImplementedError

    def _predict(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    # --- state (de)serialisation, overridden by routers with learned state --------------
    def _get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays for safetensors and JSON-able extras."""
        return {}, {}

    def _set_state(self, arrays: dict[str, np.ndarray], extra: dict[str, Any], path: Path) -> None:
        pass

    def _save_files(self, directory: Path) -> None:
        """Write payload files other than the safetensors arrays (e.g. a fine-tuned model)."""

    # --- persistence --------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the router to a directory, replacing it only once the new copy is complete."""
        self._check_fitted()
        from safetensors.numpy import save_file

        target = Path(path)
        check_replaceable(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
        try:
            arrays, extra = self._get_state()
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / WEIGHTS_NAME))
            self._save_files(tmp)
            files = {str(p.relative_to(tmp)): _digest(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            config = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "method": self.method,
                "params": self.get_params(),
                "experts": self.experts_,
                "expert_costs": self.expert_costs_,
                "fit_info": self.fit_info_,
                "state": extra,
                "files": files,
            }
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2), encoding="utf-8")
            _replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @classmethod
    def load(cls, path: str | os.PathLike) -> Router:
        from . import get_router_class

        directory = Path(path)
        config = read_config(directory)
        try:
            router_cls = get_router_class(config["method"])
        except ValueError as exc:
            raise RouterFileError(f"{directory / CONFIG_NAME}: {exc}") from None
        if cls is not Router and not issubclass(router_cls, cls):
            raise RouterFileError(f"{directory}: holds a {config['method']!r} router, not {cls.method!r}")
        for name, expected in config["files"].items():
            file = directory / name
            if not file.is_file():
                raise RouterFileError(f"{directory}: missing file {name}")
            if _digest(file) != expected:
                raise RouterFileError(f"{directory}: {name} is truncated or modified (checksum mismatch)")
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            arrays = load_file(str(directory / WEIGHTS_NAME))
        except (SafetensorError, OSError) as exc:
            raise RouterFileError(f"{directory}: cannot read {WEIGHTS_NAME}: {exc}") from None
        known = set(router_cls._param_names())
        params = {k: v for k, v in config["params"].items() if k in known}
        router = router_cls(**params)
        router.experts_ = list(config["experts"])
        router.expert_costs_ = {k: float(v) for k, v in config["expert_costs"].items()}
        router.fit_info_ = dict(config.get("fit_info", {}))
        try:
            router._set_state(arrays, config.get("state", {}), directory)
        except KeyError as exc:
            raise RouterFileError(f"{directory}: saved state lacks {exc}") from None
        return router


def read_config(directory: Path) -> dict[str, Any]:
    """Read and check ``torouter.json``; every problem is a RouterFileError naming the file."""
    file = directory / CONFIG_NAME
    if not directory.is_dir():
        raise RouterFileError(f"{directory}: not a router directory (no such directory)")
    if not file.is_file():
        raise RouterFileError(f"{directory}: missing {CONFIG_NAME}; is this a saved router?")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RouterFileError(f"{file}: corrupt JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise RouterFileError(f"{file}: not a torouter router config")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise RouterFileError(f"{file}: format version {version!r}; this torouter reads version {FORMAT_VERSION}")
    for key in ("method", "params", "experts", "expert_costs", "files"):
        if key not in config:
            raise RouterFileError(f"{file}: missing key {key!r}")
    if set(config["experts"]) != set(config["expert_costs"]):
        raise RouterFileError(f"{file}: 'experts' and 'expert_costs' name different experts")
    return config


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_replaceable(target: str | os.PathLike) -> None:
    """Only a missing path, an empty directory or a saved router may be overwritten."""
    target = Path(target)
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if any(target.iterdir()) and not (target / CONFIG_NAME).is_file():
        raise FileExistsError(f"{target} is a non-empty directory that holds no saved router; "
                              "refusing to replace it")


def _replace_dir(new: Path, target: Path) -> None:
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


class EmbeddingRouter(Router):
    """A router that reads prompts through a frozen sentence encoder (``encoder`` parameter)."""

    encoder: str
    device: str | None = None

    def _encoder(self):
        from ..encoders import Encoder

        cached = getattr(self, "_encoder_cache", None)
        if cached is None or cached.model_name != self.encoder:
            cached = self._encoder_cache = Encoder(self.encoder, device=getattr(self, "device", None))
        return cached

    def _embed(self, texts: list[str]) -> np.ndarray:
        return self._encoder().encode(texts, show_progress=len(texts) >= 512)

    def fit(self, dataset: RoutingDataset, embeddings: np.ndarray | None = None) -> Router:
        """Fit; ``embeddings`` may pass the dataset's prompts already encoded with ``self.encoder``."""
        if embeddings is not None and len(embeddings) != len(dataset):
            raise ValueError(f"{len(embeddings)} embeddings for {len(dataset)} prompts")
        self._given_embeddings = embeddings
        try:
            return super().fit(dataset)
        finally:
            self._given_embeddings = None

    def predict_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        """``predict`` for prompts already encoded with ``self.encoder``."""
        raise NotImplementedError

    def _predict(self, texts: list[str]) -> np.ndarray:
        return self.predict_embeddings(self._embed(texts))

    def _fit_embeddings(self, dataset: RoutingDataset) -> np.ndarray:
        if getattr(self, "_given_embeddings", None) is not None:
            return np.asarray(self._given_embeddings, dtype=np.float32)
        texts = dataset.texts()
        encoder = self._encoder()
        self.fit_info_["truncated"] = encoder.count_truncated(texts)
        self.fit_info_["encoder_max_length"] = encoder.max_length
        if self.fit_info_["truncated"]:
            import logging

            logging.getLogger("torouter").warning(
                "%d of %d training prompts are longer than the encoder's %d tokens; their tail is not read",
                self.fit_info_["truncated"], len(texts), encoder.max_length)
        return self._embed(texts)
