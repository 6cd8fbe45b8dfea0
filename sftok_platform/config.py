"""One typed configuration for a run: the tokenizer's sections plus data, Ray Train, evaluation, MLflow and
the run itself, loaded from a preset and validated once.

Why one tree of dataclasses: every run saves the *resolved* config (YAML next to its checkpoints, params and
an artifact in MLflow), so a result can always be traced back to every knob that produced it. Presets are
small YAML files inside this package (``sftok_platform/presets/{tiny,b64,l64}.yaml``, so a non-editable
install loads them too) that override the defaults below; on top of a preset, dotted overrides such as
``stage2.replace_prob=0.5`` change single values. Unknown keys and values of the wrong type are refused with
a message that names the closest valid key; :meth:`Config.validate` refuses every value that cannot work,
before Ray starts.

The tokenizer's own sections (``model``, ``teacher``, ``losses``, the stages, ``generator``) and the override
machinery live in :mod:`sftok.config`, which the pure-PyTorch library reads without this package.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sftok.config import (ConfigError, GeneratorConfig, LossConfig, ModelConfig, SFVRStageConfig, StageConfig,
                          TeacherConfig, TokenStageConfig, apply_override, check_ranges, flatten, merge,
                          split_override)
from sftok.blocks import VIT_SIZES
from sftok.optim import OPTIMIZERS

PRESET_DIR = Path(__file__).resolve().parent / "presets"


# ######################################################################################################
# Run-level sections
# ######################################################################################################

@dataclass
class DataConfig:
    """Where the Parquet shards are, and how to make the built-in set when there are none."""
    path: str = ""                      # shards dir (local, NFS or s3://); empty = <run root>/data/synthetic
    synthetic_images: int = 2000        # size of the built-in data set made when ``path`` is empty
    synthetic_val_images: int = 200
    seed: int = 0
    shuffle_seed: int = 0
    use_proxy_codes: bool = False       # read precomputed teacher codes (center crop) instead of on the fly


@dataclass
class TrainConfig:
    """How every stage runs on the cluster."""
    workers: int = 1
    gpu: bool = False
    cpus_per_worker: int = 1
    precision: str = "auto"             # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 42
    log_every: int = 10
    checkpoint_every: int = 100
    image_every: int = 0                # image grids to MLflow every N steps; 0 = only at the end of a stage
    max_failures: int = 2               # Ray Train restarts of a stage's worker group; -1 = unlimited
    # ... but a stage whose last this-many attempts each died before finishing one step is refused
    max_restarts_without_progress: int = 3
    num_to_keep: int = 2
    compile: bool = False               # torch.compile the trained model's forward (nn.Module.compile, in place)
    # intra-op threads of each worker's torch; 0 = Ray's default (OMP_NUM_THREADS = cpus_per_worker). The
    # tiny preset uses 2: one worker on a 2-core laptop would otherwise compute on one core.
    torch_threads: int = 0
    # divergence guard: a step whose loss or gradient norm is non-finite on any rank is skipped (no update,
    # no EMA); this many such steps in a row stop the stage with an error. 0 = stop at the first one.
    max_nonfinite_steps: int = 10
    # how Ray places a stage's workers: PACK (fewest nodes, fastest all-reduce) | SPREAD (one per node where
    # possible: losing a node costs fewer workers) | STRICT_PACK | STRICT_SPREAD
    placement_strategy: str = "PACK"
    # sync: rank 0 copies each checkpoint to storage_path inside the report barrier; async: it writes the
    # checkpoint to local disk, and Ray uploads it in the background and then deletes the local copy
    checkpoint_upload: str = "sync"
    # none: DDP all-reduces fp32 gradients; bf16: compresses them to bf16 for the all-reduce (half the bytes
    # on the interconnect, torch's bf16_compress_hook; NCCL only)
    grad_compression: str = "none"


@dataclass
class EvalConfig:
    """Reconstruction evaluation (SPEC E)."""
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    temperature: float = 0.0            # 0 = deterministic decoding; the official default is 1.0
    max_images: int = 0                 # 0 = the whole split
    batch_size: int = 32
    inception_weights: str = ""         # pt_inception-2015-12-05-6726825d.pth; empty = random (not comparable)
    stage_val_images: int = 16          # val images of the quick check that ends each training stage (sweeps read it)
    search_objective: str = ""          # sweep.py search: val_* figure Optuna optimises; "" = val_psnr_<max steps>step


@dataclass
class TrackingConfig:
    """MLflow, owned by the project (not Ray's logger callback)."""
    uri: str = ""                       # empty = sqlite:///<run root>/mlflow.db
    experiment: str = "sftok"
    registered_model: str = ""            # empty = one registered model per preset: sftok-<preset>
    alias: str = "current"               # MLflow reserves "latest" and "v<N>" as alias names
    promote: bool = False               # move the alias to this run's version (full_pipeline.py --promote)
    system_metrics: bool = True


@dataclass
class RunConfig:
    """Identity and location of a pipeline run. The same name resumes; a new name starts afresh."""
    name: str = "default"
    root: str = "runs"                  # local dir, NFS path, or s3:// URI (checkpoints, Ray storage)
    stages: list[str] = field(default_factory=lambda: ["stage0", "stage1", "stage2", "stage3"])



@dataclass
class Config:
    """The resolved configuration of one run."""
    preset: str = "b64"
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage0: StageConfig = field(default_factory=lambda: StageConfig(
        steps=100_000, beta2=0.99, warmup_steps=5_000))
    stage1: TokenStageConfig = field(default_factory=TokenStageConfig)
    stage2: SFVRStageConfig = field(default_factory=SFVRStageConfig)
    stage3: StageConfig = field(default_factory=lambda: StageConfig(
        steps=1_000_000, global_batch_size=128, warmup_steps=5_000, beta2=0.999))
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)

    # -------------------------------------------------------------------------------- conversions
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path

    def teacher_arch(self):
        """The teacher's :class:`sftok.maskgit_vqgan.VQGANArch` (the pixel head has the same one)."""
        from sftok.maskgit_vqgan import VQGANArch
        t = self.teacher
        return VQGANArch(tuple(t.channel_mult), t.num_res_blocks, t.norm_groups, t.shortcut)

    def flat(self) -> dict[str, Any]:
        """Dotted ``section.key -> value`` pairs (MLflow params)."""
        return flatten(self.to_dict())

    def validate(self) -> "Config":
        """Refuse values that cannot work together; every message says how to fix it."""
        m = self.model
        for key in ("encoder_size", "decoder_size"):
            if getattr(m, key) not in VIT_SIZES:
                raise ConfigError(f"model.{key}={getattr(m, key)!r} is not a known size; "
                                  f"use one of {sorted(VIT_SIZES)}.")
        if m.image_size % m.patch_size:
            raise ConfigError(f"model.image_size={m.image_size} is not a multiple of model.patch_size="
                              f"{m.patch_size}; pick sizes that divide.")
        t = self.teacher
        try:
            arch = self.teacher_arch()
        except ValueError as e:
            raise ConfigError(f"teacher layout: {e}") from None
        for key in ("channel_mult", "num_res_blocks", "norm_groups", "shortcut"):
            if getattr(m, f"pixel_{key}") != getattr(t, key):
                raise ConfigError(f"model.pixel_{key}={getattr(m, f'pixel_{key}')} differs from teacher.{key}="
                                  f"{getattr(t, key)}: the stage-3 pixel head is initialised from the teacher "
                                  "decoder, so set both to the same value.")
        if m.pixel_hidden_channels != t.hidden_channels or m.pixel_z_channels != t.z_channels:
            raise ConfigError(f"model.pixel_hidden_channels/pixel_z_channels={m.pixel_hidden_channels}/"
                              f"{m.pixel_z_channels} differ from teacher.hidden_channels/z_channels="
                              f"{t.hidden_channels}/{t.z_channels}; set them equal (the pixel head is the "
                              "teacher decoder).")
        f = arch.downsample_factor
        if m.image_size % f:
            raise ConfigError(f"model.image_size={m.image_size} is not a multiple of the teacher's downsampling "
                              f"factor {f} (2^(len(teacher.channel_mult)-1)); change one of them.")
        grid = (m.image_size // f) ** 2
        if m.num_proxy_codes != grid:
            raise ConfigError(f"model.num_proxy_codes={m.num_proxy_codes} must equal the teacher code grid "
                              f"(image_size/{f})^2 = {grid}; set model.num_proxy_codes={grid}.")
        if t.init not in ("torch", "scaled"):
            raise ConfigError(f"teacher.init={t.init!r}: use 'torch' (default init) or 'scaled'.")
        if not m.init_std > 0:
            raise ConfigError(f"model.init_std={m.init_std} must be > 0 (official 0.02).")
        if m.assignment not in ("batch", "per_image"):
            raise ConfigError(f"model.assignment={m.assignment!r}: use 'batch' (official) or 'per_image'.")
        if m.teacher_codebook_size != self.teacher.codebook_size:
            raise ConfigError(f"model.teacher_codebook_size={m.teacher_codebook_size} differs from "
                              f"teacher.codebook_size={self.teacher.codebook_size}; set both to the same value.")
        if not 0.0 <= self.teacher.dead_code_restart_until <= 1.0:
            raise ConfigError(f"teacher.dead_code_restart_until={self.teacher.dead_code_restart_until} is a "
                              "fraction of the stage-0 steps: use a value in [0, 1] (0 turns restarts off).")
        if self.eval.search_objective and not self.eval.search_objective.startswith("val_"):
            raise ConfigError(f"eval.search_objective={self.eval.search_objective!r}: name a figure of the stage-2 "
                              "validation, e.g. val_loss (minimised) or val_psnr_8step / val_accuracy_8step "
                              "(maximised).")
        if self.eval.stage_val_images < 1:
            raise ConfigError(f"eval.stage_val_images={self.eval.stage_val_images}: the end-of-stage check needs "
                              "at least 1 validation image.")
        if self.train.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"train.precision={self.train.precision!r}: use auto, fp32, bf16 or fp16.")
        if self.train.torch_threads < 0:
            raise ConfigError(f"train.torch_threads={self.train.torch_threads}: use 0 (Ray's default) or a "
                              "thread count.")
        if self.train.max_nonfinite_steps < 0:
            raise ConfigError(f"train.max_nonfinite_steps={self.train.max_nonfinite_steps}: use 0 (stop at the "
                              "first non-finite step) or a positive count of consecutive skipped steps.")
        if self.train.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ConfigError(f"train.placement_strategy={self.train.placement_strategy!r}: use PACK, SPREAD, "
                              "STRICT_PACK or STRICT_SPREAD (Ray placement group strategies).")
        if self.train.max_failures < -1:
            raise ConfigError(f"train.max_failures={self.train.max_failures}: use -1 (retry without limit), 0 or "
                              "a positive number of restarts.")
        if self.train.max_restarts_without_progress < 1:
            raise ConfigError(f"train.max_restarts_without_progress={self.train.max_restarts_without_progress}: "
                              "use a positive number of attempts.")
        if self.train.grad_compression not in ("none", "bf16"):
            raise ConfigError(f"train.grad_compression={self.train.grad_compression!r}: use none or bf16.")
        if self.train.grad_compression == "bf16" and not self.train.gpu:
            raise ConfigError("train.grad_compression=bf16 compresses NCCL all-reduces: it needs train.gpu=true "
                              "(--gpu); on CPU (gloo) leave it at none.")
        if self.train.checkpoint_upload not in ("sync", "async"):
            raise ConfigError(f"train.checkpoint_upload={self.train.checkpoint_upload!r}: use sync or async.")
        if self.train.workers < 1:
            raise ConfigError(f"train.workers={self.train.workers}: need at least 1 worker.")
        for name in ("stage0", "stage1", "stage2", "stage3"):
            st: StageConfig = getattr(self, name)
            per_update = self.train.workers * st.grad_accum
            if st.global_batch_size % per_update:
                raise ConfigError(
                    f"{name}.global_batch_size={st.global_batch_size} is not divisible by train.workers x "
                    f"{name}.grad_accum = {self.train.workers} x {st.grad_accum}; choose a global batch that is "
                    f"a multiple of {per_update} or change the worker count.")
            if st.steps < 0 or st.warmup_steps < 0:
                raise ConfigError(f"{name}.steps and {name}.warmup_steps must be >= 0.")
            if st.optimizer not in OPTIMIZERS:
                raise ConfigError(f"{name}.optimizer={st.optimizer!r}: use one of {', '.join(OPTIMIZERS)}.")
            if st.optimizer == "muon" and name == "stage0":
                raise ConfigError("stage0.optimizer=muon: the stage-0 teacher is a CNN with no transformer "
                                  "weight matrices for Muon; use stage0.optimizer=adamw.")
        unknown = set(self.run.stages) - {"stage0", "stage1", "stage2", "stage3", "stage4"}
        if unknown:
            raise ConfigError(f"run.stages has unknown entries {sorted(unknown)}; "
                              "use a subset of stage0, stage1, stage2, stage3, stage4.")
        if not self.eval.steps or any(not isinstance(n, int) or n < 1 for n in self.eval.steps):
            raise ConfigError(f"eval.steps={self.eval.steps}: list one or more decoding step counts >= 1, "
                              "e.g. eval.steps=[1,2,4,8].")
        if len(set(self.eval.steps)) < len(self.eval.steps):
            raise ConfigError(f"eval.steps={self.eval.steps}: list each decoding step count once (they name "
                              "the per-step results), e.g. eval.steps=[1,2,4,8].")
        check_ranges(self._range_rules())
        return self

    def _range_rules(self):
        """(dotted key, value, rule name) for every numeric knob with a bounded range (rules: ``sftok.config.RANGES``)."""
        m, t, tr, ev, d, ls, g = (self.model, self.teacher, self.train, self.eval, self.data, self.losses,
                                  self.generator)
        rules = [(f"model.{k}", getattr(m, k), "count") for k in (
            "image_size", "patch_size", "num_latent_tokens", "token_size", "codebook_size", "sinkhorn_iters",
            "teacher_codebook_size", "num_proxy_codes", "pixel_hidden_channels", "pixel_z_channels")]
        rules += [("model.commitment_cost", m.commitment_cost, "nonneg"),
                  ("model.sinkhorn_epsilon", m.sinkhorn_epsilon, "positive")]
        rules += [(f"teacher.{k}", getattr(t, k), "count") for k in (
            "hidden_channels", "codebook_size", "z_channels", "num_res_blocks")]
        rules += [(f"train.{k}", getattr(tr, k), "count") for k in (
            "cpus_per_worker", "log_every", "checkpoint_every", "num_to_keep")]
        rules += [("train.ema_decay", tr.ema_decay, "unit_open"), ("train.grad_clip", tr.grad_clip, "positive"),
                  ("train.image_every", tr.image_every, "nonneg")]
        rules += [("eval.temperature", ev.temperature, "nonneg"), ("eval.max_images", ev.max_images, "nonneg"),
                  ("eval.batch_size", ev.batch_size, "count"),
                  ("data.synthetic_images", d.synthetic_images, "count"),
                  ("data.synthetic_val_images", d.synthetic_val_images, "count")]
        rules += [(f"losses.{k}", getattr(ls, k), "nonneg") for k in (
            "reconstruction_weight", "perceptual_weight", "discriminator_weight", "discriminator_factor",
            "discriminator_start", "lecam_weight")]
        rules += [("losses.discriminator_lr", ls.discriminator_lr, "positive"),
                  ("losses.diffaug_cutout", ls.diffaug_cutout, "unit")]
        for name in ("stage0", "stage1", "stage2", "stage3"):
            st: StageConfig = getattr(self, name)
            rules += [(f"{name}.global_batch_size", st.global_batch_size, "count"),
                      (f"{name}.grad_accum", st.grad_accum, "count"),
                      (f"{name}.lr", st.lr, "positive"), (f"{name}.end_lr", st.end_lr, "nonneg"),
                      (f"{name}.beta1", st.beta1, "unit_open"), (f"{name}.beta2", st.beta2, "unit_open"),
                      (f"{name}.weight_decay", st.weight_decay, "nonneg"),
                      (f"{name}.muon_lr_scale", st.muon_lr_scale, "positive"),
                      (f"{name}.quantizer_weight", st.quantizer_weight, "nonneg")]
            if isinstance(st, TokenStageConfig):
                rules.append((f"{name}.label_smoothing", st.label_smoothing, "unit_open"))
            if isinstance(st, SFVRStageConfig):
                rules += [(f"{name}.replace_prob", st.replace_prob, "unit"),
                          (f"{name}.unmasked_weight", st.unmasked_weight, "nonneg")]
            if name in self.run.stages:
                rules.append((f"{name}.steps", st.steps, "count"))
        rules += [(f"generator.{k}", getattr(g, k), "count") for k in (
            "width", "layers", "heads", "mlp_dim", "num_classes", "global_batch_size", "sample_steps",
            "samples_per_class")]
        rules += [(f"generator.{k}", getattr(g, k), "unit_open") for k in (
            "dropout", "label_smoothing", "class_dropout", "beta1", "beta2")]
        rules += [("generator.lr", g.lr, "positive"), ("generator.end_lr", g.end_lr, "nonneg"),
                  ("generator.warmup_steps", g.warmup_steps, "nonneg"),
                  ("generator.weight_decay", g.weight_decay, "nonneg"),
                  ("generator.guidance_scale", g.guidance_scale, "nonneg"),
                  ("generator.temperature", g.temperature, "nonneg")]
        if "stage4" in self.run.stages or g.enabled:
            rules.append(("generator.steps", g.steps, "count"))
        return rules


