"""Running a sweep: Tune function trainables that drive Ray Train stages (Train V2 pattern), the shared
stages, and ``Tuner``/``Tuner.restore`` around them.

Train V2 pattern (PLATFORM.md 1.3, P1): ``Tuner(TorchTrainer(...))`` is gone, so each trial is a Tune
*function trainable* that calls ``sftok_platform.train.run_stage`` (one ``TorchTrainer.fit()`` per stage)
with a :class:`~sftok_platform.sweeps.runs.SweepReporter` (a ``TuneReportCallback``) that forwards the
workers' reports to Tune. The trial itself reports only its final figures, through ``ray.tune.report``
(never ``ray.train.report``, P2). When ASHA stops a trial, Tune kills the trial actor, the Train controller
dies with it and Train's placement-group cleaner frees the workers, which needs the State API (P8).

Sweep layout (``<run.root>/sweeps/<name>/``)::

    tune/                   Tune experiment state (``Tuner.restore`` reads it)
    runs/shared/            stages every trial reuses (stage 0 teacher, the warm-up stage 1)
    runs/<trial key>/       one pipeline run per trial (``run.root=runs``, ``run.name=<key>``)
    init/                   the fresh initialisation of warm-up-off trials
    report/                 summary.md, summary.csv, plots (also on the sweep's MLflow run)
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ray.tune.search.optuna import OptunaSearch

from sftok_platform.config import Config, ConfigError, apply_override
from sftok_platform import tracking
from sftok_platform.cluster import connect
from sftok_platform.sweeps import report as reporting
from sftok_platform.sweeps import runs
from sftok_platform.sweeps.spaces import (check_decode_steps, check_sweep_arguments, check_warmup,
                                         decode_steps_space, replace_ratio_space, search_space, trial_key,
                                         trial_overrides)

TUNE_DIR = "tune"


# ######################################################################################################
# What every trial of a sweep shares
# ######################################################################################################

@dataclass
class SweepContext:
    """Everything a trial needs besides its own parameters (shipped with ``tune.with_parameters``)."""
    kind: str                      # replace-ratio | decode-steps | search
    name: str                      # sweep name (directory, MLflow tag)
    sweep_dir: str
    cfg: dict                      # base config: run.root=<sweep>/runs, tracking.uri explicit
    shards: str = ""
    parent_run_id: str = ""
    teacher: str = ""              # teacher for stages 1-2 and stage-1/2 decoding (weights file or export)
    stage1_export: str = ""        # shared warm-up (replace-ratio)
    scratch_init: str = ""         # fresh initialisation (warm-up off)
    budget: int = 0                # search: steps of stages 1 + 2 together
    evaluation: str = "val"        # val: the stage's validation figures; full: sftok_platform.evaluate
    eval_steps: tuple = ()
    checkpoint: str = ""           # decode-steps: the export being evaluated
    debug: Optional[dict] = None   # fault injection, forwarded to run_stage (tests)

    def config(self, overrides: Optional[dict] = None) -> Config:
        from sftok_platform.train.loop import config_from_dict
        cfg = config_from_dict(self.cfg)
        for k, v in (overrides or {}).items():
            apply_override(cfg, k, v)
        return cfg.validate()


def sweep_config(cfg: Config, sweep_dir: Path) -> Config:
    """The base config of every trial: runs live under the sweep; the tracking URI stays the user's."""
    from sftok_platform.train.loop import config_from_dict
    cfg = config_from_dict(cfg.to_dict())          # a copy
    uri = tracking.tracking_uri(cfg)
    if uri.startswith("sqlite:"):
        tracking.run_root(cfg).mkdir(parents=True, exist_ok=True)
        if not cfg.tracking.uri:
            # keep the same DB and artifact store as the user's pipeline runs, not one per sweep dir
            cfg.tracking.uri = uri
    cfg.run.root = str(sweep_dir / "runs")
    return cfg


def _write_scratch_init(cfg: Config, directory: Path) -> str:
    """A freshly initialised stage-1/2 model saved as an export: stage 2 "without warm-up" loads it."""
    import torch

    from sftok.checkpoint import save_model
    from sftok.model import SFTok
    if (directory / "config.json").is_file():
        return str(directory)
    torch.manual_seed(cfg.train.seed)
    model = SFTok(dataclasses.replace(cfg.model, pixel_head=False))
    save_model(model, directory)
    return str(directory)


