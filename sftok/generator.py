"""MaskGIT-style class-conditional generator over the 64 SFTok tokens (SPEC D, the gFID model).

The official code (``modeling/maskgit.py: ImageBert``, inherited from TiTok) wraps a Hugging Face
``BertModel``. We do not depend on ``transformers``: :class:`MaskGITGenerator` re-implements exactly the
BERT layout it uses (word + position + token-type embeddings -> LayerNorm -> post-LN encoder layers, no
pooler, plus a linear ``lm_head``), with the same state-dict keys (``model.embeddings.*``,
``model.encoder.layer.{i}.*``, ``model.lm_head.*``) and the same initialisation (normal(0, 0.02)), so an
official ImageBert checkpoint loads with ``load_state_dict``. Attention runs through
``F.scaled_dot_product_attention``.

Token space (vocabulary ``codebook_size + num_classes + 2``; 8192 + 1000 + 2 = 9194 at full size):

* ``0 .. K-1``       image tokens (the tokenizer's OptVQ indices),
* ``K``              [MASK],
* ``K + 1 + c``      class ``c``,
* ``K + 1 + C``      the null class (classifier-free guidance / class dropout).

The input sequence is ``[class token, 64 image tokens]``; the head reads positions ``1..64``.

Training (:func:`mask_tokens`, :func:`mlm_loss`, :func:`training_loss`): arccos masking with
``n = max(1, round(64 * ratio))``, class label dropped with p = 0.1, cross-entropy with label smoothing 0.1
weighted 1 on masked and 0.1 on visible tokens (normalised weighted mean).

Sampling (:meth:`MaskGITGenerator.generate`): the MaskGIT loop with classifier-free guidance in the official
convention ``logits = cond + s * (cond - uncond)``, Gumbel noise with temperature annealed linearly to 0,
optional softmax-temperature annealing (the TiTok sampling script's ``softmax_temperature_annealing=True``)
and arccos re-masking of the least confident tokens; any number of steps.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from sftok.config import GeneratorConfig
from sftok.weights import read_state_dict

__all__ = [
    "MaskGITGenerator", "mask_tokens", "mlm_loss", "training_loss", "cfg_logits", "count_parameters",
    "save_generator", "load_generator", "normalize_official_keys",
]

WEIGHTS_FILE = "generator.safetensors"
CONFIG_FILE = "generator.json"
FORMAT_NAME = "sftok-maskgit-generator"


# ######################################################################################################
# BERT layout (keys mirror transformers.BertModel so official checkpoints load)
# ######################################################################################################

class _Embeddings(nn.Module):
    """BERT embeddings: word + absolute position + token type (always type 0), LayerNorm, dropout."""

    def __init__(self, vocab: int, width: int, max_positions: int, dropout: float, eps: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, width)
        self.position_embeddings = nn.Embedding(max_positions, width)
        self.token_type_embeddings = nn.Embedding(2, width)   # BERT's default type_vocab_size
        self.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(pos)[None] + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class _SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, attn_dropout: float):
        super().__init__()
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = (lin(x).view(b, n, self.heads, w // self.heads).transpose(1, 2)
                   for lin in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        return out.transpose(1, 2).reshape(b, n, w)


class _DenseLN(nn.Module):
    """BERT's ``*Output`` block: dense -> dropout -> LayerNorm(x + residual) (post-LN)."""

    def __init__(self, d_in: int, width: int, dropout: float, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float, eps: float):
        super().__init__()
        self.self = _SelfAttention(width, heads, dropout)
        self.output = _DenseLN(width, width, dropout, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x), x)


class _Intermediate(nn.Module):
    def __init__(self, width: int, mlp_dim: int):
        super().__init__()
        self.dense = nn.Linear(width, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))   # exact (erf) GELU, BERT's "gelu"


