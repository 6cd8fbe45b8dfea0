"""Side by side with the official implementation: encode and decode-to-image, same weights, same process.

    python bench/bench_official.py --official /path/to/SFTok            # SFTok-B-64, batch 1 and 16
    python bench/bench_official.py                                       # no checkout: this project alone
    python bench/bench_official.py --sections fast --weights runs/default/stages/stage3/export
                                                    # fast-path accuracy on trained weights (and their val images)

``--official`` is a checkout of github.com/Neur-IO/SFTok (tested at 0e98df0; the packages it imports:
``pip install -e ".[official]"``). The official ``SFTok`` is built from its own ``configs/infer_sftok.yaml`` with
``torch.manual_seed(0)``, in eval mode, with temperature 0 (deterministic decoding) and no guidance; this
project's model is loaded from that model's ``state_dict`` through ``sftok.from_official``, so both hold the
same weights. Every figure is timed round-robin (official, exact, fast, official, ...) in one process, so
load drift hits all alike; outputs are compared on the same inputs (tokens, decoded ids, max image
difference, PSNR).

Sections:
  roofline   the measured fp32 SGEMM rate (and bf16, int8 where the CPU has them) and the FLOPs of one
             decode-to-image (``torch.utils.flop_counter``), so every time below has its floor beside it
  encode     batch 1: official vs this project (exact; fast)
  decode     batch 1, 8 steps, T=0: official ``decode_tokens`` vs ``SFTok.decode_tokens`` (exact; fast)
  breakdown  where a batch-1 decode spends its time, per module, for both implementations
  decode16   batch 16 throughput (images/s); one timed call per variant (``--batch16-repeats``)
  fast       :func:`sftok.fast.fast_inference` accuracy: ids equal and image PSNR against the exact path,
             on random weights and, with ``--weights``, on trained weights and their data set's val images
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sftok  # noqa: E402
import sftok.registry  # noqa: E402
from sftok.fast import fast_inference, native_bf16  # noqa: E402

STEPS = 8


# ###################################################################################################### models
def official_model(checkout: Path, model_name: str):
    """The official SFTok from ``checkout`` with seed-0 random weights, and its config as a plain dict."""
    if not (checkout / "modeling" / "sftok.py").is_file():
        raise SystemExit(f"{checkout} is not a checkout of Neur-IO/SFTok (no modeling/sftok.py).")
    missing = [m for m in ("einops", "omegaconf", "accelerate") if not _importable(m)]
    if missing:
        raise SystemExit(f"the official code needs {', '.join(missing)}: pip install -e \".[official]\" "
                         f"(or pip install {' '.join(missing)})")
    sys.path.insert(0, str(checkout))
    from omegaconf import OmegaConf
    with contextlib.redirect_stdout(open(os.devnull, "w")):       # it prints "attention mode is flash"
        from modeling.sftok import SFTok as OfficialSFTok
    cfg = OmegaConf.load(checkout / "configs" / "infer_sftok.yaml")
    ours = sftok.registry.model_config(model_name)
    if {ours.encoder_size, ours.decoder_size} - {"small", "base", "large"}:
        raise SystemExit(f"the official code has no {ours.encoder_size!r}/{ours.decoder_size!r} ViT size; "
                         "compare sftok_b64 or sftok_l64, or drop --official to time this project alone.")
    cfg.model.vq_model.vit_enc_model_size = ours.encoder_size
    cfg.model.decoder.vit_dec_model_size = ours.decoder_size
    cfg.model.generator = OmegaConf.create({"randomize_temperature": 0.0, "guidance_scale": 0.0,
                                            "num_steps": STEPS})
    torch.manual_seed(0)
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        model = OfficialSFTok(cfg).eval()
    return model, OmegaConf.to_container(cfg, resolve=True)


def _importable(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


class Official:
    """The official model behind this project's call names (encode -> tokens [B,64], decode -> image)."""

    def __init__(self, model):
        self.model = model

    def encode(self, images):
        return self.model.encode(images)[1]["min_encoding_indices"].reshape(images.shape[0], -1)

    def decode_image(self, tokens):
        return self.model.decode_tokens(tokens.unsqueeze(1))


class Ours:
    def __init__(self, model):
        self.model = model

    def encode(self, images):
        return self.model.encode(images)

    def decode_image(self, tokens):
        return self.model.decode_tokens(tokens, STEPS, 0.0)