def _teacher_path(cfg: Config) -> str:
    if not cfg.teacher.weights:
        return ""
    from sftok.weights import resolve_weight
    try:
        return str(resolve_weight(cfg.teacher.weights, "teacher.weights"))
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None


def prepare_shared(ctx: SweepContext, *, need_stage1: bool, echo: Callable[[str], None] = print) -> SweepContext:
    """Train (or find) what the trials share: the stage-0 teacher (without ``teacher.weights``) and, for a
    grid with warm-up, the stage-1 run. Runs in the sweep driver before any trial starts."""
    from sftok_platform.train import run_stage
    cfg = ctx.config({"run.name": "shared"})
    teacher = _teacher_path(cfg)
    if not teacher:
        echo("[sweep] shared stage0 (teacher) ...")
        teacher = run_stage(cfg, "stage0", shards=ctx.shards, parent_run_id=ctx.parent_run_id).checkpoint_dir
    ctx = dataclasses.replace(ctx, teacher=teacher)
    if need_stage1:
        echo("[sweep] shared stage1 (warm-up) ...")
        res = run_stage(cfg, "stage1", shards=ctx.shards, parent_run_id=ctx.parent_run_id,
                        inputs={"teacher": teacher})
        ctx = dataclasses.replace(ctx, stage1_export=res.checkpoint_dir)
    ctx = dataclasses.replace(ctx, scratch_init=_write_scratch_init(cfg, Path(ctx.sweep_dir) / "init"))
    return ctx


# ######################################################################################################
# Trainables
# ######################################################################################################

TRIAL_RESULT = "trial.json"


def _trial_result_path(cfg: Config) -> Path:
    return tracking.run_root(cfg) / cfg.run.name / TRIAL_RESULT


def _reported_again(cfg: Config) -> bool:
    """A resumed grid sweep reruns every trial: a trial that had finished reports the figures it recorded
    (``<trial run dir>/trial.json``) again instead of training or evaluating again. True if it did."""
    from ray import tune
    path = _trial_result_path(cfg)
    if not path.is_file():
        return False
    tune.report(json.loads(path.read_text()))
    return True


def _report_finished(cfg: Config, result: dict) -> None:
    """Record a finished trial's figures (atomically: a kill leaves the old file or the new one), then report."""
    from ray import tune
    from sftok_platform.train.checkpointing import write_json_atomic
    write_json_atomic(_trial_result_path(cfg), result)
    tune.report(result)


def train_trial(config: dict, ctx: SweepContext) -> None:
    """One training trial: (stage 1 when the trial owns its warm-up) -> stage 2 -> final figures.

    Grid trials with warm-up start stage 2 from the shared stage-1 export; search trials train their own
    stage 1 for their share of the budget. Each stage is a ``run_stage`` call named after the trial key,
    so a restored trial resumes from its last Ray Train checkpoint or skips finished stages.
    """
    from ray import tune

    from sftok_platform.train import run_stage
    params = {k: v for k, v in config.items()}
    key = trial_key(params, tune.get_context().get_trial_id())
    base = ctx.config()
    overrides = trial_overrides(params, base, budget=ctx.budget or None)
    overrides["run.name"] = key
    cfg = ctx.config(overrides)
    if _reported_again(cfg):
        return
    uri = tracking.tracking_uri(cfg)
    own_warmup = ctx.kind == "search" and cfg.stage1.steps > 0
    objective_key = reporting.objective(cfg)[0] if ctx.kind == "search" else ""
    warm = own_warmup if ctx.kind == "search" else bool(params.get("warmup", True))
    logged = {**params, "trial_key": key, "warmup": warm, "stage1.steps": cfg.stage1.steps if warm else 0,
              "stage2.steps": cfg.stage2.steps, "stage2.replace_prob": cfg.stage2.replace_prob,
              "stage2.unmasked_weight": cfg.stage2.unmasked_weight, "stage2.lr": cfg.stage2.lr,
              "train.seed": cfg.train.seed}
    run_id = runs.start_trial_run(cfg, ctx.name, ctx.parent_run_id, key, logged)
    offset = 0
    with tracking.run_closed_by(uri, run_id):
        if own_warmup:
            s1 = run_stage(cfg, "stage1", shards=ctx.shards, parent_run_id=run_id, inputs={"teacher": ctx.teacher},
                           callbacks=[runs.SweepReporter("stage1", 0, uri, run_id, objective_key)], debug=ctx.debug)
            init, offset = s1.checkpoint_dir, cfg.stage1.steps
        elif warm:
            init, offset = ctx.stage1_export, base.stage1.steps
        else:
            init = ctx.scratch_init
        s2 = run_stage(cfg, "stage2", shards=ctx.shards, parent_run_id=run_id,
                       inputs={"teacher": ctx.teacher, "init": init},
                       callbacks=[runs.SweepReporter("stage2", offset, uri, run_id, objective_key)], debug=ctx.debug)
        final = {k: float(v) for k, v in s2.metrics.items() if isinstance(v, (int, float))}
        if ctx.evaluation == "full":
            final.update(evaluate_export(s2.checkpoint_dir, ctx, cfg, list(ctx.eval_steps or cfg.eval.steps),
                                         use_ray=True))
        final.update(sweep_step=offset + cfg.stage2.steps, trial_done=1.0)
        if objective_key:
            final["objective"] = final.get(objective_key, float("nan"))
        runs.log_metrics(uri, run_id, final, step=final["sweep_step"])
        tracking.client(uri).set_tag(run_id, "sftok.export", s2.checkpoint_dir)
    _report_finished(cfg, {**final, "trial_key": key, "stage": "done", "export": s2.checkpoint_dir})


