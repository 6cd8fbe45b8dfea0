"""Evaluation throughput: images/s of the per-image evaluation work (SPEC E protocol).

Per image: encode to 64 tokens, decode with 8 steps (stage-3 soft path -> pixel head), clamp + uint8, the FID
Inception (299 px, TF resize) on the original and on the reconstruction, PSNR/PSNR-Y/SSIM. This is exactly
what one Ray Data actor runs per batch (``sftok_platform.evaluate.BatchEvaluator``), timed in-process so the
figure is per device; a pool of N GPU actors scales it by about N. The float64 statistics and the final
sqrtm run once on the driver and are timed separately.

    python bench/bench_eval.py                          # CPU: tiny (16 images) and b64 (2 images)
    python bench/bench_eval.py --device cuda --images-tiny 256 --images-b64 128 --batch-size 32

Random weights everywhere (tokenizer and Inception): throughput does not depend on them.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from sftok.metrics import FeatureStats, fid_from_feature_stats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(name: str, images: int, batch_size: int, device: torch.device, steps: int) -> dict:
    import sftok
    from sftok.metrics import to_uint8
    from sftok_platform.evaluate import BatchEvaluator

    model = sftok.create_model(name).eval()
    ev = BatchEvaluator(model, steps=(steps,), inception_weights="", device=str(device))
    size = model.cfg.image_size
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(min(batch_size, images - i), 3, size, size, generator=g).numpy()
               for i in range(0, images, batch_size)]
    ev({"image": batches[0][:1]})                                      # warm-up (allocations, cudnn)
    _sync(device)
    # phase breakdown on the first batch
    x = torch.from_numpy(batches[0]).to(device)
    t = {}
    with torch.no_grad():
        t0 = time.perf_counter(); tok = model.to(device).encode(x); _sync(device); t["encode"] = time.perf_counter() - t0
        t0 = time.perf_counter(); rec = model.decode_tokens(tok, num_steps=steps, temperature=0.0); _sync(device)
        t["decode"] = time.perf_counter() - t0
        t0 = time.perf_counter(); ev.inception.features(to_uint8(rec)); _sync(device)
        t["inception"] = 2 * (time.perf_counter() - t0)                 # originals + reconstructions
    n0 = batches[0].shape[0]
    # end to end over all batches (wall clock, and this process's CPU time: on a shared, overloaded CPU
    # machine the CPU seconds per image are the figure that does not depend on the neighbours)
    t0, c0 = time.perf_counter(), time.process_time()
    for b in batches:
        ev({"image": b})
    _sync(device)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    params = sum(p.numel() for p in model.parameters())
    return {"model": name, "params_M": params / 1e6, "images": images, "batch_size": batch_size,
            "images_per_s": images / total, "s_per_image": total / images, "cpu_s_per_image": cpu / images,
            **{f"{k}_s_per_image": v / n0 for k, v in t.items()}}


def bench_fid(count: int = 5000) -> dict:
    """Driver-side cost: float64 statistics update of 2048-d features and the final FID (sqrtm)."""
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((count, 2048)).astype(np.float32)
    a, b = FeatureStats(2048), FeatureStats(2048)
    t0 = time.perf_counter()
    a.update(feats)
    b.update(feats[::-1] * 1.01)
    upd = (time.perf_counter() - t0) / (2 * count)
    out = {"stats_update_us_per_image": upd * 1e6}
    for method in ("sqrtm", "eigh"):
        t0 = time.perf_counter()
        fid_from_feature_stats(a, b, method=method)
        out[f"fid_{method}_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--images-tiny", type=int, default=16)
    p.add_argument("--images-b64", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--skip-fid", action="store_true", help="skip the 2048-d sqrtm timing (minutes on 2 CPUs)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# evaluation throughput on {where}; decode {args.steps} steps + Inception 299 px (x2) + PSNR/SSIM")
    print("| model | params (M) | images | batch | images/s | CPU s/img | encode s/img | decode s/img | "
          "Inception s/img |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, n in (("sftok_tiny", args.images_tiny), ("sftok_b64", args.images_b64)):
        if n <= 0:
            continue
        r = bench_model(name, n, min(args.batch_size, n), device, args.steps)
        print(f"| {r['model']} | {r['params_M']:.1f} | {r['images']} | {r['batch_size']} | {r['images_per_s']:.3f} | "
              f"{r['cpu_s_per_image']:.2f} | "
              f"{r['encode_s_per_image']:.3f} | {r['decode_s_per_image']:.3f} | {r['inception_s_per_image']:.3f} |",
              flush=True)
    if not args.skip_fid:
        f = bench_fid()
        print(f"\ndriver: float64 stats update {f['stats_update_us_per_image']:.1f} us/image; FID 2048-d: sqrtm "
              f"{f['fid_sqrtm_s']:.1f} s, eigh {f['fid_eigh_s']:.1f} s (once per step count)")


if __name__ == "__main__":
    main()