# ###################################################################################################### timing
def interleaved(named_calls: dict, repeats: int, warmup: bool = True) -> dict:
    """``{name: fn}`` -> ``{name: (median s, output)}``, timed round-robin after one untimed call each."""
    out = {}
    if warmup:
        for name, fn in named_calls.items():
            out[name] = fn()
    times = {name: [] for name in named_calls}
    for _ in range(repeats):
        for name, fn in named_calls.items():
            t0 = time.perf_counter()
            result = fn()
            times[name].append(time.perf_counter() - t0)
            out.setdefault(name, result)
    return {name: (statistics.median(times[name]), out[name]) for name in named_calls}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.float().clamp(0, 1) - b.float().clamp(0, 1)) ** 2).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def matmul_rate(dtype: torch.dtype, m: int = 2048, k: int = 2048, n: int = 2048, repeats: int = 10) -> float:
    """Measured GFLOP/s (GOP/s for int8) of one [m,k] x [k,n] product on this process's threads."""
    if dtype == torch.int8:
        a = torch.randint(-127, 127, (m, k), dtype=torch.int8)
        b = torch.randint(-127, 127, (k, n), dtype=torch.int8)
        fn = lambda: torch._int_mm(a, b)   # noqa: E731
    else:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        fn = lambda: a @ b                 # noqa: E731
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 2 * m * k * n * repeats / (time.perf_counter() - t0) / 1e9


def decode_flops(model, tokens) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        model.decode_tokens(tokens, STEPS, 0.0)
    return counter.get_total_flops()


# ###################################################################################################### sections
def section_roofline(ours, tokens):
    fp32 = matmul_rate(torch.float32)
    line = f"  fp32 SGEMM (2048^3) {fp32:6.0f} GFLOP/s"
    if native_bf16():
        line += f"   bf16 {matmul_rate(torch.bfloat16):6.0f} GFLOP/s"
    with contextlib.suppress(RuntimeError):
        line += f"   int8 (torch._int_mm) {matmul_rate(torch.int8):6.0f} GOP/s"
    print(line)
    flops = decode_flops(ours.model, tokens[:1])
    print(f"  one decode-to-image ({STEPS} steps, batch 1): {flops / 1e9:.1f} GFLOP -> fp32 floor "
          f"{flops / 1e9 / fp32:.2f} s at the SGEMM rate")
    return fp32, flops


def section_encode(impls: dict, images, repeats: int):
    print(f"\n[encode] batch 1, {repeats} interleaved repeats (+1 warm-up)")
    with torch.inference_mode():
        res = interleaved({n: (lambda m=m: m.encode(images)) for n, m in impls.items()}, repeats)
    base_name = next(iter(res))
    base_t, base_tok = res[base_name]
    for name, (t, tok) in res.items():
        same = (tok == base_tok).float().mean().item() * 100
        print(f"  {name:<26s} {t * 1000:8.1f} ms   x{base_t / t:5.2f} vs {base_name}   tokens equal {same:5.1f}%")


def section_decode(impls: dict, tokens, repeats: int, label: str, warmup: bool = True):
    B = tokens.shape[0]
    print(f"\n[decode-to-image] {label}: batch {B}, {STEPS} steps, T=0, {repeats} interleaved repeat(s)"
          f"{' (+1 warm-up)' if warmup else ''}")
    with torch.inference_mode():
        res = interleaved({n: (lambda m=m: m.decode_image(tokens)) for n, m in impls.items()}, repeats, warmup)
    base_name = next(iter(res))
    base_t, base_img = res[base_name]
    for name, (t, img) in res.items():
        diff = (img.float() - base_img.float()).abs().max().item()
        print(f"  {name:<26s} {t:8.2f} s  {B / t:7.3f} img/s   x{base_t / t:5.2f} vs {base_name}   "
              f"max|img diff| {diff:.1e}  PSNR {psnr(img, base_img):6.1f} dB")
    return res


def section_breakdown(impls: dict, tokens):
    """Seconds in the decoder's transformer blocks and in the pixel decoder during one decode (forward hooks);
    the rest is embeddings, the logits head and the sampling loop."""
    print("\n[breakdown] one batch-1 decode-to-image, seconds per part (module calls)")
    for name, impl in impls.items():
        model = impl.model
        # the official generate() calls decoder.forward directly (no hooks there), so the transformer blocks
        # are timed one by one: both implementations call them as modules
        parts = {"decoder blocks": list(model.decoder.transformer)}
        if hasattr(model, "pixel_decoder"):
            parts["pixel decoder"] = [model.pixel_decoder]
        spent = {k: [0.0, 0] for k in parts}
        handles = []
        for key, modules in parts.items():
            def pre(_m, _a, key=key):
                spent[key].append(time.perf_counter())

            def post(_m, _a, _o, key=key):
                spent[key][0] += time.perf_counter() - spent[key].pop()
                spent[key][1] += 1
            for module in modules:
                handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        with torch.inference_mode():
            impl.decode_image(tokens)                                           # warm
            for v in spent.values():
                v[:] = [0.0, 0]
            t0 = time.perf_counter()
            impl.decode_image(tokens)
            total = time.perf_counter() - t0
        for h in handles:
            h.remove()
        figures = "  ".join(f"{k} {v[0]:.2f} s ({v[1]})" for k, v in spent.items())
        rest = total - sum(v[0] for v in spent.values())
        print(f"  {name:<26s} total {total:.2f} s:  {figures}  rest {rest:.2f} s")


