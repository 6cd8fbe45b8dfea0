"""Multi-step masked decoder over the teacher's 16x16 code grid (SPEC B.3).

One forward pass maps 256 code-slot ids (teacher codes 0..1023, mask id 1024) and the 64 quantized latent
tokens to logits over the teacher vocabulary. Choosing which slots are masked (training) or committed
(inference) is done outside: ``sftok.masking`` and ``sftok.decoding``.
"""
from __future__ import annotations

import torch
from torch import nn

from sftok.blocks import ResidualAttentionBlock


class MultiStepDecoder(nn.Module):
    """ids [B, 256] in [0, 1024], z_q [B, D, 1, 64] -> logits [B, 256, 1024].

    Sequence: [CLS ; 256 code slots (+pos) ; 64 condition tokens (+pos)], no attention mask. The slot
    outputs go through ``ln_post`` and the legacy head 1x1 conv W->2W, tanh, 1x1 conv 2W->1024 on the
    16x16 map. ``cond_drop_prob`` of the official signature was never used, so there is none here.
    """

    def __init__(self, width: int, layers: int, heads: int, num_latent_tokens: int = 64, token_size: int = 32,
                 num_proxy_codes: int = 256, codebook_size: int = 1024):
        super().__init__()
        self.width, self.num_latent_tokens = width, num_latent_tokens
        self.num_proxy_codes, self.codebook_size = num_proxy_codes, codebook_size
        self.mask_token_id = codebook_size
        self.grid_size = int(round(num_proxy_codes ** 0.5))
        if self.grid_size ** 2 != num_proxy_codes:
            raise ValueError(f"num_proxy_codes={num_proxy_codes} must be a square (a 2-D code grid).")
        scale = width ** -0.5
        self.decoder_embed = nn.Linear(token_size, width, bias=True)
        self.condition_positional_embedding = nn.Parameter(scale * torch.randn(num_latent_tokens, width))
        self.class_embedding = nn.Parameter(scale * torch.randn(1, width))
        self.learnable_embedding = nn.Embedding(codebook_size + 1, width)   # row codebook_size = [MASK]
        with torch.no_grad():   # official re-draw (then trunc-normal init); kept for identical RNG use
            self.learnable_embedding.weight.copy_(scale * torch.randn(codebook_size + 1, width))
        self.learnable_embedding_positional_embedding = nn.Parameter(
            scale * torch.randn(num_proxy_codes + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.ffn = nn.Sequential(
            nn.Conv2d(width, 2 * width, 1, padding=0, bias=True),
            nn.Tanh(),
            nn.Conv2d(2 * width, codebook_size, 1, padding=0, bias=True),
        )

    def forward(self, ids: torch.Tensor, z_quantized: torch.Tensor) -> torch.Tensor:
        B, C, H, W = z_quantized.shape
        z_quantized = z_quantized.to(self.decoder_embed.weight.dtype)   # fp32 codes into a bf16 decoder
        cond = self.decoder_embed(z_quantized.reshape(B, C * H, W).transpose(1, 2))   # [B, 64, W]
        cond = cond + self.condition_positional_embedding.to(cond.dtype)
        slots = self.learnable_embedding(ids)                                          # [B, 256, W]
        slots = torch.cat([self.class_embedding.expand(B, -1, -1).to(slots.dtype), slots], dim=1)
        slots = slots + self.learnable_embedding_positional_embedding.to(slots.dtype)
        x = self.ln_pre(torch.cat([slots, cond.to(slots.dtype)], dim=1))
        for block in self.transformer:
            x = block(x)
        x = self.ln_post(x[:, 1:1 + self.num_proxy_codes])                             # [B, 256, W]
        x = x.transpose(1, 2).reshape(B, self.width, self.grid_size, self.grid_size)
        logits = self.ffn(x.contiguous())                                              # [B, 1024, 16, 16]
        return logits.flatten(2).transpose(1, 2)                                       # [B, 256, 1024]