def eval_trial(config: dict, ctx: SweepContext) -> None:
    """One decode-steps trial: evaluate the fixed export at ``config["steps"]`` decoding steps (no training)."""
    steps = int(config["steps"])
    key = trial_key(config)
    cfg = ctx.config({"run.name": key})
    if _reported_again(cfg):
        return
    uri = tracking.tracking_uri(cfg)
    run_id = runs.start_trial_run(cfg, ctx.name, ctx.parent_run_id, key, {"steps": steps, "checkpoint": ctx.checkpoint})
    t0 = time.time()
    with tracking.run_closed_by(uri, run_id):
        metrics = evaluate_export(ctx.checkpoint, ctx, cfg, [steps])
        metrics = {k.replace(f"_{steps}step", ""): v for k, v in metrics.items()}
        metrics["eval_seconds"] = time.time() - t0
        runs.log_metrics(uri, run_id, metrics, step=steps)
    _report_finished(cfg, {**metrics, "steps": steps, "trial_key": key, "trial_done": 1.0})


# ######################################################################################################
# Evaluation of one export
# ######################################################################################################

def evaluate_export(export: str, ctx: SweepContext, cfg: Config, steps: list[int], *,
                    use_ray: bool = False) -> dict[str, float]:
    """Reconstruction figures of ``export`` at each decoding step count, as ``<metric>_<n>step``.

    Reuses the evaluation module (``sftok_platform.evaluate.evaluate_checkpoint``: rFID, IS, PSNR, SSIM,
    LPIPS, codebook usage/entropy; rFID is comparable to papers only with ``eval.inception_weights`` set,
    which ``eval_inception_real`` records). ``use_ray=False`` evaluates in this process (decode-steps
    trials are sized for it); ``True`` uses its Ray Data actor pool (training trials, whose driver holds
    almost no CPU). Without the module: a small fallback (PSNR and token accuracy against the teacher).
    """
    from sftok.checkpoint import read_model_config
    from sftok_platform.train import checkpointing as ckpt
    teacher = None
    if not read_model_config(export).pixel_head:
        if not ctx.teacher:
            raise ConfigError(f"{export} is a stage-1/2 model: decoding to pixels needs the teacher; pass "
                              "--teacher <stage0 export or teacher weights> (or teacher.weights=...).")
        teacher = ckpt.load_teacher_export(ctx.teacher, cfg)
    try:
        from sftok_platform.evaluate import evaluate_checkpoint
    except ImportError:
        return _fallback_eval(export, teacher, ctx.shards, cfg, steps)
    out = evaluate_checkpoint(export, ctx.shards, cfg, steps=steps, teacher=teacher, use_ray=use_ray,
                              cpus_per_actor=1.0)
    return reporting.flatten_eval(out)


