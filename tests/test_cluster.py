"""Cluster readiness: the MLflow URI every node can reach from a multi-node cluster; Train settings of a
private local Ray."""
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



def test_a_private_local_ray_runs_train_without_the_preemption_watcher(monkeypatch):
    """One local node cannot be preempted: its workers get the watcher switched off, unless the user set it."""
    from sftok_platform.cluster import _local_train_settings
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    assert _local_train_settings() == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    assert _local_train_settings() == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}
