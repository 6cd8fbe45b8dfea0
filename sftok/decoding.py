"""Multi-step MaskGIT-style decoding of the 256 proxy-code slots (SPEC C.4, official ``generate``).

Each step runs one decoder pass on the current ids, Gumbel-samples a code for every masked slot, keeps
already committed slots (confidence +inf), and re-masks the lowest-confidence slots so that
floor(256 * arccos(rho) / (pi/2)) stay masked (rho = (s+1)/T). The Gumbel temperature anneals linearly
to 0 at the last step. Randomness: exactly two uniform draws per step, in the official order and shapes
(logits-shaped, then [B, 256]); from ``generator`` when given, else from torch's global RNG, so
``torch.manual_seed(s)`` right before decoding reproduces the official samples. Temperature 0 is
deterministic (the draws still happen, and are multiplied by 0, as in the official code).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class DecodeResult:
    ids: torch.Tensor               # [B, 256] final ids (every slot committed)
    logits: torch.Tensor            # [B, 256, V] logits of the last decoder pass
    inputs_per_step: torch.Tensor   # [B, T, 256] ids fed to the decoder at each step (mask id = masked)


def masked_after_step(num_steps: int, num_slots: int = 256) -> list[int]:
    """How many slots stay masked after each step (sample-independent when all samples start masked)."""
    out, masked = [], num_slots
    for step in range(num_steps):
        if step == num_steps - 1:
            out.append(0)
            break
        ratio = (step + 1) / num_steps
        k = max(1, min(masked - 1, math.floor(num_slots * math.acos(ratio) / (math.pi * 0.5))))
        out.append(k)
        masked = k
    return out


def _gumbel(shape_like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is not None and generator.device != shape_like.device:   # e.g. a CPU generator, CUDA model
        u = torch.zeros(shape_like.shape, dtype=shape_like.dtype, device=generator.device)
        u = u.uniform_(0, 1, generator=generator).to(shape_like.device)
    else:
        u = torch.zeros_like(shape_like).uniform_(0, 1, generator=generator)
    return -torch.log((-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20))


@torch.no_grad()
def multistep_decode(decoder, z_quantized: torch.Tensor, num_steps: int = 8, temperature: float = 1.0,
                     generator: torch.Generator | None = None) -> DecodeResult:
    """Run the official decoding loop with ``decoder(ids, z_q) -> logits``. Returns a :class:`DecodeResult`."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: need at least 1 decoding step.")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = deterministic decoding).")
    B = z_quantized.shape[0]
    n, mask_id = decoder.num_proxy_codes, decoder.mask_token_id
    ids = torch.full((B, n), mask_id, dtype=torch.long, device=z_quantized.device)
    inputs, logits = [], None
    for step in range(num_steps):
        ratio = (step + 1) / num_steps
        temp = temperature * (1.0 - ratio)
        is_mask = ids == mask_id
        inputs.append(ids)
        logits = decoder(ids, z_quantized).float()
        sampled = (logits + temp * _gumbel(logits, generator)).argmax(dim=-1)
        sampled_logits = torch.gather(logits, -1, sampled.unsqueeze(-1)).squeeze(-1)
        sampled = torch.where(is_mask, sampled, ids)
        sampled_logits = torch.where(is_mask, sampled_logits, torch.full_like(sampled_logits, math.inf))
        # the official loop sizes the re-mask from sample 0's count (all samples agree when started masked)
        mask_len = math.floor(n * math.acos(ratio) / (math.pi * 0.5))
        mask_len = max(1, min(int(is_mask[0].sum().item()) - 1, mask_len))
        confidence = sampled_logits + temp * _gumbel(sampled_logits, generator)
        cut_off = torch.sort(confidence, dim=-1).values[:, mask_len - 1:mask_len]
        if step == num_steps - 1:
            ids = sampled
        else:
            ids = torch.where(confidence <= cut_off, torch.full_like(sampled, mask_id), sampled)
    return DecodeResult(ids=ids, logits=logits, inputs_per_step=torch.stack(inputs, dim=1))
