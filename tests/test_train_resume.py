"""Resume through real Ray Train (2.60, V2) on CPU: an interrupted stage continues at the step of its last
checkpoint with the same optimizer state and no repeated steps, and a worker that dies mid-stage is
replaced (FailureConfig) and training continues from the last checkpoint."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sftok_platform.config import load_config
from sftok_platform import tracking
from sftok_platform.train import checkpointing as ckpt
from sftok_platform.train import run_stage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A private local Ray, 40 synthetic 64px images and a random stage-0 teacher export."""
    import ray
    from sftok.maskgit_vqgan import MaskGITVQGAN
    from sftok_platform.data import prepare_synthetic
    root = tmp_path_factory.mktemp("resume")
    from sftok_platform.cluster import connect
    connect(None, num_cpus=4)          # a private local Ray with its dashboard pinned (Train V2 state API)
    shards = root / "shards"
    prepare_synthetic(shards, 32, num_val=8, image_size=64, quiet=True)
    torch.manual_seed(0)
    teacher = root / "teacher"
    _t = load_config("tiny").teacher
    ckpt.save_teacher(MaskGITVQGAN(_t.hidden_channels, _t.codebook_size, _t.z_channels, load_config("tiny").teacher_arch()),
                      teacher, hidden_channels=_t.hidden_channels, codebook_size=_t.codebook_size,
                      z_channels=_t.z_channels, arch=load_config("tiny").teacher_arch())   # the tiny preset's layout
    yield {"root": root, "shards": str(shards), "teacher": str(teacher)}
    ray.shutdown()


def stage1_config(env, name, *overrides):
    return load_config("tiny", [
        f"run.root={env['root']}", f"run.name={name}", f"data.path={env['shards']}", "stage1.steps=6",
        "stage1.global_batch_size=4", "stage1.warmup_steps=2", "train.checkpoint_every=2", "train.log_every=2",
        "eval.max_images=4", "eval.batch_size=4", "eval.steps=[1,2]", "tracking.system_metrics=false", *overrides])


def steps_after_each_start(paths):
    """Journal -> [(start step, resumed, fingerprint, [steps run after that start]), ...]."""
    out = []
    for e in ckpt.read_journal(paths):
        if e.get("event") == "start":
            out.append((e["step"], e["resumed"], e["optimizer_fingerprint"], []))
        else:
            out[-1][3].append(e["step"])
    return out


def test_interrupted_stage_continues_at_its_checkpoint(env):
    cfg = stage1_config(env, "interrupt", "train.max_failures=0")
    inputs = {"teacher": env["teacher"]}
    with pytest.raises(Exception, match="injected failure after step 4"):
        run_stage(cfg, "stage1", shards=env["shards"], inputs=inputs,
                  debug={"fail_after_step": 4, "fail_rank": 0, "how": "raise"})
    paths = ckpt.StagePaths(env["root"] / "interrupt", "stage1")
    assert not ckpt.is_done(paths)
    ray_dir = ckpt.storage_path(paths.run_dir) / ckpt.ray_run_name("interrupt", "stage1")
    last = ckpt.latest_checkpoint_dir(ray_dir)
    assert last.name == "step_0000004"
    saved = ckpt.load_state(last)
    assert saved["step"] == 4 and saved["ema"]["num_updates"] == 4
    assert all(len(s) for s in saved["optimizer"]["state"].values())
    fingerprint = ckpt.optimizer_fingerprint(saved["optimizer"])

    result = run_stage(cfg, "stage1", shards=env["shards"], inputs=inputs)   # the same command again
    attempts = steps_after_each_start(paths)
    assert [(a[0], a[1]) for a in attempts] == [(0, False), (4, True)]
    assert attempts[1][2] == pytest.approx(fingerprint), "resumed with a different optimizer state"
    assert attempts[0][3] == [1, 2, 3, 4] and attempts[1][3] == [5, 6], "steps repeated or skipped"
    assert ckpt.is_done(paths) and result.metrics["val_loss"] > 0
    assert ckpt.load_state(ckpt.latest_checkpoint_dir(ray_dir))["step"] == 6
    # one MLflow child run across both attempts, its loss curve without repeated steps
    history = tracking.client(cfg).get_metric_history(result.run_id, "loss")
    assert sorted(m.step for m in history) == [2, 4, 6]
    # a finished stage is skipped by the next rerun
    assert run_stage(cfg, "stage1", shards=env["shards"], inputs=inputs).skipped


