"""``ray_cluster.yaml`` passes Ray 2.60's own cluster-launcher validation (schema + semantic checks), and
the parts the pipeline relies on are there: the pinned Ray image, shared storage, the MLflow server on the
head node, a CPU-only head and GPU workers. (``_private`` APIs: Ray is pinned to 2.60.0 in pyproject.)"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def load():
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


def validate(cfg):
    from ray.autoscaler._private.util import prepare_config, validate_config
    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_cluster_yaml_is_valid():
    validate(load())


def test_cluster_yaml_runs_the_pipeline_pieces():
    cfg = load()
    assert cfg["docker"]["image"].startswith("rayproject/ray:2.60.0-") and "-cu" in cfg["docker"]["image"]
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    gpu = cfg["available_node_types"]["gpu_worker"]
    assert gpu["node_config"]["InstanceType"].startswith(("p4", "p5", "g6"))
    start = "\n".join(cfg["head_start_ray_commands"])
    assert "mlflow server" in start and "--port 5000" in start and "/mnt/shared/mlflow" in start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in start
    assert any("/mnt/shared" in c for c in cfg["initialization_commands"])
    assert any("mlflow==3.17.2" in c for c in cfg["setup_commands"])


def test_validation_catches_mistakes():
    bad = load()
    bad["setup_comands"] = bad.pop("setup_commands")        # a typo
    with pytest.raises(Exception):
        validate(bad)
    bad = load()
    bad["head_node_type"] = "nope"
    with pytest.raises(Exception, match="head_node_type"):
        validate(bad)


def test_cluster_yaml_provisions_the_auth_token():
    """Every node starts Ray with RAY_AUTH_MODE=token and gets the launching machine's token file."""
    cfg = load()
    assert cfg["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key


@pytest.mark.slow
def test_token_auth_head_starts_and_refuses_a_client_without_the_token(tmp_path):
    """What the YAML's start commands do, in a temporary HOME: `ray get-auth-token --generate` writes the
    token, `RAY_AUTH_MODE=token ray start --head` comes up with it, a client holding the token connects and
    one without it is refused."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token"}
    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        env.pop(k, None)
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    token = (home / ".ray" / "auth_token").read_text().strip()
    assert len(token) >= 16
    import shutil
    import tempfile
    temp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))   # short: unix socket paths are limited to 107 bytes
    start = subprocess.run(["ray", "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                            "--object-store-memory=100000000", f"--temp-dir={temp}"], env=env, capture_output=True, text=True, timeout=120)
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        probe = ("import ray; ray.init(address='127.0.0.1:%d', logging_level='error'); "
                 "print('CPUS', ray.cluster_resources().get('CPU'))" % port)
        ok = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0 and "CPUS 1.0" in ok.stdout, ok.stdout + ok.stderr
        stranger = {**env, "HOME": str(tmp_path)}      # same auth mode, no token file
        bad = subprocess.run([sys.executable, "-c", probe], env=stranger, capture_output=True, text=True, timeout=120)
        assert bad.returncode != 0 and "token" in (bad.stdout + bad.stderr).lower(), bad.stdout + bad.stderr
    finally:
        _kill_processes_of(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _kill_processes_of(temp_dir) -> None:
    """Stop only the Ray processes of this test's head (their command lines name its temp dir): `ray stop`
    would kill every Ray on the machine, a user's own included."""
    import psutil
    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        if str(temp_dir) in " ".join(proc.info.get("cmdline") or []):
            mine.append(proc)
    for proc in mine:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(mine, timeout=30)
