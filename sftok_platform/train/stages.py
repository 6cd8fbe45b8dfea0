"""What each stage trains, from what, with which loss: the stage-specific half of the training loop.

=========  ==========================================  ==========================  =========================
stage      trains                                      starts from                 loss (sftok.objectives)
=========  ==========================================  ==========================  =========================
stage0     a MaskGIT-VQGAN-architecture teacher        scratch                     stage0_loss (MSE + q-loss)
stage1     encoder, latent tokens, OptVQ, decoder      scratch                     stage1_loss (all masked)
stage2     same (SFVR)                                 stage-1 EMA (SPEC I.2)      stage2_loss
stage3     decoder + pixel head (encoder frozen), D    stage-2 EMA + teacher as    Stage3Loss (+ D step)
                                                       pixel head
=========  ==========================================  ==========================  =========================

Stage 0 exists for data sets the official teacher was not trained on (or offline clusters without it);
with ``teacher.weights`` set the pipeline skips it. :func:`build_stage` returns a :class:`StageParts`:
the model whose EMA is exported, a ``step_module`` whose ``forward(images, step) -> (loss, metrics)`` is
what DDP wraps (so every gradient-carrying pass runs inside DDP's forward), and the hooks the loop uses
for codebook statistics, validation, image grids, the export and (stage 3) the discriminator.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sftok_platform.config import Config
from sftok.maskgit_vqgan import MaskGITVQGAN
from sftok.model import SFTok
from sftok_platform.train import checkpointing as ckpt

STAGES = ("stage0", "stage1", "stage2", "stage3")


@dataclass
class StageParts:
    """Everything stage-specific the loop needs."""
    model: nn.Module                                   # trained; its EMA is the stage's export
    step_module: nn.Module                             # forward(images, step) -> (loss, metrics dict)
    codes: Callable[[torch.Tensor], torch.Tensor]      # images -> code ids (codebook usage / perplexity)
    codebook_size: int
    export: Callable[[nn.Module, Path], None]          # (EMA model, dir) -> writes the export
    val_metrics: Callable[[nn.Module, torch.Tensor], dict]
    grid_rows: Callable[[nn.Module, torch.Tensor], tuple[list, list]]
    aux_module: Optional[nn.Module] = None             # stage 3: the discriminator (DDP-wrapped by the loop)
    aux_optimizer: Optional[torch.optim.Optimizer] = None
    aux_step_fn: Optional[Callable] = None
    aux_state_fn: Optional[Callable[[], dict]] = None
    aux_load_fn: Optional[Callable[[dict], None]] = None
    post_step_fn: Optional[Callable] = None            # (step, ema) -> metrics, on every rank after each update
    notes: dict = field(default_factory=dict)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def aux_step(self, wrapped: nn.Module, images: torch.Tensor, step: int) -> dict:
        return self.aux_step_fn(wrapped, images, step) if self.aux_step_fn else {}

    def post_step(self, step: int, ema) -> dict:
        return self.post_step_fn(step, ema) if self.post_step_fn else {}

    def aux_state(self) -> dict:
        return self.aux_state_fn() if self.aux_state_fn else {}

    def load_aux_state(self, state: dict) -> None:
        if state and self.aux_load_fn:
            self.aux_load_fn(state)


class _LossModule(nn.Module):
    """``forward(images, step)`` runs a stage loss on ``self.model`` (the only registered submodule, so
    DDP sees exactly the trained parameters). Extra objects (teacher, loss modules) are kept outside the
    module tree on purpose."""

    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_fn", fn)

    def forward(self, images: torch.Tensor, step: int):
        return self._fn(self.model, images, step)


# ######################################################################################################
# Shared pieces
# ######################################################################################################

def _psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    mse = ((x.clamp(0, 1) - y.clamp(0, 1)) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def _mean_image_psnr(images: torch.Tensor) -> float:
    """PSNR of the batch's own mean image: a (slightly generous) constant-prediction baseline to beat."""
    return _psnr(images.mean(0, keepdim=True).expand_as(images), images).mean().item()


def _majority_code_rate(codes: torch.Tensor) -> float:
    """Accuracy of always predicting the batch's most frequent teacher code: the floor for token accuracy."""
    return (codes == codes.flatten().mode().values).float().mean().item()


def _teacher(inputs: dict, cfg: Config, device) -> MaskGITVQGAN:
    path = inputs.get("teacher")
    if not path:
        raise ValueError("this stage needs a teacher: set teacher.weights or run stage0 first.")
    return ckpt.load_teacher_export(path, cfg, device)


def _sftok(cfg: Config, pixel_head: bool, device) -> SFTok:
    return SFTok(dataclasses.replace(cfg.model, pixel_head=pixel_head)).to(device)


