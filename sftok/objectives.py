"""The training objectives of every SFTok stage, as plain functions/modules a training loop calls.

Each returns ``(loss, metrics)``: a scalar tensor to back-propagate and a dict of python floats for
logging (one device sync for the whole dict).

* stage 0 (this project's addition): train a MaskGIT-VQGAN teacher on new data  -> :func:`stage0_loss`
* stage 1 "warming up": all 256 slots masked, CE to the teacher codes + quantizer loss -> :func:`stage1_loss`
* stage 2 SFVR: a no-grad all-masked guide pass with the *current* weights gives the model's step-1
  prediction; arccos masking; each visible slot shows that prediction with probability ``replace_prob``
  (else the teacher code); CE weighted 1.0 masked / ``unmasked_weight`` visible + quantizer loss
  -> :func:`stage2_loss` (``replace_prob=0``: the vanilla MaskGIT-style baseline)
* stage 3: frozen encoder/quantizer, every visible slot shows the guide prediction, soft pixel head; MSE +
  LPIPS + GAN (DINO discriminator, DiffAug, hinge + LeCam) -> :class:`Stage3Loss`

Models may be wrapped in DDP: the pass that needs gradients goes through ``model(images, ids)`` (so DDP's
gradient hooks run); attribute access and no-grad passes use the unwrapped module. Randomness (masks,
replacement coins, augmentation) comes from ``generator`` when given, else torch's global RNG, in the
official order (t, permutation, replacement), so ``torch.manual_seed`` replays the official draws; masks
and coins can also be passed in explicitly.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from sftok.diffaug import DiffAug
from sftok.discriminator import DinoDiscriminator
from sftok.ema import unwrap_model
from sftok.lpips import LPIPS
from sftok.masking import arccos_mask, check_mask, decoder_input_ids, replacement_draw
from sftok.optim import build_adamw
from sftok.weights import exclude_from_state_dict, is_random


# ######################################################################################################
# helpers
# ######################################################################################################

def _floats(metrics: dict) -> dict[str, float]:
    """Tensors/numbers -> python floats with a single device-to-host copy."""
    keys = list(metrics)
    vals = [v.detach().float().reshape(()) if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            for v in metrics.values()]
    if not vals:
        return {}
    dev = next((v.device for v in vals if v.device.type != "cpu"), torch.device("cpu"))
    out = torch.stack([v.to(dev) for v in vals]).cpu().tolist()
    return dict(zip(keys, out))


def _check_codes(teacher_codes: torch.Tensor, batch: int, num_slots: int) -> torch.Tensor:
    if not isinstance(teacher_codes, torch.Tensor) or teacher_codes.is_floating_point() or \
            teacher_codes.dtype == torch.bool:
        raise TypeError(f"teacher_codes must be an integer tensor [B, {num_slots}] of MaskGIT-VQGAN code ids "
                        "(teacher.encode_codes(images)).")
    if tuple(teacher_codes.shape) != (batch, num_slots):
        side = int(num_slots ** 0.5)
        raise ValueError(f"teacher_codes has shape {tuple(teacher_codes.shape)}; expected ({batch}, {num_slots}) "
                         f"(one code per slot of the teacher's {side}x{side} code grid).")
    return teacher_codes.long()


def weighted_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, unmasked_weight: float,
                label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The official MLM loss: per-slot CE, weight 1.0 on masked and ``unmasked_weight`` on visible slots,
    normalised by the sum of the weights (+1e-8). Computed in fp32. Returns (loss, detached statistics)."""
    B, N, V = logits.shape
    ce = F.cross_entropy(logits.float().reshape(B * N, V), targets.reshape(B * N), reduction="none",
                         label_smoothing=label_smoothing).view(B, N)
    m = mask.to(ce.dtype)
    w = m + (1.0 - m) * unmasked_weight
    loss = (ce * w).sum() / (w.sum() + 1e-8)
    with torch.no_grad():
        correct = (logits.argmax(dim=-1) == targets).to(ce.dtype)
        n_m, n_v = m.sum(), (1.0 - m).sum()
        stats = {
            "ce": ce.mean(),                                          # plain mean CE over all slots
            "ce_masked": (ce * m).sum() / n_m.clamp(min=1),
            "ce_visible": (ce * (1 - m)).sum() / n_v.clamp(min=1),
            "accuracy": (correct * m).sum() / n_m.clamp(min=1),     # on masked slots (official "correct_tokens")
            "accuracy_visible": (correct * (1 - m)).sum() / n_v.clamp(min=1),
            "mask_ratio": m.mean(),
        }
    return loss, stats


