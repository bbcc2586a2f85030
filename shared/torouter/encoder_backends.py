"""Fast encoder backends: the router's sentence encoder without torch at routing time.

A router's encoder can run on sentence-transformers (torch), or on artefacts derived
once from the same local model and cached on disk:

- ``onnx`` / ``onnx-int8``: the transformer with its mean pooling and normalisation,
  exported to ONNX by ``torch.onnx`` and run by onnxruntime; ``onnx-int8`` has its
  weights quantised to int8 by onnxruntime's dynamic quantisation. Tokenisation is the
  model's own fast tokenizer (the ``tokenizers`` library), with the same truncation.
  (sentence-transformers' ``backend="onnx"`` needs ``optimum-onnx``, which pins
  transformers below 4.58; torouter runs on transformers 5, so the export uses the
  exporter built into torch instead.)
- ``static``: a model2vec static model distilled from the encoder (one embedding per
  token, averaged), which routes a prompt in microseconds and never imports torch.

Artefacts are built from the local model folder only (no network), into a temporary
folder that replaces the target only once complete, under
``$TOROUTER_CACHE/encoders/<model>-<fingerprint>/`` (default ``~/.cache/torouter``, the
folder torouter keeps every derived file in). The fingerprint covers the model folder's
path and its weights' size and modification time, so a changed model is rebuilt. No
artefact is a pickle: ONNX is protobuf, the static model safetensors plus JSON.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from .paths import cache_dir

log = logging.getLogger("torouter")

ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model-int8.onnx"
STATIC_DIR = "static"
BUILD_VERSION = 1  # bump when a build changes what it writes
# Tokens of a prompt the static model reads. Its cost is the tokenizer's, so it grows with this
# budget: on RouterBench's 5-shot prompts 512 tokens (model2vec's default) route in about 2 ms,
# 128 in under 1 ms, with the same quality on RouterBench and 0.0016 less mean score on
# RouterDC (benchmarks/README.md, "Fast routing"). A router records the budget it was
# trained with (``fit_info_["encoder_max_length"]``) and keeps it when loaded.
STATIC_MAX_TOKENS = 128
STATIC_PCA_DIMS = 256  # model2vec's default; the 384 MiniLM dimensions reduced by PCA


def model_folder(source: str) -> Path:
    """The local folder of a model: ``source`` itself, or its copy in the Hugging Face cache."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source))
        except Exception as exc:  # noqa: BLE001 - any failure means: not available locally
            raise ValueError(f"encoder {source!r}: the onnx and static backends build from a local model folder, "
                             f"and none was found ({type(exc).__name__}: {exc})") from None
    if not (folder / "model.safetensors").is_file():
        raise ValueError(f"encoder folder {folder} has no model.safetensors; the onnx and static backends "
                         "build only from safetensors weights (torouter never unpickles)")
    return folder


def artefact_dir(source: str) -> Path:
    """The cache folder for artefacts built from the model at ``source``."""
    folder = model_folder(source).resolve()
    weights = (folder / "model.safetensors").stat()
    fingerprint = hashlib.sha256(
        f"{folder}|{weights.st_size}|{weights.st_mtime_ns}|{BUILD_VERSION}".encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", folder.name if folder.name != "model" else folder.parent.name)
    return cache_dir() / "encoders" / f"{slug}-{fingerprint}"


def _publish(build, target: Path) -> Path:
    """Run ``build(tmp_folder)`` and move the result to ``target`` atomically (another process may race)."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.exists():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def max_seq_length(folder: Path) -> int:
    """The number of tokens the sentence-transformers model reads (its ``max_seq_length``)."""
    config = folder / "sentence_bert_config.json"
    if config.is_file():
        value = json.loads(config.read_text(encoding="utf-8")).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            return value
    return 512


# --- ONNX --------------------------------------------------------------------------------------


def build_onnx(source: str, target: Path) -> Path:
    """Export the model (transformer, mean pooling, L2 normalisation) to ``target/model.onnx``."""
    import torch
    from transformers import AutoModel

    folder = model_folder(source)

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self, transformer):
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                      token_type_ids=token_type_ids).last_hidden_state
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2, dim=1)

    def export(tmp: Path) -> None:
        import warnings

        model = AutoModel.from_pretrained(str(folder), use_safetensors=True).eval()
        names = ["input_ids", "attention_mask", "token_type_ids"]
        example = torch.ones((2, 8), dtype=torch.long)
        axes = {name: {0: "batch", 1: "tokens"} for name in names} | {"sentence_embedding": {0: "batch"}}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(SentenceEmbedding(model), (example, example, torch.zeros_like(example)),
                              str(tmp / ONNX_FILE), input_names=names, output_names=["sentence_embedding"],
                              dynamic_axes=axes, opset_version=17, dynamo=False)

    log.info("exporting %s to ONNX (once; cached in %s)", folder, target)
    return _publish(export, target)


def build_onnx_int8(source: str, target: Path) -> Path:
    """The ONNX export with its weights quantised to int8 (onnxruntime dynamic quantisation)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    float_dir = onnx_artefact(source, quantized=False).parent

    def quantize(tmp: Path) -> None:
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # onnxruntime warns on the root logger to "consider pre-processing"
        try:
            quantize_dynamic(str(float_dir / ONNX_FILE), str(tmp / ONNX_INT8_FILE), weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)

    return _publish(quantize, target)


def onnx_artefact(source: str, quantized: bool) -> Path:
    """The path of the (built once) ONNX file of the model at ``source``."""
    base = artefact_dir(source)
    if quantized:
        return build_onnx_int8(source, base / "onnx-int8") / ONNX_INT8_FILE
    return build_onnx(source, base / "onnx") / ONNX_FILE


def _session_threads() -> int:
    """Threads for onnxruntime: torch's setting when torch is loaded (0: onnxruntime's default)."""
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else 0


class OnnxBackend:
    """The ONNX export on onnxruntime's CPU provider, fed by the model's own fast tokenizer."""

    def __init__(self, source: str, quantized: bool, keep: str):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        folder = model_folder(source)
        self.path = onnx_artefact(source, quantized)
        self.max_length = max_seq_length(folder)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length, direction="left" if keep == "tail" else "right")
        self._counting = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._counting.no_padding()
        self._counting.no_truncation()
        options = ort.SessionOptions()
        options.intra_op_num_threads = _session_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.dim = int(self.session.get_outputs()[0].shape[-1])

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        # Batches of similar lengths pad less (sentence-transformers sorts the same way).
        order = np.argsort([-len(e.ids) for e in encodings], kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(encodings[i].ids) for i in rows)
            ids = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros_like(ids)
            types = np.zeros_like(ids)
            for r, i in enumerate(rows):
                n = len(encodings[i].ids)
                ids[r, :n] = encodings[i].ids
                mask[r, :n] = 1
                types[r, :n] = encodings[i].type_ids
            out[rows] = self.session.run(None, {"input_ids": ids, "attention_mask": mask,
                                                "token_type_ids": types})[0]
        return out

    def count_truncated(self, texts: list[str]) -> int:
        return sum(len(e.ids) > self.max_length for e in self._counting.encode_batch(texts))


