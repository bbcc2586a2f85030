"""The soft-label objective shared by the MLP and BERT routers."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads only when a router trains or predicts
    import torch


def soft_label_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft labels, normalised over each prompt's observed experts only."""
    import torch
    logits = logits.float().masked_fill(~mask, torch.finfo(torch.float32).min)
    log_probs = torch.log_softmax(logits, dim=-1)
    return -(targets * log_probs.masked_fill(~mask, 0.0)).sum(dim=-1).mean()


def pick_device(device: str | None) -> str:
    from ..encoders import default_device

    return device or default_device()