def _fallback_eval(export: str, teacher, shards: str, cfg: Config, steps: list[int]) -> dict[str, float]:
    import torch

    from sftok.checkpoint import load_model
    from sftok_platform.data import read_split
    model = load_model(export).eval()
    limit = cfg.eval.max_images or 10 ** 9
    sums: dict[str, float] = {}
    n = 0
    with torch.no_grad():
        for batch in read_split(shards, "val", train=False, image_size=cfg.model.image_size).iter_torch_batches(
                batch_size=cfg.eval.batch_size):
            images = batch["image"].float()[: limit - n]
            tokens = model.encode(images)
            codes = teacher.encode_codes(images) if teacher is not None else None
            for s in steps:
                res = model.decode(tokens, num_steps=s, temperature=0.0)
                recon = (teacher.decode_codes(res.ids) if teacher is not None
                         else model.decode_tokens(tokens, num_steps=s, temperature=0.0)).clamp(0, 1)
                mse = ((recon - images) ** 2).flatten(1).mean(1).clamp_min(1e-10)
                sums[f"psnr_{s}step"] = sums.get(f"psnr_{s}step", 0.0) + float((10 * torch.log10(1 / mse)).sum())
                if codes is not None:
                    acc = (res.ids == codes).float().mean(1).sum()
                    sums[f"accuracy_{s}step"] = sums.get(f"accuracy_{s}step", 0.0) + float(acc)
            n += images.shape[0]
            if n >= limit:
                break
    return {k: v / max(n, 1) for k, v in sums.items()}


# ######################################################################################################
# The sweep
# ######################################################################################################

@dataclass
class SweepResult:
    name: str
    kind: str
    sweep_dir: str
    parent_run_id: str
    tracking_uri: str
    rows: list[dict]
    report_files: dict[str, str]
    seconds: float
    result_grid: Any = None
    teacher: str = ""              # the teacher the trials used (stage-0 export or teacher.weights)


def _check_tune_state(tune_path: Path) -> None:
    """Refuse to restore a search whose newest Tune state file is empty (a kill during Tune's state upload
    leaves it so, and the restore would silently start a different experiment)."""
    newest: dict[str, Path] = {}          # per kind of state file (experiment, searcher, ...): the newest
    for path in tune_path.glob("*state-*"):
        if path.name.startswith("tmp"):            # Tune's half-written temporaries are never read
            continue
        kind = path.name.rsplit("state-", 1)[0]
        if kind not in newest or path.name > newest[kind].name:      # names end in a sortable timestamp
            newest[kind] = path
    for path in newest.values():
        if path.stat().st_size == 0:
            raise RuntimeError(f"{path} is empty: the search was killed while Tune saved its state, so it "
                               f"cannot be restored. Its finished trials stay in MLflow; start the search again "
                               f"under a new --name.")


def _sweep_dir(cfg: Config, name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"sweep name {name!r}: use a plain directory name such as replace-ratio-tiny.")
    return tracking.run_root(cfg) / "sweeps" / name