def _quantizer_stats(qinfo: dict, codebook_size: int) -> dict[str, torch.Tensor]:
    idx = qinfo["indices"]
    return {
        "quantizer_loss": qinfo["quantizer_loss"].detach(),
        "commitment_loss": qinfo["commitment_loss"].detach(),
        "codebook_loss": qinfo["codebook_loss"].detach(),
        # share of the OptVQ codebook used by this batch's tokens (collapse detector)
        "token_usage": _usage(idx, codebook_size),
    }


def _usage(ids: torch.Tensor, size: int) -> torch.Tensor:
    """Share of a codebook's entries that occur in ``ids`` (no host sync, unlike torch.unique)."""
    hit = torch.zeros(size, device=ids.device).index_fill_(0, ids.flatten().long(), 1.0)
    return hit.mean()


@torch.no_grad()
def guide_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The self-forcing guide: one all-masked decoder pass with the model's current weights, no grad.

    Encoder + quantizer + decoder run afresh (as in the official loop); the result does not depend on the
    teacher codes, so it equals the stage-1 forward of the same weights.
    """
    base = unwrap_model(model)
    z_q, _ = base.quantize_images(images)
    ids = torch.full((images.shape[0], base.cfg.num_proxy_codes), base.mask_id, dtype=torch.long,
                     device=images.device)
    return base.decoder(ids, z_q)


# ######################################################################################################
# stage 0: the MaskGIT-VQGAN teacher on new data
# ######################################################################################################

def stage0_loss(teacher: nn.Module, images: torch.Tensor, *, lpips: Optional[nn.Module] = None,
                perceptual_weight: float = 1.0, quantizer_weight: float = 1.0, outputs: Optional[tuple] = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Train a MaskGIT-VQGAN-architecture teacher: MSE(recon, x) + q-loss (+ LPIPS when ``lpips`` is given).

    ``teacher`` is a :class:`sftok.maskgit_vqgan.MaskGITVQGAN` (possibly DDP-wrapped) whose forward returns
    ``(recon, {"quantizer_loss", "codes", ...})``; pass that forward's result as ``outputs`` when the caller
    ran it already (it needs the codes too).
    """
    recon, info = outputs if outputs is not None else teacher(images)
    mse = F.mse_loss(recon.float(), images.float())
    loss = mse + quantizer_weight * info["quantizer_loss"]
    metrics = {"mse": mse.detach(), "quantizer_loss": info["quantizer_loss"].detach()}
    if lpips is not None and perceptual_weight > 0:
        lp = lpips(images, recon).mean()
        loss = loss + perceptual_weight * lp
        metrics["lpips"] = lp.detach()
    base = unwrap_model(teacher)
    size = base.quantize.num_embeddings if hasattr(base, "quantize") else 1024
    metrics["code_usage"] = _usage(info["codes"], size)
    metrics["loss"] = loss.detach()
    return loss, _floats(metrics)


def stage0_lpips(loss_cfg) -> Optional[LPIPS]:
    """LPIPS for stage 0 when real VGG16 + LPIPS-head files are configured, else None (MSE + VQ only).

    Stage 0 is this project's addition, so missing files are not an error here, and random backbones
    (``"random"``) are not used either: a random perceptual term would only add noise to the teacher.
    """
    paths = (loss_cfg.vgg16_weights, loss_cfg.lpips_heads)
    if loss_cfg.perceptual_weight <= 0 or any(not p or is_random(p) for p in paths):
        return None
    return LPIPS(*paths)


