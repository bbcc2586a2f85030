"""The router interface and its on-disk format.

A router is a scikit-learn style estimator: hyper-parameters in ``__init__``,
``fit(dataset)`` learns state (attributes ending in ``_``), ``predict(prompts)``
returns an ``(n_prompts, n_experts)`` array of quality estimates on the score scale
(NaN where a router knows nothing about an expert), and ``save``/``load`` use a
directory holding ``torouter.json`` plus safetensors weights. Loading never unpickles:
not the router's files, and not the encoder it names, which must have safetensors
weights. Everything read is checked (types, shapes, checksums) and every problem is a
``RouterFileError`` naming the file, so a damaged or hand-edited router fails at load,
not at its first prediction.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import shutil
import tempfile
import typing
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


def state_array(arrays: dict[str, np.ndarray], name: str, shape: tuple[int | None, ...], path: Path) -> np.ndarray:
    """A saved array with the expected shape (``None``: any length on that axis), else RouterFileError."""
    if name not in arrays:
        raise RouterFileError(f"{path}: saved state lacks the array {name!r}")
    array = arrays[name]
    if array.ndim != len(shape) or any(want is not None and got != want for got, want in zip(array.shape, shape)):
        wanted = "(" + ", ".join("n" if w is None else str(w) for w in shape) + ")"
        raise RouterFileError(f"{path}: saved array {name!r} has shape {tuple(array.shape)}, expected {wanted}")
    return array


def state_number(extra: dict[str, Any], name: str, path: Path) -> float:
    """A finite number saved in the config's ``state``, else RouterFileError."""
    value = extra.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RouterFileError(f"{path / CONFIG_NAME}: state {name!r} must be a finite number, got {value!r}")
    return float(value)


