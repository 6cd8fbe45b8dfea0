"""OptVQ: L2-normalised codebook with a shared linear map and Sinkhorn-balanced assignment (SPEC B.2).

Assignment is *not* nearest neighbour. Distances between the normalised latents and the normalised
effective codebook normalize(shared_linear(E)) are turned into a transport plan by 5 Sinkhorn iterations
whose code marginals are uniform; each latent then takes its argmax code. With ``assignment="batch"``
(official) the plan spans every latent of the batch, so a token can change with the other images in the
batch, at inference too. ``assignment="per_image"`` runs the same algorithm on each image's latents alone:
tokens then never depend on batch neighbours and equal the official tokens of that image encoded alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sinkhorn(cost: torch.Tensor, iters: int = 5, epsilon: float = 10.0) -> torch.Tensor:
    """Balanced assignment of cost [..., N, K] (the official op order, batched over leading dims).

    Q = exp(-eps * cost)^T is normalised to total mass 1; each iteration normalises code rows to 1/K and
    sample columns to 1/N; the result is scaled by N so each sample's column sums to 1.
    """
    q = torch.exp(-cost * epsilon).transpose(-1, -2)                     # [..., K, N]
    K, N = q.shape[-2], q.shape[-1]
    q = q / (q.sum(dim=(-2, -1), keepdim=True) + 1e-8)
    for _ in range(iters):
        q = q / (q.sum(dim=-1, keepdim=True) + 1e-8)
        q = q / K
        q = q / (q.sum(dim=-2, keepdim=True) + 1e-8)
        q = q / N
    return (q * N).transpose(-1, -2)                                       # [..., N, K]


def sinkhorn_indices(x: torch.Tensor, codebook: torch.Tensor, iters: int = 5,
                     epsilon: float = 10.0) -> torch.Tensor:
    """Code index per row of x [..., N, D] against codebook [K, D]; the plan spans each leading slice.

    The official code also computes a standardised distance but never assigns it (a no-op we skip);
    only the shift by the global minimum (per slice) is applied.
    """
    d = torch.cdist(x, codebook, p=2)
    d = d - d.amin(dim=(-2, -1), keepdim=True)
    return sinkhorn(d, iters, epsilon).argmax(dim=-1)


class OptVQ(nn.Module):
    """Quantize latents [B, D, 1, K] to unit-norm codes; straight-through; always fp32.

    Parameters keep the official names: ``embedding`` [1, codebook_size, D] (raw codebook),
    ``shared_linear`` (D -> D, identity init) and the int64 buffer ``index_offset``.
    """

    def __init__(self, codebook_size: int = 8192, token_size: int = 32, commitment_cost: float = 0.25,
                 sinkhorn_iters: int = 5, sinkhorn_epsilon: float = 10.0, assignment: str = "batch"):
        super().__init__()
        if assignment not in ("batch", "per_image"):
            raise ValueError(f"assignment={assignment!r}: use 'batch' (official) or 'per_image'.")
        self.codebook_size, self.token_size = codebook_size, token_size
        self.commitment_cost = commitment_cost
        self.sinkhorn_iters, self.sinkhorn_epsilon = sinkhorn_iters, sinkhorn_epsilon
        self.assignment = assignment
        # randn then uniform_: the official init, whose RNG consumption we keep so seeds reproduce its weights
        self.embedding = nn.Parameter(
            torch.randn(1, codebook_size, token_size).uniform_(-1.0 / codebook_size, 1.0 / codebook_size))
        self.shared_linear = nn.Linear(token_size, token_size, bias=True)
        with torch.no_grad():
            self.shared_linear.weight.copy_(torch.eye(token_size))
            self.shared_linear.bias.zero_()
        self.register_buffer("index_offset", torch.zeros(1, dtype=torch.long))

    def codebook(self) -> torch.Tensor:
        """The effective codebook normalize(shared_linear(E)) [K, D]."""
        return F.normalize(self.shared_linear(self.embedding), dim=-1).view(-1, self.token_size)

    @torch.no_grad()
    def find_indices(self, z_flat: torch.Tensor, batch: int, assignment: str | None = None) -> torch.Tensor:
        """Indices [B, K] for normalised latents z_flat [B*K, D] (rows ordered image-major)."""
        assignment = assignment or self.assignment
        codebook = self.codebook()
        if assignment == "batch":
            idx = sinkhorn_indices(z_flat, codebook, self.sinkhorn_iters, self.sinkhorn_epsilon)
        else:
            idx = torch.cat([sinkhorn_indices(z, codebook, self.sinkhorn_iters, self.sinkhorn_epsilon)
                             for z in z_flat.view(batch, -1, self.token_size)])
        return idx.view(batch, -1)

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        """Unit-norm code vectors [N, D] for flat indices (official lookup-then-normalise order)."""
        rows = self.shared_linear(self.embedding).view(-1, self.token_size)[indices.reshape(-1)]
        return F.normalize(rows, dim=-1)

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [B, K] -> z_q [B, D, 1, K]."""
        B, K = tokens.shape
        return self.get_codebook_entry(tokens).view(B, 1, K, self.token_size).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor, assignment: str | None = None):
        """z [B, D, 1, K] -> (z_q [B, D, 1, K], info). Info holds the losses and ``indices`` [B, K]."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            B = z.shape[0]
            z = z.permute(0, 2, 3, 1).contiguous()                           # [B, 1, K, D]
            z = F.normalize(z, dim=-1)
            indices = self.find_indices(z.view(-1, self.token_size), B, assignment)
            z_q = self.get_codebook_entry(indices).view(z.shape)
            commitment_loss = self.commitment_cost * torch.mean((z_q.detach() - z) ** 2)
            codebook_loss = torch.mean((z_q - z.detach()) ** 2)
            z_q = z + (z_q - z).detach()                                      # straight-through
            z_q = z_q.permute(0, 3, 1, 2).contiguous()                        # [B, D, 1, K]
        info = {
            "quantizer_loss": commitment_loss + codebook_loss,
            "commitment_loss": commitment_loss,
            "codebook_loss": codebook_loss,
            "indices": indices,
            "min_encoding_indices": indices.view(B, 1, -1),
        }
        return z_q, info
