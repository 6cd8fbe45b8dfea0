"""ViT encoder with 64 learned latent queries (TiTok's encoder, SPEC B.1)."""
from __future__ import annotations

import torch
from torch import nn

from sftok.blocks import ResidualAttentionBlock


class TiTokEncoder(nn.Module):
    """Image [B,3,H,W] + latent queries [K,W] -> continuous latents [B, token_size, 1, K].

    Sequence: [CLS ; patches ; latent queries]. Only the K query outputs are kept. The output head keeps
    the official *legacy* quirk: the [B,K,W] tensor is reshaped (not transposed) to [B,W,K,1] before the
    1x1 ``conv_out``, so the conv mixes a flat reinterpretation of the token x channel matrix. Released
    weights were trained through this reshape, so a port must copy it.
    """

    def __init__(self, width: int, layers: int, heads: int, image_size: int = 256, patch_size: int = 16,
                 num_latent_tokens: int = 64, token_size: int = 32):
        super().__init__()
        self.width, self.num_latent_tokens, self.token_size = width, num_latent_tokens, token_size
        self.grid_size = image_size // patch_size
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=True)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(1, width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size ** 2 + 1, width))
        self.latent_token_positional_embedding = nn.Parameter(scale * torch.randn(num_latent_tokens, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.conv_out = nn.Conv2d(width, token_size, kernel_size=1, bias=True)

    def forward(self, pixel_values: torch.Tensor, latent_tokens: torch.Tensor) -> torch.Tensor:
        B = pixel_values.shape[0]
        pixel_values = pixel_values.to(self.patch_embed.weight.dtype)           # fp32 images into bf16 weights
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)            # [B, grid^2, W]
        x = torch.cat([self.class_embedding.expand(B, -1, -1).to(x.dtype), x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        queries = (latent_tokens + self.latent_token_positional_embedding).to(x.dtype)
        x = torch.cat([x, queries.expand(B, -1, -1)], dim=1)
        x = self.ln_pre(x)
        for block in self.transformer:
            x = block(x)
        latents = self.ln_post(x[:, 1 + self.grid_size ** 2:])                   # [B, K, W]
        latents = latents.reshape(B, self.width, self.num_latent_tokens, 1)     # legacy flat reshape
        return self.conv_out(latents).reshape(B, self.token_size, 1, self.num_latent_tokens)
