"""Core benchmark of the sftok library: encode, 8-step decode-to-image and training-step throughput.

Every optimised path is measured in the same run against the plain eager fp32 baseline (naive
matmul-softmax attention, ``torch.no_grad``, NCHW convolutions) and its outputs are compared with the
baseline's. Random weights (seed 0): the figures are about speed; equality is checked on the same inputs.

    python bench/bench_core.py                        # sftok_b64, 2 threads, all sections (a few minutes)
    python bench/bench_core.py --model sftok_tiny --repeats 1 --batch16-repeats 1     # smoke test
    python bench/bench_core.py --sections assignment   # batch vs per-image token agreement only

On CUDA it also prints images/s and model-FLOPs utilisation (SPEC B.5 FLOP counts, dense bf16 peak).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sftok  # noqa: E402
from sftok.blocks import attention_impl  # noqa: E402

# SPEC B.5 forward GFLOP per 256^2 image; training counts trainable parts x3 (SPEC H)
GFLOP = {"encoder": 54.8, "decoder_b": 55.9, "decoder_l": 196.0, "pixel_decoder": 186.5, "lpips": 160.0}
PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def decoder_gflop(model) -> float:
    return GFLOP["decoder_l"] if model.cfg.decoder_size == "large" else GFLOP["decoder_b"]


def decode_gflop(model, steps: int) -> float:
    return steps * decoder_gflop(model) + GFLOP["pixel_decoder"]


def train_gflop(model, stage: str) -> float:
    enc, dec, pix = GFLOP["encoder"], decoder_gflop(model), GFLOP["pixel_decoder"]
    if stage == "stage1":
        return 3 * (enc + dec)
    if stage == "stage2":
        return 3 * (enc + dec) + enc + dec                 # + no-grad guide pass
    return enc + dec + 3 * (dec + pix) + GFLOP["lpips"]    # frozen encoder, guide pass, LPIPS (no GAN)


def peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS_BF16.items() if k in name), None)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def compare(variants, run, repeats: int, device, prepare=None, warmup: bool = True) -> list[tuple[float, object]]:
    """Time ``run(v)`` for every variant, round-robin, so that load drift on a shared machine hits all
    variants alike. One untimed warm-up call per variant first (its output is the one compared; without
    warm-up, the first timed call's). ``prepare(v)`` runs untimed before every call (layout switches).
    Returns [(median seconds, output)]."""
    prepare = prepare or (lambda v: None)
    outputs, times, cpu = [None] * len(variants), [[] for _ in variants], [[] for _ in variants]
    if warmup:
        for i, v in enumerate(variants):
            prepare(v)
            outputs[i] = run(v)
    for _ in range(repeats):
        for i, v in enumerate(variants):
            prepare(v)
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            out = run(v)
            sync(device)
            times[i].append(time.perf_counter() - t0)
            cpu[i].append(time.process_time() - c0)
            outputs[i] = out if outputs[i] is None else outputs[i]
    for v, c in zip(variants, cpu):     # process CPU time barely depends on the neighbours' load
        v["cpu_s"] = statistics.median(c)
    return [(statistics.median(t), o) for t, o in zip(times, outputs)]


def variant_ctx(v: dict, device):
    """Context for one variant: attention kernel, grad mode, autocast."""
    stack = contextlib.ExitStack()
    stack.enter_context(attention_impl(v["attn"]))
    stack.enter_context(torch.inference_mode() if v.get("inference_mode") else torch.no_grad())
    if v.get("bf16"):
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    return stack


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss(a.float().clamp(0, 1), b.float().clamp(0, 1)).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def report(name: str, seconds: float, base: float, images: int, gflop_per_image: float, extra: str = "",
           cpu: float | None = None):
    line = f"  {name:<44s} {seconds * 1000:10.1f} ms  x{base / seconds:5.2f}  {images / seconds:8.3f} img/s"
    if cpu is not None and seconds > 0:
        line += f"  cpu {cpu:7.1f} s"
    peak = peak_tflops()
    if peak:
        line += f"  MFU {images * gflop_per_image / seconds / 1000 / peak * 100:5.1f}%"
    print(line + (f"  {extra}" if extra else ""), flush=True)


# ###################################################################################################### sections
VARIANTS = [
    dict(name="eager fp32 baseline (math attn, no_grad)", attn="math"),
    dict(name="SDPA", attn="sdpa"),
    dict(name="SDPA + inference_mode + channels_last", attn="sdpa", inference_mode=True, channels_last=True),
    dict(name="SDPA + inference_mode + channels_last + bf16 pixel decoder", attn="sdpa", inference_mode=True,
         channels_last=True, bf16_pixel=True),
    dict(name="SDPA + inference_mode + channels_last + bf16", attn="sdpa", inference_mode=True,
         channels_last=True, bf16=True),
    dict(name="SDPA + inference_mode + channels_last + bf16 weights", attn="sdpa", inference_mode=True,
         channels_last=True, bf16_weights=True),
]


def set_layout(model, channels_last: bool):
    if model.cfg.pixel_head:
        model.pixel_decoder.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def bench_encode(model, device, args):
    print(f"\n[encode] batch 1, {args.repeats} interleaved repeats (+1 warm-up)")
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1)).to(device)
    variants = [{**v, "name": v["name"].replace(" + channels_last", "")}
                for v in VARIANTS if not (v.get("bf16_pixel") or v.get("bf16_weights"))]

    def run(v):
        with variant_ctx(v, device):
            return model.encode(x)

    results = compare(variants, run, args.repeats, device)
    base_t, base_tok = results[0]
    for v, (t, tok) in zip(variants, results):
        same = (tok == base_tok).float().mean().item()
        report(v["name"], t, base_t, 1, GFLOP["encoder"], f"tokens equal to baseline: {same * 100:.1f}%",
               cpu=v.get("cpu_s"))


def bench_decode(model, device, args, batch: int, repeats: int, variants, warmup: bool = True):
    print(f"\n[decode-to-image] {args.steps} steps, temperature {args.temperature}, batch {batch}, "
          f"{repeats} interleaved repeats ({'+1 warm-up' if warmup else 'no warm-up call'})")
    tokens = torch.randint(0, model.cfg.codebook_size, (batch, 64), generator=torch.Generator().manual_seed(3))
    tokens = tokens.to(device)

    copies = {}

    def pick(v):
        if not v.get("bf16_weights"):
            return model
        if "bf16" not in copies:      # model.inference_dtype(bf16): bf16 weights, fp32 quantizer
            copies["bf16"] = copy.deepcopy(model).inference_dtype(torch.bfloat16)
        return copies["bf16"]

    def run(v):
        m = pick(v)
        with variant_ctx(v, device):
            res = m.decode(tokens, args.steps, args.temperature,
                           generator=torch.Generator(device=device).manual_seed(0))
            with torch.autocast(device.type, dtype=torch.bfloat16) if v.get("bf16_pixel") else contextlib.nullcontext():
                return res.ids, m.logits_to_image(res.logits)

    results = compare(variants, run, repeats, device, warmup=warmup,
                      prepare=lambda v: set_layout(pick(v), bool(v.get("channels_last"))))
    if args.compile:   # compiled modules change every later call, so this one is timed after the others
        v = dict(name="SDPA + inference_mode + channels_last + torch.compile", attn="sdpa", inference_mode=True,
                 channels_last=True)
        set_layout(model, True)
        model.decoder.compile(dynamic=False)
        model.pixel_decoder.compile(dynamic=False)
        variants = variants + [v]
        results += compare([v], run, repeats, device)
    base_t, (base_ids, base_img) = results[0]
    for v, (t, (ids, img)) in zip(variants, results):
        agree = (ids == base_ids).float().mean().item()
        diff = (img.float() - base_img.float()).abs().max().item()
        report(v["name"], t, base_t, batch, decode_gflop(model, args.steps),
               f"ids equal {agree * 100:5.1f}%  max|img diff| {diff:.2e}  PSNR vs base {psnr(img, base_img):.1f} dB",
               cpu=v.get("cpu_s"))
    set_layout(model, False)


def bench_train(name: str, device, args):
    """Training-step throughput per stage: forward + backward + AdamW step, eager fp32 vs SDPA (+bf16)."""
    from sftok.config import LossConfig
    from sftok.objectives import Stage3Loss, stage1_loss, stage2_loss
    from sftok.optim import build_adamw
    B = args.train_batch
    print(f"\n[train step] batch {B}, {args.train_repeats} interleaved repeats "
          f"({'+1 warm-up step' if not args.no_warmup else 'no warm-up step'}); "
          "forward + backward + AdamW")
    x = torch.rand(B, 3, 256, 256, generator=torch.Generator().manual_seed(4)).to(device)
    codes = torch.randint(0, 1024, (B, 256), generator=torch.Generator().manual_seed(5)).to(device)
    for stage in ("stage1", "stage2", "stage3"):
        torch.manual_seed(0)
        model = sftok.create_model(name if stage == "stage3" else f"{name}_stage12").to(device).train()
        stage3 = None
        if stage == "stage3":
            # LPIPS-VGG with random VGG/LPIPS weights (same FLOPs as the real ones, no files needed); the GAN
            # term starts at step 20k and is off here
            cfg = LossConfig(discriminator_weight=0.0)
            stage3 = Stage3Loss(cfg, allow_random_backbones=True).to(device)
            Stage3Loss.prepare_model(model)
        opt = build_adamw(model, lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-4)

        def step():
            if stage == "stage1":
                loss, _ = stage1_loss(model, x, codes)
            elif stage == "stage2":
                loss, _ = stage2_loss(model, x, codes, generator=torch.Generator().manual_seed(0))
            else:
                loss, _, _ = stage3.generator_loss(model, x, 0, generator=torch.Generator().manual_seed(0))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        # every variant's warm-up step starts from the same weights and optimiser state, so the
        # first-step losses compare; the timed steps then continue from wherever the weights are
        init_model = {k: v.clone() for k, v in model.state_dict().items()}
        variants = [dict(name="eager fp32 baseline (math attn)", attn="math"), dict(name="SDPA fp32", attn="sdpa"),
                    dict(name="SDPA + bf16 autocast", attn="sdpa", bf16=True)]
        variants = [variants[i] for i in map(int, args.train_variants.split(","))]
        fresh = set()

        def run(v):
            if v["name"] not in fresh:
                fresh.add(v["name"])
                model.load_state_dict(init_model)
                opt.state.clear()
            with contextlib.ExitStack() as ctx:
                ctx.enter_context(attention_impl(v["attn"]))
                if v.get("bf16"):
                    ctx.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
                return step().item()

        results = compare(variants, run, args.train_repeats, device, warmup=not args.no_warmup)
        base_t, base_loss = results[0]
        for v, (t, first) in zip(variants, results):
            report(f"{stage}: {v['name']}", t, base_t, B, train_gflop(model, stage),
                   f"first-step loss {first:.5f} (baseline {base_loss:.5f})", cpu=v.get("cpu_s"))
        del model, opt, stage3


def bench_assignment(device, args):
    """How often the official batch-coupled Sinkhorn tokens differ from batch-independent ones."""
    print("\n[assignment] tokens that differ between assignment='batch' (official) and 'per_image'")
    ref = Path(__file__).resolve().parents[2] / "shared" / "reference"
    ref = ref if ref.is_dir() else Path("/work/shared/reference")
    if (ref / "model_tiny.safetensors").exists():
        from safetensors.torch import load_file
        model = sftok.from_official(ref / "model_tiny.safetensors", ref / "config_tiny_stage3.yaml").to(device)
        images = load_file(str(ref / "inputs.safetensors"))["images"].to(device)
        cases = [("reference tiny weights, reference inputs", model, images)]
        for b in (4, 16, 64):
            cases.append((f"reference tiny weights, {b} random images", model,
                          torch.rand(b, 3, 256, 256, generator=torch.Generator().manual_seed(b)).to(device)))
        for label, m, imgs in cases:
            _assignment_line(label, m, imgs)
    torch.manual_seed(0)
    model = sftok.create_model(args.model).to(device).eval()
    imgs = torch.rand(args.assign_batch, 3, 256, 256, generator=torch.Generator().manual_seed(7)).to(device)
    _assignment_line(f"{args.model} seed-0 random weights, {args.assign_batch} random images", model, imgs)


def _assignment_line(label, model, images):
    batched = model.encode(images, assignment="batch")
    alone = model.encode(images, assignment="per_image")
    diff = (batched != alone).float()
    print(f"  {label:<58s} {int(diff.sum())}/{diff.numel()} = {diff.mean().item() * 100:.2f}% tokens differ; "
          f"images affected {int((diff.sum(1) > 0).sum())}/{len(images)}", flush=True)


# ###################################################################################################### main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sftok_b64")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sections", default="encode,decode,train,decode16,assignment")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch16-repeats", type=int, default=1)
    p.add_argument("--batch16-warmup", action="store_true", help="warm-up call before the batch-16 timings")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--train-batch", type=int, default=1)
    p.add_argument("--train-repeats", type=int, default=2)
    p.add_argument("--assign-batch", type=int, default=8)
    p.add_argument("--decode-variants", default="0,1,2,3,4",
                   help="indices into VARIANTS for the batch-1 decode (0 = baseline, keep it first)")
    p.add_argument("--train-variants", default="0,1,2", help="0 = eager fp32, 1 = SDPA fp32, 2 = SDPA + bf16")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip warm-up calls (the first timed call is compared); for a heavily loaded machine")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (decoder + pixel decoder)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sections = set(args.sections.split(","))
    print(f"sftok core benchmark: model {args.model}, device {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, cpu '{platform.processor() or platform.machine()}', "
          f"load average {os.getloadavg()[0]:.2f} at start")
    if device.type == "cpu":
        print("  (no GPU here: img/s only; MFU is printed on CUDA against the dense bf16 peak)")
    torch.manual_seed(0)
    model = sftok.create_model(args.model).to(device).eval()
    if "encode" in sections:
        bench_encode(model, device, args)
    if "decode" in sections:
        chosen = [VARIANTS[i] for i in map(int, args.decode_variants.split(","))]
        bench_decode(model, device, args, 1, args.repeats, chosen, warmup=not args.no_warmup)
    if "train" in sections:
        bench_train(args.model, device, args)
    if "decode16" in sections:
        if args.compile:
            torch.manual_seed(0)       # fresh, uncompiled model
            model = sftok.create_model(args.model).to(device).eval()
        best = [VARIANTS[0], VARIANTS[2], VARIANTS[4]]
        bench_decode(model, device, args, 16, args.batch16_repeats, best, warmup=args.batch16_warmup)
    del model
    if "assignment" in sections:
        bench_assignment(device, args)
    print(f"\nload average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