# ######################################################################################################
# stages 1 and 2
# ######################################################################################################

def stage1_loss(model: nn.Module, images: torch.Tensor, teacher_codes: torch.Tensor, *,
                quantizer_weight: float = 1.0, label_smoothing: float = 0.0
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage 1 "warming up": every slot is [MASK]; CE over the 256 slots + ``quantizer_weight`` x q-loss."""
    base = unwrap_model(model)
    B, N = images.shape[0], base.cfg.num_proxy_codes
    codes = _check_codes(teacher_codes, B, N)
    mask = torch.ones(B, N, dtype=torch.bool, device=images.device)
    ids = torch.full((B, N), base.mask_id, dtype=torch.long, device=images.device)
    logits, qinfo = model(images, ids)
    ce, stats = weighted_ce(logits, codes, mask, 1.0, label_smoothing)
    loss = ce + quantizer_weight * qinfo["quantizer_loss"]
    metrics = {"loss": loss.detach(), **stats, **_quantizer_stats(qinfo, base.cfg.codebook_size)}
    return loss, _floats(metrics)


def stage2_loss(model: nn.Module, images: torch.Tensor, teacher_codes: torch.Tensor, *,
                replace_prob: float = 1.0, unmasked_weight: float = 0.1, quantizer_weight: float = 1.0,
                label_smoothing: float = 0.0, generator: Optional[torch.Generator] = None,
                mask: Optional[torch.Tensor] = None, replace: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage 2 SFVR (SPEC C.2). ``replace_prob=0`` is the vanilla baseline (visible slots = teacher codes).

    Args:
        replace_prob: chance that a visible slot shows the model's own step-1 prediction (official runs: 1.0).
        unmasked_weight: CE weight of visible slots (masked slots weigh 1.0).
        generator: source of the mask and replacement draws (default: torch's global RNG).
        mask, replace: explicit BoolTensors [B, 256] (True = masked / True = use the guide) that replace
            the corresponding draws; a draw that is passed in is not made.
    """
    base = unwrap_model(model)
    B, N = images.shape[0], base.cfg.num_proxy_codes
    codes = _check_codes(teacher_codes, B, N)
    mask = arccos_mask(B, N, generator) if mask is None else check_mask(mask, B, N, "mask")
    replace = (replacement_draw(B, N, replace_prob, generator) if replace is None
               else check_mask(replace, B, N, "replace"))
    use_guide = bool((replace & ~mask.to(replace.device)).any())   # vanilla (nothing replaced): no guide pass
    mask, replace = mask.to(images.device), replace.to(images.device)
    metrics: dict = {}
    guide_ids = None
    if use_guide:
        guide_ids = guide_logits(model, images).argmax(dim=-1)
        metrics["guide_accuracy"] = (guide_ids == codes).float().mean()   # step-1 prediction vs teacher
    ids = decoder_input_ids(codes, guide_ids, mask, replace, base.mask_id)
    logits, qinfo = model(images, ids)
    ce, stats = weighted_ce(logits, codes, mask, unmasked_weight, label_smoothing)
    loss = ce + quantizer_weight * qinfo["quantizer_loss"]
    visible = (~mask).float()
    metrics.update({
        "loss": loss.detach(), "ce_weighted": ce.detach(), **stats,
        # share of visible slots whose input differs from the teacher code (what SFVR changes)
        "visible_wrong_inputs": ((ids != codes).float() * visible).sum() / visible.sum().clamp(min=1),
        **_quantizer_stats(qinfo, base.cfg.codebook_size),
    })
    return loss, _floats(metrics)


def stage_loss(stage: str, model: nn.Module, images: torch.Tensor, teacher_codes: torch.Tensor, stage_cfg,
               *, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage 1 or 2 from its config (:class:`sftok.config.TokenStageConfig` / :class:`SFVRStageConfig`)."""
    common = dict(quantizer_weight=stage_cfg.quantizer_weight, label_smoothing=stage_cfg.label_smoothing)
    if stage == "stage1":
        return stage1_loss(model, images, teacher_codes, **common)
    if stage == "stage2":
        return stage2_loss(model, images, teacher_codes, replace_prob=stage_cfg.replace_prob,
                           unmasked_weight=stage_cfg.unmasked_weight, generator=generator, **common)
    raise ValueError(f"stage_loss handles 'stage1' and 'stage2', got {stage!r} (stage 0: stage0_loss, "
                     "stage 3: Stage3Loss).")


# ######################################################################################################
# stage 3
# ######################################################################################################

@contextmanager
def frozen_parameters(module: nn.Module):
    """Temporarily set ``requires_grad=False`` on every parameter of ``module`` (restored afterwards)."""
    params = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in params:
            p.requires_grad_(flag)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def lecam_loss(real_mean: torch.Tensor, fake_mean: torch.Tensor, ema_real: torch.Tensor,
               ema_fake: torch.Tensor) -> torch.Tensor:
    """LeCam regulariser on the mean logits (Tseng et al. 2021, TiTok's form)."""
    return F.relu(real_mean - ema_fake).pow(2) + F.relu(ema_real - fake_mean).pow(2)


def _fp32(like: torch.Tensor):
    """Autocast off (fp32) for the perceptual and adversarial passes, on ``like``'s device type."""
    return torch.autocast(device_type=like.device.type, enabled=False)


class Stage3Loss(nn.Module):
    """Stage-3 losses: the generator objective and the discriminator step (SPEC C.3, stage 3).

    Generator: ``reconstruction_weight`` x MSE + ``perceptual_weight`` x LPIPS-VGG + ``quantizer_weight`` x
    q-loss (frozen encoder: a logged constant) + ``discriminator_weight`` x ``discriminator_factor`` x
    (-mean D(DiffAug(x_hat))) from ``discriminator_start``. Discriminator: hinge x ``discriminator_factor`` +
    ``lecam_weight`` x LeCam (EMA 0.999 of the mean real/fake logits), DiffAug drawn independently for real
    and fake.

    A training step::

        loss, m, recon = stage3.generator_loss(model, images, step)
        loss.backward(); opt.step(); opt.zero_grad()
        if stage3.gan_active(step):
            d_loss, dm = stage3.discriminator_loss(images, recon)
            d_loss.backward(); d_opt.step(); d_opt.zero_grad()

    Discriminator-gradient quirk (SPEC I.9), decided on purpose: the official stage 3 leaves D trainable
    during the generator pass and never clears those gradients, so every D update also carries
    d(0.5 * -D(x_hat))/dD, a gradient that pushes D *towards* calling fakes real. We do not copy that: the
    generator pass runs D with its parameters frozen (gradients still flow through D to x_hat), so the D
    update depends only on the D loss. It is the standard GAN update TiTok uses and the official comments
    suggest was intended; copying the leak would make D's objective depend on the generator weight 0.5 and
    on the order of the two passes. It also saves the D-parameter gradient work in the generator backward.

    If training on several workers, wrap ``stage3.discriminator`` in DDP yourself and pass the wrapper to
    ``discriminator_loss(..., discriminator=wrapper)``; the generator pass calls the unwrapped module (no
    DDP hooks, no grads).
    """

    def __init__(self, cfg, *, quantizer_weight: float = 1.0, allow_random_backbones: bool = False):
        """``cfg``: a :class:`sftok.config.LossConfig`. External files (``vgg16_weights``, ``lpips_heads``,
        ``dino_weights``) must exist, be ``"random"``, or ``allow_random_backbones=True`` (tests)."""
        super().__init__()
        self.cfg = cfg
        self.quantizer_weight = quantizer_weight
        self.lecam_decay = 0.999
        self.lpips = (LPIPS(cfg.vgg16_weights, cfg.lpips_heads, allow_random=allow_random_backbones)
                      if cfg.perceptual_weight > 0 else None)
        if self.lpips is not None:
            exclude_from_state_dict(self, "lpips")       # external weights: not part of checkpoints
        self.uses_gan = cfg.discriminator_weight > 0 and cfg.discriminator_factor > 0
        self.discriminator = (DinoDiscriminator(cfg.dino_weights, arch=getattr(cfg, "dino_arch", "vit_s16"),
                                                allow_random=allow_random_backbones)
                              if self.uses_gan else None)
        self.diffaug = DiffAug(cutout=cfg.diffaug_cutout)
        self.register_buffer("ema_real_logits", torch.zeros(()))
        self.register_buffer("ema_fake_logits", torch.zeros(()))

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def prepare_model(model: nn.Module) -> nn.Module:
        """Freeze encoder, quantizer and latent tokens (eval mode); needs the pixel head."""
        base = unwrap_model(model)
        if not base.cfg.pixel_head:
            raise ValueError("stage 3 trains the soft pixel head, but this model has none (a stage-1/2 layout); "
                             "create it with pixel_head=True and call model.init_pixel_head_from_teacher(teacher).")
        base.freeze_encoder()
        return model

    def checkpoint_state(self) -> dict:
        """What stage 3 must save besides the tokenizer: D heads (unwrapped from DDP) and the LeCam EMAs."""
        state = {"ema_real_logits": self.ema_real_logits.clone(), "ema_fake_logits": self.ema_fake_logits.clone()}
        if self.discriminator is not None:
            state["discriminator"] = unwrap_model(self.discriminator).state_dict()
        return state

    def load_checkpoint_state(self, state: dict) -> None:
        self.ema_real_logits.copy_(state["ema_real_logits"])
        self.ema_fake_logits.copy_(state["ema_fake_logits"])
        if self.discriminator is not None:
            if "discriminator" not in state:
                raise KeyError("checkpoint has no discriminator state, but this Stage3Loss has a discriminator.")
            unwrap_model(self.discriminator).load_state_dict(state["discriminator"], strict=True)

    def gan_active(self, global_step: int) -> bool:
        return self.discriminator is not None and global_step >= self.cfg.discriminator_start

    def discriminator_optimizer(self, stage_cfg) -> torch.optim.AdamW:
        """AdamW for the discriminator heads (official: lr ``losses.discriminator_lr``, the stage's betas/wd)."""
        if self.discriminator is None:
            raise ValueError("no discriminator: losses.discriminator_weight or discriminator_factor is 0.")
        return build_adamw(unwrap_model(self.discriminator), lr=self.cfg.discriminator_lr,
                           betas=(stage_cfg.beta1, stage_cfg.beta2), weight_decay=stage_cfg.weight_decay)

    # ------------------------------------------------------------------ generator
    def reconstruct(self, model: nn.Module, images: torch.Tensor, *, generator: Optional[torch.Generator] = None,
                    mask: Optional[torch.Tensor] = None):
        """Stage-3 forward: (x_hat, logits, qinfo, mask). Visible slots show argmax of the guide pass."""
        base = unwrap_model(model)
        if base.latent_tokens.requires_grad or any(p.requires_grad for p in base.quantize.parameters()):
            raise RuntimeError("stage 3 keeps the encoder, quantizer and latent tokens frozen: call "
                               "Stage3Loss.prepare_model(model) once before training.")
        B, N = images.shape[0], base.cfg.num_proxy_codes
        mask = arccos_mask(B, N, generator) if mask is None else check_mask(mask, B, N, "mask")
        mask = mask.to(images.device)
        guide_ids = guide_logits(model, images).argmax(dim=-1)
        ids = decoder_input_ids(guide_ids, guide_ids, mask, None, base.mask_id)
        logits, qinfo = model(images, ids, return_image=True)
        return qinfo.pop("image"), logits, qinfo, mask

    def generator_loss(self, model: nn.Module, images: torch.Tensor, global_step: int, *,
                       generator: Optional[torch.Generator] = None, mask: Optional[torch.Tensor] = None):
        """-> (loss, metrics, x_hat). Pass ``x_hat.detach()`` on to :meth:`discriminator_loss`."""
        c = self.cfg
        recon, _, qinfo, mask = self.reconstruct(model, images, generator=generator, mask=mask)
        mse = F.mse_loss(recon.float(), images.float())
        qloss = qinfo["quantizer_loss"].detach()
        loss = c.reconstruction_weight * mse + self.quantizer_weight * qloss
        metrics = {"mse": mse.detach(), "quantizer_loss": qloss, "mask_ratio": mask.float().mean()}
        if self.lpips is not None:
            with _fp32(recon):                           # official: LPIPS and D's pass in fp32
                lp = self.lpips(images.float(), recon.float()).mean()
            loss = loss + c.perceptual_weight * lp
            metrics["lpips"] = lp.detach()
        active = self.gan_active(global_step)
        if active:
            disc = unwrap_model(self.discriminator)
            with frozen_parameters(disc), _fp32(recon):  # no generator-loss gradient reaches D (see class doc)
                logits_fake = disc(self.diffaug(recon.float(), generator), generator)
            gan = -logits_fake.float().mean()
            weighted = c.discriminator_weight * c.discriminator_factor * gan
            loss = loss + weighted
            metrics.update({"gan_g": gan.detach(), "gan_g_weighted": weighted.detach()})
        metrics["gan_active"] = float(active)
        metrics["loss"] = loss.detach()
        return loss, _floats(metrics), recon

    # ------------------------------------------------------------------ discriminator
    def discriminator_loss(self, images: torch.Tensor, recon: torch.Tensor, *,
                           generator: Optional[torch.Generator] = None, discriminator: Optional[nn.Module] = None
                           ) -> tuple[torch.Tensor, dict[str, float]]:
        """Hinge + LeCam on D(DiffAug(real)) and D(DiffAug(fake)); updates the LeCam EMAs.

        ``discriminator``: the module to run, e.g. ``self.discriminator``'s DDP wrapper so that the D
        gradients are all-reduced (default: ``self.discriminator``)."""
        if self.discriminator is None:
            raise ValueError("no discriminator: losses.discriminator_weight or discriminator_factor is 0.")
        disc = discriminator if discriminator is not None else self.discriminator
        c = self.cfg
        real = self.diffaug(images.detach().float(), generator)
        fake = self.diffaug(recon.detach().float(), generator)
        with _fp32(recon):
            logits_real = disc(real, generator).float()
            logits_fake = disc(fake, generator).float()
        hinge = c.discriminator_factor * hinge_d_loss(logits_real, logits_fake)
        real_mean, fake_mean = logits_real.mean(), logits_fake.mean()
        lecam = c.lecam_weight * lecam_loss(real_mean, fake_mean, self.ema_real_logits, self.ema_fake_logits)
        with torch.no_grad():
            self.ema_real_logits.lerp_(real_mean.detach(), 1.0 - self.lecam_decay)
            self.ema_fake_logits.lerp_(fake_mean.detach(), 1.0 - self.lecam_decay)
        loss = hinge + lecam
        metrics = {"d_loss": loss.detach(), "d_hinge": hinge.detach(), "lecam": lecam.detach(),
                   "d_real": real_mean.detach(), "d_fake": fake_mean.detach(),
                   "lecam_ema_real": self.ema_real_logits.clone(), "lecam_ema_fake": self.ema_fake_logits.clone()}
        return loss, _floats(metrics)


__all__ = ["stage0_loss", "stage0_lpips", "stage1_loss", "stage2_loss", "stage_loss", "Stage3Loss", "guide_logits",
           "weighted_ce", "hinge_d_loss", "lecam_loss", "frozen_parameters"]