def run_sweep(kind: str, cfg: Config, *, name: Optional[str] = None, resume: bool = False,
              ratios=None, warmup=(True, False), seeds=(0,), steps=None, checkpoint: str = "",
              teacher: str = "", trials: int = 16, fixed: Optional[dict] = None, ranges: Optional[dict] = None,
              concurrency: Optional[int] = None, driver_cpus: float = 0.25, eval_cpus: float = 1.0,
              eval_gpus: float = 0.0, evaluation: str = "val", asha: bool = True, grace_steps: Optional[int] = None,
              optuna_seed: int = 0, points_to_evaluate: Optional[list] = None, debug: Optional[dict] = None,
              num_cpus: Optional[float] = None, echo: Callable[[str], None] = print) -> SweepResult:
    """Run (or, with ``resume``, restore and finish) one sweep; returns the per-trial rows and report files.

    Args:
        kind: ``replace-ratio``, ``decode-steps`` or ``search`` (see :mod:`sftok_platform.sweeps.spaces`).
        cfg: the resolved base config (preset + overrides).
        name: sweep name (default: the kind); the same name + ``resume=True`` continues an interrupted sweep.
        concurrency: trials at once (default: what the cluster's CPUs/GPUs fit).
        driver_cpus: CPUs reserved by each trial's driver function (it only waits on the Train run).
        evaluation: ``val`` (stage validation CE/PSNR, cheap) or ``full`` (the evaluation module: rFID, ...).
        asha / grace_steps: search only: ASHA early stopping on the training loss at equal ``sweep_step``.
        debug: fault injection forwarded to ``run_stage`` (tests).
    """
    from ray import tune
    check_sweep_arguments(kind, evaluation=evaluation, ratios=ratios, warmup=warmup, seeds=seeds, steps=steps,
                          checkpoint=checkpoint, trials=trials, fixed=fixed, ranges=ranges, concurrency=concurrency,
                          driver_cpus=driver_cpus, eval_cpus=eval_cpus, eval_gpus=eval_gpus, grace_steps=grace_steps,
                          optuna_seed=optuna_seed, num_cpus=num_cpus, budget=cfg.stage1.steps + cfg.stage2.steps)
    if kind == "decode-steps":
        checkpoint = resolve_export(checkpoint)
    t0 = time.time()
    name = name or kind
    sweep_dir = _sweep_dir(cfg, name)
    tune_path = sweep_dir / TUNE_DIR
    exists = tune.Tuner.can_restore(str(tune_path)) if tune_path.exists() else False
    if exists and not resume:
        raise ConfigError(f"sweep {name!r} already exists in {sweep_dir}. Continue it with --resume, or start "
                          f"a new one with --name <other name>.")
    if resume and not exists:
        echo(f"[sweep] nothing to resume in {tune_path}; starting sweep {name!r} afresh")
    resources = connect(num_cpus=num_cpus)
    from sftok_platform.cluster import resolve_tracking_uri
    resolve_tracking_uri(cfg, echo=echo)
    base = sweep_config(cfg, sweep_dir)
    if kind != "decode-steps":
        check_trial_fits(resources, base, driver_cpus)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    base.save(sweep_dir / "config.yaml")
    uri = tracking.tracking_uri(base)

    # -------------------------------------------------------------- what the trials share
    if kind == "decode-steps":
        ratios_or_steps = list(steps or base.eval.steps or (1, 2, 4, 8, 16))
        space = decode_steps_space(ratios_or_steps)
        description = {"kind": kind, "checkpoint": checkpoint, "steps": ratios_or_steps}
    elif kind == "replace-ratio":
        space = replace_ratio_space(ratios if ratios is not None else (0.0, 0.5, 0.8, 1.0), warmup, seeds)
        description = {"kind": kind, "ratios": list(ratios or (0.0, 0.5, 0.8, 1.0)), "warmup": list(warmup),
                       "seeds": list(seeds), "stage1.steps": base.stage1.steps, "stage2.steps": base.stage2.steps}
    else:
        space = search_space(fixed, ranges)
        description = {"kind": kind, "trials": trials, "budget": base.stage1.steps + base.stage2.steps,
                       "fixed": json.dumps(fixed or {}), "ranges": json.dumps(ranges or {}), "asha": asha}
    parent = runs.start_sweep_run(base, name, kind, description)
    from sftok_platform.data import ensure_dataset
    shards = ensure_dataset(cfg)          # the user's run root: data shared with pipeline runs and other sweeps
    ctx = SweepContext(kind=kind, name=name, sweep_dir=str(sweep_dir), cfg=base.to_dict(), shards=shards,
                       parent_run_id=parent, budget=base.stage1.steps + base.stage2.steps, evaluation=evaluation,
                       eval_steps=tuple(base.eval.steps), checkpoint=checkpoint, debug=debug)
    with tracking.run_closed_by(uri, parent, finish=False):     # ends FINISHED, or KILLED with trials left
        if kind == "decode-steps":
            ctx = dataclasses.replace(ctx, teacher=teacher or _teacher_path(base) or _find_teacher(checkpoint))
        else:
            ctx = prepare_shared(ctx, need_stage1=kind == "replace-ratio" and any(warmup), echo=echo)

        # -------------------------------------------------------------- resources per trial and Tune
        t = base.train
        if kind == "decode-steps":
            per_trial = {"cpu": eval_cpus, **({"gpu": eval_gpus} if eval_gpus else {})}
            trainable = tune.with_resources(tune.with_parameters(eval_trial, ctx=ctx), per_trial)
            fits = _fits(resources, per_trial)
        else:
            per_trial = {"cpu": driver_cpus}
            trainable = tune.with_resources(tune.with_parameters(train_trial, ctx=ctx), per_trial)
            # a worker computes on max(cpus_per_worker, torch_threads) cores: two tiny trials of 2-thread
            # workers on a 2-core laptop oversubscribed it (7-13 img/s each vs ~65 img/s for one alone)
            fits = _fits(resources, {"cpu": driver_cpus + t.workers * max(t.cpus_per_worker, t.torch_threads),
                                     **({"gpu": t.workers} if t.gpu else {})}, spare_cpus=1)
        max_concurrent = concurrency or fits
        if kind == "search":
            # Intermediate results carry training figures (ASHA's "loss"), the final one the validation
            # figures (Optuna's objective); Tune's strict check wants every metric in every result.
            os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        echo(f"[sweep] {name}: {kind}, up to {max_concurrent} trial(s) at once, resources per trial "
             f"{per_trial} + Train workers {t.workers} x {t.cpus_per_worker} CPU{' + GPU' if t.gpu else ''}"
             if kind != "decode-steps" else
             f"[sweep] {name}: decode-steps on {checkpoint}, up to {max_concurrent} trial(s), {per_trial} each")
        run_config = tune.RunConfig(name=TUNE_DIR, storage_path=str(sweep_dir),
                                    failure_config=tune.FailureConfig(max_failures=0))
        if exists and resume and kind == "search":
            # Optuna's and ASHA's state live only in Tune's experiment files: restore them
            _check_tune_state(tune_path)
            echo(f"[sweep] restoring {tune_path} (finished trials are kept, interrupted ones resume by name)")
            tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=True)
        else:
            if exists and resume:
                # A grid is fixed and its trials are named by their parameters, so the grid is simply run
                # again: finished trials report their recorded figures (trial.json), interrupted ones resume
                # their stages from the last Ray Train checkpoints, the rest start. Tuner.restore is not
                # used: a SIGKILL during Tune's own state upload once left its searcher state empty, and
                # the restored sweep then ran one trial with no parameters and lost the others.
                kept = tune_path.with_name(f"{TUNE_DIR}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}")
                tune_path.rename(kept)
                echo(f"[sweep] resuming: the grid runs again (finished trials are kept, interrupted ones resume "
                     f"from their checkpoints); Tune's old state moved to {kept.name}")
            tuner = tune.Tuner(trainable, param_space=space, run_config=run_config,
                               tune_config=_tune_config(kind, base, trials, max_concurrent, asha, grace_steps,
                                                        optuna_seed, points_to_evaluate))
        grid = tuner.fit()

        # -------------------------------------------------------------- table, plots, MLflow
        rows = reporting.collect_rows(grid, kind, budget=ctx.budget)
        _close_stopped_trials(base, parent, rows)
        files = reporting.write_report(rows, kind, sweep_dir / "report", title=f"sweep {name!r} ({kind})",
                                       notes=_notes(base, kind, evaluation))
        reporting.log_report(uri, parent, files, rows)
        echo(Path(files["markdown"]).read_text())
        unfinished = [r["trial_key"] for r in rows if r["status"] in ("interrupted", "error")]
        if unfinished:
            echo(f"[sweep] {len(unfinished)} trial(s) interrupted or failed ({', '.join(unfinished)}): rerun the same "
                 f"command with --resume to finish them.")
        tracking.end_run(uri, parent, "KILLED" if unfinished else "FINISHED")
    return SweepResult(name, kind, str(sweep_dir), parent, uri, rows, files, time.time() - t0, grid, ctx.teacher)


