"""What each stage trains, from what, with which loss: the stage-specific half of the training loop.

=========  ==========================================  ==========================  =========================
stage      trains                                      starts from                 loss (sftok.objectives)
=========  ==========================================  ==========================  =========================
stage0     a MaskGIT-VQGAN-architecture teacher        scratch                     stage0_loss (MSE + q-loss)
stage1     encoder, latent tokens, OptVQ, decoder      scratch                     stage1_loss (all masked)
stage2     same (SFVR)                                 stage-1 EMA (SPEC I.2)      stage2_loss
stage3     decoder + pixel head (encoder frozen), D    stage-2 EMA + teacher as    Stage3Loss (+ D step)
                                                       pixel head
stage4     the MaskGIT generator over the 64 tokens     scratch (tokens of the      generator.training_loss
                                                       final tokenizer)
=========  ==========================================  ==========================  =========================

Stage 0 exists for data sets the official teacher was not trained on (or offline clusters without it);
with ``teacher.weights`` set the pipeline skips it. Each stage is a :class:`TrainingTask` subclass (the
shape of timm's ``TrainingTask``): it builds the trained ``model`` and names what the one worker loop
(:mod:`sftok_platform.train.loop`) asks of it, ``loss``, ``validate``, ``grid_rows``, ``export``, and
where a stage needs them ``after_step``, the auxiliary optimisation (stage 3's discriminator) and its own
resumable state. Adding a stage means writing one class and naming it in :data:`TASKS`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from sftok.checkpoint import WEIGHTS_FILE, save_model
from sftok.dead_codes import DeadCodeRestart
from sftok.ema import EMA, unwrap_model
from sftok.maskgit_vqgan import MaskGITVQGAN, init_scaled_
from sftok.model import SFTok
from sftok.objectives import Stage3Loss, stage0_loss, stage_loss
from sftok.generator import MaskGITGenerator, save_generator, training_loss
from sftok.optim import build_optimizer, discriminator_lr_at, set_lr
from sftok.weights import read_state_dict
from sftok.config import StageConfig
from sftok_platform.config import Config
from sftok_platform.data.reader import image_batches, token_batches
from sftok_platform.train import checkpointing as ckpt

STAGES = ("stage0", "stage1", "stage2", "stage3")       # the tokenizer stages; stage 4 is sftok_platform.generator_stage


class _LossModule(nn.Module):
    """``forward(images, step)`` runs the task's loss on ``self.model`` (the only registered submodule, so
    DDP sees exactly the trained parameters and every gradient-carrying pass runs inside DDP's forward).
    The task (teacher, loss modules) is kept outside the module tree on purpose."""

    def __init__(self, task: "TrainingTask"):
        super().__init__()
        self.model = task.model
        object.__setattr__(self, "_task", task)

    def forward(self, images: torch.Tensor, step: int):
        return self._task.loss(self.model, images, step)


class TrainingTask:
    """One stage's half of the training loop. Subclasses set ``model`` and ``codebook_size`` in
    ``__init__(cfg, inputs, device)`` and implement the four abstract methods; the rest are optional hooks.

    ``inputs``: paths from earlier stages (``teacher``: a teacher export or weights, ``init``: the previous
    stage's export).
    """
    model: nn.Module                                 # trained; its EMA is the stage's export
    codebook_size: int                               # of the codes ``codes`` returns (usage statistics; 0: none)
    aux_module: Optional[nn.Module] = None           # trained beside the model (stage 3: the discriminator)
    aux_optimizer: Optional[torch.optim.Optimizer] = None
    section: str = ""                                # config section of its knobs (messages); default: the stage
    rows_name = "images"                             # what one row of its data is (progress lines, throughput)
    uses_val_split = True                            # end-of-stage check and image grids on the val images

    def loss(self, model: nn.Module, images: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        """The training objective on ``model`` (the DDP-wrapped module's inner model): (loss, metrics)."""
        raise NotImplementedError

    def codes(self, images: torch.Tensor) -> torch.Tensor:
        """Code ids of ``images`` under the trained model (codebook usage and perplexity)."""
        raise NotImplementedError

    def validate(self, model: nn.Module, images: torch.Tensor) -> dict[str, float]:
        """End-of-stage figures of ``model`` (the EMA copy) on validation images, with their baselines."""
        raise NotImplementedError

    def grid_rows(self, model: nn.Module, images: torch.Tensor) -> tuple[list[torch.Tensor], list[str]]:
        """Rows of the image grid: the originals and what ``model`` makes of them, with row labels."""
        raise NotImplementedError

    def export(self, model: nn.Module, directory: Path) -> None:
        """Write ``model`` (the EMA copy) as the stage's export, the next stage's input."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------- optional hooks
    def after_step(self, step: int, ema: EMA) -> dict[str, float]:
        """Runs on every rank after each optimiser update (stage 0: dead-code restarts)."""
        return {}

    def aux_step(self, wrapped: nn.Module, images: torch.Tensor, step: int) -> dict[str, float]:
        """One update of ``aux_module`` (``wrapped``: its DDP wrapper) after the model's update."""
        return {}

    def state_dict(self) -> dict:
        """What the task needs to resume besides model, EMA and optimizer (saved in every checkpoint)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ----------------------------------------------------------------------------------- for the loop
    def build_optimizer(self, stage_cfg) -> torch.optim.Optimizer:
        """AdamW with the official no-decay groups over the trainable parameters."""
        return build_optimizer(self.model, stage_cfg)

    def batches(self, shard, micro_batch: int, seed: int, device, first_epoch: int = 0):
        """Endless micro-batches of this worker's ``train`` shard, as ``loss`` takes them."""
        return image_batches(shard, micro_batch, seed, device, first_epoch)

    def step_module(self) -> nn.Module:
        """The module DDP wraps: ``forward(images, step) -> (loss, metrics)``."""
        return _LossModule(self)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


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
    state = read_state_dict(Path(init_dir) / WEIGHTS_FILE)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(allow_missing_prefixes)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{init_dir} does not fit this model (missing {missing[:5]}, unexpected "
                         f"{result.unexpected_keys[:5]}); was it written with another model config?")


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

class TeacherTask(TrainingTask):
    """Stage 0: train a MaskGIT-VQGAN-architecture teacher (MSE + VQ loss), restarting dead codes during
    the first ``teacher.dead_code_restart_until`` of the steps (sftok.dead_codes)."""

    def __init__(self, cfg: Config, inputs: dict, device):
        t = self.teacher_cfg = cfg.teacher
        teacher = MaskGITVQGAN(t.hidden_channels, t.codebook_size, t.z_channels, cfg.teacher_arch())
        if t.init == "scaled":
            init_scaled_(teacher)
        self.model = teacher.to(device)
        self.codebook_size = t.codebook_size
        self.quantizer_weight = cfg.stage0.quantizer_weight
        self.restart = DeadCodeRestart(t.codebook_size, seed=cfg.train.seed)
        self.restart_steps = int(t.dead_code_restart_until * cfg.stage0.steps)
        self._last_quantizer_io: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def loss(self, model, images, step):
        outputs = model(images)
        _, info = outputs
        self._last_quantizer_io = (info["latents"].detach(), info["codes"].detach())   # for after_step
        return stage0_loss(model, images, quantizer_weight=self.quantizer_weight, outputs=outputs)

    def after_step(self, step, ema):
        io, self._last_quantizer_io = self._last_quantizer_io, None
        if step >= self.restart_steps or io is None:
            return {}
        latents, ids = io
        embedding = self.model.quantize.embedding
        dead = self.restart(embedding, latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]), ids, step)
        if dead.numel():       # the exported EMA must not average a restarted row with the dead one
            ema.reset_rows("quantize.embedding.weight", dead, embedding.weight[dead])
        return {"restarted_codes": float(dead.numel())}

    def codes(self, images):
        return self.model.encode_codes(images)

    def validate(self, model, images):
        recon = model.decode_codes(model.encode_codes(images))
        return {"loss": F.mse_loss(recon, images).item(), "psnr": _psnr(recon, images).mean().item(),
                "mean_image_psnr": _mean_image_psnr(images)}

    def grid_rows(self, model, images):
        return [images, model.decode_codes(model.encode_codes(images))], ["original", "teacher reconstruction"]

    def export(self, model, directory):
        t = self.teacher_cfg
        ckpt.save_teacher(model, directory, hidden_channels=t.hidden_channels, codebook_size=t.codebook_size,
                          z_channels=t.z_channels)

    def state_dict(self):
        return {"dead_code_restart": self.restart.state_dict()}

    def load_state_dict(self, state):
        if state:
            self.restart.load_state_dict(state["dead_code_restart"])


