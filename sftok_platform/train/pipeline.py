"""The driver side: one ``TorchTrainer`` per stage (:func:`run_stage`) and the whole schedule
(:func:`run_pipeline`: checks, data, stages 0-3, evaluation, model registry, summary).

Resume semantics (PLATFORM.md P4): a stage's Ray Train run is named ``<run.name>-<stage>`` under
``<run.root>/<run.name>/ray``, so rerunning the same command continues the running stage from its last
checkpoint, and ``stages/<stage>/done.json`` makes finished stages skip. A fresh attempt is a new
``run.name`` (``--run-name``); nothing here ever uses timestamps in names.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from sftok_platform.config import Config, ConfigError
from sftok_platform import tracking
from sftok_platform.train import checkpointing as ckpt
from sftok_platform.train.stages import STAGES

# keys that may change between launches of the same run name (they do not change what is trained)
RESUMABLE_CHANGES = ("train.workers", "train.gpu", "train.cpus_per_worker", "train.max_failures",
                     "train.num_to_keep", "train.log_every", "train.image_every", "run.", "tracking.", "eval.",
                     "data.path", "generator.")


@dataclass
class StageResult:
    """What a finished stage left behind."""
    stage: str
    checkpoint_dir: str                  # the export the next stage loads (EMA weights + config)
    metrics: dict = field(default_factory=dict)   # final validation metrics (val_*) + stage images/s
    ray_checkpoint: str = ""             # the last Ray Train checkpoint (full training state)
    run_id: str = ""                     # MLflow child run
    seconds: float = 0.0
    skipped: bool = False                # True when a previous launch had finished it


@dataclass
class PipelineResult:
    run_name: str
    run_dir: str
    stages: dict[str, StageResult]
    eval_metrics: dict
    parent_run_id: str
    model_version: str
    model_uri: str
    tracking_uri: str
    seconds: float
    generator_metrics: dict = field(default_factory=dict)     # stage 4 (--with-generator): gFID, IS, ...


def run_dir(cfg: Config) -> Path:
    return tracking.run_root(cfg) / cfg.run.name


# ######################################################################################################
# Checks before any work
# ######################################################################################################

def stage_inputs(cfg: Config, stage: str, rdir: Path, *, planned: tuple[str, ...] = ()) -> dict:
    """Paths a stage loads (teacher, init weights). ``planned`` stages count as available: they run first.

    Raises ConfigError when a required input neither exists nor is planned.
    """
    def export_of(s: str) -> Optional[str]:
        paths = ckpt.StagePaths(rdir, s)
        return str(paths.export) if (ckpt.is_done(paths) or s in planned) else None

    inputs: dict[str, str] = {}
    if stage in ("stage1", "stage2", "stage3"):
        if cfg.teacher.weights:
            from sftok.weights import resolve_weight
            try:
                inputs["teacher"] = str(resolve_weight(cfg.teacher.weights, "teacher.weights"))
            except FileNotFoundError as e:
                raise ConfigError(str(e)) from None
        else:
            t = export_of("stage0")
            if t is None:
                raise ConfigError(
                    f"{stage} needs a MaskGIT-VQGAN teacher: set teacher.weights=/path/to/"
                    "maskgit-vqgan-imagenet-f16-256.bin, or include stage0 in run.stages (--stages "
                    "stage0,...) to train one on your data first.")
            inputs["teacher"] = t
    previous = {"stage2": "stage1", "stage3": "stage2"}.get(stage)
    if previous:
        init = export_of(previous)
        if init is None:
            raise ConfigError(
                f"{stage} starts from the {previous} EMA weights, but run {cfg.run.name!r} has no finished "
                f"{previous} ({ckpt.StagePaths(rdir, previous).done} is missing). Include {previous} in "
                f"run.stages (--stages {previous},{stage}) or use the --run-name of a run whose {previous} "
                "finished.")
        inputs["init"] = init
    return inputs


def preflight(cfg: Config, stages: list[str]) -> None:
    """Every check that can fail without touching data or Ray: weights, stage inputs, data manifest,
    registry alias. Messages say how to fix the config."""
    cfg.validate()
    from sftok.weights import missing_weights
    if "stage3" in stages:
        problems = missing_weights(cfg, ("stage3",))
        if problems:
            raise ConfigError("stage 3 cannot start:\n  - " + "\n  - ".join(problems))
    rdir = run_dir(cfg)
    planned: list[str] = []
    for s in stages:
        stage_inputs(cfg, s, rdir, planned=tuple(planned))
        planned.append(s)
    if cfg.data.path:
        from sftok_platform.data import DataError, load_manifest
        path = cfg.data.path if "://" in cfg.data.path else str(Path(cfg.data.path).expanduser().resolve())
        try:
            load_manifest(path)
        except DataError as e:
            raise ConfigError(f"data.path={cfg.data.path!r}: {e}") from None
    tracking.check_alias(cfg.tracking.alias)


def check_same_run(cfg: Config, rdir: Path) -> None:
    """A rerun of a run name must train the same thing (else a silent mix of two configs would resume)."""
    saved = rdir / "config.yaml"
    if not saved.is_file():
        return
    from sftok_platform.config import load_config
    try:
        old = load_config(str(saved), validate=False).flat()
    except ConfigError:
        return
    new = cfg.flat()
    changed = [k for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and k != "preset" and not k.startswith(RESUMABLE_CHANGES)]
    if changed:
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:8])
        raise ConfigError(f"run {cfg.run.name!r} ({rdir}) was started with a different config ({diff}). "
                          f"Resuming would mix two experiments: start a fresh attempt with --run-name <new name>, "
                          f"or restore those settings to resume.")


def ordered_stages(stages: list[str]) -> list[str]:
    return [s for s in STAGES if s in stages]


# ######################################################################################################
# One stage
# ######################################################################################################

def _raise_if_diverged(paths: ckpt.StagePaths, cfg: Config, error: BaseException) -> None:
    """A stage that failed because it diverged (the loop's journal says so) raises ``StageDiverged`` with the
    loop's own message instead of Ray's wrapped worker traceback."""
    from sftok_platform.train.loop import StageDiverged, divergence_message
    message = divergence_message(paths, cfg)
    if message:
        raise StageDiverged(message) from error


def build_trainer(cfg: Config, stage: str, *, run_id: Optional[str], inputs: dict, datasets: dict,
                  callbacks: Optional[list] = None, debug: Optional[dict] = None):
    """The one ``TorchTrainer`` of every stage (0-4): :func:`sftok_platform.train.loop.train_loop_per_worker`
    on ``train.workers`` workers, named ``<run.name>-<stage>`` under the run's Ray storage (the same name
    resumes from its last checkpoint), with the configured failure, checkpoint and placement policies.

    ``datasets``: Ray Datasets by name; ``train`` is split across the workers, the rest (``val``) is not.
    ``inputs``: what the stage's task loads (``sftok_platform.train.stages.TASKS``).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from sftok_platform.train.loop import train_loop_per_worker
    t = cfg.train
    rdir = run_dir(cfg)
    storage = ckpt.storage_path(rdir)
    name = ckpt.ray_run_name(cfg.run.name, stage)
    loop_config = {
        "cfg": cfg.to_dict(), "stage": stage, "run_dir": str(rdir), "inputs": inputs,
        "tracking": {"uri": tracking.tracking_uri(cfg), "run_id": run_id, "system_metrics": cfg.tracking.system_metrics},
        "ray_storage": str(storage / name), "debug": debug,
        "launched_at": time.time(),      # attempts after this count towards train.max_restarts_without_progress
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.workers, use_gpu=t.gpu, placement_strategy=t.placement_strategy,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.gpu else {})}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.num_to_keep),
            callbacks=callbacks or None,
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),   # our own progress lines only
        datasets=datasets,
        # one worker reads the whole train set itself; a split would start a SplitCoordinator actor (~4 s of
        # process start and imports per stage on 2 cores) only to hand every block to that one worker
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"] if t.workers > 1 else []),
    )


