"""Cluster readiness: the MLflow URI every node can reach, and a stage surviving the loss of a node on a
simulated multi-node Ray cluster (several raylets on this host, ``ray.cluster_utils.Cluster``)."""
from __future__ import annotations

import pytest

from sftok.config import ConfigError
from sftok_platform.cluster import tracking_uri_for_workers


@pytest.mark.parametrize("uri, expected", [
    ("http://127.0.0.1:5000", "http://10.0.0.7:5000"),
    ("http://localhost:5000/", "http://10.0.0.7:5000/"),
    ("https://user:pw@localhost:8443/mlflow", "https://user:pw@10.0.0.7:8443/mlflow"),
    ("http://[::1]:5000", "http://10.0.0.7:5000"),
    ("http://0.0.0.0:5000", "http://10.0.0.7:5000"),
    ("http://mlflow.internal:5000", "http://mlflow.internal:5000"),      # a real host name stays
    ("databricks", "databricks"),
])
def test_loopback_tracking_uri_becomes_the_head_address_on_a_multi_node_cluster(uri, expected):
    assert tracking_uri_for_workers(uri, multi_node=True, driver_ip="10.0.0.7") == expected
    assert tracking_uri_for_workers(uri, multi_node=False, driver_ip="10.0.0.7") == uri   # one machine: as given


def test_sqlite_tracking_is_refused_on_a_multi_node_cluster():
    with pytest.raises(ConfigError, match=r"mlflow server .*--tracking-uri http://<head IP>:5000"):
        tracking_uri_for_workers("sqlite:////mnt/shared/runs/mlflow.db", multi_node=True, driver_ip="10.0.0.7")
    assert tracking_uri_for_workers("sqlite:///x.db", multi_node=False, driver_ip="1.2.3.4") == "sqlite:///x.db"


@pytest.mark.slow
def test_a_stage_survives_losing_a_node(tmp_path, monkeypatch):
    """Three raylets on this host (a CPU-less head, as in ray_cluster.yaml, and two 2-CPU nodes), an MLflow
    server given as a loopback URI, stage 1 with two workers spread over the nodes; one node is removed
    mid-stage and a fresh one joins. The stage restarts from its last checkpoint (same optimizer state) and
    finishes with exactly ``steps`` optimizer updates: the replayed steps replaced the lost ones."""
    import socket
    import subprocess
    import sys
    import threading
    import time

    import ray
    import torch
    from ray.cluster_utils import Cluster

    from sftok.config import load_config
    from sftok.maskgit_vqgan import MaskGITVQGAN
    from sftok_platform import tracking
    from sftok_platform.cluster import connect, free_port
    from sftok_platform.data import prepare_synthetic
    from sftok_platform.train import checkpointing as ckpt
    from sftok_platform.train import run_stage

    shards = tmp_path / "shards"
    prepare_synthetic(shards, 32, num_val=8, image_size=64, quiet=True)
    cfg0 = load_config("tiny")
    t = cfg0.teacher
    torch.manual_seed(0)
    ckpt.save_teacher(MaskGITVQGAN(t.hidden_channels, t.codebook_size, t.z_channels, cfg0.teacher_arch()),
                      tmp_path / "teacher", hidden_channels=t.hidden_channels, codebook_size=t.codebook_size,
                      z_channels=t.z_channels, arch=cfg0.teacher_arch())

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination", str(tmp_path / "art"),
                               "--host", "0.0.0.0", "--port", str(port), "--allowed-hosts", "*"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dash = free_port()
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{dash}")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dash})
    try:
        node_b = [cluster.add_node(num_cpus=2) for _ in range(2)][1]
        cluster.wait_for_nodes()
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        for _ in range(300):                                    # the MLflow server is up
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        cfg = load_config("tiny", [
            f"run.root={tmp_path / 'runs'}", "run.name=nodeloss", f"data.path={shards}", "stage1.steps=40",
            "stage1.global_batch_size=4", "stage1.warmup_steps=2", "train.workers=2", "train.checkpoint_every=4",
            "train.log_every=4", "train.placement_strategy=SPREAD", "train.torch_threads=1", "train.max_failures=2",
            f"tracking.uri=http://127.0.0.1:{port}", "tracking.system_metrics=false"])
        connect(cfg)
        paths = ckpt.StagePaths(tmp_path / "runs" / "nodeloss", "stage1")
        removed = {}

        def kill_a_node_mid_stage():
            deadline = time.time() + 300
            while time.time() < deadline:
                steps = [e.get("step", 0) for e in ckpt.read_journal(paths) if "loss" in e]
                if steps and max(steps) >= 6:
                    removed["at_step"] = max(steps)
                    cluster.remove_node(node_b, allow_graceful=False)
                    cluster.add_node(num_cpus=2)
                    return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_a_node_mid_stage, daemon=True)
        killer.start()
        result = run_stage(cfg, "stage1", shards=str(shards), inputs={"teacher": str(tmp_path / "teacher")})
        killer.join(timeout=5)
        assert removed.get("at_step", 40) < 40, "the node was not removed while the stage ran"

        journal = ckpt.read_journal(paths)
        starts = [e for e in journal if e.get("event") == "start"]
        assert len(starts) == 2 and starts[1]["resumed"] and starts[1]["world_size"] == 2
        resumed_at = starts[1]["step"]
        assert resumed_at % 4 == 0 and 4 <= resumed_at <= removed["at_step"]
        after = [e["step"] for e in journal[journal.index(starts[1]):] if "loss" in e]
        assert after == list(range(resumed_at + 1, 41)), "steps after the restart skipped or repeated"
        final = ckpt.load_state(ckpt.latest_checkpoint_dir(ckpt.storage_path(paths.run_dir) / ckpt.ray_run_name(
            "nodeloss", "stage1")))
        assert final["step"] == 40
        adam_steps = {int(s["step"]) for s in final["optimizer"]["state"].values()}
        assert adam_steps == {40}, f"optimizer updates {adam_steps} != 40 steps: a lost step was applied twice"
        assert ckpt.is_done(paths) and result.metrics["val_loss"] > 0
        # rank 0 logged to the MLflow server through the rewritten (non-loopback) URI
        assert cfg.tracking.uri != f"http://127.0.0.1:{port}"
        history = tracking.client(cfg).get_metric_history(result.run_id, "loss")
        assert max(m.step for m in history) == 40
    finally:
        ray.shutdown()
        cluster.shutdown()
        server.terminate()
        server.wait(timeout=30)