class TokenTask(TrainingTask):
    """Stages 1 and 2: the tokenizer predicts the frozen teacher's codes (stage 1 with every slot masked,
    stage 2 with SFVR); stage 2 starts from the stage-1 export."""

    def __init__(self, stage: str, cfg: Config, inputs: dict, device):
        self.stage, self.stage_cfg = stage, getattr(cfg, stage)
        self.teacher = _teacher(inputs, cfg, device)
        self.model = _sftok(cfg, pixel_head=False, device=device)
        if stage == "stage2":
            if not inputs.get("init"):
                raise ValueError("stage2 starts from the stage-1 EMA weights: run stage1 first (or pass its export).")
            _load_init(self.model, inputs["init"])
        self.codebook_size = cfg.model.codebook_size
        self.steps = list(cfg.eval.steps)

    def loss(self, model, images, step):
        with torch.no_grad():
            codes = self.teacher.encode_codes(images)
        return stage_loss(self.stage, model, images, codes, self.stage_cfg)

    def codes(self, images):
        return self.model.encode(images)

    def validate(self, model, images):
        return _token_val(model, self.teacher, images, self.steps)

    def grid_rows(self, model, images):
        return _decode_rows(model, images, self.steps, self.teacher)

    def export(self, model, directory):
        save_model(model, directory)