def run_stage(cfg: Config, stage: str, *, shards: str, parent_run_id: Optional[str] = None,
              callbacks: Optional[list] = None, inputs: Optional[dict] = None, debug: Optional[dict] = None,
              force: bool = False) -> StageResult:
    """Train one stage as one ``TorchTrainer.fit()``; resumes by name, skips a stage that already finished.

    Args:
        cfg: resolved config (``run.name``/``run.root`` locate the run; the stage reads ``cfg.<stage>``).
        stage: ``stage0`` .. ``stage3``.
        shards: prepared shards dir (``sftok_platform.data.ensure_dataset(cfg)``).
        parent_run_id: MLflow parent (pipeline or sweep) run; the stage's child run hangs under it.
        callbacks: ``ray.train.UserCallback`` list, e.g. ``[ray.tune.integration.ray_train.TuneReportCallback()]``
            when called from a Tune function trainable (the per-log-step metrics and the final ``val_loss``
            reach Tune).
        inputs: ``{"teacher": path, "init": path}`` overrides of what the stage loads (default: the teacher
            from ``teacher.weights`` or this run's stage 0, the previous stage's export of this run).
        debug: fault injection for tests: ``{"fail_after_step": k, "fail_rank": r, "how": "raise"|"exit",
            "marker": file}``.
        force: train even if ``done.json`` says the stage finished.

    Returns:
        :class:`StageResult`; ``metrics`` holds ``val_loss`` (lower is better for every stage) and the
        stage's other ``val_*`` figures.
    """
    from sftok_platform.cluster import check_resources, connect, resolve_tracking_uri
    from sftok_platform.data import read_split

    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; use one of {', '.join(STAGES)}.")
    rdir = run_dir(cfg)
    paths = ckpt.StagePaths(rdir, stage)
    if ckpt.is_done(paths) and not force:
        info = ckpt.read_done(paths)
        return StageResult(stage, str(paths.export), info.get("metrics", {}), info.get("ray_checkpoint", ""),
                           info.get("run_id", ""), info.get("seconds", 0.0), skipped=True)
    inputs = dict(inputs) if inputs is not None else stage_inputs(cfg, stage, rdir)
    if stage == "stage3":
        from sftok.weights import missing_weights
        problems = missing_weights(cfg, ("stage3",))
        if problems:
            raise ConfigError("stage 3 cannot start:\n  - " + "\n  - ".join(problems))
    resources = connect(cfg)
    check_resources(cfg, resources)
    resolve_tracking_uri(cfg)
    # the driver's Ray Data context travels with the datasets made below to Train's SplitCoordinator: no
    # "Starting execution of Dataset" / "Execution plan" INFO pair on the console for every epoch of every
    # stage (the one-line "execution finished in N s" remains)
    from ray.data import DataContext
    DataContext.get_current().print_on_execution_start = False
    rdir.mkdir(parents=True, exist_ok=True)
    if not (rdir / "config.yaml").is_file():
        cfg.save(rdir / "config.yaml")

    run_id = tracking.start_child_run(cfg, stage, parent_run_id)
    image_size = cfg.model.image_size
    trainer = build_trainer(
        cfg, stage, run_id=run_id, inputs=inputs, callbacks=callbacks, debug=debug,
        # uint8 through the object store (196 KB instead of 786 KB per 256-px image); the worker converts to
        # float32 in [0,1] on its device (data.reader.iter_train_batches / as_float_images)
        datasets={"train": read_split(shards, "train", train=True, image_size=image_size, seed=cfg.data.shuffle_seed,
                                      image_dtype="uint8"),
                  "val": read_split(shards, "val", train=False, image_size=image_size, image_dtype="uint8")})
    t0 = time.time()
    with tracking.run_closed_by(cfg, run_id, finish=False):      # FINISHED below, once the export is tagged
        try:
            result = trainer.fit()
        except Exception as e:
            _raise_if_diverged(paths, cfg, e)
            raise
        if result.error is not None:   # V2 returns (not raises) controller errors, e.g. workers OOM-killed
            _raise_if_diverged(paths, cfg, result.error)
            raise result.error
    seconds = time.time() - t0
    metrics_file = paths.dir / "final_metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    ray_ckpt = result.checkpoint.path if result.checkpoint is not None else ""
    c = tracking.client(cfg)
    c.set_tag(run_id, "ray.checkpoint", ray_ckpt)
    c.set_tag(run_id, "sftok.export", str(paths.export))
    tracking.end_run(cfg, run_id, "FINISHED")
    ckpt.mark_done(paths, {"metrics": metrics, "ray_checkpoint": ray_ckpt, "run_id": run_id, "seconds": seconds,
                           "inputs": inputs})
    return StageResult(stage, str(paths.export), metrics, ray_ckpt, run_id, seconds)