class _Layer(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int, dropout: float, eps: float):
        super().__init__()
        self.attention = _Attention(width, heads, dropout, eps)
        self.intermediate = _Intermediate(width, mlp_dim)
        self.output = _DenseLN(mlp_dim, width, dropout, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(x)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    def __init__(self, layers: int, **kw):
        super().__init__()
        self.layer = nn.ModuleList([_Layer(**kw) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class _Bert(nn.Module):
    """``BertModel(add_pooling_layer=False)`` plus the ``lm_head`` that ImageBert attaches to it."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, mlp_dim: int, max_positions: int,
                 out_dim: int, dropout: float, eps: float = 1e-12):
        super().__init__()
        self.embeddings = _Embeddings(vocab, width, max_positions, dropout, eps)
        self.encoder = _Encoder(layers, width=width, heads=heads, mlp_dim=mlp_dim, dropout=dropout, eps=eps)
        self.lm_head = nn.Linear(width, out_dim)


# ######################################################################################################
# The generator
# ######################################################################################################

class MaskGITGenerator(nn.Module):
    """Class-conditional bidirectional transformer over ``seq_len`` image tokens (official ``ImageBert``).

    Args:
        cfg: sizes and regularisation (:class:`sftok.config.GeneratorConfig`).
        codebook_size: the tokenizer's OptVQ codebook size (8192 for SFTok-B/L, 1024 for ``sftok_tiny``).
        seq_len: tokens per image (64).
    """

    def __init__(self, cfg: GeneratorConfig, codebook_size: int = 8192, seq_len: int = 64):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"generator.width={cfg.width} is not divisible by generator.heads={cfg.heads}; "
                             "pick a head count that divides the width.")
        self.cfg = cfg
        self.codebook_size = codebook_size
        self.seq_len = seq_len
        self.num_classes = cfg.num_classes
        self.mask_id = codebook_size
        self.null_class_id = codebook_size + 1 + cfg.num_classes
        self.model = _Bert(vocab=codebook_size + cfg.num_classes + 2, width=cfg.width, layers=cfg.layers,
                           heads=cfg.heads, mlp_dim=cfg.mlp_dim, max_positions=seq_len + 1,
                           out_dim=codebook_size, dropout=cfg.dropout)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """BERT ``_init_weights`` with initializer_range 0.02 (applied by ``post_init`` officially)."""
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------------- inputs
    def class_tokens(self, labels: torch.Tensor, drop: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Map class labels ``[B]`` to vocabulary ids; where ``drop`` is True use the null class."""
        if labels.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}.")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"class labels must lie in [0, {self.num_classes}); got "
                             f"[{int(labels.min())}, {int(labels.max())}]. Set generator.num_classes to the "
                             "number of classes in the data.")
        cond = labels.long() + self.codebook_size + 1
        if drop is not None:
            cond = torch.where(drop, torch.full_like(cond, self.null_class_id), cond)
        return cond

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor,
                drop_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[B, seq_len, codebook_size]`` for ``tokens [B, seq_len]`` (mask id allowed).

        ``drop_labels`` (bool ``[B]``) replaces those labels by the null class (class dropout / CFG).
        """
        if tokens.dim() != 2 or tokens.shape[1] != self.seq_len:
            raise ValueError(f"tokens must have shape [B, {self.seq_len}], got {tuple(tokens.shape)}.")
        ids = torch.cat([self.class_tokens(labels, drop_labels)[:, None], tokens.long()], dim=1)
        x = self.model.encoder(self.model.embeddings(ids))
        return self.model.lm_head(x[:, 1:])

    def guided_logits(self, tokens: torch.Tensor, labels: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """Classifier-free guided logits, official convention ``cond + s * (cond - uncond)``.

        With ``s == 0`` only the conditional pass runs (as officially), so the result *is* the conditional
        logits. Otherwise the conditional and unconditional halves run as one batch.
        """
        if guidance_scale == 0:
            return self(tokens, labels)
        b = tokens.shape[0]
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(tokens.device)
        both = self(torch.cat([tokens, tokens]), torch.cat([labels, labels]), drop)
        return cfg_logits(both[:b], both[b:], guidance_scale)

    # ------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(self, labels: torch.Tensor, *, num_steps: int = 8, guidance_scale: float = 4.5,
                 temperature: float = 1.0, softmax_annealing: bool = True,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sample ``[B, seq_len]`` image tokens for class ``labels [B]`` (official ``ImageBert.generate``
        with ``guidance_decay="constant"``).

        Step ``i`` (ratio r = (i+1)/num_steps): guided logits, optionally divided by the softmax
        temperature ``0.5 + 0.8 (1 - r)``; Gumbel noise with temperature ``temperature * (1 - r)`` picks a
        token for every masked slot; its (noised) logit is the confidence; the
        ``clamp(floor(seq_len * arccos(r) / (pi/2)), 1, masked - 1)`` least confident new tokens are masked
        again. The last step keeps everything. Randomness comes from ``generator`` (CPU or the model's
        device) so a seed reproduces a sample. Call ``model.eval()`` first: dropout stays active otherwise.
        """
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps}: need at least one sampling step.")
        device = next(self.parameters()).device
        labels = labels.to(device)
        b, n = labels.shape[0], self.seq_len
        ids = torch.full((b, n), self.mask_id, dtype=torch.long, device=device)

        def gumbel(shape) -> torch.Tensor:
            u = torch.rand(shape, generator=generator, device=generator.device if generator else device)
            return -torch.log((-torch.log(u.to(device).clamp_min(1e-20))).clamp_min(1e-20))

        for step in range(num_steps):
            ratio = (step + 1) / num_steps
            tau = temperature * (1.0 - ratio)
            is_mask = ids == self.mask_id
            logits = self.guided_logits(ids, labels, guidance_scale).float()
            if softmax_annealing:
                logits = logits / (0.5 + 0.8 * (1.0 - ratio))
            sampled = (logits + tau * gumbel(logits.shape)).argmax(-1)
            picked = logits.gather(-1, sampled[..., None]).squeeze(-1)
            sampled = torch.where(is_mask, sampled, ids)
            if step == num_steps - 1:
                ids = sampled
                break
            confidence = torch.where(is_mask, picked, torch.full_like(picked, math.inf)) + tau * gumbel(picked.shape)
            mask_len = math.floor(n * math.acos(ratio) / (math.pi / 2))
            mask_len = torch.clamp(is_mask.sum(-1, keepdim=True) - 1, max=mask_len).clamp(min=1)   # [B,1]
            rank = confidence.argsort(-1).argsort(-1)                  # 0 = least confident
            ids = torch.where(rank < mask_len, torch.full_like(sampled, self.mask_id), sampled)
        return ids


