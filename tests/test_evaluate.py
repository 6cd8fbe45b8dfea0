"""sftok_platform.evaluate: the accumulator equals a direct computation, Ray Data equals in-process, stage-1/2
decoding through the teacher, JSON + MLflow outputs, the command line.

Kept fast on 2 cores: a 64 px tiny tokenizer (4x4 proxy grid), 8 images, random Inception at 75 px input
(labelled not comparable), and the exact low-rank FID (8 images give rank-7 covariances).
"""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import sftok
from sftok.checkpoint import save_model
from sftok.inception import FIDInceptionV3
from sftok.metrics import FeatureStats, InceptionScoreStats, fid_from_feature_stats, psnr, ssim, to_uint8
from sftok_platform.evaluate import evaluate_checkpoint, flat_metrics, iter_local_batches, log_to_mlflow, main, steps_table

FAST = dict(steps=(1, 4), inception_input_size=75, assignment="per_image", batch_size=3)


def write_shards(root, sizes, split="val", per_file=5):
    """Parquet shards + manifest in the DATA helper's schema (image_bytes, label, path, width, height)."""
    from sftok_platform.data import synthetic
    from sftok_platform.data.manifest import write_manifest
    (root / split).mkdir(parents=True)
    shards, rows = [], []
    for i, (w, h) in enumerate(sizes):
        data, label = synthetic.render_jpeg(i, split=split, size=max(w, h))
        from PIL import Image
        import io
        img = Image.open(io.BytesIO(data)).resize((w, h))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
        rows.append({"image_bytes": buf.getvalue(), "label": label, "path": f"{split}/{i}.jpg", "width": w, "height": h})
    chunks = [rows[i:i + per_file] for i in range(0, len(rows), per_file)]
    for k, chunk in enumerate(chunks):
        name = f"{split}-{k:05d}-of-{len(chunks):05d}"
        pq.write_table(pa.Table.from_pylist(chunk), root / split / f"{name}.parquet")
        shards.append({"name": name, "file": f"{split}/{name}.parquet", "rows": len(chunk)})
    write_manifest(root, {"kind": "sftok-image-shards", "schema_version": 1, "complete": True,
                          "source": {"type": "test"}, "options": {}, "classes": synthetic.classes(),
                          "splits": {split: {"planned_images": len(rows), "planned_shards": len(chunks),
                                             "shards": shards, "num_images": len(rows)}}})
    return str(root)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("eval")
    shards = write_shards(root / "shards", [(64, 64), (80, 64), (64, 72), (96, 96), (70, 66), (64, 64), (90, 70),
                                            (64, 80)])
    model = sftok.create_model("sftok_tiny", image_size=64, num_proxy_codes=16)
    save_model(model, root / "ckpt")
    result = evaluate_checkpoint(str(root / "ckpt"), shards, use_ray=False, **FAST)
    return root, shards, model, result


def test_result_layout_and_labels(setup):
    _, _, _, r = setup
    assert r["num_images"] == 8 and r["step_counts"] == [1, 4] and r["stage"] == "stage3"
    assert set(r["steps"]) == {"1", "4"}
    for s in ("1", "4"):
        assert set(r["steps"][s]) == {"rfid", "is", "psnr", "psnr_y", "ssim", "lpips"}
        assert r["steps"][s]["rfid"] > 0 and r["steps"][s]["is"] >= 1.0 and r["steps"][s]["lpips"] is None
    assert r["rfid"] == r["steps"]["4"]["rfid"]                       # headline = largest step count
    assert [row["steps"] for row in r["rfid_vs_steps"]] == [1, 4]
    assert 0 < r["codebook_usage"] <= 8 * 64 / 1024 and 0 < r["codebook_entropy"] <= np.log2(8 * 64)
    assert not r["inception"]["paper_comparable"]
    assert any("NOT comparable" in n for n in r["notes"]) and any("LPIPS skipped" in n for n in r["notes"])
    assert "| 4 |" in steps_table(r)
    json.dumps(r)                                                      # JSON-able as is