def test_dead_worker_is_replaced_and_training_continues(env):
    cfg = stage1_config(env, "dead-worker", "train.workers=2", "train.max_failures=1")
    marker = env["root"] / "killed-once"
    result = run_stage(cfg, "stage1", shards=env["shards"], inputs={"teacher": env["teacher"]},
                       debug={"fail_after_step": 5, "fail_rank": 1, "how": "exit", "marker": str(marker)})
    assert marker.is_file(), "the fault was not injected"
    attempts = steps_after_each_start(ckpt.StagePaths(env["root"] / "dead-worker", "stage1"))
    assert len(attempts) == 2 and attempts[0][:2] == (0, False), attempts
    assert attempts[0][3][:5] == [1, 2, 3, 4, 5]
    # the replacement group starts from a reported checkpoint (step 4, or step 2 when the controller had not
    # yet registered step 4 when rank 1 died) and runs to the end without gaps
    restart, resumed = attempts[1][:2]
    assert resumed and restart in (2, 4), attempts
    assert attempts[1][3] == list(range(restart + 1, 7))
    assert result.metrics["val_loss"] > 0 and result.ray_checkpoint.endswith("step_0000006")


def test_a_diverging_stage_stops_loudly_and_keeps_finite_checkpoints(env):
    """lr 1e6 makes the stage-0 loss NaN from its third step: the guard skips those updates, stops the stage
    after train.max_nonfinite_steps in a row with StageDiverged, the Ray retry refuses to replay it, every
    checkpoint and no export holds a non-finite tensor, and MLflow gets the skipped-step count."""
    from sftok_platform.train.loop import StageDiverged
    cfg = load_config("tiny", [
        f"run.root={env['root']}", "run.name=diverge", f"data.path={env['shards']}", "stage0.steps=10",
        "stage0.global_batch_size=4", "stage0.warmup_steps=2", "stage0.lr=1e6", "train.checkpoint_every=2",
        "train.log_every=2", "train.max_nonfinite_steps=2", "train.max_failures=1", "tracking.system_metrics=false"])
    with pytest.raises(StageDiverged, match=r"stage0 diverged: .* 3 steps in a row .*Lower stage0.lr"):
        run_stage(cfg, "stage0", shards=env["shards"])
    paths = ckpt.StagePaths(env["root"] / "diverge", "stage0")
    journal = ckpt.read_journal(paths)
    assert [e["step"] for e in journal if e.get("event") == "start"] == [0]
    assert [e["step"] for e in journal if e.get("event") == "diverged"] == [5]
    # the retry (max_failures=1) resumed at the step-4 checkpoint and refused to replay steps 5.. into NaN
    assert [e["step"] for e in journal if e.get("event") == "refused_replay"] == [4]
    assert [e["step"] for e in journal if "loss" in e] == [1, 2, 3, 4], "steps were replayed"
    assert any(e.get("loss") != e.get("loss") for e in journal), "the loss never went NaN: the test tests nothing"
    ray_dir = ckpt.storage_path(paths.run_dir) / ckpt.ray_run_name("diverge", "stage0")
    kept = sorted(ray_dir.glob("step_*"))
    assert kept, "no checkpoint was written before the divergence"
    for d in kept:
        state = ckpt.load_state(d)
        assert ckpt.nonfinite_tensors({"model": state["model"], "ema": state["ema"]}) == [], d.name
    assert not paths.export.exists() and not ckpt.is_done(paths)
    run = tracking.client(cfg).search_runs([tracking.client(cfg).get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                                           filter_string="tags.mlflow.runName = 'diverge-stage0'")
    assert run and run[0].info.status == "FAILED"
    assert run[0].data.metrics.get("nonfinite_steps", 0) >= 3


def test_async_checkpoint_upload_lands_in_storage(env):
    """train.checkpoint_upload=async (the b64/l64 default): checkpoints are staged on local disk and uploaded
    by Ray in the background; the kept ones are complete in storage and the staging dirs are removed."""
    import tempfile
    cfg = stage1_config(env, "async", "train.checkpoint_upload=async", "train.max_failures=0")
    staged_before = set(Path(tempfile.gettempdir()).glob("sftok-ckpt-*"))
    result = run_stage(cfg, "stage1", shards=env["shards"], inputs={"teacher": env["teacher"]})
    paths = ckpt.StagePaths(env["root"] / "async", "stage1")
    ray_dir = ckpt.storage_path(paths.run_dir) / ckpt.ray_run_name("async", "stage1")
    kept = sorted(d.name for d in ray_dir.glob("step_*"))
    assert kept == ["step_0000004", "step_0000006"]          # num_to_keep=2
    assert [ckpt.load_state(ray_dir / k)["step"] for k in kept] == [4, 6]
    assert ckpt.is_done(paths) and result.metrics["val_loss"] > 0
    assert set(Path(tempfile.gettempdir()).glob("sftok-ckpt-*")) <= staged_before, "staging dirs left behind"