def _load_init(model: SFTok, init_dir: str, *, allow_missing_prefixes: tuple[str, ...] = ()) -> None:
    """Load the previous stage's export (EMA weights); only keys under ``allow_missing_prefixes`` may be
    absent (stage 3: the pixel head, which comes from the teacher)."""
    from sftok.checkpoint import WEIGHTS_FILE
    from sftok.weights import read_state_dict
    state = read_state_dict(Path(init_dir) / WEIGHTS_FILE)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(allow_missing_prefixes)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{init_dir} does not fit this model (missing {missing[:5]}, unexpected "
                         f"{result.unexpected_keys[:5]}); was it written with another model config?")


def _token_codes(model: SFTok) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda images: model.encode(images)


def _decode_rows(model: SFTok, images: torch.Tensor, steps: list[int], teacher: Optional[MaskGITVQGAN]):
    tokens = model.encode(images)
    rows, labels = [images], ["original"]
    for n in steps:
        rows.append(model.decode_tokens(tokens, num_steps=n, temperature=0.0, teacher=teacher).clamp(0, 1))
        labels.append(f"{n}-step")
    return rows, labels


def _token_val(model: SFTok, teacher: MaskGITVQGAN, images: torch.Tensor, steps: list[int]) -> dict:
    """1-step CE/accuracy against the teacher codes (the stage-1/2 objective with every slot masked) and
    the token accuracy + PSNR (through the teacher decoder) of deterministic multi-step decoding."""
    codes = teacher.encode_codes(images)
    B, N = codes.shape
    ids = torch.full((B, N), model.mask_id, dtype=torch.long, device=images.device)
    logits, _ = model(images, ids)
    out = {"loss": F.cross_entropy(logits.float().reshape(B * N, -1), codes.reshape(-1)).item(),
           "accuracy_1step": (logits.argmax(-1) == codes).float().mean().item(),
           "majority_code_rate": _majority_code_rate(codes), "mean_image_psnr": _mean_image_psnr(images),
           "teacher_psnr": _psnr(teacher.decode_codes(codes), images).mean().item()}
    tokens = model.encode(images)
    for n in steps:
        res = model.decode(tokens, num_steps=n, temperature=0.0)
        out[f"accuracy_{n}step"] = (res.ids == codes).float().mean().item()
        out[f"psnr_{n}step"] = _psnr(teacher.decode_codes(res.ids), images).mean().item()
    return out


# ######################################################################################################
# The stages
# ######################################################################################################

def build_stage0(cfg: Config, inputs: dict, device) -> StageParts:
    from sftok.dead_codes import DeadCodeRestart
    from sftok.objectives import stage0_loss
    from sftok.maskgit_vqgan import init_scaled_
    t = cfg.teacher
    teacher = MaskGITVQGAN(t.hidden_channels, t.codebook_size, t.z_channels, cfg.teacher_arch())
    if t.init == "scaled":
        init_scaled_(teacher)
    teacher = teacher.to(device)
    qw = cfg.stage0.quantizer_weight

    # dead-code restart (sftok.dead_codes): the quantizer's input and ids of the last training forward
    restart = DeadCodeRestart(t.codebook_size, seed=cfg.train.seed)
    restart_steps = int(t.dead_code_restart_until * cfg.stage0.steps)
    last: dict = {}
    teacher.quantize.register_forward_hook(
        lambda module, args, out: last.update(h=args[0].detach(), ids=out[1].detach()))

    def post_step(step, ema) -> dict:
        if step >= restart_steps or "h" not in last:
            return {}
        h = last.pop("h")
        dead = restart(teacher.quantize.embedding, h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]),
                       last.pop("ids"), step)
        if dead.numel():       # the exported EMA must not average a restarted row with the dead one
            ema.shadow["quantize.embedding.weight"][dead] = teacher.quantize.embedding.weight[dead].float()
        return {"restarted_codes": float(dead.numel())}

    def loss(model, images, step):
        return stage0_loss(model, images, quantizer_weight=qw)

    def val(model, images):
        recon = model.decode_codes(model.encode_codes(images))
        return {"loss": F.mse_loss(recon, images).item(), "psnr": _psnr(recon, images).mean().item(),
                "mean_image_psnr": _mean_image_psnr(images)}

    def rows(model, images):
        return [images, model.decode_codes(model.encode_codes(images))], ["original", "teacher reconstruction"]

    def export(model, directory):
        ckpt.save_teacher(model, directory, hidden_channels=t.hidden_channels, codebook_size=t.codebook_size,
                          z_channels=t.z_channels)

    return StageParts(model=teacher, step_module=_LossModule(teacher, loss),
                      codes=lambda images: teacher.encode_codes(images), codebook_size=t.codebook_size,
                      export=export, val_metrics=val, grid_rows=rows, post_step_fn=post_step,
                      aux_state_fn=lambda: {"dead_code_restart": restart.state_dict()},
                      aux_load_fn=lambda state: restart.load_state_dict(state["dead_code_restart"]))