# ######################################################################################################
# Training objective
# ######################################################################################################

def mask_tokens(tokens: torch.Tensor, mask_id: int,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Arccos masking (official ``masking_input_tokens``): t ~ U(0,1), ratio = arccos(t)/(pi/2) clipped to
    [1e-6, 1], n = max(1, round(L * ratio)) random slots per row replaced by ``mask_id``.

    Returns ``(masked_tokens, mask)`` with ``mask`` bool ``[B, L]`` (True = masked).
    """
    b, n = tokens.shape
    dev = generator.device if generator is not None else tokens.device
    t = torch.rand(b, generator=generator, device=dev).to(tokens.device)
    ratio = (torch.acos(t) / (math.pi * 0.5)).clamp(1e-6, 1.0)
    num_masked = (n * ratio).round().clamp(min=1)
    perm_rank = torch.rand(b, n, generator=generator, device=dev).to(tokens.device).argsort(-1)
    mask = perm_rank < num_masked[:, None]
    return torch.where(mask, torch.full_like(tokens, mask_id), tokens), mask


def mlm_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *,
             label_smoothing: float = 0.1, unmasked_weight: float = 0.1) -> tuple[torch.Tensor, dict]:
    """Official ``MLMLoss``: label-smoothed CE, weight 1 on masked and ``unmasked_weight`` on visible
    slots, normalised by the weight sum. Also returns the top-1 accuracy on masked slots."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, label_smoothing=label_smoothing,
                         reduction="none")
    m = mask.to(ce.dtype)
    w = (1.0 - m) * unmasked_weight + m
    loss = (ce * w).sum() / (w.sum() + 1e-8)
    with torch.no_grad():
        correct = ((logits.argmax(-1) == targets).to(ce.dtype) * m).sum(1) / (m.sum(1) + 1e-8)
    return loss, {"loss": float(loss.detach()), "masked_accuracy": float(correct.mean())}