ABLATION_RATIOS = (0.0, 1.0)


def run_ablation(cfg: Config, *, name: Optional[str] = None, seeds=(0, 1, 2), steps=(1, 2, 4, 8),
                 warmup=(True, False), resume: bool = False, echo: Callable[[str], None] = print,
                 **sweep_kwargs):
    """The laptop ablation (README, "The laptop ablation"): SFVR (replace_prob 1.0) against vanilla (0.0),
    with and without warm-up (``warmup``: both by default; ``(True,)`` halves the trials when only the
    SFVR-vs-vanilla comparison is wanted), one trial per seed; then a decode-steps sweep on the export of the
    first seed's SFVR trial (the warm-up one where it ran). Two sweeps, ``<name>`` and
    ``<name>-decode-steps``; returns both results.

    ``sweep_kwargs`` go to both :func:`run_sweep` calls (``concurrency``, ``num_cpus``, ``evaluation`` ...).
    """
    # the grid's arguments are checked by its run_sweep; the decode half's steps here, not ~25 minutes later
    warmup = tuple(check_warmup(warmup))
    check_decode_steps(steps)
    name = name or "ablation"
    grid = run_sweep("replace-ratio", cfg, name=name, resume=resume, ratios=ABLATION_RATIOS,
                     warmup=warmup, seeds=seeds, echo=echo, **sweep_kwargs)
    export = next((r.metrics.get("export") for r in grid.result_grid
                   if r.error is None and (r.config or {}).get("replace_prob") == 1.0
                   and bool((r.config or {}).get("warmup")) == warmup[0]
                   and (r.config or {}).get("seed") == seeds[0]), None)
    if not export:
        raise RuntimeError(f"sweep {name!r}: the SFVR {'warm-up' if warmup[0] else 'no-warm-up'} trial of seed "
                           f"{seeds[0]} has no export, so the decode-steps half cannot run; finish the sweep "
                           f"with --resume first.")
    decode_kwargs = {k: v for k, v in sweep_kwargs.items() if k in ("num_cpus", "concurrency")}
    decode = run_sweep("decode-steps", cfg, name=f"{name}-decode-steps", resume=resume, checkpoint=export,
                       teacher=grid.teacher, steps=list(steps), echo=echo, **decode_kwargs)
    return grid, decode