def build_stage12(stage: str, cfg: Config, inputs: dict, device) -> StageParts:
    from sftok.checkpoint import save_model
    from sftok.objectives import stage_loss
    teacher = _teacher(inputs, cfg, device)
    model = _sftok(cfg, pixel_head=False, device=device)
    if stage == "stage2":
        if not inputs.get("init"):
            raise ValueError("stage2 starts from the stage-1 EMA weights: run stage1 first (or pass its export).")
        _load_init(model, inputs["init"])
    st = getattr(cfg, stage)

    def loss(m, images, step):
        with torch.no_grad():
            codes = teacher.encode_codes(images)
        return stage_loss(stage, m, images, codes, st)

    steps = list(cfg.eval.steps)
    return StageParts(model=model, step_module=_LossModule(model, loss), codes=_token_codes(model),
                      codebook_size=cfg.model.codebook_size, export=lambda m, d: save_model(m, d),
                      val_metrics=lambda m, x: _token_val(m, teacher, x, steps),
                      grid_rows=lambda m, x: _decode_rows(m, x, steps, teacher))


def build_stage3(cfg: Config, inputs: dict, device) -> StageParts:
    from sftok.checkpoint import save_model
    from sftok.ema import unwrap_model
    from sftok.objectives import Stage3Loss
    if not inputs.get("init"):
        raise ValueError("stage3 fine-tunes a stage-2 model: run stage2 first (or pass its export).")
    teacher = _teacher(inputs, cfg, device)
    model = _sftok(cfg, pixel_head=True, device=device)
    _load_init(model, inputs["init"], allow_missing_prefixes=("pixel_quantize.", "pixel_decoder."))
    model.init_pixel_head_from_teacher(teacher)
    Stage3Loss.prepare_model(model)
    del teacher
    st = cfg.stage3
    losses = Stage3Loss(cfg.losses, quantizer_weight=st.quantizer_weight).to(device)
    last = {}

    def loss(m, images, step):
        value, metrics, recon = losses.generator_loss(m, images, step)
        last["recon"] = recon.detach()
        return value, metrics

    d_opt = losses.discriminator_optimizer(st) if losses.discriminator is not None else None
    disc = losses.discriminator

    def d_step(wrapped, images, step) -> dict:
        from sftok.optim import discriminator_lr_at, set_lr
        if not losses.gan_active(step):
            return {}
        set_lr(d_opt, discriminator_lr_at(step, st, cfg.losses))
        losses.discriminator = wrapped              # the DDP wrapper for the D pass (gradients all-reduced)
        try:
            d_loss, metrics = losses.discriminator_loss(images, last["recon"])
            d_loss.backward()
            # clipped like the generator (global norm train.grad_clip), as the TiTok-derived official loop does
            d_params = [p for p in unwrap_model(wrapped).parameters() if p.requires_grad]
            metrics = {**metrics, "d_grad_norm": float(torch.nn.utils.clip_grad_norm_(d_params, cfg.train.grad_clip))}
            d_opt.step()
            d_opt.zero_grad(set_to_none=True)
        finally:
            losses.discriminator = unwrap_model(wrapped)
        return metrics

    def aux_state() -> dict:
        """D heads + LeCam EMAs (never the external backbones) and D's optimizer."""
        return {"loss": losses.checkpoint_state(), **({"d_optimizer": d_opt.state_dict()} if d_opt else {})}

    def aux_load(state: dict) -> None:
        losses.load_checkpoint_state(state["loss"])
        if d_opt is not None:
            d_opt.load_state_dict(state["d_optimizer"])

    steps = list(cfg.eval.steps)

    def val(m, images):
        recon = m.decode_tokens(m.encode(images), num_steps=max(steps), temperature=0.0).clamp(0, 1)
        return {"loss": F.mse_loss(recon, images).item(), f"psnr_{max(steps)}step": _psnr(recon, images).mean().item(),
                "mean_image_psnr": _mean_image_psnr(images)}

    return StageParts(model=model, step_module=_LossModule(model, loss), codes=_token_codes(model),
                      codebook_size=cfg.model.codebook_size, export=lambda m, d: save_model(m, d),
                      val_metrics=val, grid_rows=lambda m, x: _decode_rows(m, x, steps, None),
                      aux_module=disc, aux_optimizer=d_opt, aux_step_fn=d_step if disc is not None else None,
                      aux_state_fn=aux_state, aux_load_fn=aux_load)


def build_stage(stage: str, cfg: Config, inputs: dict, device) -> StageParts:
    """The :class:`StageParts` of ``stage`` with every model on ``device``."""
    if stage == "stage0":
        return build_stage0(cfg, inputs, device)
    if stage in ("stage1", "stage2"):
        return build_stage12(stage, cfg, inputs, device)
    if stage == "stage3":
        return build_stage3(cfg, inputs, device)
    raise ValueError(f"unknown stage {stage!r}; use one of {', '.join(STAGES)}.")


__all__ = ["STAGES", "StageParts", "build_stage"]