def test_accumulated_metrics_equal_a_direct_computation(setup):
    root, shards, model, r = setup
    images = torch.cat([torch.from_numpy(b["image"]) for b in iter_local_batches(shards, "val", image_size=64,
                                                                                  batch_size=8)])
    assert images.shape == (8, 3, 64, 64)
    net = FIDInceptionV3("")
    net.INPUT_IMAGE_SIZE = 75
    tokens = model.encode(images, assignment="per_image")
    real = FeatureStats(2048).update(net.features(to_uint8(images))[0])
    recon = model.decode_tokens(tokens, num_steps=4, temperature=0.0)
    r_u8 = to_uint8(recon)
    pool, logits = net.features(r_u8)
    fake = FeatureStats(2048).update(pool)
    s4 = r["steps"]["4"]
    assert s4["rfid"] == pytest.approx(fid_from_feature_stats(real, fake, method="eigh"), rel=1e-3, abs=1e-6)
    assert s4["is"] == pytest.approx(InceptionScoreStats().update(logits).compute(), rel=1e-5)
    rf = r_u8.float() / 255
    assert s4["psnr"] == pytest.approx(psnr(rf, images).mean().item(), rel=1e-5)
    assert s4["psnr_y"] == pytest.approx(psnr(rf, images, y_channel=True).mean().item(), rel=1e-5)
    assert s4["ssim"] == pytest.approx(ssim(rf, images).mean().item(), rel=1e-5)
    ids = tokens.flatten().tolist()
    assert r["codebook_usage"] == pytest.approx(len(set(ids)) / 1024)


@pytest.mark.slow
def test_ray_data_actor_pool_equals_in_process(setup, tmp_path, ray_cluster):
    root, shards, _, _ = setup
    remote = evaluate_checkpoint(str(root / "ckpt"), shards, use_ray=True, num_actors=1, **FAST)
    # the same computation in this process, on as many threads as the 1-CPU actor (Ray sets its
    # OMP_NUM_THREADS=1): a different thread count reorders float sums (SSIM moved by 2e-6 relative)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = evaluate_checkpoint(str(root / "ckpt"), shards, use_ray=False, **FAST)
    finally:
        torch.set_num_threads(threads)
    assert remote["ray"] and remote["num_images"] == local["num_images"] == 8
    assert remote["codebook_usage"] == local["codebook_usage"]
    assert remote["codebook_entropy"] == pytest.approx(local["codebook_entropy"], abs=1e-12)
    assert remote["is_original"] == pytest.approx(local["is_original"], rel=1e-6)
    for s in ("1", "4"):
        for k in ("psnr", "psnr_y", "ssim", "is"):
            assert remote["steps"][s][k] == pytest.approx(local["steps"][s][k], rel=1e-6), (s, k)
        assert remote["steps"][s]["rfid"] == pytest.approx(local["steps"][s]["rfid"], rel=1e-4, abs=1e-7)


def test_stage12_checkpoint_decodes_through_the_teacher(setup, tmp_path):
    _, shards, _, _ = setup
    m12 = sftok.create_model("sftok_tiny_stage12", image_size=64, num_proxy_codes=16)
    save_model(m12, tmp_path / "s12")
    with pytest.raises(sftok.ConfigError, match="teacher"):
        evaluate_checkpoint(str(tmp_path / "s12"), shards, use_ray=False, max_images=2, **FAST)
    teacher = sftok.MaskGITVQGAN(hidden_channels=32)
    r = evaluate_checkpoint(str(tmp_path / "s12"), shards, use_ray=False, teacher=teacher, max_images=4,
                            **dict(FAST, steps=(2,)))
    assert r["stage"] == "stage12" and r["num_images"] == 4 and np.isfinite(r["rfid"])


def test_json_and_mlflow_parent_child_runs(setup, tmp_path, seed_mlflow):
    from mlflow.tracking import MlflowClient
    _, _, _, r = setup
    uri = seed_mlflow(tmp_path)
    client = MlflowClient(uri)
    exp = client.create_experiment("t", artifact_location=str(tmp_path / "art"))
    parent = client.create_run(exp, run_name="pipeline").info.run_id
    rid = log_to_mlflow(r, uri, experiment="t", parent_run_id=parent)
    run = client.get_run(rid)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.metrics["rfid"] == pytest.approx(r["rfid"])
    hist = client.get_metric_history(rid, "rfid_vs_steps")
    assert sorted((m.step, m.value) for m in hist) == [(1, pytest.approx(r["steps"]["1"]["rfid"])),
                                                      (4, pytest.approx(r["steps"]["4"]["rfid"]))]
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{rid}'")
    assert sorted(c.data.params["decode_steps"] for c in children) == ["1", "4"]
    arts = {a.path for a in client.list_artifacts(rid, "eval")}
    assert arts == {"eval/results.json", "eval/rfid_vs_steps.md"}
    assert run.data.params["inception_weights"] == "random"
    assert "rfid/steps_1" in flat_metrics(r)