def _tune_config(kind: str, base: Config, trials: int, max_concurrent: int, asha: bool,
                 grace_steps: Optional[int], optuna_seed: int, points: Optional[list]):
    from ray import tune
    if kind != "search":
        return tune.TuneConfig(max_concurrent_trials=max_concurrent, num_samples=1)
    from ray.tune.schedulers import ASHAScheduler
    budget = base.stage1.steps + base.stage2.steps
    # Optuna learns from the final validation figure (multi-step PSNR); ASHA compares the training loss at
    # equal sweep_step (trials stopped early have no final figure and count as pruned in Optuna). Caveat:
    # SFVR makes the training task harder, so ASHA's training-loss cut is biased towards low replace_prob.
    _, mode = reporting.objective(base)
    searcher = _OptunaSearch(metric="objective", mode=mode, seed=optuna_seed, points_to_evaluate=points or None)
    scheduler = None
    if asha:
        grace = grace_steps or max(1, budget // 4)
        scheduler = ASHAScheduler(time_attr="sweep_step", metric="loss", mode="min", max_t=budget,
                                  grace_period=grace, reduction_factor=2, stop_last_trials=False)
    return tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=trials,
                           max_concurrent_trials=max_concurrent)


class _OptunaSearch(OptunaSearch):
    """Tells Optuna "pruned" (instead of a NaN value) for trials that ended without the objective, i.e. the
    ones ASHA stopped before their validation figure existed."""

    def on_trial_complete(self, trial_id, result=None, error=False):
        if result and isinstance(result.get(self.metric), float) and math.isnan(result[self.metric]):
            result = {k: v for k, v in result.items() if k != self.metric}
        super().on_trial_complete(trial_id, result, error)


def check_trial_fits(resources: dict, cfg: Config, driver_cpus: float) -> None:
    """Refuse, before any work, a training sweep whose one trial cannot run on this cluster.

    A trial holds its driver's CPUs and its Train workers' CPUs for its whole life, and the workers' Ray
    Data readers need at least one more free CPU. Without it the trial waits for data forever. This was seen
    on a 2-CPU head with ``ray job submit``.
    """
    t = cfg.train
    need = driver_cpus + t.workers * t.cpus_per_worker + 1.0
    have = float(resources.get("CPU", 0))
    if have < need:
        raise ConfigError(
            f"one training trial needs {need:g} CPUs: {driver_cpus:g} for the trial driver (--driver-cpus) + "
            f"{t.workers} x {t.cpus_per_worker} for the Train workers (--workers, train.cpus_per_worker) + 1 for "
            f"Ray Data's readers. This cluster has {have:g}. Give Ray more logical CPUs (e.g. `ray start --head "
            f"--num-cpus {math.ceil(need)}`; a local Ray started by the sweep gets the cores + 2), or lower "
            f"--driver-cpus or the workers.")
    if t.gpu and float(resources.get("GPU", 0)) < t.workers:
        raise ConfigError(f"one training trial needs {t.workers} GPUs (--workers {t.workers} --gpu); this cluster "
                          f"has {resources.get('GPU', 0):g}. Use fewer workers or add GPU nodes.")


