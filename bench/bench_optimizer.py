"""Optimizer A/B on the tiny preset: AdamW against Muon for the transformer matrices, same teacher, same data.

    python bench/bench_optimizer.py --teacher runs/tiny/stages/stage0/export              # stages 1-3
    python bench/bench_optimizer.py --teacher DIR --stages stage1 --steps stage1=300      # stage 1 alone
    python bench/bench_optimizer.py --teacher DIR --init STAGE1_EXPORT --stages stage2 --steps stage2=600 \
        --optimizers muon                                  # stage 2 alone, from a given stage-1 export

The README's table ("The laptop default", "What changed: Muon") comes from this loop. It is the training
loop without Ray: the real stage tasks (``build_stage``), the preset's schedule, gradient clipping and EMA,
on the built-in synthetic set drawn in-process (8192 train images, horizontal flips; the first ``--val``
val images), one process, ``--threads`` threads. For each optimizer it trains the chosen stages in order
(stage 2 starts from its own stage-1 export, stage 3 from its stage-2 export) and prints the stage's
validation figures every ``--every`` steps, then the two runs side by side with the mean-image baseline.
The teacher is a stage-0 export (``teacher.safetensors`` + ``teacher.json``), e.g. from a no-flag run.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sftok.ema import EMA  # noqa: E402
from sftok.optim import lr_at, set_lr  # noqa: E402
from sftok_platform.config import load_config  # noqa: E402
from sftok_platform.data import synthetic  # noqa: E402
from sftok_platform.train.stages import build_stage, stage_optim_config  # noqa: E402

STAGES = ("stage1", "stage2", "stage3")


def render(n: int, split: str, size: int) -> torch.Tensor:
    """uint8 [n, 3, size, size]: the synthetic set drawn at 256 px and resized as the data prep does."""
    images = [np.asarray(Image.fromarray(synthetic.render(i, split=split)[0]).resize((size, size), Image.BICUBIC))
              for i in range(n)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def batches(train_u8: torch.Tensor, batch: int, seed: int):
    """Shuffled epochs of float batches in [0,1] with random horizontal flips."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(train_u8), generator=g)
        for i in range(0, len(order) - batch + 1, batch):
            x = train_u8[order[i:i + batch]].float() / 255
            flip = torch.rand(batch, generator=g) < 0.5
            x[flip] = x[flip].flip(-1)
            yield x


def train_stage(stage: str, cfg, inputs: dict, train_u8, val, every: int, export: Path, tag: str) -> dict:
    torch.manual_seed(cfg.train.seed)
    task = build_stage(stage, cfg, inputs, torch.device("cpu"))
    st = stage_optim_config(cfg, stage)
    optimizer = task.build_optimizer(st)
    ema = EMA(task.model, cfg.train.ema_decay)
    module, data = task.step_module(), batches(train_u8, st.global_batch_size, cfg.train.seed)
    start, figures = time.perf_counter(), {}
    if stage != "stage1":          # where the stage starts: the export it was initialised from
        task.model.eval()
        with torch.no_grad():
            shown = {k: v for k, v in task.validate(task.model, val).items() if k.startswith(("accuracy", "psnr"))}
        print(f"[{tag} {stage}] step 0/{st.steps} " + " ".join(f"{k}={v:.4g}" for k, v in shown.items()), flush=True)
    for step in range(st.steps):
        set_lr(optimizer, lr_at(step, st))
        module.train()
        loss, _ = module(next(data), step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.trainable_parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(task.model)
        task.after_step(step, ema)
        if (step + 1) % every == 0 or step + 1 == st.steps:
            model = copy.deepcopy(task.model)
            ema.copy_to(model)
            model.eval()
            with torch.no_grad():
                figures = task.validate(model, val)
            shown = {k: v for k, v in figures.items() if k.startswith(("accuracy_1", "psnr"))}
            print(f"[{tag} {stage}] step {step + 1}/{st.steps} {time.perf_counter() - start:.0f}s "
                  + " ".join(f"{k}={v:.4g}" for k, v in shown.items()), flush=True)
    export.mkdir(parents=True, exist_ok=True)
    task.export(model, export)
    return figures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="stage-0 export dir (teacher.safetensors + teacher.json)")
    ap.add_argument("--stages", default="stage1,stage2,stage3", help="comma-separated, from stage1..stage3")
    ap.add_argument("--init", help="export the first of --stages starts from (default: the previous stage's "
                    "export of this run, so --stages must then begin at stage1)")
    ap.add_argument("--steps", action="append", default=[], metavar="STAGE=N", help="override a stage's steps")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other config override, e.g. stage1.lr=0.003 (repeatable)")
    ap.add_argument("--optimizers", default="adamw,muon", help="comma-separated: adamw, muon")
    ap.add_argument("--train", type=int, default=8192, help="synthetic train images")
    ap.add_argument("--val", type=int, default=64, help="synthetic val images")
    ap.add_argument("--every", type=int, default=100, help="validate every N steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    stages = [s for s in STAGES if s in args.stages.split(",")]
    if not stages or any(s not in STAGES for s in args.stages.split(",")):
        ap.error(f"--stages: choose from {', '.join(STAGES)}")
    first = STAGES.index(stages[0])
    if stages != list(STAGES[first:first + len(stages)]):
        ap.error(f"--stages {args.stages}: each stage starts from the one before it; list consecutive stages")
    if args.init and stages[0] == "stage1":
        ap.error("--init is for a run that starts after stage 1 (stage 1 starts from a fresh model)")
    if stages[0] != "stage1" and not (args.init and Path(args.init).is_dir()):
        ap.error(f"{stages[0]} starts from an export: include the stages before it in --stages, or pass "
                 f"--init <the previous stage's export directory>")
    if not (Path(args.teacher) / "teacher.json").is_file():
        ap.error(f"--teacher {args.teacher}: no teacher.json there; pass a stage-0 export directory")
    torch.set_num_threads(args.threads)
    overrides = [f"train.seed={args.seed}"] + [f"{s.split('=')[0]}.steps={s.split('=')[1]}" for s in args.steps] + args.set
    base = load_config("tiny", overrides)
    size = base.model.image_size
    print(f"drawing {args.train} + {args.val} synthetic images at {size} px ...", flush=True)
    train_u8, val = render(args.train, "train", size), render(args.val, "val", size).float() / 255
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.optimizers.split(","):
            cfg = load_config("tiny", overrides + [f"{s}.optimizer={name}" for s in STAGES])
            out, inputs = Path(tmp) / name, {"teacher": args.teacher}
            for i, stage in enumerate(stages):
                if stage != "stage1":
                    previous = STAGES[STAGES.index(stage) - 1]
                    inputs["init"] = args.init if (i == 0 and args.init) else str(out / previous)
                results[(name, stage)] = train_stage(stage, cfg, inputs, train_u8, val, args.every,
                                                     out / stage, name)
    print(f"\n{args.val} val images, threads {args.threads}, load {os.getloadavg()[0]:.2f}")
    for stage in stages:
        for name in args.optimizers.split(","):
            r = results[(name, stage)]
            psnr = {k: round(v, 2) for k, v in r.items() if k.startswith("psnr")}
            acc = r.get("accuracy_1step")
            print(f"{stage:7s} {name:6s} " + (f"token acc {acc:.3f} " if acc is not None else "")
                  + " ".join(f"{k}={v}" for k, v in psnr.items())
                  + f"  (mean image {r.get('mean_image_psnr', float('nan')):.2f} dB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