# ######################################################################################################
# The whole schedule
# ######################################################################################################

def run_pipeline(cfg: Config, *, with_generator: bool = False, debug: Optional[dict] = None,
                 evaluate: bool = True, echo: Callable[[str], None] = print) -> PipelineResult:
    """Checks, data, stages 0-3 (stage 0 only without ``teacher.weights``), evaluation, registry, summary."""
    t0 = time.time()
    cfg.validate()
    stages = ordered_stages(cfg.run.stages)
    if cfg.teacher.weights and "stage0" in stages:
        stages.remove("stage0")          # the official teacher replaces stage 0
    want_generator = with_generator or cfg.generator.enabled or "stage4" in cfg.run.stages
    rdir = run_dir(cfg)
    check_same_run(cfg, rdir)
    preflight(cfg, stages)

    from sftok_platform.cluster import check_resources, connect, resolve_tracking_uri
    resources = connect(cfg)
    check_resources(cfg, resources)
    resolve_tracking_uri(cfg, echo=echo)
    rdir.mkdir(parents=True, exist_ok=True)
    cfg.save(rdir / "config.yaml")

    from sftok_platform.data import ensure_dataset
    echo(f"[pipeline] run {cfg.run.name!r} in {rdir}; stages {', '.join(stages)}; "
         + ("checking the data ..." if cfg.data.path else "preparing the built-in data set (or reusing it) ..."))
    shards = ensure_dataset(cfg)
    echo(f"[pipeline] data: {shards}")
    parent = tracking.start_parent_run(cfg)
    tracking.log_config_artifact(cfg, parent)
    results: dict[str, StageResult] = {}
    with tracking.run_closed_by(cfg, parent):
        for stage in stages:
            echo(f"[pipeline] {stage}: starting" if not ckpt.is_done(ckpt.StagePaths(rdir, stage))
                 else f"[pipeline] {stage}: already finished, skipped")
            res = run_stage(cfg, stage, shards=shards, parent_run_id=parent, debug=debug)
            results[stage] = res
            tracking.log_summary_metrics(cfg, parent, {f"{stage}/{k}": v for k, v in res.metrics.items()})
        final_stage = next((s for s in ("stage3", "stage2", "stage1") if s in results), None)
        eval_metrics: dict = {}
        version, uri = "", ""
        if final_stage is not None:
            export = results[final_stage].checkpoint_dir
            if evaluate:
                eval_metrics = _evaluate(cfg, export, shards, rdir, parent, echo)
                if eval_metrics:
                    tracking.log_summary_metrics(cfg, parent, {f"eval/{k}": v for k, v in eval_metrics.items()})
            figures = {f"eval.{k}": f"{v:.6g}" for k, v in eval_metrics.items()
                       if isinstance(v, (int, float)) and k.startswith(("psnr", "ssim", "rfid", "lpips", "baseline"))}
            teacher_dir = stage_inputs(cfg, "stage1", rdir).get("teacher") if final_stage != "stage3" else None
            version, uri = tracking.register_model(cfg, parent, export, teacher_dir=teacher_dir, tags={
                "stage": final_stage, "pipeline": cfg.run.name, "preset": cfg.preset, **figures})
            c = tracking.client(cfg)
            c.set_tag(parent, "sftok.model_uri", uri)
            c.set_tag(parent, "sftok.model_version", version)
        generator_metrics: dict = {}
        if want_generator and final_stage is not None:
            generator_metrics = _generator(cfg, results[final_stage].checkpoint_dir, shards, parent, echo)
    result = PipelineResult(cfg.run.name, str(rdir), results, eval_metrics, parent, version, uri,
                            tracking.tracking_uri(cfg), time.time() - t0, generator_metrics)
    echo(summary_table(result))
    echo(f"\nMLflow UI:  {tracking.ui_command(cfg)}")
    return result


