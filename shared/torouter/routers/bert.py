"""BERT router: fine-tune a whole BERT-family encoder as an expert classifier on soft labels.

The paper's strongest router. The encoder (any ``AutoModelForSequenceClassification``
checkpoint; MiniLM by default) gets a classification head with one output per
expert and is trained end to end with the same soft-label cross-entropy as the MLP.
Prompts longer than ``max_length`` tokens are truncated; how many were is counted
in ``fit_info_["truncated"]`` and logged, never silent.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..data import RoutingDataset
from ..encoders import DEFAULT_ENCODER, resolve_model
from ..labels import DEFAULT_TEMPERATURE, fit_offset, quality_from_log_probs, soft_labels
from ._training import pick_device, soft_label_loss
from .base import Router, RouterFileError, state_number

MODEL_DIR = "model"
log = logging.getLogger("torouter")


class BERTRouter(Router):
    method = "bert"

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE, epochs: int = 3, lr: float = 5e-5,
                 weight_decay: float = 0.01, batch_size: int = 16, max_length: int = 256,
                 warmup_ratio: float = 0.1, seed: int = 0, encoder: str = DEFAULT_ENCODER,
                 device: str | None = None):
        self.temperature = temperature
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_length = max_length
        self.warmup_ratio = warmup_ratio
        self.seed = seed
        self.encoder = encoder
        self.device = device

    def _tokenize(self, texts: list[str]):
        return self._tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")

    def _fit(self, dataset: RoutingDataset) -> None:
        import torch
        from tqdm.auto import tqdm
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers import logging as hf_logging

        torch.manual_seed(self.seed)
        device = pick_device(self.device)
        source = resolve_model(self.encoder)
        self._tokenizer = AutoTokenizer.from_pretrained(source)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the new head's "newly initialized" notice is expected
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=len(self.experts_), problem_type="multi_label_classification")
        finally:
            hf_logging.set_verbosity(verbosity)
        model.config.id2label = dict(enumerate(self.experts_))
        model.config.label2id = {e: i for i, e in enumerate(self.experts_)}
        model.to(device)

        texts = dataset.texts()
        lengths = [len(ids) for ids in self._tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
        truncated = sum(n > self.max_length for n in lengths)
        self.fit_info_.update(truncated=truncated, max_length=self.max_length)
        if truncated:
            log.warning("bert router: %d of %d training prompts exceed max_length=%d tokens and were truncated",
                        truncated, len(texts), self.max_length)

        targets = torch.as_tensor(soft_labels(dataset.scores, dataset.mask, self.temperature), dtype=torch.float32)
        mask = torch.as_tensor(dataset.mask)
        steps_per_epoch = math.ceil(len(texts) / self.batch_size)
        total_steps = max(1, steps_per_epoch * self.epochs)
        warmup = int(self.warmup_ratio * total_steps)
        optimiser = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimiser, lambda step: min((step + 1) / max(1, warmup), max(0.0, (total_steps - step) / max(1, total_steps - warmup))))
        generator = torch.Generator().manual_seed(self.seed)
        use_bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
        model.train()
        bar = tqdm(total=total_steps, desc="bert router", leave=False)
        loss_value = float("nan")
        for _ in range(self.epochs):
            order = torch.randperm(len(texts), generator=generator)
            for start in range(0, len(texts), self.batch_size):
                idx = order[start:start + self.batch_size]
                batch = self._tokenize([texts[i] for i in idx]).to(device)
                with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_bf16):
                    logits = model(**batch).logits
                loss = soft_label_loss(logits, targets[idx].to(device), mask[idx].to(device))
                optimiser.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimiser.step()
                schedule.step()
                loss_value = loss.item()
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}")
        bar.close()
        model.eval()
        self._model = model
        self._device = device
        self.fit_info_["final_loss"] = loss_value
        self.offset_ = fit_offset(self._log_probs(texts), dataset.scores, dataset.mask, self.temperature)

    def _log_probs(self, texts: list[str]) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for start in range(0, len(texts), 64):
                batch = self._tokenize(texts[start:start + 64]).to(self._device)
                logits = self._model(**batch).logits.float()
                out.append(torch.log_softmax(logits, dim=-1).cpu().numpy())
        return np.concatenate(out)

    def _predict(self, texts: list[str]) -> np.ndarray:
        return quality_from_log_probs(self._log_probs(texts), self.temperature, self.offset_)

    def _save_files(self, directory: Path) -> None:
        self._model.save_pretrained(directory / MODEL_DIR, safe_serialization=True)
        self._tokenizer.save_pretrained(directory / MODEL_DIR)

    def _get_state(self):
        return {}, {"offset": self.offset_}

    def _set_state(self, arrays: dict[str, np.ndarray], extra: dict[str, Any], path: Path) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model_dir = path / MODEL_DIR
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise RouterFileError(f"{path}: cannot load the fine-tuned model: {exc}") from None
        if model.config.num_labels != len(self.experts_):
            raise RouterFileError(f"{path}: model has {model.config.num_labels} outputs for {len(self.experts_)} experts")
        self._device = pick_device(self.device)
        self._model = model.to(self._device).eval()
        self.offset_ = state_number(extra, "offset", path)
