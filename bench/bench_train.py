"""Training throughput: images/s per stage through the real Ray Train path, and the worker scaling ratio.

CPU (default): the ``tiny`` preset on the built-in synthetic data, every stage with 1 and with 2 workers at
the same global batch, so the ratio shows what data parallelism buys on this machine. Throughput is
steady state: measured from the rank-0 journal between the end of the first log window (data pipeline and
worker warm-up) and the last step. Ray start-up and worker-group start per stage are reported separately.

GPU (when CUDA is present, ``--gpu``): ``b64`` stage 1/2/3 steps on one GPU without Ray (DDP adds nothing on
one device) in bf16 autocast, images/s and MFU = achieved model FLOP/s / peak dense bf16 FLOP/s (FLOPs of
one forward+backward counted with ``torch.utils.flop_counter``).

    python bench/bench_train.py                      # CPU, tiny, 1 and 2 workers
    python bench/bench_train.py --workers 1 2 4 --steps 16
    python bench/bench_train.py --gpu --batch 32     # b64 on one GPU
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

try:
    import sftok  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sftok_platform.config import load_config  # noqa: E402

STAGES = ("stage0", "stage1", "stage2", "stage3")
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def steady_images_per_s(journal: list[dict], global_batch: int, skip: int) -> float:
    steps = [e for e in journal if "t" in e and "event" not in e]
    steps = steps[skip:]
    if len(steps) < 2:
        return float("nan")
    return (len(steps) - 1) * global_batch / (steps[-1]["t"] - steps[0]["t"])


def bench_cpu(args) -> dict:
    from sftok_platform.cluster import connect
    from sftok_platform.data import ensure_dataset
    from sftok_platform.train import checkpointing as ckpt
    from sftok_platform.train import run_stage
    root = Path(args.root or tempfile.mkdtemp(prefix="sftok-bench-"))
    t0 = time.time()
    connect(None, num_cpus=max(args.workers) + 2)
    ray_start = time.time() - t0
    results: dict = {"preset": "tiny", "ray_start_s": ray_start, "stages": {}}
    shards = None
    for workers in args.workers:
        name = f"bench-w{workers}"
        cfg = load_config("tiny", [f"run.root={root}", f"run.name={name}", f"train.workers={workers}",
                                   *[f"{s}.steps={args.steps}" for s in STAGES],
                                   *[f"{s}.global_batch_size={args.batch}" for s in STAGES],
                                   f"losses.discriminator_start={args.steps // 2}", f"train.log_every={args.skip}",
                                   f"train.checkpoint_every={args.steps}", "tracking.system_metrics=false",
                                   "eval.max_images=8"])
        shards = shards or ensure_dataset(cfg)
        for stage in STAGES:
            t = time.time()
            res = run_stage(cfg, stage, shards=shards)
            wall = time.time() - t
            journal = ckpt.read_journal(ckpt.StagePaths(root / name, stage))
            start = next(e["t"] for e in journal if e.get("event") == "start")
            ips = steady_images_per_s(journal, args.batch, args.skip)
            row = results["stages"].setdefault(stage, {})
            row[f"w{workers}"] = {"images_per_s": ips, "wall_s": wall, "startup_s": start - t,
                                  "val_loss": res.metrics.get("val_loss")}
            print(f"{stage} workers={workers}: {ips:.2f} images/s steady ({wall:.0f}s wall, "
                  f"{start - t:.0f}s to first step)", flush=True)
    if len(args.workers) > 1:
        a, b = args.workers[0], args.workers[-1]
        for stage, row in results["stages"].items():
            row[f"scaling_w{b}_over_w{a}"] = row[f"w{b}"]["images_per_s"] / row[f"w{a}"]["images_per_s"]
    return results


def bench_gpu(args) -> dict:
    import dataclasses

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sftok.maskgit_vqgan import MaskGITVQGAN
    from sftok.model import SFTok
    from sftok.objectives import Stage3Loss, stage_loss
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))
    cfg = load_config("b64", ["losses.vgg16_weights=random", "losses.lpips_heads=random",
                              "losses.dino_weights=random", "losses.discriminator_start=0"])
    dev = torch.device("cuda")
    teacher = MaskGITVQGAN(128, 1024, 256).to(dev).eval().requires_grad_(False)
    out = {"device": name, "peak_bf16_flops": peak, "batch": args.batch, "stages": {}}
    images = torch.rand(args.batch, 3, 256, 256, device=dev)
    for stage in ("stage1", "stage2", "stage3"):
        model = SFTok(dataclasses.replace(cfg.model, pixel_head=stage == "stage3")).to(dev)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
        losses = None
        if stage == "stage3":
            model.init_pixel_head_from_teacher(teacher)
            Stage3Loss.prepare_model(model)
            losses = Stage3Loss(cfg.losses).to(dev)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if losses is None:
                    loss, _ = stage_loss(stage, model, images, teacher.encode_codes(images), getattr(cfg, stage))
                else:
                    loss, _, _ = losses.generator_loss(model, images, 1)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        with FlopCounterMode(display=False) as fc:
            step()
        flops = fc.get_total_flops()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / args.steps
        out["stages"][stage] = {"images_per_s": args.batch / dt, "step_ms": dt * 1e3,
                                "tflops_per_step": flops / 1e12, "mfu": flops / dt / peak,
                                "max_memory_gb": torch.cuda.max_memory_allocated() / 2**30}
        print(f"{stage}: {args.batch / dt:.1f} images/s, MFU {flops / dt / peak:.1%}", flush=True)
        del model, opt, losses
        torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=8, help="global batch (CPU) / per-GPU batch (GPU)")
    p.add_argument("--skip", type=int, default=3, help="steps of warm-up excluded from the throughput")
    p.add_argument("--root", default=None)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--out", default=None, help="write the results as JSON")
    args = p.parse_args()
    import torch
    res = bench_gpu(args) if args.gpu and torch.cuda.is_available() else bench_cpu(args)
    text = json.dumps(res, indent=2, default=float)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
