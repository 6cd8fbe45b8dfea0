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
