"""Cluster readiness (issue 15): a stage survives losing a node of a multi-node Ray cluster.

Three raylets on this host stand in for a cluster (``ray.cluster_utils.Cluster``): a CPU-less head, as in
``ray_cluster.yaml``, and two 3-CPU worker nodes. Stage 1 trains with two workers spread over both; when it
has written a checkpoint, one of the nodes is removed without warning (a lost spot node). The restarted
worker group fits on the surviving node with a CPU left for Ray Data's read tasks. The stage must restart from its last
checkpoint and finish with exactly ``steps`` optimizer updates, and rank 0 must log to the MLflow server through a URI the other nodes can
reach (the loopback URI given is rewritten to the head's address).
"""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

pytestmark = pytest.mark.slow

STEPS, CHECKPOINT_EVERY = 24, 4


@pytest.mark.timeout(600)
def test_a_stage_survives_losing_a_node(tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    from sftok.maskgit_vqgan import MaskGITVQGAN
    from sftok_platform.cluster import connect, free_port
    from sftok_platform.config import load_config
    from sftok_platform.data import prepare_synthetic
    from sftok_platform.train import checkpointing as ckpt
    from sftok_platform.train import run_stage

    if ray.is_initialized():
        ray.shutdown()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination", str(tmp_path / "art"),
                               "--host", "0.0.0.0", "--port", str(port), "--allowed-hosts", "*"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dash = free_port()
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{dash}")
    # The GCS declares a node dead after `health_check_failure_threshold` missed checks (defaults: every 3 s,
    # 10 s timeout, 5 misses: ~15 s). Until then the restarted group's placement group can wait for the lost
    # node's CPUs; 1 s / 3 s / 3 misses here cut the stage's restart from ~18 s to ~12 s and still give a
    # raylet of a loaded 2-core machine three 3-s chances to answer.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dash,
        "_system_config": {"health_check_period_ms": 1000, "health_check_timeout_ms": 3000,
                           "health_check_failure_threshold": 3}})
    try:
        nodes = [cluster.add_node(num_cpus=3) for _ in range(2)]    # a worker each, and a CPU for Ray Data
        cluster.wait_for_nodes()
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        cfg = load_config("tiny", [
            f"run.root={tmp_path / 'runs'}", "run.name=nodeloss", f"stage1.steps={STEPS}",
            "stage1.global_batch_size=4", "stage1.warmup_steps=2", "train.workers=2",
            f"train.checkpoint_every={CHECKPOINT_EVERY}", f"train.log_every={CHECKPOINT_EVERY}",
            "train.placement_strategy=SPREAD", "train.torch_threads=1", "train.max_failures=2",
            f"tracking.uri=http://127.0.0.1:{port}", "tracking.system_metrics=false"])
        connect(cfg)                               # join the cluster before anything else starts a Ray
        shards = tmp_path / "shards"
        prepare_synthetic(shards, 32, num_val=8, image_size=cfg.model.image_size, quiet=True)
        t = cfg.teacher
        torch.manual_seed(0)
        ckpt.save_teacher(MaskGITVQGAN(t.hidden_channels, t.codebook_size, t.z_channels, cfg.teacher_arch()),
                          tmp_path / "teacher", hidden_channels=t.hidden_channels, codebook_size=t.codebook_size,
                          z_channels=t.z_channels)
        for _ in range(300):                                    # the MLflow server is up
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        paths = ckpt.StagePaths(tmp_path / "runs" / "nodeloss", "stage1")
        removed: dict = {}

        def remove_a_worker_node_after_the_first_checkpoint():
            # The surviving node has 3 CPUs: the restarted group's 2 workers and 1 for Ray Data's read tasks.
            # With 2 (both for the workers) those tasks could never be scheduled ("Cluster resources are not
            # enough to run any task ... may hang forever"), a real stall of an undersized cluster.
            from ray.util.state import list_actors
            try:
                deadline = time.time() + 400
                ray_run = ckpt.storage_path(paths.run_dir) / ckpt.ray_run_name("nodeloss", "stage1")
                while time.time() < deadline:
                    steps = [e["step"] for e in ckpt.read_journal(paths) if "loss" in e]
                    # recorded by Train, not only journaled: a node lost before the step-4 checkpoint is
                    # recorded makes the stage restart from step 0, which is right but not what this tests
                    if steps and max(steps) > CHECKPOINT_EVERY and ckpt.recorded_checkpoint_steps(ray_run):
                        hosts = {a.node_id for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"),
                                                                         ("state", "=", "ALIVE")])}
                        victim = next(n for n in nodes if n.node_id in hosts)
                        removed["at_step"] = max(steps)
                        cluster.remove_node(victim, allow_graceful=False)
                        return
                    time.sleep(0.05)
            except Exception as e:               # surfaced by the assertion below, not lost in the thread
                removed["error"] = repr(e)

        killer = threading.Thread(target=remove_a_worker_node_after_the_first_checkpoint, daemon=True)
        killer.start()
        result = run_stage(cfg, "stage1", shards=str(shards), inputs={"teacher": str(tmp_path / "teacher")})
        killer.join(timeout=5)
        journal = ckpt.read_journal(paths)
        assert "error" not in removed, removed
        assert removed.get("at_step", STEPS) < STEPS, ("the node was not removed while the stage ran", journal)

        starts = [e for e in journal if e.get("event") == "start"]
        assert len(starts) == 2 and starts[1]["resumed"] and starts[1]["world_size"] == 2, journal
        resumed_at = starts[1]["step"]
        assert resumed_at % CHECKPOINT_EVERY == 0 and CHECKPOINT_EVERY <= resumed_at <= removed["at_step"], journal
        after = [e["step"] for e in journal[journal.index(starts[1]):] if "loss" in e]
        assert after == list(range(resumed_at + 1, STEPS + 1)), "steps after the restart skipped or repeated"
        final = ckpt.load_state(ckpt.latest_checkpoint_dir(
            ckpt.storage_path(paths.run_dir) / ckpt.ray_run_name("nodeloss", "stage1")))
        assert final["step"] == STEPS
        adam_steps = {int(s["step"]) for part in ckpt.optimizer_parts(final["optimizer"])
                      for s in part["state"].values() if "step" in s}      # Muon keeps no step count; AdamW does
        assert adam_steps == {STEPS}, f"optimizer updates {adam_steps} != {STEPS} steps: a step applied twice or lost"
        assert ckpt.is_done(paths) and result.metrics["val_loss"] > 0
        assert cfg.tracking.uri != f"http://127.0.0.1:{port}"    # rewritten to an address every node reaches
        import mlflow
        client = mlflow.MlflowClient(f"http://127.0.0.1:{port}")
        history = client.get_metric_history(result.run_id, "loss")
        assert history and max(m.step for m in history) == STEPS
    finally:
        ray.shutdown()
        cluster.shutdown()
        server.terminate()
        server.wait(timeout=30)
