"""Ray Train (2.60, V2) on CPU, one stage at a time: a diverging stage stops loudly and its retry refuses to
replay the divergence; checkpoints uploaded asynchronously land in storage.

An interrupted stage continuing at its checkpoint and a dead worker being replaced are asserted on the
end-to-end pipeline run (tests/test_pipeline_e2e.py), which goes through both on its way."""
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
def env(tmp_path_factory, ray_cluster, seed_mlflow):
    """The suite's local Ray, 40 synthetic images at the tiny preset's size and a random stage-0 teacher export."""
    from sftok.maskgit_vqgan import MaskGITVQGAN
    from sftok_platform.data import prepare_synthetic
    root = tmp_path_factory.mktemp("resume")
    seed_mlflow(root)
    shards = root / "shards"
    prepare_synthetic(shards, 32, num_val=8, image_size=load_config("tiny").model.image_size, quiet=True)
    torch.manual_seed(0)
    teacher = root / "teacher"
    _t = load_config("tiny").teacher
    ckpt.save_teacher(MaskGITVQGAN(_t.hidden_channels, _t.codebook_size, _t.z_channels, load_config("tiny").teacher_arch()),
                      teacher, hidden_channels=_t.hidden_channels, codebook_size=_t.codebook_size,
                      z_channels=_t.z_channels, arch=load_config("tiny").teacher_arch())   # the tiny preset's layout
    return {"root": root, "shards": str(shards), "teacher": str(teacher)}


def stage1_config(env, name, *overrides):
    return load_config("tiny", [
        f"run.root={env['root']}", f"run.name={name}", f"data.path={env['shards']}", "stage1.steps=6",
        "stage1.global_batch_size=4", "stage1.warmup_steps=2", "train.checkpoint_every=2", "train.log_every=2",
        "eval.max_images=4", "eval.batch_size=4", "eval.steps=[1,2]", "tracking.system_metrics=false", *overrides])


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