def test_command_line(setup, tmp_path, capsys):
    root, shards, _, _ = setup
    out = tmp_path / "res.json"
    assert main(["--checkpoint", str(root / "ckpt"), "--data", shards, "--steps", "2", "--no-ray", "--max-images",
                 "3", "--assignment", "per_image", "--inception-input-size", "75", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["num_images"] == 3 and res["step_counts"] == [2] and res["inception"]["input_size"] == 75
    text = capsys.readouterr()
    assert "| 2 |" in text.out and "NOT comparable" in text.err + text.out
    assert main(["--checkpoint", str(root / "ckpt"), "--data", shards, "--steps", "x"]) == 2


BAD_EVAL_ARGUMENTS = [    # (arguments, what the refusal says); each used to start Ray and fail, run or trace back
    (["--steps", "0"], "decoding step counts >= 1"),
    (["--steps", "1,1"], "list each decoding step count once"),
    (["--temperature", "-1"], "--temperature -1: use 0 (deterministic)"),
    (["--max-images", "-1"], "--max-images -1: use 0 for the whole split"),
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--num-actors", "0"], "--num-actors 0: must be >= 1"),
    (["--inception-input-size", "32"], "Inception-v3 needs >= 75 px"),
    (["--checkpoint", "/nonexistent/export"], "--checkpoint /nonexistent/export: no such file or directory"),
    (["--data", "/nonexistent/shards"], "no manifest.json in /nonexistent/shards"),
]


@pytest.mark.parametrize("extra,message", BAD_EVAL_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_EVAL_ARGUMENTS])
def test_bad_command_line_arguments_are_refused_before_ray_starts(setup, extra, message, capsys, monkeypatch):
    """Exit code 2 and one ``error:`` line that says what to change; no traceback, no Ray."""
    import sftok_platform.cluster as cluster

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for an evaluation whose arguments are bad")

    monkeypatch.setattr(cluster, "connect", no_ray)
    root, shards, _, _ = setup
    args = {"--checkpoint": str(root / "ckpt"), "--data": shards}
    args.update(dict(zip(extra[::2], extra[1::2])))
    assert main([x for kv in args.items() for x in kv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err


def test_lpips_with_local_weight_files_and_random_is_skipped(setup, tmp_path):
    from sftok.lpips import LPIPS, _vgg16_features
    root, shards, _, _ = setup
    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in _vgg16_features().state_dict().items()}, tmp_path / "vgg16.pth")
    torch.save({f"lin{k}.model.1.weight": torch.full((1, c, 1, 1), 1.0 / c)
                for k, c in enumerate((64, 128, 256, 512, 512))}, tmp_path / "vgg.pth")
    weights = (str(tmp_path / "vgg16.pth"), str(tmp_path / "vgg.pth"))
    kw = dict(FAST, steps=(1,), max_images=2)
    r = evaluate_checkpoint(str(root / "ckpt"), shards, use_ray=False, lpips_weights=weights, **kw)
    assert not any("LPIPS" in n for n in r["notes"])
    model = sftok.load_model(root / "ckpt")
    images = next(iter_local_batches(shards, "val", image_size=64, batch_size=2))["image"]
    images = torch.from_numpy(images)
    recon = to_uint8(model.decode_tokens(model.encode(images, assignment="per_image"), num_steps=1,
                                         temperature=0.0)).float() / 255
    expected = LPIPS(*weights)(recon, images).mean().item()
    assert r["lpips"] == pytest.approx(expected, rel=1e-4) and r["lpips"] > 0
    skipped = evaluate_checkpoint(str(root / "ckpt"), shards, use_ray=False, lpips_weights=("random", "random"), **kw)
    assert skipped["lpips"] is None and any("'random'" in n for n in skipped["notes"])


def test_constant_baselines_are_scored_on_the_same_images(setup):
    """The two references printed beside the model's PSNR: the mean train image (one constant for every
    image) and each image painted in its own mean colour (3 numbers per image), both 8-bit rounded."""
    from sftok_platform.evaluate import BatchEvaluator, EvalAccumulator
    _, shards, model, _ = setup
    batch = next(iter_local_batches(shards, "val", image_size=64, batch_size=8))
    images = torch.from_numpy(batch["image"])
    mean_image = np.full((3, 64, 64), 0.5, dtype=np.float32)
    evaluator = BatchEvaluator(model, steps=[1], inception_input_size=75, mean_image=mean_image)
    result = EvalAccumulator([1], 1024).update(evaluator(batch)).metrics(fid_method="eigh")
    flat = (images.mean((2, 3), keepdim=True).expand_as(images) * 255).round() / 255
    assert result["baseline_image_colour_psnr"] == pytest.approx(psnr(flat, images).mean().item(), rel=1e-5)
    assert result["baseline_mean_image_psnr"] == pytest.approx(
        psnr(torch.full_like(images, 128 / 255), images).mean().item(), rel=1e-5)
    # painting each image in its own mean colour is never worse than one grey for all of them
    assert result["baseline_image_colour_psnr"] > result["baseline_mean_image_psnr"]
