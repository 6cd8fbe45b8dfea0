"""``train_loop_per_worker``: the one training loop every stage runs inside a Ray Train worker.

What a stage trains (models, losses, the discriminator) comes from :mod:`sftok_platform.train.stages`;
this file is the machinery around it, the same for every stage:

* DDP through ``ray.train.torch.prepare_model`` (gloo on CPU, NCCL on GPU), AdamW with the official
  no-decay groups, warm-up + cosine LR per optimiser update, grad clip, EMA, autocast (bf16 on GPU by
  default, fp16 + GradScaler when asked, fp32 on CPU) and gradient accumulation. The global batch is a
  property of the stage: each worker draws ``global_batch_size / (workers * grad_accum)`` images per
  micro-batch, so changing the worker count does not change the optimisation.
* Every rank calls ``ray.train.report`` on the same steps (a barrier, PLATFORM.md P7); only rank 0 passes
  the checkpoint (model, EMA, optimizer, scaler, discriminator + its optimizer, step, all ranks' RNG states,
  resolved config). A restarted worker group, or a rerun of the same run name, continues from
  ``ray.train.get_checkpoint()`` with the same optimizer state and step. The data position is not restored
  (no mid-epoch resume in OSS Ray 2.60): the shuffle is reseeded instead, as 1d-tokenizer does.
* Curves go to MLflow from rank 0 (all-reduced over ranks): Ray V2 keeps only metrics attached to
  checkpoints (P3). Rank 0 also prints one progress line per ``train.log_every`` steps.
* At the last step rank 0 writes the stage export (EMA weights) that the next stage loads, logs image grids
  and computes a validation metric that goes into the final report (Tune reads it from there).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from sftok_platform.config import Config, load_config
from sftok_platform.data.reader import as_float_images
from sftok.ema import EMA
from sftok.optim import lr_at, set_lr
from sftok_platform.tracking import StageLogger
from sftok_platform.train import checkpointing as ckpt
from sftok_platform.train.stages import TrainingTask, build_stage, stage_optim_config


def config_from_dict(d: dict) -> Config:
    """Rebuild the resolved :class:`Config` shipped to the workers as a plain dict."""
    return load_config(None, overrides=d, validate=False)


# ######################################################################################################
# Small helpers
# ######################################################################################################

def say(message: str) -> None:
    """One progress line on the driver's terminal. Written to the worker's real stdout, which Ray forwards:
    ``print`` is patched by Train V2 and would show each line twice once MLflow wraps ``sys.stdout``."""
    out = sys.__stdout__ or sys.stdout
    out.write(message + "\n")
    out.flush()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype (None = fp32). ``auto``: bf16 on GPU, fp32 on CPU."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision=fp16 needs a GPU (GradScaler); use fp32 or bf16 on CPU.")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def quiet_worker_console() -> None:
    """Ray Train V2 logs every ``ray.train.report`` as an INFO line ("Reporting training result N:
    TrainingReport(...)") through a logger named after its source file, which ``LoggingConfig`` does not
    reach; on the console those lines drown the stage's own progress lines. The same figures are in MLflow
    and in those progress lines, so that one logger is raised to WARNING in each worker, and so is MLflow's
    system-metrics logger (two INFO lines per stage: "Skip logging GPU metrics", "Started monitoring")."""
    import logging
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:           # another Ray layout: leave its logging alone
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over ranks (every rank must call this with the same keys)."""
    if not values or not dist_ready() or torch.distributed.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    t /= torch.distributed.get_world_size()
    return dict(zip(keys, t.tolist()))


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    if dist_ready() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t


def all_reduce_max(x: float, device: torch.device) -> float:
    if not dist_ready() or torch.distributed.get_world_size() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


class StageDiverged(RuntimeError):
    """The loss or gradient norm stayed non-finite for more than ``train.max_nonfinite_steps`` steps."""


def step_is_finite(loss: torch.Tensor, grad_norm: torch.Tensor, device: torch.device) -> bool:
    """Whether this step's loss and gradient norm are finite on **every** rank (one all-reduce of a flag),
    so all ranks skip or apply the same updates and their weights stay identical."""
    flag = (torch.isfinite(loss.detach().float()) & torch.isfinite(grad_norm.float())).to(torch.float32)
    if dist_ready() and torch.distributed.get_world_size() > 1:
        flag = flag.reshape(1).to(device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def config_fingerprint(cfg: Config) -> str:
    import hashlib
    return hashlib.sha1(cfg.to_yaml().encode()).hexdigest()[:12]


def refuse_hopeless_restart(paths: ckpt.StagePaths, cfg: Config, start_step: int, rank: int,
                            launched_at: float = 0.0) -> None:
    """Stop Ray's retries (``train.max_failures``, -1 = unlimited on the b64/l64 presets) where they cannot
    help: a stage that diverged with this same config would replay the same steps from its last checkpoint
    into the same divergence (a changed config may go on); and a stage whose last
    ``train.max_restarts_without_progress`` attempts since this launch (``run_stage``'s ``fit()``, at
    ``launched_at``) each died before finishing a step is crash-looping."""
    journal = ckpt.read_journal(paths)
    fruitless = 0
    for entry in journal:
        if entry.get("event") == "start":
            fruitless += entry.get("t", 0.0) >= launched_at
        elif "loss" in entry:
            fruitless = 0
    if fruitless >= cfg.train.max_restarts_without_progress:
        raise RuntimeError(f"{paths.stage}: the last {fruitless} attempts each failed before finishing a step; "
                           "not restarting again (train.max_restarts_without_progress). See the worker errors "
                           "above, fix the cause and rerun the same command to resume.")
    message = divergence_message(paths, cfg, after_step=start_step)
    if message:
        if rank == 0:
            ckpt.journal(paths, event="refused_replay", step=start_step, t=round(time.time(), 3))
        raise StageDiverged(message)


def divergence_message(paths: ckpt.StagePaths, cfg: Config, after_step: int = -1) -> Optional[str]:
    """The journal's message of a divergence of this stage with this same config beyond ``after_step``."""
    fp = config_fingerprint(cfg)
    for entry in reversed(ckpt.read_journal(paths)):
        if entry.get("event") == "diverged" and entry.get("config") == fp and int(entry.get("step", 0)) > after_step:
            return entry["message"]
    return None


def codebook_stats(counts: torch.Tensor) -> dict[str, float]:
    """Usage (fraction of codes hit) and perplexity (exp entropy) of an all-reduced code histogram."""
    total = counts.sum().clamp_min(1)
    p = counts.double() / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"codebook_usage": float((counts > 0).double().mean()), "codebook_perplexity": float(entropy.exp())}


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import psutil
        return psutil.Process().memory_info().rss / 2**20
    except Exception:
        return 0.0


def fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def maybe_compile(model: torch.nn.Module, cfg: Config) -> None:
    """``train.compile``: ``nn.Module.compile`` compiles ``forward`` in place, so parameter names (EMA,
    checkpoints, the next stage's init) are unchanged and the other methods (encode, the multi-step decode
    of validation) keep running eagerly."""
    if cfg.train.compile:
        model.compile()


def maybe_fail(debug: Optional[dict], step: int, rank: int) -> None:
    """Fault injection for the resume tests: fail after step k on one rank, once if a marker file is given."""
    if not debug or step != debug.get("fail_after_step") or rank != debug.get("fail_rank", 0):
        return
    marker = debug.get("marker")
    if marker:
        if Path(marker).exists():
            return
        Path(marker).write_text(f"failed after step {step} on rank {rank}\n")
    say(f"[fault injection] rank {rank} fails after step {step} ({debug.get('how', 'raise')})")
    if debug.get("how") == "exit":
        os._exit(1)
    raise RuntimeError(f"injected failure after step {step} on rank {rank}")


# ######################################################################################################
# The loop
# ######################################################################################################

def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. ``config`` (``train_loop_config``): ``cfg`` (resolved config dict), ``stage``,
    ``run_dir``, ``inputs`` (paths of the teacher / init weights), ``tracking`` (uri, run_id,
    system_metrics) and optionally ``debug`` (fault injection for tests)."""
    import ray.train
    import ray.train.torch

    quiet_worker_console()
    cfg = config_from_dict(config["cfg"])
    stage = config["stage"]
    st = stage_optim_config(cfg, stage)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    paths = ckpt.StagePaths(Path(config["run_dir"]), stage)
    total = st.steps
    accum = st.grad_accum
    micro = st.global_batch_size // (world * accum)
    if micro * world * accum != st.global_batch_size:
        raise ValueError(f"{stage}.global_batch_size={st.global_batch_size} is not divisible by workers x "
                         f"grad_accum = {world} x {accum}.")
    seed_everything(cfg.train.seed)      # identical modules on every rank (random external backbones too)
    if cfg.train.torch_threads > 0:      # Ray sets OMP_NUM_THREADS = the worker's CPU reservation
        torch.set_num_threads(cfg.train.torch_threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True   # official: TF32 on
        torch.backends.cudnn.allow_tf32 = True

    task: TrainingTask = build_stage(stage, cfg, config["inputs"], device)
    maybe_compile(task.model, cfg)
    seed_everything(cfg.train.seed + 1000 * rank)   # then per-rank streams (masks, augmentation)
    model = task.model
    optimizer = task.build_optimizer(st)
    ema = EMA(model, cfg.train.ema_decay)
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # ---------------------------------------------------------------- resume
    start_step, resumed_fp = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = ckpt.load_state(d, map_location=device)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        task.load_state_dict(state.get("aux", {}))
        start_step = int(state["step"])
        resumed_fp = ckpt.optimizer_fingerprint(state["optimizer"])
        rng = state.get("rng", [])
        if len(rng) == world:
            ckpt.restore_rng(rng[rank])
        else:
            seed_everything(cfg.train.seed + 1000 * rank + start_step)
        del state
    refuse_hopeless_restart(paths, cfg, start_step, rank, config.get("launched_at", 0.0))

    step_module = ray.train.torch.prepare_model(task.step_module(), move_to_device=False,
                                                parallel_strategy="ddp" if world > 1 else None)
    aux_module = None
    if task.aux_module is not None:
        aux_module = ray.train.torch.prepare_model(task.aux_module, move_to_device=False,
                                                   parallel_strategy="ddp" if world > 1 else None)
    if cfg.train.grad_compression == "bf16" and world > 1:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
        for wrapped in (step_module, aux_module):
            if hasattr(wrapped, "register_comm_hook"):
                wrapped.register_comm_hook(None, bf16_compress_hook)

    log = StageLogger(config["tracking"]["uri"], config["tracking"].get("run_id"), enabled=rank == 0,
                      system_metrics=config["tracking"].get("system_metrics", True))
    if rank == 0:
        ckpt.journal(paths, event="start", t=round(time.time(), 3), step=start_step, resumed=checkpoint is not None,
                     world_size=world, micro_batch=micro, optimizer_fingerprint=resumed_fp)
        what = f"resuming at step {start_step}" if checkpoint is not None else "starting"
        say(f"[{stage}] {what}: {total} steps, global batch {st.global_batch_size} = {world} workers x "
              f"{accum} accum x {micro} {task.rows_name}, device {device.type}, precision "
              f"{'fp32' if amp_dtype is None else str(amp_dtype).split('.')[-1]}")
        log.tags({"ray.storage_path": config.get("ray_storage", ""), "sftok.world_size": world})

    batches = task.batches(ray.train.get_dataset_shard("train"), micro, cfg.data.shuffle_seed + 7919 * rank,
                           device, first_epoch=start_step)
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    debug = config.get("debug")
    step_journal = ckpt.StepJournal(paths)
    status = "FAILED"
    try:
        sums: dict[str, float] = {}
        n_sum = 0
        bad_in_a_row = 0
        nonfinite_total = 0
        t_window, steps_window = time.perf_counter(), 0
        t_start = time.perf_counter()
        for step in range(start_step, total):
            lr = lr_at(step, st)
            set_lr(optimizer, lr)
            step_module.train()
            batch = None
            step_sums: dict[str, float] = {}
            for i in range(accum):
                batch = next(batches)
                if step == 0 and i == 0 and rank == 0 and cfg.train.image_every:
                    # the grid before training, at step 0: MLflow's image view opens at step 0 and shows "No
                    # image logged at this step" for a key whose first step is later (MLflow 3.17, Chromium)
                    _log_progress_grid(task, log, stage, batch, 0)
                    step_module.train()
                sync = (step_module.no_sync() if (i < accum - 1 and hasattr(step_module, "no_sync"))
                        else contextlib.nullcontext())
                with sync:
                    with autocast:
                        loss, metrics = step_module(batch, step)
                    scaler.scale(loss / accum).backward()
                for k, v in metrics.items():
                    step_sums[k] = step_sums.get(k, 0.0) + float(v) / accum
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(task.trainable_parameters(), cfg.train.grad_clip)
            done = step + 1
            # divergence guard: a non-finite loss/gradient anywhere skips the update (weights, EMA, D) on
            # every rank; fp16's GradScaler backs off its scale as usual (update() still runs)
            finite = step_is_finite(loss, grad_norm, device)
            if finite:
                scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if finite:
                bad_in_a_row = 0
                ema.update(model)
                aux_metrics = task.after_step(step, ema)
                if aux_module is not None:
                    aux_metrics.update(task.aux_step(aux_module, batch, step))
                for k, v in {**step_sums, **aux_metrics}.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm.detach().float()   # synced at log steps
                n_sum += 1
            else:
                bad_in_a_row += 1
                nonfinite_total += 1
                if rank == 0:
                    say(f"[{stage}] step {done}: non-finite loss {float(loss.detach()):.4g} / grad norm "
                        f"{float(grad_norm):.4g}: update skipped ({bad_in_a_row} in a row, "
                        f"limit train.max_nonfinite_steps={cfg.train.max_nonfinite_steps})")
                if bad_in_a_row > cfg.train.max_nonfinite_steps:
                    message = (f"{stage} diverged: loss/gradient non-finite for {bad_in_a_row} steps in a row "
                               f"(up to step {done}; {nonfinite_total} skipped in all). The last checkpoint "
                               f"holds the last finite weights. Lower {task.section}.lr (now {st.lr:g}), raise "
                               f"{task.section}.warmup_steps or tighten train.grad_clip, then rerun.")
                    if rank == 0:
                        step_journal.flush()
                        ckpt.journal(paths, event="diverged", step=done, config=config_fingerprint(cfg),
                                     message=message, t=round(time.time(), 3))
                        log.metrics({"nonfinite_steps": float(nonfinite_total)}, step=done)
                    raise StageDiverged(message)
            steps_window += 1
            if rank == 0:
                step_journal.add(done, loss)

            last = done == total
            log_now = done % cfg.train.log_every == 0 or last
            ckpt_now = done % cfg.train.checkpoint_every == 0 or last
            report: dict = {}
            if rank == 0 and (log_now or ckpt_now):
                step_journal.flush()
            if log_now:
                metrics = all_reduce_mean({k: float(v) / max(n_sum, 1) for k, v in sums.items()}, device)
                metrics["nonfinite_steps"] = float(nonfinite_total)       # identical on every rank
                if task.codebook_size:
                    counts = torch.zeros(task.codebook_size, dtype=torch.float64, device=device)
                    with torch.no_grad():
                        counts += torch.bincount(task.codes(batch).flatten(), minlength=task.codebook_size)
                    metrics.update(codebook_stats(all_reduce_sum_(counts)))
                elapsed = time.perf_counter() - t_window
                ips = steps_window * st.global_batch_size / max(elapsed, 1e-9)
                metrics.update(lr=lr, **{f"{task.rows_name}_per_s": ips}, epoch_step=done,
                               memory_mb=all_reduce_max(memory_mb(device), device))
                eta = (total - done) * elapsed / max(steps_window, 1)
                if rank == 0:
                    log.metrics(metrics, step=done)
                    usage = f" usage {metrics['codebook_usage']:.2f}" if "codebook_usage" in metrics else ""
                    acc = f" acc {metrics['masked_accuracy']:.3f}" if "masked_accuracy" in metrics else ""
                    say(f"[{stage}] step {done}/{total} loss {metrics.get('loss', float('nan')):.4f}{acc} "
                        f"lr {lr:.2e} grad {metrics.get('grad_norm', float('nan')):.2f}{usage} "
                        f"{ips:.1f} {task.rows_name}/s ETA {fmt_eta(eta)}")
                report = {"step": done, **{k: float(v) for k, v in metrics.items()}}
                sums, n_sum = {}, 0
                t_window, steps_window = time.perf_counter(), 0
            every = cfg.train.image_every
            if rank == 0 and every and done % every == 0 and not last:
                _log_progress_grid(task, log, stage, batch, done)
            if last:
                report.update(_finish_stage(task, ema, cfg, st, stage, paths, log, rank, device,
                                            time.perf_counter() - t_start, done - start_step))
            if ckpt_now:
                _report_with_checkpoint(report, done, rank, world, model, ema, optimizer, scaler, task, cfg)
            elif log_now:
                ray.train.report(report)
            maybe_fail(debug, done, rank)
        if start_step >= total:          # restarted after the last checkpoint: only (re)write the export
            report = _finish_stage(task, ema, cfg, st, stage, paths, log, rank, device, 0.0, 0)
            ray.train.report(report)
        status = "FINISHED"
    finally:
        if rank == 0:
            step_journal.flush()
        log.close(status)


def _report_with_checkpoint(metrics: dict, step: int, rank: int, world: int, model, ema, optimizer, scaler,
                            task: TrainingTask, cfg: Config) -> None:
    """Every rank reports; rank 0 attaches the full training state as ``step_<n>``."""
    import ray.train
    rng = ckpt.capture_rng()
    if dist_ready() and world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, rng)
        rng_all = gathered
    else:
        rng_all = [rng]
    metrics = {"step": step, **metrics}
    if rank != 0:
        ray.train.report(metrics)
        return
    bad = ckpt.nonfinite_tensors({"model": model.state_dict(), "ema": ema.state_dict()})
    if bad:
        raise StageDiverged(f"step {step}: {len(bad)} non-finite weight tensors ({', '.join(bad[:3])} ...); not "
                            f"checkpointing them over the last finite checkpoint. Lower the stage's lr and rerun.")
    state = {"step": step, "model": model.state_dict(), "ema": ema.state_dict(),
             "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "aux": task.state_dict(),
             "rng": rng_all, "config": cfg.to_yaml()}
    name = f"step_{step:07d}"
    if cfg.train.checkpoint_upload == "async":
        # staged on local disk; Ray copies it to storage_path in the background and deletes the stage dir,
        # so training waits for the local torch.save only, not for the shared file system or object store
        from ray.train import CheckpointUploadMode
        d = tempfile.mkdtemp(prefix="sftok-ckpt-")
        ckpt.save_state(d, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name,
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC, delete_local_checkpoint_after_upload=True)
        return
    with tempfile.TemporaryDirectory(prefix="sftok-ckpt-") as d:
        ckpt.save_state(d, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name)


def _log_progress_grid(task: TrainingTask, log: StageLogger, stage: str, images, step: int) -> None:
    """Rank 0, every ``train.image_every`` steps: originals vs reconstructions of the online model (the EMA
    grid is logged at the end of the stage), as MLflow images under the same key with the step."""
    if not task.uses_val_split:          # a task without images (stage 4) has no grids
        return
    task.model.eval()
    with torch.no_grad():
        rows, labels = task.grid_rows(task.model, images[:4].float())
    log.image_grid(rows, labels, f"{stage}_recon", step=step)


def _finish_stage(task: TrainingTask, ema: EMA, cfg: Config, st, stage: str, paths: ckpt.StagePaths,
                  log: StageLogger, rank: int, device: torch.device, seconds: float, steps: int) -> dict:
    """Rank 0: export the EMA weights, log image grids and compute the validation metrics.

    Returns the metrics for the final report (``val_*``); other ranks return an empty dict and only wait
    at the report barrier.
    """
    import json

    import ray.train
    if rank != 0:
        return {}
    ema_model = copy.deepcopy(task.model)
    ema.copy_to(ema_model)
    ema_model.eval()
    bad = ckpt.nonfinite_tensors(ema_model.state_dict())
    if bad:
        raise StageDiverged(f"{stage}: the EMA weights hold {len(bad)} non-finite tensors ({', '.join(bad[:3])} ...); "
                            "no export written. Lower the stage's lr and rerun.")
    task.export(ema_model, paths.export)
    out: dict = {}
    limit = cfg.eval.stage_val_images     # a quick check; the full evaluation is sftok_platform.evaluate
    sums: dict[str, float] = {}
    n_img = 0
    first = None
    val_batches = (ray.train.get_dataset_shard("val").iter_torch_batches(
        batch_size=min(cfg.eval.batch_size, limit), device=device) if task.uses_val_split else [])
    with torch.no_grad():
        for batch in val_batches:
            images = as_float_images(batch["image"])
            if first is None:
                first = images[:4]
            for k, v in task.validate(ema_model, images).items():
                sums[k] = sums.get(k, 0.0) + float(v) * images.shape[0]
            n_img += images.shape[0]
            if n_img >= limit:
                break
        out = {f"val_{k}": v / max(n_img, 1) for k, v in sums.items()}
        if first is not None:
            rows, labels = task.grid_rows(ema_model, first)
            paths.images.mkdir(parents=True, exist_ok=True)
            from sftok_platform.tracking import save_image_grid
            save_image_grid(rows, labels, paths.images / f"{stage}_final.png")
            log.image_grid(rows, labels, f"{stage}_recon", step=st.steps)
    if seconds > 0 and steps > 0:
        out[f"stage_{task.rows_name}_per_s"] = steps * st.global_batch_size / seconds
    if task.uses_val_split:
        out["val_images"] = float(n_img)
    log.metrics(out, step=st.steps)
    log.artifact(paths.export, artifact_path="export")
    (paths.dir / "final_metrics.json").write_text(json.dumps(out, indent=2))
    say(f"[{stage}] done: " + ", ".join(f"{k}={v:.4g}" for k, v in out.items()))
    return out


__all__ = ["train_loop_per_worker", "StageDiverged", "step_is_finite", "config_from_dict", "autocast_dtype", "codebook_stats"]
