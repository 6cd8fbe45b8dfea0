"""Does the multi-step decoder read its slot inputs? The diagnostic behind "decoding steps change nothing".

    python bench/bench_context.py --teacher runs/tiny/stages/stage0/export \
        --exports runs/tiny/stages/stage1/export runs/tiny/stages/stage2/export

More decoding steps can only help if the decoder uses the codes already placed in its slots. For each
stage export this prints, on the built-in synthetic val images (``--val``, drawn in-process as
``bench_optimizer.py`` does, at the model's image size), the token accuracy against the teacher's codes:

* on the masked slots when a random share of the slots (0 .. 90%) hold the teacher's true codes: flat
  means the slot inputs are ignored, rising means the decoder has learned to use its neighbours;
* with every slot given its true code (can it at least copy its input?);
* of its own 1-step guesses, and of the most confident eighth of them (what a later step would commit);
* after 1 / 2 / 4 / 8 decoding steps at temperature 0.

And once, from the teacher alone: how much a code's left neighbour says about it (plug-in entropies over
``--train`` images, and the accuracy of predicting a code as the commonest follower of its left neighbour,
counted on one half of the images and scored on the other). Figures only; nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_optimizer import render  # noqa: E402
from sftok.checkpoint import load_model  # noqa: E402
from sftok.decoding import multistep_decode  # noqa: E402
from sftok_platform.train.checkpointing import load_teacher_dir  # noqa: E402

VISIBLE_SHARES = (0.0, 0.25, 0.5, 0.75, 0.9)


def entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


@torch.no_grad()
def teacher_codes(teacher, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([teacher.encode_codes(images[i:i + batch]) for i in range(0, len(images), batch)])


def neighbour_figures(codes: np.ndarray, codebook_size: int) -> str:
    """codes [N, H, W]: what the left neighbour tells about a code."""
    left, right = codes[:, :, :-1].ravel(), codes[:, :, 1:].ravel()
    joint = np.zeros((codebook_size, codebook_size))
    np.add.at(joint, (left, right), 1)
    h = entropy_bits(np.bincount(codes.ravel(), minlength=codebook_size).astype(float))
    h_given_left = entropy_bits(joint.ravel()) - entropy_bits(joint.sum(1))
    half = len(codes) // 2
    counted = np.zeros_like(joint)
    np.add.at(counted, (codes[:half, :, :-1].ravel(), codes[:half, :, 1:].ravel()), 1)
    follower = counted.argmax(1)
    held_left, held_right = codes[half:, :, :-1].ravel(), codes[half:, :, 1:].ravel()
    majority = np.bincount(codes[:half].ravel(), minlength=codebook_size).argmax()
    return (f"H(code) {h:.2f} bits, H(code | left neighbour) {h_given_left:.2f} bits (plug-in); "
            f"equal to the left neighbour {np.mean(left == right):.1%}; predicted from the left neighbour "
            f"alone {np.mean(follower[held_left] == held_right):.1%} (held-out half; commonest code "
            f"{np.mean(held_right == majority):.1%})")


@torch.no_grad()
def export_figures(model, codes: torch.Tensor, images: torch.Tensor, seed: int) -> list[str]:
    z_q, _ = model.quantize_images(images)
    masked = torch.full_like(codes, model.mask_id)
    lines, shares = [], []
    for share in VISIBLE_SHARES:
        visible = torch.rand(codes.shape, generator=torch.Generator().manual_seed(seed)) < share
        pred = model.decoder(torch.where(visible, codes, masked), z_q).argmax(-1)
        shares.append(f"{share:.0%}: {(pred == codes)[~visible].float().mean():.1%}")
    lines.append("masked-slot accuracy with a share of true codes visible  " + "  ".join(shares))
    copied = (model.decoder(codes, z_q).argmax(-1) == codes).float().mean()
    logits = model.decoder(masked, z_q).float()
    right = (logits.argmax(-1) == codes).float()
    confidence = logits.max(-1).values             # the official decoding loop ranks by the raw logit
    top = confidence >= confidence.quantile(7 / 8, dim=1, keepdim=True)
    lines.append(f"every slot given its true code: {copied:.1%} copied;  own 1-step guesses {right.mean():.1%}, "
                 f"the most confident eighth {right[top].mean():.1%}")
    steps = [f"{n}: {(multistep_decode(model.decoder, z_q, n, 0.0).ids == codes).float().mean():.1%}"
             for n in (1, 2, 4, 8)]
    lines.append("token accuracy after n decoding steps (temperature 0)  " + "  ".join(steps))
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="stage-0 export dir (teacher.safetensors + teacher.json)")
    ap.add_argument("--exports", nargs="+", required=True, help="stage-1/2 export dirs to examine")
    ap.add_argument("--val", type=int, default=128, help="synthetic val images")
    ap.add_argument("--train", type=int, default=4096, help="synthetic train images for the neighbour counts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1, help="seed of the visible-slot draws")
    args = ap.parse_args(argv)
    for path in [args.teacher, *args.exports]:
        if not Path(path).is_dir():
            ap.error(f"{path}: not a directory; pass export directories (runs/<run>/stages/stageN/export)")
    if args.val < 1 or args.train < 2:
        ap.error("--val must be >= 1 and --train >= 2")
    torch.set_num_threads(args.threads)
    teacher = load_teacher_dir(args.teacher)
    models = {path: load_model(path).eval() for path in args.exports}
    size = next(iter(models.values())).cfg.image_size
    train = teacher_codes(teacher, render(args.train, "train", size).float() / 255).reshape(args.train, -1)
    side = int(round(train.shape[1] ** 0.5))
    print(f"teacher codes ({side}x{side} per image, {args.train} train images): "
          + neighbour_figures(train.reshape(-1, side, side).numpy(), teacher.quantize.num_embeddings))
    val = render(args.val, "val", size).float() / 255
    codes = teacher_codes(teacher, val).reshape(len(val), -1)
    for path, model in models.items():
        print(f"\n{path}")
        for line in export_figures(model, codes, val, args.seed):
            print("  " + line)
    print(f"\n{args.val} val images, threads {args.threads}, load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