def training_loss(model: MaskGITGenerator, tokens: torch.Tensor, labels: torch.Tensor, *,
                  class_dropout: Optional[float] = None, label_smoothing: Optional[float] = None,
                  unmasked_weight: float = 0.1,
                  generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict]:
    """One training step's loss on clean ``tokens [B, L]`` with ``labels [B]`` (masking, class dropout,
    forward, :func:`mlm_loss`). ``class_dropout`` / ``label_smoothing`` default to the model's config."""
    # unwrap DDP to reach the config and mask id; the forward still goes through the wrapper
    core = model.module if hasattr(model, "module") else model
    p = core.cfg.class_dropout if class_dropout is None else class_dropout
    ls = core.cfg.label_smoothing if label_smoothing is None else label_smoothing
    masked, mask = mask_tokens(tokens, core.mask_id, generator)
    dev = generator.device if generator is not None else tokens.device
    drop = torch.rand(tokens.shape[0], generator=generator, device=dev).to(tokens.device) < p
    logits = model(masked, labels, drop)
    return mlm_loss(logits, tokens, mask, label_smoothing=ls, unmasked_weight=unmasked_weight)


def cfg_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance, official convention: ``cond + scale * (cond - uncond)``
    (= ``uncond + (1 + scale) * (cond - uncond)``; official 4.5 is 5.5 in the usual convention)."""
    return cond + scale * (cond - uncond)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ######################################################################################################
# Files
# ######################################################################################################

def save_generator(model: MaskGITGenerator, directory) -> "Path":
    """Write ``generator.safetensors`` + ``generator.json`` (GeneratorConfig, codebook size, length)."""
    import dataclasses
    import json
    from pathlib import Path

    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
    meta = {"format": FORMAT_NAME, "codebook_size": model.codebook_size, "seq_len": model.seq_len,
            "generator": dataclasses.asdict(model.cfg)}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def load_generator(directory, map_location="cpu") -> MaskGITGenerator:
    """Rebuild a generator saved by :func:`save_generator` (safetensors; nothing is unpickled)."""
    import json
    from pathlib import Path

    directory = Path(directory)
    cfg_file, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{directory} is not a generator export: it needs {CONFIG_FILE} and "
                                f"{WEIGHTS_FILE} (written by sftok.generator.save_generator / stage 4).")
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{cfg_file} is not a generator config (format={meta.get('format')!r}).")
    model = MaskGITGenerator(GeneratorConfig(**meta["generator"]), codebook_size=int(meta["codebook_size"]),
                             seq_len=int(meta["seq_len"]))
    model.load_state_dict(normalize_official_keys(read_state_dict(weights)))
    return model.to(map_location).eval()


def normalize_official_keys(state: dict) -> dict:
    """Drop the non-parameter buffers that some ``transformers`` versions store in ``BertModel`` state
    dicts (``embeddings.position_ids`` / ``token_type_ids``), so official ImageBert weights load strictly."""
    return {k: v for k, v in state.items()
            if not k.endswith(("embeddings.position_ids", "embeddings.token_type_ids"))}
