"""GPU acceptance: the checks a machine with a GPU runs unattended before a cluster run (about 2-4 minutes).

On one GPU, with the ``b64`` sizes and random weights (nothing is downloaded), through the same stage classes
the Ray Train loop uses (``sftok_platform.train.stages.build_stage`` tasks), each wrapped in NCCL DDP on a
world of 1 with the bf16 gradient-compression hook (``train.grad_compression=bf16``):

1. one bf16-autocast optimizer step of each stage 0-3: loss finite, step time, images/s and MFU (model
   FLOPs of a step counted with ``torch.utils.flop_counter`` / peak dense bf16 FLOP/s of the device);
2. the teacher's codes under bf16 autocast equal its fp32 codes (the training targets must not depend on
   the loop's precision);
3. checkpoint + resume: the training state saved and loaded back (``weights_only=True``) gives the same next
   loss as the process that saved it, and every tensor of the checkpoint is finite.

    python bench/gpu_acceptance.py                              # b64 on cuda:0, JSON to stdout
    python bench/gpu_acceptance.py --out bench/results/gpu_acceptance.json --batch 16
    python bench/gpu_acceptance.py --device cpu --preset tiny   # the same checks on CPU (gloo, fp32)

Exit status 0 when every check passes, 1 otherwise; the JSON says which failed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

try:
    import sftok  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from sftok_platform.config import load_config  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}
RANDOM_LOSS_WEIGHTS = ["losses.vgg16_weights=random", "losses.lpips_heads=random", "losses.dino_weights=random",
                       "losses.discriminator_start=0"]


def _init_process_group(device: torch.device) -> None:
    import socket
    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def _write_inputs(cfg, directory: Path, device: torch.device) -> dict:
    """A random teacher (the preset's layout) and a random stage-2 export: what stages 1-3 load."""
    import dataclasses

    from sftok.checkpoint import save_model
    from sftok.maskgit_vqgan import MaskGITVQGAN
    from sftok.model import SFTok
    from sftok_platform.train import checkpointing as ckpt
    t = cfg.teacher
    torch.manual_seed(0)
    ckpt.save_teacher(MaskGITVQGAN(t.hidden_channels, t.codebook_size, t.z_channels, cfg.teacher_arch()),
                      directory / "teacher", hidden_channels=t.hidden_channels, codebook_size=t.codebook_size,
                      z_channels=t.z_channels)
    save_model(SFTok(dataclasses.replace(cfg.model, pixel_head=False)), directory / "stage2")
    return {"teacher": str(directory / "teacher"), "init": str(directory / "stage2")}


class StageStep:
    """One stage's parts, its DDP-wrapped step module and optimizer: ``step(images, i) -> loss``."""

    def __init__(self, stage: str, cfg, inputs: dict, device: torch.device, amp: bool):
        from torch.nn.parallel import DistributedDataParallel

        from sftok.ema import EMA
        from sftok.optim import build_optimizer
        from sftok_platform.train.stages import build_stage
        self.stage, self.cfg, self.device = stage, cfg, device
        self.parts = build_stage(stage, cfg, inputs, device)
        self.optimizer = build_optimizer(self.parts.model, getattr(cfg, stage))
        self.ema = EMA(self.parts.model, cfg.train.ema_decay)
        self.ddp = DistributedDataParallel(self.parts.step_module(), device_ids=[device.index] if device.type == "cuda"
                                           else None)
        if device.type == "cuda":      # train.grad_compression=bf16: the all-reduce of bf16 gradients over NCCL
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
            self.ddp.register_comm_hook(None, bf16_compress_hook)
        self.amp = amp

    def forward(self, images: torch.Tensor, i: int) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss, _ = self.ddp(images, i)
        return loss

    def step(self, images: torch.Tensor, i: int) -> float:
        loss = self.forward(images, i)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parts.trainable_parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.parts.model)
        if self.parts.aux_module is not None:      # stage 3: the discriminator's own step
            self.parts.aux_step(self.parts.aux_module, images, i)
        return float(loss.detach())

    def state(self) -> dict:
        return {"model": self.parts.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load(self, state: dict) -> None:
        self.parts.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_stage_steps(cfg, inputs, device, amp, batch: int, steps: int, peak: float) -> dict:
    from torch.utils.flop_counter import FlopCounterMode
    out = {}
    images = torch.rand(batch, 3, cfg.model.image_size, cfg.model.image_size, device=device)
    for stage in ("stage0", "stage1", "stage2", "stage3"):
        runner = StageStep(stage, cfg, inputs, device, amp)
        losses = [runner.step(images, i) for i in range(2)]                # warm-up (allocator, cuDNN)
        with FlopCounterMode(display=False) as fc:
            losses.append(runner.step(images, 2))
        _sync(device)
        t = time.perf_counter()
        for i in range(steps):
            losses.append(runner.step(images, 3 + i))
        _sync(device)
        dt = (time.perf_counter() - t) / steps
        flops = fc.get_total_flops()
        row = {"ok": all(map(lambda v: v == v and abs(v) != float("inf"), losses)), "loss": losses[-1],
               "step_ms": dt * 1e3, "images_per_s": batch / dt, "tflop_per_step": flops / 1e12,
               "mfu": flops / dt / peak if peak == peak else float("nan")}
        if device.type == "cuda":
            row["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        out[stage] = row
        print(f"[acceptance] {stage}: loss {row['loss']:.4g} {row['step_ms']:.0f} ms/step "
              f"{row['images_per_s']:.1f} img/s MFU {row['mfu']:.1%}", flush=True)
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def check_teacher_codes(cfg, inputs, device, batch: int) -> dict:
    from sftok_platform.train import checkpointing as ckpt
    teacher = ckpt.load_teacher_export(inputs["teacher"], cfg, device)
    images = torch.rand(batch, 3, cfg.model.image_size, cfg.model.image_size, device=device)
    exact = teacher.encode_codes(images)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        in_autocast = teacher.encode_codes(images)
    same = float((in_autocast == exact).float().mean())
    print(f"[acceptance] teacher codes under bf16 autocast: {same:.2%} equal to fp32", flush=True)
    return {"ok": same == 1.0, "equal_fraction": same}


def check_resume(cfg, inputs, device, amp, batch: int, directory: Path) -> dict:
    from sftok_platform.train import checkpointing as ckpt
    images = torch.rand(batch, 3, cfg.model.image_size, cfg.model.image_size, device=device)
    first = StageStep("stage1", cfg, inputs, device, amp)
    for i in range(3):
        first.step(images, i)
    ckpt.save_state(directory / "resume", {"step": 3, **first.state()})
    torch.manual_seed(1234)
    expected = float(first.forward(images, 3).detach())
    del first
    second = StageStep("stage1", cfg, inputs, device, amp)
    state = ckpt.load_state(directory / "resume", map_location=device)
    bad = ckpt.nonfinite_tensors({"model": state["model"], "ema": state["ema"]})
    second.load(state)
    torch.manual_seed(1234)
    got = float(second.forward(images, 3).detach())
    ok = not bad and abs(got - expected) <= 1e-5 * max(1.0, abs(expected))
    print(f"[acceptance] resume: next loss {got:.6g} vs {expected:.6g} in the saving process", flush=True)
    return {"ok": ok, "loss_after_resume": got, "loss_before": expected, "nonfinite_tensors": bad}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="b64")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8, help="images per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per stage")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s (default: by GPU name)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
        (v for k, v in PEAK_BF16.items() if k in name), float("nan"))
    amp = device.type == "cuda"
    cfg = load_config(args.preset, RANDOM_LOSS_WEIGHTS)
    t0 = time.time()
    _init_process_group(device)
    result = {"device": name, "preset": args.preset, "batch": args.batch, "bf16": amp,
              "peak_bf16_flops": peak, "ddp_backend": torch.distributed.get_backend()}
    with tempfile.TemporaryDirectory(prefix="sftok-acceptance-") as d:
        inputs = _write_inputs(cfg, Path(d), device)
        result["stages"] = check_stage_steps(cfg, inputs, device, amp, args.batch, args.steps, peak)
        result["teacher_codes"] = check_teacher_codes(cfg, inputs, device, args.batch)
        result["resume"] = check_resume(cfg, inputs, device, amp, args.batch, Path(d))
    torch.distributed.destroy_process_group()
    checks = {**{f"step_{k}": v["ok"] for k, v in result["stages"].items()},
              "teacher_codes": result["teacher_codes"]["ok"], "resume": result["resume"]["ok"]}
    result.update(checks=checks, passed=all(checks.values()), seconds=time.time() - t0)
    text = json.dumps(result, indent=2, default=float)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(f"[acceptance] {'PASSED' if result['passed'] else 'FAILED'} in {result['seconds']:.0f}s: "
          + ", ".join(f"{k} {'ok' if v else 'FAIL'}" for k, v in checks.items()), flush=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
