"""Stage 4: the MaskGIT generator on SFTok tokens, and its gFID (SPEC D), tracked in MLflow.

    run_stage4(cfg, tokenizer_dir, shards, parent_run_id)   # experiments/full_pipeline.py --with-generator

Four steps, each resumable, under ``<run.root>/<run.name>/stages/stage4/``:

1. **Tokenize** the train split once with a Ray Data pass (an actor pool, one GPU each where present): resize
   + center crop (the official generator data, ``random_crop: False``), the image *and its mirror image*
   encoded with batch-independent OptVQ assignment (``assignment="per_image"``: a token never depends on
   which images share the batch, so precomputed tokens equal on-the-fly ones). The official random flip is
   kept by picking one of the two token rows per sample at training time. Output: ``tokens/`` Parquet
   (``tokens``, ``tokens_flip`` int16 [64], ``label``) + ``tokens.json``.
2. **Train** :class:`sftok.generator.MaskGITGenerator` in the one training loop of every stage
   (``sftok_platform.train.loop``, task ``GeneratorTask``) and its ``TorchTrainer``: run name
   ``<run.name>-stage4`` (the same name resumes from ``ray.train.get_checkpoint()``), a checkpoint from rank
   0 every ``train.checkpoint_every`` steps, AdamW (``generator.lr``, betas, wd with the official no-decay
   rule), warm-up + cosine, grad clip ``train.grad_clip``, EMA ``train.ema_decay``, mixed precision (with
   the GradScaler for fp16), TF32, ``train.compile`` and the divergence guard like stages 0-3. The EMA
   weights are exported to ``export/`` (``sftok.generator.load_generator``).
3. **Sample** ``generator.samples_per_class`` images for every class of the data in parallel (Ray Data over
   class chunks on an actor pool): CFG sampling (``generator.sample_steps``, ``guidance_scale``,
   ``temperature``, softmax-temperature annealing as in the TiTok sampling script), decoding with the
   tokenizer (``max(eval.steps)`` steps at ``eval.temperature``), FID-Inception features in the same actor.
   ``samples.npz`` keeps every sample's tokens and label (images can be re-decoded from them).
4. **gFID / IS** of the samples against ``generator.reference_stats`` (an ``.npz`` with ``mu`` [2048] and
   ``sigma`` [2048,2048]; ADM's ``VIRTUAL_imagenet256_labeled.npz`` holds exactly these for ImageNet 256)
   with the FID Inception of ``eval.inception_weights`` (sftok.inception). Without a reference file the
   statistics of the val shards are used instead and the figure is logged as ``gfid_vs_val`` with the label
   "gFID vs val shards (not comparable to papers)".

MLflow: one child run ``<run.name>-stage4`` under the pipeline's parent run: params (the ``generator``
section and the rest of the resolved config), the loss curve (rank 0 of the trainer), a sample grid image,
the final metrics and the EMA export.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from sftok_platform.config import Config, ConfigError

STAGE = "stage4"
SOFTMAX_ANNEALING = True          # TiTok's sample_imagenet script: softmax_temperature_annealing=True
VAL_LABEL = "gFID vs val shards (not comparable to papers)"
GRID_CLASSES, GRID_PER_CLASS = 8, 4


# ######################################################################################################
# Entry point
# ######################################################################################################

def run_stage4(cfg: Config, tokenizer_dir: str, shards: str, parent_run_id: Optional[str] = None, *,
               teacher: Optional[str] = None, force: bool = False, debug: Optional[dict] = None) -> dict:
    """Tokenize, train the generator, sample, and measure gFID/IS; returns the final metrics.

    Args:
        cfg: resolved config; reads ``generator.*``, ``train.*`` (workers, gpu, checkpointing, EMA),
            ``eval.*`` (decode steps/temperature, batch size, Inception weights), ``run.*``, ``tracking.*``.
        tokenizer_dir: a tokenizer export (``sftok.checkpoint.save_model`` dir, e.g. the stage-3 export).
        shards: the prepared shards dir (train split tokenized, val split for the fallback reference).
        parent_run_id: MLflow run the stage-4 child run hangs under (the pipeline's parent run).
        teacher: MaskGIT-VQGAN weights to decode with when the tokenizer has no pixel head (stage-1/2
            export); default ``teacher.weights`` or this run's stage-0 export.
        force: redo a stage that ``done.json`` marks finished.
        debug: fault injection for tests (``{"fail_after_step": k, "marker": file}``).

    Returns:
        ``{"gfid" or "gfid_vs_val", "inception_score", "num_samples", "train_loss", "train_seconds",
        "sample_seconds", "tokenized_images", ...}`` (numbers) plus ``"gfid_label"`` and ``"export"``.
    """
    from sftok_platform import tracking
    from sftok_platform.cluster import connect
    from sftok_platform.data import load_manifest
    from sftok_platform.train import checkpointing as ckpt

    rdir = tracking.run_root(cfg) / cfg.run.name
    paths = ckpt.StagePaths(rdir, STAGE)
    if ckpt.is_done(paths) and not force:
        return ckpt.read_done(paths)["metrics"]
    manifest = load_manifest(shards)
    num_classes = check_config(cfg, manifest)
    tok_cfg = _tokenizer_config(tokenizer_dir)
    teacher = teacher or _default_teacher(cfg, rdir, tok_cfg.pixel_head)
    connect(cfg)
    paths.dir.mkdir(parents=True, exist_ok=True)
    run_id = tracking.start_child_run(cfg, STAGE, parent_run_id)
    c = tracking.client(cfg)
    c.set_tag(run_id, "sftok.tokenizer", str(tokenizer_dir))
    with tracking.run_closed_by(cfg, run_id):
        t0 = time.time()
        tokens_dir, n_tok = tokenize_train_split(cfg, tokenizer_dir, shards, paths.dir, tok_cfg.image_size)
        t_tok = time.time() - t0
        train_info = train_generator(cfg, tokens_dir, paths, tok_cfg.codebook_size, tok_cfg.num_latent_tokens,
                                     run_id, debug=debug)
        t1 = time.time()
        samples = sample_and_measure(cfg, paths.export, tokenizer_dir, num_classes, tok_cfg.num_latent_tokens,
                                     teacher=teacher)
        np.savez(paths.dir / "samples.npz", tokens=samples["tokens"], labels=samples["labels"])
        ref = reference_stats(cfg, shards, paths.dir, tok_cfg.image_size)
        fid = fid_against(samples["features"], samples["feature_stats"], ref["mu"], ref["sigma"])
        t_sample = time.time() - t1
        key = "gfid" if ref["source"] == "file" else "gfid_vs_val"
        label = (f"gFID vs {Path(cfg.generator.reference_stats).name}" if ref["source"] == "file" else VAL_LABEL)
        note = samples["inception_note"]
        if note:
            label += f"; {note}"
        metrics = {key: fid, "inception_score": samples["inception_score"], "num_samples": len(samples["labels"]),
                   "train_loss": train_info.get("loss", float("nan")), "train_seconds": train_info["seconds"],
                   "tokenize_seconds": t_tok, "sample_seconds": t_sample, "tokenized_images": n_tok,
                   "reference_images": ref.get("count", 0)}
        grid = paths.images / "stage4_samples.png"
        save_sample_grid(cfg, tokenizer_dir, samples, grid, teacher=teacher)
        tracking.log_summary_metrics(cfg, run_id, metrics, step=cfg.generator.steps)
        c.set_tag(run_id, "sftok.gfid_label", label)
        c.set_tag(run_id, "sftok.export", str(paths.export))
        with Image.open(grid) as img:     # the UI's image view (``log_image``), labels beside it (not in images/)
            c.log_image(run_id, img.convert("RGB"), key="stage4_samples", step=cfg.generator.steps)
        c.log_artifact(run_id, str(grid.with_suffix(".txt")), "image_labels")
        c.log_artifact(run_id, str(paths.dir / "samples.npz"), "samples")
        out = {**metrics, "gfid_label": label, "export": str(paths.export)}
        (paths.dir / "final_metrics.json").write_text(json.dumps(out, indent=2))
    ckpt.mark_done(paths, {"metrics": out, "run_id": run_id, "tokenizer": str(tokenizer_dir)})
    return out


def check_config(cfg: Config, manifest: dict) -> int:
    """Refuse generator settings that cannot work with this data; returns the data's class count."""
    g, t = cfg.generator, cfg.train
    classes = len(manifest.get("classes") or [])
    if classes < 1:
        raise ConfigError("the shards' manifest lists no classes; the generator is class-conditional and needs "
                          "labelled data (prepare an image folder with one sub-folder per class).")
    if g.num_classes < classes:
        raise ConfigError(f"generator.num_classes={g.num_classes} but the data has {classes} classes; set "
                          f"generator.num_classes={classes}.")
    if g.global_batch_size % t.workers:
        raise ConfigError(f"generator.global_batch_size={g.global_batch_size} is not divisible by train.workers="
                          f"{t.workers}; pick a multiple of {t.workers}.")
    if g.width % g.heads:
        raise ConfigError(f"generator.width={g.width} is not divisible by generator.heads={g.heads}.")
    if g.steps < 1 or g.samples_per_class < 1 or g.sample_steps < 1:
        raise ConfigError("generator.steps, generator.samples_per_class and generator.sample_steps must be >= 1.")
    if g.reference_stats and not Path(g.reference_stats).expanduser().is_file():
        raise ConfigError(f"generator.reference_stats={g.reference_stats!r} does not exist. Give an .npz with "
                          "'mu' [2048] and 'sigma' [2048,2048] (for ImageNet 256: ADM's "
                          "VIRTUAL_imagenet256_labeled.npz from openai/guided-diffusion's evaluations), or leave it "
                          "empty to compare against the val shards (not comparable to papers).")
    return classes


def _tokenizer_config(tokenizer_dir: str):
    from sftok.checkpoint import read_model_config
    if not (Path(tokenizer_dir) / "config.json").is_file():
        raise ConfigError(f"tokenizer_dir={tokenizer_dir!r} is not a tokenizer export (no config.json); pass the "
                          "export dir of stage 3 (or convert an official checkpoint with python -m sftok.convert).")
    return read_model_config(tokenizer_dir)


def _default_teacher(cfg: Config, rdir: Path, pixel_head: bool) -> Optional[str]:
    if pixel_head:
        return None
    from sftok_platform.train import checkpointing as ckpt
    if cfg.teacher.weights:
        return cfg.teacher.weights
    p = ckpt.StagePaths(rdir, "stage0")
    if ckpt.is_done(p):
        return str(p.export)
    raise ConfigError("the tokenizer has no pixel head (a stage-1/2 export), so its samples decode through the "
                      "MaskGIT-VQGAN teacher: set teacher.weights or pass teacher=<stage-0 export>.")


def _actor_resources(cfg: Config) -> dict:
    t = cfg.train
    return {"compute": _actor_pool(t.workers), "num_cpus": t.cpus_per_worker, "num_gpus": 1 if t.gpu else 0}


def _actor_pool(n: int):
    import ray.data
    return ray.data.ActorPoolStrategy(size=max(1, n))


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ######################################################################################################
# 1. Tokenize (Ray Data)
# ######################################################################################################

class TokenizeImages:
    """map_batches actor: images [B,3,S,S] -> tokens of the image and of its mirror image (per-image
    assignment, so a row's tokens do not depend on its batch)."""

    def __init__(self, tokenizer_dir: str, threads: int = 1):
        from sftok.checkpoint import load_model
        torch.set_num_threads(max(1, threads))
        self.device = _device()
        self.model = load_model(tokenizer_dir, map_location=self.device).eval()

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        images = torch.as_tensor(batch["image"], device=self.device)
        tokens = self.model.encode(images, assignment="per_image")
        flipped = self.model.encode(images.flip(-1), assignment="per_image")
        return {"tokens": tokens.cpu().numpy().astype(np.int16), "tokens_flip": flipped.cpu().numpy().astype(np.int16),
                "label": np.asarray(batch["label"], dtype=np.int64)}


def tokenize_train_split(cfg: Config, tokenizer_dir: str, shards: str, stage_dir: Path,
                         image_size: int) -> tuple[str, int]:
    """Tokens of the train split as Parquet under ``stage_dir/tokens`` (skipped when ``tokens.json`` says
    the same tokenizer and shards already produced them). Returns ``(dir, rows)``."""
    import ray.data

    from sftok_platform.data import read_parquet, read_split
    out, marker = stage_dir / "tokens", stage_dir / "tokens.json"
    meta = {"tokenizer": str(Path(tokenizer_dir).resolve()), "shards": str(shards), "assignment": "per_image",
            "image_size": image_size}
    if marker.is_file():
        done = json.loads(marker.read_text())
        if {k: done.get(k) for k in meta} == meta:
            return str(out), int(done["rows"])
    ds = read_split(shards, "train", train=False, image_size=image_size, seed=None,
                    batch_size=cfg.eval.batch_size)
    ds = ds.map_batches(TokenizeImages, fn_constructor_kwargs={"tokenizer_dir": str(tokenizer_dir),
                                                               "threads": cfg.train.cpus_per_worker},
                        batch_size=cfg.eval.batch_size, batch_format="numpy", **_actor_resources(cfg))
    ds.write_parquet(str(out), mode=ray.data.SaveMode.OVERWRITE)
    rows = read_parquet(str(out)).count()
    marker.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    return str(out), rows


# ######################################################################################################
# 2. Train (Ray Train)
# ######################################################################################################

def train_generator(cfg: Config, tokens_dir: str, paths, codebook_size: int, seq_len: int,
                    run_id: Optional[str], *, debug: Optional[dict] = None) -> dict:
    """Train the generator as stage 4 of the one training loop (``sftok_platform.train.stages.GeneratorTask``
    in ``build_trainer``'s ``TorchTrainer``, named ``<run.name>-stage4``: the same name resumes); skipped
    when the export of a finished training exists. Returns ``{"loss", "step", "seconds", "ray_checkpoint"}``."""
    from ray.data import FileShuffleConfig

    from sftok_platform import tracking
    from sftok_platform.data import read_parquet
    from sftok_platform.train.pipeline import build_trainer

    done_file = paths.dir / "train_done.json"
    if done_file.is_file() and (paths.export / "generator.safetensors").is_file():
        return json.loads(done_file.read_text())
    trainer = build_trainer(
        cfg, STAGE, run_id=run_id, debug=debug, inputs={"codebook_size": codebook_size, "seq_len": seq_len},
        datasets={"train": read_parquet(tokens_dir, shuffle=FileShuffleConfig(seed=cfg.data.shuffle_seed))})
    t0 = time.time()
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    metrics = result.metrics or {}
    info = {"loss": float(metrics.get("loss", float("nan"))), "step": int(metrics.get("step", cfg.generator.steps)),
            "seconds": time.time() - t0,
            "ray_checkpoint": result.checkpoint.path if result.checkpoint is not None else ""}
    if run_id:
        tracking.client(cfg).set_tag(run_id, "ray.checkpoint", info["ray_checkpoint"])
    done_file.write_text(json.dumps(info, indent=2))
    return info


def _decode(tokenizer, tokens: torch.Tensor, cfg: Config, teacher) -> torch.Tensor:
    steps = max(cfg.eval.steps) if cfg.eval.steps else 8
    gen = torch.Generator().manual_seed(0)
    return tokenizer.decode_tokens(tokens, num_steps=steps, temperature=cfg.eval.temperature, generator=gen,
                                   teacher=teacher).clamp(0, 1)


def _load_teacher(cfg: Config, path: Optional[str], device):
    if not path:
        return None
    from sftok_platform.train import checkpointing as ckpt
    return ckpt.load_teacher_export(path, cfg, device)


class SampleDecodeFeatures:
    """map_batches actor: rows (index, label) -> generated tokens, decoded images' Inception pool features
    and logits. The sampling RNG is seeded from the batch's first index, so a sample set is reproducible."""

    def __init__(self, cfg_dict: dict, generator_dir: str, tokenizer_dir: str, teacher: Optional[str] = None,
                 threads: int = 1):
        from sftok.checkpoint import load_model
        from sftok.generator import load_generator
        from sftok.inception import FIDInceptionV3
        from sftok_platform.train.loop import config_from_dict
        torch.set_num_threads(max(1, threads))
        self.cfg = config_from_dict(cfg_dict)
        self.device = _device()
        self.generator = load_generator(generator_dir, map_location=self.device)
        self.tokenizer = load_model(tokenizer_dir, map_location=self.device).eval()
        self.teacher = _load_teacher(self.cfg, teacher, self.device)
        self.inception = FIDInceptionV3(self.cfg.eval.inception_weights, check_hash=False).to(self.device)

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        from sftok.metrics import to_uint8
        g = self.cfg.generator
        index = np.asarray(batch["index"], dtype=np.int64)
        labels = torch.as_tensor(np.asarray(batch["label"], dtype=np.int64), device=self.device)
        rng = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + int(index[0]))
        tokens = self.generator.generate(labels, num_steps=g.sample_steps, guidance_scale=g.guidance_scale,
                                         temperature=g.temperature, softmax_annealing=SOFTMAX_ANNEALING,
                                         generator=rng)
        images = _decode(self.tokenizer, tokens, self.cfg, self.teacher)
        pool, logits = self.inception.features(to_uint8(images))
        return {"index": index, "label": labels.cpu().numpy(), "tokens": tokens.cpu().numpy().astype(np.int16),
                "pool": pool.cpu().numpy().astype(np.float32), "logits": logits.cpu().numpy().astype(np.float32)}


