"""Exponential moving average of a QAT model that carries quantizer state consistently.

Ultralytics' ModelEMA averages every float tensor it bound at creation, buffers included. For a fake-quantized model
that is wrong twice over: observer statistics and fixed scales are state, not weights (averaging a frozen range moves
it), and the on/off switches are integer buffers it never touches. Here parameters (conv weights, biases, LSQ scales)
are averaged and every buffer (observer statistics, scales, zero points, switches, BN statistics) is copied, so
freezing observers on the live model freezes them on the EMA too.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from src.quantization.fake_quantize import fake_quantizers


class QATModelEMA:
    """EMA of parameters plus an exact copy of buffers.

    Args:
        model: The live model.
        decay: Maximum decay.
        tau: Ramp time constant in updates (decay starts small so early updates follow the model).
        updates: Number of updates already done (for resume).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000, updates: int = 0):
        self.ema = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.updates = updates
        self.max_decay, self.tau = decay, tau

    def decay(self) -> float:
        return self.max_decay * (1 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average parameters, copy buffers."""
        self.updates += 1
        d = self.decay()
        for pe, pm in zip(self.ema.parameters(), model.parameters()):
            pe.mul_(d).add_(pm.detach(), alpha=1.0 - d)
        self.sync_buffers(model)

    @torch.no_grad()
    def sync_buffers(self, model: nn.Module) -> None:
        """Copy every buffer (quantizer switches, ranges, BN statistics) from the live model."""
        for be, bm in zip(self.ema.buffers(), model.buffers()):
            be.copy_(bm)
        for qe, qm in zip(fake_quantizers(self.ema), fake_quantizers(model)):
            qe.copy_switches_from(qm)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "state_dict": self.ema.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.ema.load_state_dict(state["state_dict"])
