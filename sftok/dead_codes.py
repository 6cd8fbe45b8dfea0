"""Dead-code restart for a VQ codebook trained from scratch (stage 0, the teacher).

Why: a plain argmin VQ trained from a near-zero codebook collapses. The first few rows that an encoder
output lands near win every assignment, the others never receive a gradient, and the teacher ends up with
about 1% of its codes in use (measured on the tiny preset: 9-14 of 1024). A collapsed teacher makes the
stage-1/2 proxy-code task trivial, so every SFTok metric downstream means nothing. The standard remedy
(Jukebox; Zeghidour et al. 2021, SoundStream) is to move each code that no recent batch used onto a random
encoder output from the current batch. The argmin then finds it, and it receives a gradient again.

The restart keeps every rank identical, with no broadcast. Features are all-gathered in rank order and
counts are all-reduced, and the replacement rows are drawn from a generator seeded by the step. This
module does not change the official teacher: it only runs while stage 0 trains one.
"""
from __future__ import annotations

import torch
from torch import nn


def _dist() -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


class DeadCodeRestart:
    """Tracks an exponential moving average of per-code usage and restarts the rows that fell below it.

    Args:
        codebook_size: rows of the codebook.
        decay: EMA decay of the per-code assignment counts (per optimiser step).
        threshold: a code is dead when its average count per step is below this.
        seed: base seed of the row choice (the step is added, so reruns repeat it).
    """

    def __init__(self, codebook_size: int, *, decay: float = 0.9, threshold: float = 1e-3, seed: int = 0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay={decay} must lie in [0, 1).")
        self.codebook_size, self.decay, self.threshold, self.seed = codebook_size, decay, threshold, seed
        self.usage: torch.Tensor | None = None     # EMA of counts per step, float64 on the codebook's device

    @torch.no_grad()
    def __call__(self, embedding: nn.Embedding, features: torch.Tensor, ids: torch.Tensor, step: int) -> torch.Tensor:
        """Update usage with this step's assignments and restart the dead rows of ``embedding``.

        Args:
            embedding: the codebook (``[codebook_size, dim]`` weight); changed in place.
            features: this rank's encoder outputs ``[N, dim]`` (the vectors that were quantized).
            ids: their code ids ``[N]``.
            step: the optimiser step (seeds the row choice).
        Returns:
            the indices of the restarted rows (the same on every rank).
        """
        weight = embedding.weight
        features = features.detach().reshape(-1, weight.shape[1]).to(weight.dtype)
        counts = torch.bincount(ids.reshape(-1), minlength=self.codebook_size).to(weight.device, torch.float64)
        if _dist():
            torch.distributed.all_reduce(counts)
            gathered = [torch.empty_like(features) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(gathered, features.contiguous())
            features = torch.cat(gathered)
        if self.usage is None:
            self.usage = counts.clone()
        else:
            self.usage = self.usage.to(counts.device)
            self.usage.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        dead = (self.usage < self.threshold).nonzero().flatten()
        if dead.numel() == 0:
            return dead
        g = torch.Generator().manual_seed(self.seed + step)
        pick = torch.randint(0, features.shape[0], (dead.numel(),), generator=g)
        # a little noise so that several dead rows restarted on one feature split apart again
        noise = torch.randn(dead.numel(), weight.shape[1], generator=g, dtype=torch.float32)
        scale = 0.01 * features.float().std().clamp_min(1e-6)
        weight[dead] = features[pick.to(features.device)] + (scale * noise).to(weight.device, weight.dtype)
        self.usage[dead] = 1.0 / self.codebook_size    # a grace period before a row can count as dead again
        return dead

    def state_dict(self) -> dict:
        return {"usage": None if self.usage is None else self.usage.cpu()}

    def load_state_dict(self, state: dict) -> None:
        usage = state.get("usage")
        self.usage = None if usage is None else usage.to(torch.float64)