def _teacher_path(cfg: Config, rdir: Path) -> Optional[str]:
    if cfg.teacher.weights:
        return cfg.teacher.weights
    p = ckpt.StagePaths(rdir, "stage0")
    return str(ckpt.teacher_file(p.export)) if ckpt.is_done(p) else None


def _evaluate(cfg: Config, export: str, shards: str, rdir: Path, parent: str, echo) -> dict:
    """Reconstruction metrics of the final export (sftok_platform.evaluate), logged as an ``eval`` child run
    of the pipeline run (with one child per decoding step count) and summarised on the parent."""
    try:
        from sftok_platform.evaluate import evaluate_checkpoint
    except ImportError as e:
        echo(f"[pipeline] evaluation skipped: sftok_platform.evaluate is not available ({e}).")
        return {}
    teacher = None
    from sftok.checkpoint import read_model_config
    if not read_model_config(export).pixel_head:
        path = _teacher_path(cfg, rdir)
        teacher = ckpt.load_teacher_export(path, cfg) if path else None
    echo(f"[pipeline] evaluating {export} at {list(cfg.eval.steps)} decoding steps ...")
    metrics = evaluate_checkpoint(export, shards, cfg, steps=list(cfg.eval.steps), teacher=teacher, use_ray=True,
                                  tracking_uri=tracking.tracking_uri(cfg), experiment=cfg.tracking.experiment,
                                  parent_run_id=parent, run_name=f"{cfg.run.name}-eval")
    (rdir / "eval_metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    return {k: float(v) for k, v in _flatten_numbers(metrics).items()}


def _flatten_numbers(d: Any, prefix: str = "") -> dict:
    out: dict = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten_numbers(v, f"{prefix}{k}/" if isinstance(v, dict) else f"{prefix}{k}"))
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        out[prefix.rstrip("/")] = d
    return out