def section_fast_accuracy(ours_model, tokens, images=None, label="random weights"):
    """ids equal and image PSNR of the fast path against the exact path on the same tokens."""
    fast = fast_inference(ours_model)
    with torch.inference_mode():
        exact = ours_model.decode(tokens, STEPS, 0.0)
        approx = fast.decode(tokens, STEPS, 0.0)
        if ours_model.cfg.pixel_head:
            img_exact = ours_model.logits_to_image(exact.logits)
            img_fast = fast.logits_to_image(approx.logits)
        else:
            return print(f"  {label}: no pixel head (stage-1/2 layout); skipped")
        ids = (exact.ids == approx.ids).float().mean().item() * 100
        line = (f"  {label}: {tokens.shape[0]} images, decoded ids equal {ids:.2f}%, image PSNR fast vs exact "
                f"{psnr(img_fast, img_exact):.1f} dB")
        if images is not None:
            tok_fast = fast.encode(images)
            line += (f"; tokens from fast encode equal {(tok_fast == tokens).float().mean().item() * 100:.2f}%; "
                     f"PSNR vs the input: exact {psnr(img_exact, images):.2f} dB, fast {psnr(img_fast, images):.2f} dB")
    print(line, flush=True)


def trained_weights_case(path: Path, n: int):
    """A checkpoint in this project's format and ``n`` val images of the built-in synthetic set at its size."""
    import numpy as np
    from PIL import Image

    from sftok_platform.data import synthetic
    model = sftok.load_model(path).eval()
    size = model.cfg.image_size
    imgs = []
    for i in range(n):
        array, _ = synthetic.render(i, split="val")
        imgs.append(np.asarray(Image.fromarray(array).resize((size, size), Image.BICUBIC)))
    images = torch.tensor(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
    return model, images


# ###################################################################################################### main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", type=Path, help="checkout of github.com/Neur-IO/SFTok")
    p.add_argument("--model", default="sftok_b64", help="registry name (sftok_b64, sftok_l64, sftok_tiny)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sections", default="roofline,encode,decode,breakdown,decode16,fast")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch16-repeats", type=int, default=1)
    p.add_argument("--weights", type=Path, help="a trained checkpoint (this project's format) for the fast-path "
                   "accuracy on its data set's val images")
    p.add_argument("--images", type=int, default=32, help="val images for --weights")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(args.threads)
    sections = set(args.sections.split(","))
    print(f"bench_official: model {args.model}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cpu '{platform.processor() or platform.machine()}', capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16 {native_bf16()}, load average {os.getloadavg()[0]:.2f} at start")

    impls: dict = {}
    if args.official:
        off_model, off_cfg = official_model(args.official.resolve(), args.model)
        impls["official"] = Official(off_model)
        ours_model = sftok.from_official(off_model.state_dict(), off_cfg).eval()
        print(f"  official: {args.official} (same seed-0 weights loaded into both)")
    else:
        print("  no --official checkout: timing this project alone (fetch github.com/Neur-IO/SFTok and pass "
              "--official PATH for the side-by-side ratios)")
        torch.manual_seed(0)
        ours_model = sftok.create_model(args.model).eval()
    impls["exact"] = Ours(ours_model)
    impls["fast (int8 + bf16 pixel)"] = Ours(fast_inference(ours_model))

    size = ours_model.cfg.image_size
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        tokens = ours_model.encode(images)
        if "official" in impls:
            same = torch.equal(impls["official"].encode(images), tokens)
            print(f"  tokens of the official and this project's encode equal: {same}")

    if "roofline" in sections:
        print("\n[roofline]")
        with torch.no_grad():          # FlopCounterMode's module tracker does not run under inference_mode
            section_roofline(impls["exact"], tokens)
    if "encode" in sections:
        section_encode(impls, images, args.repeats)
    if "decode" in sections:
        section_decode(impls, tokens, args.repeats, "batch 1")
    if "breakdown" in sections:
        section_breakdown(impls, tokens)
    if "decode16" in sections:
        batch = torch.randint(0, ours_model.cfg.codebook_size, (16, ours_model.cfg.num_latent_tokens),
                              generator=torch.Generator().manual_seed(3))
        section_decode(impls, batch, args.batch16_repeats, "batch 16", warmup=False)
    if "fast" in sections:
        print("\n[fast path accuracy] against the exact path, T=0")
        batch = torch.randint(0, ours_model.cfg.codebook_size, (8, ours_model.cfg.num_latent_tokens),
                              generator=torch.Generator().manual_seed(4))
        section_fast_accuracy(ours_model, batch, label=f"{args.model}, seed-0 random weights, random tokens")
        if args.weights:
            model, val = trained_weights_case(args.weights, args.images)
            with torch.inference_mode():
                toks = model.encode(val)
            section_fast_accuracy(model, toks, val, label=f"trained {args.weights}")
    print(f"\nload average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