class ImageFeatures:
    """map_batches actor: images [B,3,S,S] in [0,1] -> uint8 -> FID-Inception pool features."""

    def __init__(self, inception_weights: str, threads: int = 1):
        from sftok.inception import FIDInceptionV3
        torch.set_num_threads(max(1, threads))
        self.device = _device()
        self.inception = FIDInceptionV3(inception_weights, check_hash=False).to(self.device)

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        from sftok.metrics import to_uint8
        pool, _ = self.inception.features(to_uint8(torch.as_tensor(batch["image"])))
        return {"pool": pool.cpu().numpy().astype(np.float32)}


def sample_and_measure(cfg: Config, generator_dir, tokenizer_dir: str, num_classes: int, seq_len: int = 64, *,
                       teacher: Optional[str] = None) -> dict:
    """``samples_per_class`` samples of each class through an actor pool; returns tokens, labels, running
    Inception statistics (and the raw pool features when there are fewer samples than feature dims, for
    the exact low-rank FID), the Inception Score and the Inception's comparability note."""
    import ray.data

    from sftok.inception import POOL_DIM
    from sftok_platform.data.reader import without_progress_bars
    from sftok.metrics import FeatureStats, InceptionScoreStats
    g = cfg.generator
    n = num_classes * g.samples_per_class
    bs = max(1, cfg.eval.batch_size)
    items = [{"index": i, "label": i // g.samples_per_class} for i in range(n)]
    ds = without_progress_bars(ray.data.from_items(items, override_num_blocks=max(1, math.ceil(n / bs))))
    ds = ds.map_batches(SampleDecodeFeatures, batch_size=bs, batch_format="numpy",
                        fn_constructor_kwargs={"cfg_dict": cfg.to_dict(), "generator_dir": str(generator_dir),
                                               "tokenizer_dir": str(tokenizer_dir), "teacher": teacher,
                                               "threads": cfg.train.cpus_per_worker},
                        **_actor_resources(cfg))
    stats, isc = FeatureStats(POOL_DIM), InceptionScoreStats()
    tokens = np.zeros((n, seq_len), dtype=np.int16)
    labels = np.zeros(n, dtype=np.int64)
    keep = n <= POOL_DIM
    features = np.zeros((n, POOL_DIM), dtype=np.float32) if keep else None
    for batch in ds.iter_batches(batch_size=bs, batch_format="numpy"):
        idx = batch["index"]
        tokens[idx], labels[idx] = batch["tokens"], batch["label"]
        stats.update(batch["pool"])
        isc.update(batch["logits"])
        if keep:
            features[idx] = batch["pool"]
    return {"tokens": tokens, "labels": labels, "feature_stats": stats, "features": features,
            "inception_score": isc.compute(), "inception_note": inception_note(cfg.eval.inception_weights)}


def inception_note(weights: str) -> str:
    """'' for the paper's FID Inception file, else a warning for the report (random or other weights)."""
    from sftok.inception import PAPER_WEIGHTS_FILE, PAPER_WEIGHTS_SHA256, RANDOM_WEIGHTS_NOTE, sha256_file
    if not weights:
        return RANDOM_WEIGHTS_NOTE
    if sha256_file(Path(weights).expanduser()) != PAPER_WEIGHTS_SHA256:
        return f"Inception weights are not {PAPER_WEIGHTS_FILE}: not comparable to papers"
    return ""


def save_sample_grid(cfg: Config, tokenizer_dir: str, samples: dict, path: Path, *,
                     teacher: Optional[str] = None) -> Path:
    """One row per class (the first ``GRID_CLASSES`` classes), the first ``GRID_PER_CLASS`` samples each,
    re-decoded from the saved tokens (decoding at ``eval.temperature`` 0 is deterministic)."""
    from sftok.checkpoint import load_model
    from sftok_platform.tracking import save_image_grid
    tok = load_model(tokenizer_dir).eval()
    t = _load_teacher(cfg, teacher, "cpu")
    rows, names = [], []
    labels = samples["labels"]
    for c in sorted(set(labels.tolist()))[:GRID_CLASSES]:
        idx = np.flatnonzero(labels == c)[:GRID_PER_CLASS]
        rows.append(_decode(tok, torch.as_tensor(samples["tokens"][idx].astype(np.int64)), cfg, t))
        names.append(f"class {c}")
    return save_image_grid(rows, names, path)


# ######################################################################################################
# 4. Reference statistics and FID
# ######################################################################################################

def load_reference_stats(path: str) -> dict:
    """``mu``/``sigma`` from an ``.npz`` (ADM's ``VIRTUAL_imagenet256_labeled.npz`` or one written by
    :func:`reference_stats`); read without pickle."""
    p = Path(path).expanduser()
    with np.load(p, allow_pickle=False) as z:
        missing = {"mu", "sigma"} - set(z.files)
        if missing:
            raise ConfigError(f"{p} has no {sorted(missing)} arrays (it has {z.files}); give an .npz with 'mu' [2048] "
                              "and 'sigma' [2048,2048] of FID-Inception pool features, e.g. ADM's "
                              "VIRTUAL_imagenet256_labeled.npz.")
        mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
        count = int(z["count"]) if "count" in z.files else 0
    if mu.shape != (2048,) or sigma.shape != (2048, 2048):
        raise ConfigError(f"{p}: mu {mu.shape} / sigma {sigma.shape}; expected (2048,) and (2048, 2048).")
    return {"mu": mu, "sigma": sigma, "count": count}


def reference_stats(cfg: Config, shards: str, stage_dir: Path, image_size: int) -> dict:
    """The reference ``mu``/``sigma``: ``generator.reference_stats`` when given (``source="file"``), else the
    val shards' Inception statistics at the tokenizer's ``image_size`` (``source="val"``), computed once
    with Ray Data and cached in ``stage_dir/reference_val_stats.npz`` (keyed by the shards and the Inception
    weights)."""
    from sftok.inception import POOL_DIM
    from sftok.metrics import FeatureStats
    from sftok_platform.data import read_split
    if cfg.generator.reference_stats:
        return {**load_reference_stats(cfg.generator.reference_stats), "source": "file"}
    cache = stage_dir / "reference_val_stats.npz"
    key = json.dumps({"shards": str(shards), "inception": cfg.eval.inception_weights,
                      "image_size": image_size})
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) == key:
                return {"mu": z["mu"], "sigma": z["sigma"], "count": int(z["count"]), "source": "val"}
    ds = read_split(shards, "val", train=False, image_size=image_size, seed=None,
                    batch_size=cfg.eval.batch_size)
    ds = ds.map_batches(ImageFeatures, batch_size=cfg.eval.batch_size, batch_format="numpy",
                        fn_constructor_kwargs={"inception_weights": cfg.eval.inception_weights,
                                               "threads": cfg.train.cpus_per_worker},
                        **_actor_resources(cfg))
    stats = FeatureStats(POOL_DIM)
    for batch in ds.iter_batches(batch_size=cfg.eval.batch_size, batch_format="numpy"):
        stats.update(batch["pool"])
    if stats.count < 2:
        raise ConfigError(f"{shards}: the val split has {stats.count} image(s); the reference statistics need at "
                          "least 2 (better thousands), or set generator.reference_stats.")
    np.savez(cache, mu=stats.mean, sigma=stats.cov, count=stats.count, key=key)
    return {"mu": stats.mean, "sigma": stats.cov, "count": stats.count, "source": "val"}


def fid_against(features: Optional[np.ndarray], stats, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """FID of the samples against reference statistics.

    With at least as many samples as feature dims: ``sftok.metrics.fid_from_stats`` (the official scipy
    ``sqrtm`` recipe). With fewer (smoke runs, tests), the sample covariance ``S = B^T B`` has rank < N, and
    ``tr sqrt(S_ref S) = sum sqrt(eig(B S_ref B^T))`` is computed exactly from the N x N matrix instead of a
    2048 x 2048 ``sqrtm`` (same number, seconds instead of minutes on a CPU).
    """
    from sftok.metrics import fid_from_stats
    if features is None or len(features) >= features.shape[1]:
        return fid_from_stats(stats.mean, stats.cov, mu_ref, sigma_ref)
    return fid_low_rank(features.astype(np.float64), mu_ref, sigma_ref)


def fid_low_rank(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """Exact FID between the Gaussian of ``features`` [N, D] (N-1 normaliser) and ``(mu_ref, sigma_ref)``,
    through the N x N matrix ``B sigma_ref B^T`` (``B`` = centred features / sqrt(N-1))."""
    x = np.asarray(features, dtype=np.float64)
    n = x.shape[0]
    if n < 2:
        raise ValueError("FID needs at least 2 samples.")
    mu = x.mean(0)
    b = (x - mu) / math.sqrt(n - 1)
    sigma_trace = float((b * b).sum())
    m = b @ sigma_ref @ b.T
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    diff = mu - mu_ref
    return float(diff @ diff + sigma_trace + np.trace(sigma_ref) - 2.0 * tr_covmean)


__all__ = ["run_stage4", "check_config", "tokenize_train_split", "train_generator",
           "sample_and_measure", "reference_stats", "load_reference_stats", "fid_against", "fid_low_rank",
           "save_sample_grid", "VAL_LABEL"]