class PixelTask(TrainingTask):
    """Stage 3: fine-tune the decoder and the soft pixel head (initialised from the teacher's decoder) on
    pixels, encoder frozen, with the official perceptual and adversarial terms and a discriminator step."""

    def __init__(self, cfg: Config, inputs: dict, device):
        if not inputs.get("init"):
            raise ValueError("stage3 fine-tunes a stage-2 model: run stage2 first (or pass its export).")
        teacher = _teacher(inputs, cfg, device)
        self.model = _sftok(cfg, pixel_head=True, device=device)
        _load_init(self.model, inputs["init"], allow_missing_prefixes=("pixel_quantize.", "pixel_decoder."))
        self.model.init_pixel_head_from_teacher(teacher)
        Stage3Loss.prepare_model(self.model)
        self.cfg, self.stage_cfg = cfg, cfg.stage3
        self.codebook_size = cfg.model.codebook_size
        self.steps = list(cfg.eval.steps)
        self.losses = Stage3Loss(cfg.losses, quantizer_weight=self.stage_cfg.quantizer_weight).to(device)
        self.aux_module = self.losses.discriminator
        self.aux_optimizer = (self.losses.discriminator_optimizer(self.stage_cfg)
                              if self.aux_module is not None else None)
        self._last_recon: Optional[torch.Tensor] = None

    def loss(self, model, images, step):
        value, metrics, recon = self.losses.generator_loss(model, images, step)
        self._last_recon = recon.detach()                 # the fakes of this step's discriminator update
        return value, metrics

    def aux_step(self, wrapped, images, step):
        if self.aux_optimizer is None or not self.losses.gan_active(step):
            return {}
        set_lr(self.aux_optimizer, discriminator_lr_at(step, self.stage_cfg, self.cfg.losses))
        d_loss, metrics = self.losses.discriminator_loss(images, self._last_recon, discriminator=wrapped)
        d_loss.backward()
        # clipped like the generator (global norm train.grad_clip), as the TiTok-derived official loop does
        d_params = [p for p in unwrap_model(wrapped).parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(d_params, self.cfg.train.grad_clip)
        self.aux_optimizer.step()
        self.aux_optimizer.zero_grad(set_to_none=True)
        return {**metrics, "d_grad_norm": float(grad_norm)}

    def codes(self, images):
        return self.model.encode(images)

    def validate(self, model, images):
        n = max(self.steps)
        recon = model.decode_tokens(model.encode(images), num_steps=n, temperature=0.0).clamp(0, 1)
        return {"loss": F.mse_loss(recon, images).item(), f"psnr_{n}step": _psnr(recon, images).mean().item(),
                "mean_image_psnr": _mean_image_psnr(images)}

    def grid_rows(self, model, images):
        return _decode_rows(model, images, self.steps, None)

    def export(self, model, directory):
        save_model(model, directory)

    def state_dict(self):
        """D heads + LeCam EMAs (never the external backbones) and D's optimizer."""
        return {"loss": self.losses.checkpoint_state(),
                **({"d_optimizer": self.aux_optimizer.state_dict()} if self.aux_optimizer else {})}

    def load_state_dict(self, state):
        if not state:
            return
        self.losses.load_checkpoint_state(state["loss"])
        if self.aux_optimizer is not None:
            self.aux_optimizer.load_state_dict(state["d_optimizer"])


class GeneratorTask(TrainingTask):
    """Stage 4: the class-conditional MaskGIT generator on precomputed tokens (SPEC D). Its data are token
    rows (``tokens``, ``tokens_flip``, ``label``; sftok_platform.generator_stage writes them), its knobs the
    ``generator`` section; there are no images to validate on (gFID is measured after training).

    ``inputs``: ``codebook_size`` and ``seq_len`` of the tokenizer whose tokens it models.
    """
    section = "generator"
    rows_name = "sequences"
    uses_val_split = False

    def __init__(self, cfg: Config, inputs: dict, device):
        self.model = MaskGITGenerator(cfg.generator, codebook_size=int(inputs["codebook_size"]),
                                      seq_len=int(inputs["seq_len"])).to(device)
        self.codebook_size = 0                        # no codebook of its own to report usage of

    def batches(self, shard, micro_batch, seed, device, first_epoch=0):
        return token_batches(shard, micro_batch, seed, device, first_epoch)

    def loss(self, model, batch, step):
        tokens = batch["tokens"]
        flip = (torch.rand(tokens.shape[0]) < 0.5).to(tokens.device)[:, None]   # the official random flip
        return training_loss(model, torch.where(flip, batch["tokens_flip"], tokens), batch["label"])

    def validate(self, model, images):
        return {}

    def grid_rows(self, model, images):
        return [], []

    def export(self, model, directory):
        save_generator(model, directory)


def stage_optim_config(cfg: Config, stage: str) -> StageConfig:
    """The optimisation knobs of ``stage`` (steps, batch, LR schedule, AdamW): ``cfg.<stage>`` for the
    tokenizer stages, a :class:`StageConfig` view of the ``generator`` section for stage 4."""
    if stage != "stage4":
        return getattr(cfg, stage)
    g = cfg.generator
    return StageConfig(steps=g.steps, global_batch_size=g.global_batch_size, grad_accum=1, lr=g.lr,
                       end_lr=g.end_lr, warmup_steps=g.warmup_steps, beta1=g.beta1, beta2=g.beta2,
                       weight_decay=g.weight_decay)


# stage name -> task constructor (cfg, inputs, device)
TASKS = {
    "stage0": TeacherTask,
    "stage1": lambda cfg, inputs, device: TokenTask("stage1", cfg, inputs, device),
    "stage2": lambda cfg, inputs, device: TokenTask("stage2", cfg, inputs, device),
    "stage3": PixelTask,
    "stage4": GeneratorTask,
}


def build_stage(stage: str, cfg: Config, inputs: dict, device) -> TrainingTask:
    """The :class:`TrainingTask` of ``stage`` with every model on ``device``."""
    if stage not in TASKS:
        raise ValueError(f"unknown stage {stage!r}; use one of {', '.join(TASKS)}.")
    task = TASKS[stage](cfg, inputs, device)
    task.section = task.section or stage
    return task


__all__ = ["STAGES", "TASKS", "TrainingTask", "TeacherTask", "TokenTask", "PixelTask", "GeneratorTask",
           "build_stage", "stage_optim_config"]
