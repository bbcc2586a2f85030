"""MLP router: a small network on frozen sentence embeddings, trained on soft labels.

The network maps an embedding to one logit per expert and is trained with
cross-entropy against ``softmax(T * score)`` (see ``torouter.labels``). Its
log-probabilities divided by ``T`` estimate each expert's score up to a constant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..data import RoutingDataset
from ..encoders import DEFAULT_BACKEND, DEFAULT_ENCODER
from ..labels import DEFAULT_TEMPERATURE, fit_offset, quality_from_log_probs, soft_labels
from ._training import pick_device, soft_label_loss
from .base import EmbeddingRouter


def _build(in_dim: int, hidden: int, n_out: int, dropout: float):
    from torch import nn

    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.GELU(),
                         nn.Dropout(dropout), nn.Linear(hidden, n_out))


class MLPRouter(EmbeddingRouter):
    method = "mlp"

    # Defaults chosen by AIQ on a validation fifth of RouterBench's training split.
    def __init__(self, temperature: float = DEFAULT_TEMPERATURE, hidden: int = 256, dropout: float = 0.3,
                 epochs: int = 60, lr: float = 1e-3, weight_decay: float = 0.1, batch_size: int = 64,
                 seed: int = 0, encoder: str = DEFAULT_ENCODER, device: str | None = None,
                 backend: str = DEFAULT_BACKEND):
        self.temperature = temperature
        self.hidden = hidden
        self.dropout = dropout
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.seed = seed
        self.encoder = encoder
        self.device = device
        self.backend = backend

    def _fit(self, dataset: RoutingDataset) -> None:
        import torch

        from tqdm.auto import tqdm

        embeddings, scores, mask = self._fit_embeddings(dataset), dataset.scores, dataset.mask
        torch.manual_seed(self.seed)
        device = pick_device(self.device)
        x = torch.as_tensor(embeddings, dtype=torch.float32, device=device)
        y = torch.as_tensor(soft_labels(scores, mask, self.temperature), dtype=torch.float32, device=device)
        m = torch.as_tensor(mask, device=device)
        net = _build(x.shape[1], self.hidden, y.shape[1], self.dropout).to(device)
        optimiser = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        net.train()
        losses = []
        for _ in tqdm(range(self.epochs), desc="mlp router", disable=len(x) * self.epochs < 200_000,
                      leave=False):
            order = torch.randperm(len(x), generator=generator).to(device)
            total = 0.0
            for start in range(0, len(x), self.batch_size):
                idx = order[start:start + self.batch_size]
                loss = soft_label_loss(net(x[idx]), y[idx], m[idx])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += loss.item() * len(idx)
            losses.append(total / len(x))
        net.eval()
        self._net = net.cpu()
        self.fit_info_["final_loss"] = losses[-1] if losses else None
        self.offset_ = fit_offset(self._log_probs(embeddings), scores, mask, self.temperature)

    def _log_probs(self, embeddings: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            logits = self._net(torch.as_tensor(embeddings, dtype=torch.float32))
            return torch.log_softmax(logits, dim=-1).numpy()

    def predict_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        return quality_from_log_probs(self._log_probs(embeddings), self.temperature, self.offset_)

    def _get_state(self):
        arrays = {f"net.{k}": v.detach().cpu().numpy() for k, v in self._net.state_dict().items()}
        return arrays, {"offset": self.offset_, "in_dim": int(self._net[1].in_features)}

    def _set_state(self, arrays: dict[str, np.ndarray], extra: dict[str, Any], path: Path) -> None:
        import torch

        from .base import RouterFileError, state_number

        in_dim = state_number(extra, "in_dim", path)
        if in_dim != int(in_dim) or in_dim < 1:
            raise RouterFileError(f"{path}: state 'in_dim' must be a positive whole number, got {in_dim!r}")
        net = _build(int(in_dim), self.hidden, len(self.experts_), self.dropout)
        state = {k[len("net."):]: torch.from_numpy(v.copy()) for k, v in arrays.items() if k.startswith("net.")}
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise RouterFileError(f"{path}: MLP weights do not match the config: {exc}") from None
        net.eval()
        self._net = net
        self.offset_ = state_number(extra, "offset", path)