# ######################################################################################################
# Loading: defaults <- preset YAML <- dotted overrides
# ######################################################################################################

def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(preset: str | os.PathLike | None = None, overrides: list[str] | dict | None = None,
                *, validate: bool = True) -> Config:
    """Build a :class:`Config`.

    Args:
        preset: a preset name (``tiny``, ``b64``, ``l64``) or the path of a YAML file (a preset, or a
            resolved config saved by an earlier run). ``None`` keeps the dataclass defaults.
        overrides: ``["stage2.replace_prob=0.5", ...]`` (values parsed as YAML) or a nested/dotted dict.
    """
    cfg = Config()
    if preset is not None:
        path = Path(preset)
        if not path.suffix:
            path = PRESET_DIR / f"{preset}.yaml"
            if not path.exists():
                raise ConfigError(f"unknown preset {str(preset)!r}; available: {', '.join(list_presets())} "
                                  f"(or pass the path of a YAML file).")
        elif not path.exists():
            raise ConfigError(f"config file {str(path)!r} does not exist.")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}.")
        data.setdefault("preset", path.stem if path.parent == PRESET_DIR else data.get("preset", str(path)))
        merge(cfg, data, where=str(path))
    if overrides:
        items = overrides.items() if isinstance(overrides, dict) else (split_override(o) for o in overrides)
        for dotted, value in items:
            apply_override(cfg, dotted, value)
    return cfg.validate() if validate else cfg


__all__ = [
    "Config", "DataConfig", "TrainConfig", "EvalConfig", "TrackingConfig", "RunConfig", "load_config",
    "list_presets", "PRESET_DIR",
    # re-exported: a run's config is built from these
    "ConfigError", "ModelConfig", "TeacherConfig", "StageConfig", "TokenStageConfig", "SFVRStageConfig",
    "LossConfig", "GeneratorConfig",
    "apply_override", "split_override",
]