def _generator(cfg: Config, tokenizer_dir: str, shards: str, parent: str, echo) -> dict:
    try:
        from sftok_platform.generator_stage import run_stage4
    except ImportError as e:
        raise ConfigError(f"--with-generator needs sftok_platform.generator_stage ({e}).") from None
    echo("[pipeline] stage4 (generator): starting")
    metrics = run_stage4(cfg, tokenizer_dir, shards, parent) or {}
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracking.log_summary_metrics(cfg, parent, {f"stage4/{k}": v for k, v in numbers.items()})
    return metrics


def summary_table(result: PipelineResult) -> str:
    """A plain-text table: one row per stage plus the evaluation figures."""
    rows = [("stage", "status", "time", "val_loss", "images/s", "export")]
    for s, r in result.stages.items():
        rows.append((s, "skipped (done earlier)" if r.skipped else "trained", f"{r.seconds:.0f}s",
                     _fmt(r.metrics.get("val_loss")), _fmt(r.metrics.get("stage_images_per_s")), r.checkpoint_dir))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["", f"Run {result.run_name!r} finished in {result.seconds:.0f}s  ({result.run_dir})"]
    for i, row in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    ev = result.eval_metrics
    headline = {k: v for k, v in ev.items()
                if k in ("num_images", "rfid", "is", "psnr", "ssim", "lpips", "codebook_usage")
                or (k.startswith("steps/") and k.endswith(("/rfid", "/psnr")))}
    if headline:
        lines.append("\nEvaluation of the final model (all figures: eval_metrics.json and the MLflow eval run):")
        if "psnr" in ev and "baseline_mean_image_psnr" in ev:
            gain = ev["psnr"] - ev["baseline_mean_image_psnr"]
            lines.append(f"  PSNR {ev['psnr']:.2f} dB vs {ev['baseline_mean_image_psnr']:.2f} dB for the mean train "
                         f"image (the best constant guess): {gain:+.2f} dB"
                         + ("" if gain > 1.0 else "  <- NOT LEARNED: about the mean image"))
            if "baseline_image_colour_psnr" in ev:
                lines.append(f"  (each image painted in its own mean colour: {ev['baseline_image_colour_psnr']:.2f} dB)")
        for k, v in sorted(headline.items()):
            lines.append(f"  {k:<20} {_fmt(v)}")
    if result.model_uri:
        promoted = "@" in result.model_uri
        lines.append(f"\nRegistered: {result.model_uri} (version {result.model_version}, an MLflow pyfunc: "
                     "mlflow.pyfunc.load_model(uri).predict(DataFrame({'image': [png_bytes]})))"
                     + ("" if promoted else "; rerun with --promote to move the serving alias to it"))
    g = result.generator_metrics
    if g:
        lines.append(f"\nGenerator (stage 4; {g.get('gfid_label', 'gFID')}):")
        for k in ("gfid", "gfid_vs_val", "inception_score", "num_samples", "train_loss", "train_seconds",
                  "sample_seconds"):
            if k in g:
                lines.append(f"  {k:<20} {_fmt(g[k])}")
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    try:
        return f"{float(v):.4g}"
    except (TypeError, ValueError):
        return str(v)


__all__ = ["StageResult", "PipelineResult", "run_stage", "run_pipeline", "preflight", "stage_inputs",
           "check_same_run", "run_dir", "summary_table"]
