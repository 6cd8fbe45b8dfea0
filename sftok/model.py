"""The SFTok tokenizer: ViT encoder + OptVQ + multi-step decoder (+ the stage-3 soft pixel head).

Submodule and parameter names equal the official ``SFTok`` so official state dicts load unchanged:
``latent_tokens``, ``encoder``, ``quantize``, ``decoder`` and, when ``cfg.pixel_head`` (stage 3 /
released model), ``pixel_quantize`` + ``pixel_decoder``.
"""
from __future__ import annotations

import torch
from torch import nn

from sftok.blocks import VIT_SIZES, init_official_
from sftok.config import ConfigError, ModelConfig
from sftok.decoder import MultiStepDecoder
from sftok.decoding import DecodeResult, multistep_decode
from sftok.encoder import TiTokEncoder
from sftok.maskgit_vqgan import Decoder as PixelDecoder
from sftok.maskgit_vqgan import MaskGITVQGAN, VectorQuantizer, VQGANArch
from sftok.quantizer import OptVQ
from sftok.validation import check_ids, check_images


class SFTok(nn.Module):
    """Images [B,3,256,256] in [0,1] <-> 64 discrete tokens in [0, codebook_size).

    Typical use::

        tokens = model.encode(images)                      # LongTensor [B, 64]
        recon = model.decode_tokens(tokens, num_steps=8)   # [B, 3, 256, 256] (stage-3 / released layout)
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        for key in ("encoder_size", "decoder_size"):
            if getattr(cfg, key) not in VIT_SIZES:
                raise ConfigError(f"ModelConfig.{key}={getattr(cfg, key)!r}; use one of {sorted(VIT_SIZES)}.")
        self.cfg = cfg
        ew, el, eh = VIT_SIZES[cfg.encoder_size]
        dw, dl, dh = VIT_SIZES[cfg.decoder_size]
        self.encoder = TiTokEncoder(ew, el, eh, cfg.image_size, cfg.patch_size, cfg.num_latent_tokens,
                                    cfg.token_size)
        self.decoder = MultiStepDecoder(dw, dl, dh, cfg.num_latent_tokens, cfg.token_size,
                                        cfg.num_proxy_codes, cfg.teacher_codebook_size)
        self.latent_tokens = nn.Parameter(ew ** -0.5 * torch.randn(cfg.num_latent_tokens, ew))
        init_official_(self, cfg.init_std)   # official order: before the quantizer and the pixel head exist
        self.quantize = OptVQ(cfg.codebook_size, cfg.token_size, cfg.commitment_cost, cfg.sinkhorn_iters,
                              cfg.sinkhorn_epsilon, cfg.assignment)
        if cfg.pixel_head:
            self.pixel_quantize = VectorQuantizer(cfg.teacher_codebook_size, cfg.pixel_z_channels)
            self.pixel_decoder = PixelDecoder(cfg.pixel_hidden_channels, cfg.pixel_z_channels, pixel_arch(cfg))
        self._encoder_frozen = False

    # ------------------------------------------------------------------ properties
    @property
    def mask_id(self) -> int:
        """Decoder id of a masked slot (= teacher codebook size, 1024)."""
        return self.cfg.teacher_codebook_size

    @property
    def has_pixel_head(self) -> bool:
        return self.cfg.pixel_head

    # ------------------------------------------------------------------ encoding
    def quantize_images(self, images: torch.Tensor, assignment: str | None = None):
        """Images -> (z_q [B,32,1,64] straight-through, info). Info: ``quantizer_loss``, ``commitment_loss``,
        ``codebook_loss`` (scalars), ``indices`` LongTensor [B,64]. Gradients flow (unless frozen)."""
        check_images(images, self.cfg.image_size)
        z = self.encoder(images, self.latent_tokens)
        return self.quantize(z, assignment=assignment)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, assignment: str | None = None) -> torch.Tensor:
        """Images [B,3,256,256] in [0,1] -> tokens LongTensor [B,64].

        ``assignment`` overrides ``cfg.assignment``: "batch" (official, batch-coupled Sinkhorn) or
        "per_image" (each image's tokens independent of the rest of the batch).
        """
        return self.quantize_images(images, assignment)[1]["indices"]

    def tokens_to_latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [B,64] -> z_q [B,32,1,64] (unit-norm code vectors)."""
        tokens = check_ids(tokens, self.cfg.num_latent_tokens, self.cfg.codebook_size, "tokens")
        return self.quantize.decode_tokens(tokens)

    # ------------------------------------------------------------------ decoding
    def forward(self, images: torch.Tensor, ids: torch.Tensor, return_image: bool = False):
        """One training forward: (logits [B,256,1024], info); ``info["image"]`` when ``return_image``.

        ``ids`` [B,256] are the decoder's slot ids (mask id 1024 allowed); masking/replacement is chosen
        by the caller (``sftok.masking``). Going through ``forward`` keeps DDP's gradient hooks in play.
        """
        ids = check_ids(ids, self.cfg.num_proxy_codes, self.mask_id, "ids", allow=self.mask_id)
        z_q, info = self.quantize_images(images)
        logits = self.decoder(ids, z_q)
        if return_image:
            info["image"] = self.logits_to_image(logits)
        return logits, info

    def logits_to_image(self, logits: torch.Tensor) -> torch.Tensor:
        """Soft pixel head: softmax over the 1024 codes -> weighted pixel codebook -> pixel decoder.

        logits [B,256,1024] -> images [B,3,256,256], not clamped (the official evaluator clamps).
        """
        if not self.cfg.pixel_head:
            raise RuntimeError("this model has no pixel head (stage-1/2 layout); decode hard ids with the "
                               "teacher instead: model.decode_tokens(tokens, teacher=teacher).")
        B, N, V = logits.shape
        side = self.decoder.grid_size
        feats = logits.softmax(dim=-1) @ self.pixel_quantize.embedding.weight.to(logits.dtype)   # [B, 256, C]
        feats = feats.transpose(1, 2).reshape(B, -1, side, side).to(self.pixel_decoder.conv_in.weight.dtype)
        channels_last = self.pixel_decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        return self.pixel_decoder(feats.contiguous(memory_format=layout))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, num_steps: int = 8, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> DecodeResult:
        """Tokens [B,64] -> :class:`DecodeResult` (final ids, last-pass logits, per-step decoder inputs)."""
        z_q = self.tokens_to_latents(tokens)
        return multistep_decode(self.decoder, z_q, num_steps, temperature, generator)

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor, num_steps: int = 8, temperature: float = 1.0,
                      generator: torch.Generator | None = None, teacher: MaskGITVQGAN | None = None
                      ) -> torch.Tensor:
        """Tokens [B,64] -> images [B,3,256,256].

        With a pixel head (stage 3 / released): soft final-step logits of all 256 slots -> pixel decoder
        (unclamped, as the official ``decode_tokens``). Without (stage 1/2): the final hard ids go through
        ``teacher.decode_codes`` (clamped to [0,1]); ``teacher`` is required there and ignored otherwise.
        """
        if not self.cfg.pixel_head and teacher is None:
            raise RuntimeError("a stage-1/2 model (no pixel head) decodes hard ids through the MaskGIT-VQGAN "
                               "teacher: pass teacher=sftok.maskgit_vqgan.load_teacher(path).")
        result = self.decode(tokens, num_steps, temperature, generator)
        if self.cfg.pixel_head:
            return self.logits_to_image(result.logits).float()
        return teacher.decode_codes(result.ids)

    def channels_last(self) -> "SFTok":
        """Store the conv-heavy pixel decoder channels-last (faster oneDNN/cuDNN convs, same outputs up to
        float rounding). ``logits_to_image`` already builds its 16x16 feature map in that layout."""
        if self.cfg.pixel_head:
            self.pixel_decoder.to(memory_format=torch.channels_last)
        return self

    def inference_dtype(self, dtype: torch.dtype = torch.bfloat16) -> "SFTok":
        """Cast the weights for inference to ``dtype`` (e.g. bf16: AMX/tensor-core matmuls without autocast's
        per-call weight casts), keeping the OptVQ quantizer in fp32 as the official code does. Decoding
        still samples from fp32 logits. Outputs then differ from fp32 by bf16 rounding."""
        for name, child in self.named_children():
            if name != "quantize":
                child.to(dtype)
        self.latent_tokens.data = self.latent_tokens.data.to(dtype)
        return self

    # ------------------------------------------------------------------ stage 3 helpers
    @torch.no_grad()
    def init_pixel_head_from_teacher(self, teacher: MaskGITVQGAN) -> None:
        """Copy the teacher codebook and decoder into ``pixel_quantize`` / ``pixel_decoder`` (stage-3 init)."""
        if not self.cfg.pixel_head:
            raise RuntimeError("model has no pixel head; create it with pixel_head=True (e.g. 'sftok_b64').")
        try:
            self.pixel_quantize.load_state_dict(teacher.quantize.state_dict())
            self.pixel_decoder.load_state_dict(teacher.decoder.state_dict())
        except RuntimeError as e:
            raise ValueError(f"teacher and pixel head sizes differ (model.pixel_hidden_channels="
                             f"{self.cfg.pixel_hidden_channels}, teacher hidden_channels="
                             f"{teacher.hidden_channels}; pixel layout {pixel_arch(self.cfg)}, teacher "
                             f"{teacher.arch}); make them equal. {str(e)[:300]}") from None

    def freeze_encoder(self) -> "SFTok":
        """Stage 3: freeze ``latent_tokens``, ``encoder`` and ``quantize`` and keep them in eval mode."""
        self.latent_tokens.requires_grad_(False)
        self.encoder.requires_grad_(False)
        self.quantize.requires_grad_(False)
        self._encoder_frozen = True
        return self.train(self.training)

    def train(self, mode: bool = True) -> "SFTok":
        super().train(mode)
        if self._encoder_frozen:
            self.encoder.eval()
            self.quantize.eval()
        return self

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"encoder={c.encoder_size}, decoder={c.decoder_size}, tokens={c.num_latent_tokens}x"
                f"{c.codebook_size}, pixel_head={c.pixel_head}, assignment={c.assignment}")


def pixel_arch(cfg: ModelConfig) -> VQGANArch:
    """The pixel head's MaskGIT-VQGAN layout (the teacher's, see ``Config.teacher_arch``)."""
    return VQGANArch(tuple(cfg.pixel_channel_mult), cfg.pixel_num_res_blocks, cfg.pixel_norm_groups,
                     cfg.pixel_shortcut)