class Router:
    """Base class: subclasses implement ``_fit``, ``_predict`` and their state's (de)serialisation."""

    method: ClassVar[str] = ""
    # Whether add_expert / drop_expert work: the estimates split into a prompt side and per-expert profiles.
    supports_expert_profiles: ClassVar[bool] = False

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

    # --- changing the pool of experts without retraining (see routers/profiles.py) --------
    def add_expert(self, name: str, data: RoutingDataset, embeddings: np.ndarray | None = None) -> Router:
        """Add expert ``name`` from its scored answers in ``data`` (routing records, as ``torouter prepare``
        writes them), without refitting the prompt side or touching the other experts' profiles.

        An expert the router already has is re-profiled from ``data`` (replaced). Its cost is
        its mean cost over the scored records. ``embeddings`` may pass ``data``'s prompts already
        encoded. Raises ``ExpertProfileError`` for a router that cannot (only ``cluster`` and
        ``knn`` can) and for data without a scored answer of ``name``.
        """
        from .profiles import add_expert

        add_expert(self, name, data, embeddings)
        return self

    def drop_expert(self, name: str) -> Router:
        """Remove expert ``name``; the other experts' estimates stay as they were."""
        from .profiles import drop_expert

        drop_expert(self, name)
        return self

    def _set_profile(self, column: int, scored: RoutingDataset, scores: np.ndarray,
                     embeddings: np.ndarray | None) -> None:
        """Write the profile of the expert at ``column`` (``len(experts_)``: a new one) from its scores."""
        raise NotImplementedError

    def _drop_profile(self, column: int) -> None:
        raise NotImplementedError

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
        params = _checked_params(router_cls, config["params"], directory / CONFIG_NAME)
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
        router = router_cls(**params)
        router.experts_ = list(config["experts"])
        router.expert_costs_ = {k: float(v) for k, v in config["expert_costs"].items()}
        router.fit_info_ = dict(config.get("fit_info", {}))
        try:
            router._set_state(arrays, config.get("state", {}), directory)
        except RouterFileError:
            raise
        except KeyError as exc:
            raise RouterFileError(f"{directory}: saved state lacks {exc}") from None
        except (TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
            raise RouterFileError(f"{directory}: saved state does not fit a {config['method']!r} router "
                                  f"({type(exc).__name__}: {exc})") from None
        router._check_sources(directory)
        return router

    def _check_sources(self, directory: Path) -> None:
        """Refuse at load what a router would need at its first prediction and could not use."""


_DIGEST = re.compile(r"[0-9a-f]{64}")


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
    except RecursionError:
        raise RouterFileError(f"{file}: corrupt JSON (nested too deeply)") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise RouterFileError(f"{file}: not a torouter router config")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise RouterFileError(f"{file}: format version {version!r}; this torouter reads version {FORMAT_VERSION}")
    for key in ("method", "params", "experts", "expert_costs", "files"):
        if key not in config:
            raise RouterFileError(f"{file}: missing key {key!r}")
    _check_types(config, directory, file)
    if set(config["experts"]) != set(config["expert_costs"]):
        raise RouterFileError(f"{file}: 'experts' and 'expert_costs' name different experts")
    return config


def _check_types(config: dict[str, Any], directory: Path, file: Path) -> None:
    """The config's fields have the types loading relies on (a hand-edited file may not)."""
    if not isinstance(config["method"], str):
        raise RouterFileError(f"{file}: 'method' must be a string, got {config['method']!r}")
    experts = config["experts"]
    if not isinstance(experts, list) or not experts or not all(isinstance(e, str) and e for e in experts):
        raise RouterFileError(f"{file}: 'experts' must be a list of expert names, got {experts!r}")
    seen: set[str] = set()
    for name in experts:
        if name in seen:
            raise RouterFileError(f"{file}: duplicate expert {name!r} in 'experts'")
        seen.add(name)
    costs = config["expert_costs"]
    if not isinstance(costs, dict):
        raise RouterFileError(f"{file}: 'expert_costs' must map each expert to a cost >= 0, got {costs!r}")
    for name, cost in costs.items():
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not math.isfinite(cost) or cost < 0:
            raise RouterFileError(f"{file}: 'expert_costs' must map each expert to a cost >= 0 "
                                  f"(got {name!r}: {cost!r})")
    for key in ("params", "fit_info", "state"):
        if key in config and not isinstance(config[key], dict):
            raise RouterFileError(f"{file}: {key!r} must be an object, got {config[key]!r}")
    files = config["files"]
    if not isinstance(files, dict) or not all(isinstance(d, str) and _DIGEST.fullmatch(d) for d in files.values()):
        raise RouterFileError(f"{file}: 'files' must map file names to SHA-256 digests, got {files!r}")
    root = directory.resolve()
    for name in files:
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts or not (root / relative).resolve().is_relative_to(root):
            raise RouterFileError(f"{file}: file {name!r} is outside the router directory")
    if WEIGHTS_NAME not in files:
        raise RouterFileError(f"{file}: 'files' lacks {WEIGHTS_NAME}")


def _checked_params(router_cls: type[Router], params: dict[str, Any], file: Path) -> dict[str, Any]:
    """The saved hyper-parameters the router takes, each of the type its constructor declares."""
    from pydantic import TypeAdapter, ValidationError

    hints = typing.get_type_hints(router_cls.__init__)
    known = set(router_cls._param_names())
    checked = {}
    for name, value in params.items():
        if name not in known:
            continue
        if name in hints:
            try:
                TypeAdapter(hints[name]).validate_python(value, strict=True)
            except ValidationError:
                raise RouterFileError(f"{file}: params.{name} must be {_type_name(hints[name])}, got {value!r}"
                                      ) from None
        checked[name] = value
    return checked


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


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
    """A router that reads prompts through a frozen sentence encoder (``encoder`` parameter).

    ``backend`` says what runs that encoder (``torouter.encoders.BACKENDS``): chosen at
    training time, saved with the router and used again when it is loaded, since the
    backends' embeddings differ (the static backend's even in dimension). A fitted router
    also keeps the static backend's token budget it was trained with
    (``fit_info_["encoder_max_length"]``), so a later change of the default does not change
    what it reads.
    """

    encoder: str
    device: str | None = None
    backend: str = "sentence-transformers"

    def _encoder(self):
        from ..encoders import Encoder

        backend = getattr(self, "backend", "sentence-transformers")
        trained = getattr(self, "fit_info_", {}).get("encoder_max_length")
        max_tokens = trained if backend == "static" and isinstance(trained, int) else None
        cached = getattr(self, "_encoder_cache", None)
        if (cached is None or cached.model_name != self.encoder or cached.backend != backend
                or (max_tokens is not None and cached.max_tokens != max_tokens)):
            cached = self._encoder_cache = Encoder(self.encoder, device=getattr(self, "device", None),
                                                   backend=backend, max_tokens=max_tokens)
        return cached

    def _embed(self, texts: list[str]) -> np.ndarray:
        return self._encoder().encode(texts, show_progress=len(texts) >= 512)

    def _check_sources(self, directory: Path) -> None:
        from ..encoders import BACKENDS

        if self.backend not in BACKENDS:
            raise RouterFileError(f"{directory / CONFIG_NAME}: params.backend {self.backend!r} is not an encoder "
                                  f"backend; known: {list(BACKENDS)}")
        problem = encoder_problem(self.encoder)
        if problem is not None:
            raise RouterFileError(f"{directory}: encoder {self.encoder!r}: {problem}")

    def fit(self, dataset: RoutingDataset, embeddings: np.ndarray | None = None) -> Router:
        """Fit; ``embeddings`` may pass the dataset's prompts already encoded with ``self.encoder``
        on ``self.backend``."""
        from ..encoders import check_backend

        check_backend(self.backend)
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


# Weight files written with pickle (torch.save); ``openvino_model.bin`` and the like are not.
_PICKLED = re.compile(r"(pytorch_model.*\.bin|.*\.(pt|pth|pkl|pickle|ckpt))$")


def encoder_problem(name: str) -> str | None:
    """Why a sentence encoder cannot be used without unpickling, or None when it can.

    A local folder must hold safetensors weights, in every folder that holds pickled
    ones too (a sentence-transformers module such as ``2_Dense``); a hub id is checked
    in the local Hugging Face cache when it is there, and otherwise left to be fetched,
    safetensors only, at first use.
    """
    from ..encoders import resolve_model

    source = resolve_model(name)
    folder = Path(source).expanduser()
    if not folder.exists():
        if source.startswith(("/", "./", "../", "~")) or folder.is_absolute():
            return f"no such folder {folder}"
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, local_files_only=True))
        except Exception:  # noqa: BLE001 - not downloaded yet (or not a hub id): checked at first use
            return None
    if not folder.is_dir():
        return f"{folder} is a file, not a model folder"
    files = [p for p in folder.rglob("*") if p.is_file()]
    pickled = [p for p in files if _PICKLED.fullmatch(p.name)]
    unsafe = [p for p in pickled if not any(q.suffix == ".safetensors" for q in p.parent.iterdir())]
    if unsafe or not any(p.suffix == ".safetensors" for p in files):
        named = ", ".join(str(p.relative_to(folder)) for p in (unsafe or pickled)) or "no weights"
        return (f"its weights are pickled ({named}), with no safetensors beside them; torouter never "
                "unpickles: convert the model to safetensors (e.g. save_pretrained(..., safe_serialization=True))")
    return None