# --- static (model2vec) --------------------------------------------------------------------------


def build_static(source: str, target: Path, pca_dims: int | None = STATIC_PCA_DIMS,
                 token_remove_pattern: str | None = r"\[unused\d+\]") -> Path:
    """Distil a model2vec static model from the encoder into ``target`` (one forward pass per token).

    ``token_remove_pattern`` drops matching tokens from the vocabulary (model2vec's
    option); a pattern that keeps few tokens gives a small, quick-to-build model.
    """
    from model2vec.distill import distill_from_model
    from transformers import AutoModel, AutoTokenizer

    folder = model_folder(source)

    def distil(tmp: Path) -> None:
        model = AutoModel.from_pretrained(str(folder), use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
        static = distill_from_model(model, tokenizer,  # type: ignore[arg-type]  # a fast tokenizer (use_fast)
                                    pca_dims=pca_dims, token_remove_pattern=token_remove_pattern,
                                    device="cpu")
        static.save_pretrained(str(tmp))
        (tmp / "torouter_build.json").write_text(json.dumps(
            {"source": str(folder), "pca_dims": pca_dims, "token_remove_pattern": token_remove_pattern,
             "vocabulary": int(static.embedding.shape[0])}, indent=2), encoding="utf-8")

    log.info("distilling a static model from %s (once; cached in %s)", folder, target)
    return _publish(distil, target)


def static_artefact(source: str) -> Path:
    return build_static(source, artefact_dir(source) / STATIC_DIR)


class StaticBackend:
    """A model2vec static model: mean of per-token embeddings, no transformer at routing time."""

    def __init__(self, source: str, keep: str, max_tokens: int | None = None):
        from model2vec import StaticModel

        if keep != "head":
            raise ValueError("the static backend reads the head of a prompt only (keep='head')")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        self.path = static_artefact(source)
        self.max_length = max_tokens or STATIC_MAX_TOKENS
        self.model = StaticModel.from_pretrained(str(self.path), normalize=True, max_length=self.max_length)
        self.dim = int(self.model.dim)
        from tokenizers import Tokenizer

        self._counting = Tokenizer.from_str(self.model.tokenizer.to_str())
        self._counting.no_truncation()

    def encode(self, texts: list[str], batch_size: int = 1024) -> np.ndarray:
        vectors = self.model.encode(texts, max_length=self.max_length, batch_size=max(batch_size, 1024),
                                    use_multiprocessing=False)
        # The table is float16: normalise again in float32. A prompt made only of tokens
        # outside the vocabulary embeds to zeros and stays so.
        vectors = np.asarray(vectors, dtype=np.float32)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def count_truncated(self, texts: list[str]) -> int:
        lengths = [len(e.ids) for e in self._counting.encode_batch(texts, add_special_tokens=False)]
        return sum(n > self.max_length for n in lengths)


@functools.lru_cache(maxsize=8)
def load_backend(source: str, backend: str, keep: str = "head", max_tokens: int | None = None):
    """The backend object for ``backend`` on the model at ``source`` (built on first use, loaded once).

    ``max_tokens`` sets the static backend's token budget (default ``STATIC_MAX_TOKENS``);
    the ONNX backends read what the model itself reads.
    """
    try:
        if backend in ("onnx", "onnx-int8"):
            return OnnxBackend(source, quantized=backend == "onnx-int8", keep=keep)
        if backend == "static":
            return StaticBackend(source, keep, max_tokens)
    except ImportError as exc:
        raise ImportError(f"the {backend!r} encoder backend needs torouter's 'fast' extra "
                          f"(pip install 'torouter[fast]'): {exc}") from exc
    raise ValueError(f"no fast backend {backend!r}; choose onnx, onnx-int8 or static")
