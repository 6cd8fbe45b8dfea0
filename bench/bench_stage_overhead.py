"""The fixed cost of one stage: ``run_stage`` of a 2-step tiny stage 1 (1 worker), several times in one
local Ray, so that only the per-stage part (Train controller and workers, data executions, validation,
export, MLflow) is timed.

    python bench/bench_stage_overhead.py [--runs 3] [--root /tmp/sftok-bench-stage]

Uses the suite's environment settings (tests/conftest.py) unless they are already set. Prints one line per
run: the wall time of ``run_stage`` and of its ``TorchTrainer.fit()``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

for _key, _value in {"OMP_WAIT_POLICY": "PASSIVE", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
                     "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_memory_monitor_refresh_ms": "0"}.items():
    os.environ.setdefault(_key, _value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "sftok-bench-stage"))
    args = ap.parse_args()

    import torch

    from sftok.maskgit_vqgan import MaskGITVQGAN
    from sftok_platform.cluster import connect
    from sftok_platform.config import load_config
    from sftok_platform.data import prepare_synthetic
    from sftok_platform.train import checkpointing as ckpt
    from sftok_platform.train import run_stage
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    connect(None, num_cpus=4)
    shards = root / "shards"
    tiny = load_config("tiny")
    prepare_synthetic(shards, 32, num_val=8, image_size=tiny.model.image_size, quiet=True)
    t, arch = tiny.teacher, tiny.teacher_arch()
    torch.manual_seed(0)
    ckpt.save_teacher(MaskGITVQGAN(t.hidden_channels, t.codebook_size, t.z_channels, arch), root / "teacher",
                      hidden_channels=t.hidden_channels, codebook_size=t.codebook_size, z_channels=t.z_channels,
                      arch=arch)
    print(f"load {os.getloadavg()[0]:.2f}", flush=True)
    for i in range(args.runs):
        cfg = load_config("tiny", [
            f"run.root={root}", f"run.name=r{i}", f"data.path={shards}", "stage1.steps=2",
            "stage1.global_batch_size=4", "stage1.warmup_steps=0", "train.checkpoint_every=2",
            "train.log_every=2", "eval.max_images=4", "eval.batch_size=4", "eval.steps=[1,2]",
            "tracking.system_metrics=false"])
        t0 = time.time()
        res = run_stage(cfg, "stage1", shards=str(shards), inputs={"teacher": str(root / "teacher")})
        print(f"run {i}: run_stage {time.time() - t0:.2f} s, fit {res.seconds:.2f} s", flush=True)
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