def _fits(resources: dict, per_trial: dict, spare_cpus: float = 0.0) -> int:
    """How many trials the cluster runs at once (one CPU is left for Ray Data next to the workers)."""
    n = int((float(resources.get("CPU", 1)) - spare_cpus) // max(per_trial.get("cpu", 1), 1e-6))
    if per_trial.get("gpu"):
        n = min(n, int(float(resources.get("GPU", 0)) // per_trial["gpu"]))
    return max(1, n)


def _close_stopped_trials(cfg: Config, parent: str, rows: list[dict]) -> None:
    """Give each trial run the status Tune decided, which the trial cannot know for itself.

    Runs of trials that ASHA stopped, or that an interrupted sweep left behind, are still RUNNING: they
    become KILLED, and crashed ones become FAILED. A trial that ASHA stops can also get far enough through
    its own ``except`` block to mark its run FAILED before its actor dies. Tune's verdict ("stopped early")
    overrides that, so a stopped trial never shows as a crash. A resumed sweep reopens the runs.
    """
    uri = tracking.tracking_uri(cfg)
    for key, run in runs.trial_runs(cfg, parent).items():
        row = next((r for r in rows if r.get("trial_key") == key), {})
        verdict = row.get("status", "unknown")
        stopped_marked_failed = run.info.status == "FAILED" and verdict == "stopped early"
        if run.info.status == "RUNNING" or stopped_marked_failed:
            status = "FAILED" if verdict == "error" else "KILLED"
            tracking.client(uri).set_tag(run.info.run_id, "sftok.trial_status", verdict)
            tracking.end_run(uri, run.info.run_id, status)


def _notes(cfg: Config, kind: str, evaluation: str) -> list[str]:
    img = cfg.model.image_size
    notes = [f"preset {cfg.preset}: encoder {cfg.model.encoder_size}, decoder {cfg.model.decoder_size}, "
             f"{cfg.model.num_latent_tokens} tokens, {img}x{img} images; data {cfg.data.path or 'built-in synthetic'}."]
    if kind == "replace-ratio":
        notes.append(f"stage 1 (warm-up, shared): {cfg.stage1.steps} steps, stage 2: {cfg.stage2.steps} steps, "
                     f"global batch {cfg.stage2.global_batch_size}, lr {cfg.stage2.lr:g}.")
    elif kind == "search":
        notes.append(f"step budget {cfg.stage1.steps + cfg.stage2.steps} (stage 1 + stage 2), split per trial by "
                     f"stage1_fraction; global batch {cfg.stage2.global_batch_size}. Optuna maximises "
                     f"{reporting.objective(cfg)[0]}; ASHA stops on the training loss at equal steps.")
    if kind == "decode-steps":
        notes.append("Metric: the evaluation module (sftok_platform.evaluate) on the val split at each step count; "
                     "a stage-1/2 export decodes its hard codes through the teacher decoder, a stage-3 export "
                     "through its own pixel head.")
    elif evaluation == "val":
        notes.append(f"Metric: validation of the stage-2 EMA model on {cfg.eval.stage_val_images} images of the val "
                     "split (eval.stage_val_images): val CE = 1-step cross-entropy "
                     "against the teacher codes; PSNR / token accuracy after n-step deterministic decoding "
                     "through the teacher decoder. No rFID (run with --evaluation full for rFID).")
    return notes


def resolve_export(path: str) -> str:
    """An export dir (``model.safetensors`` + ``config.json``) from a stage dir, a run dir or the export."""
    p = Path(path).expanduser().resolve()
    for cand in (p, p / "export", p / "stages" / "stage3" / "export", p / "stages" / "stage2" / "export"):
        if (cand / "config.json").is_file() and (cand / "model.safetensors").is_file():
            return str(cand)
    raise ConfigError(f"--checkpoint {path}: no model.safetensors + config.json there (nor in export/ or "
                      "stages/stage3/export/). Pass a stage export, e.g. runs/<run>/stages/stage3/export.")


def _find_teacher(export: str) -> str:
    """The stage-0 export next to a stage export of the same run (for stage-1/2 checkpoints)."""
    p = Path(export)
    for cand in (p.parent.parent / "stage0" / "export", p.parent.parent.parent / "stage0" / "export"):
        if (cand / "teacher.safetensors").is_file():
            return str(cand)
    return ""


__all__ = ["SweepContext", "SweepResult", "run_sweep", "run_ablation", "train_trial", "eval_trial",
           "evaluate_export", "resolve_export", "prepare_shared", "sweep_config"]
