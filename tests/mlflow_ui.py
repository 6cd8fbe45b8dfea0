"""The MLflow UI as a user sees it: ``mlflow ui`` on loopback, pages rendered by headless Chromium.

``chromium --headless --dump-dom`` loads a page, runs its JavaScript (the UI is a React app that fetches
runs, metrics and artifacts through the tracking server's REST API) and prints the resulting DOM, so a test
can assert on what a browser shows: run names, metric names and values, image grids, artifact names.
``--virtual-time-budget`` lets the page's fetches settle before the dump.

Chromium is a Debian package (``apt-get install chromium``), not a Python dependency: where it is not
installed the UI tests skip with that instruction (README, "MLflow"). The flags are the ones this closed
network needs: without ``--disable-background-networking`` and friends Chromium spends its start-up on
refused connections to Google's hosts.
"""
from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from sftok_platform.cluster import free_port

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


def chromium() -> str:
    """Path of the Chromium binary, or skip the calling test with how to install it."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium is not installed (Debian: apt-get install -y chromium); "
                "the MLflow UI browser checks need it")


class MlflowUI:
    """``with MlflowUI(tracking_uri) as ui: html = ui.page("#/experiments/1/runs/<id>")``."""

    def __init__(self, tracking_uri: str):
        self.browser = chromium()
        self.tracking_uri = tracking_uri
        self.proc: subprocess.Popen | None = None
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")

    def __enter__(self) -> "MlflowUI":
        # free_port() only finds a port that is free now: another process (a Ray started by the other test
        # process, seen once) can take it before the server binds it. Then this server exits, or /health
        # answers with some other protocol's bytes, and the next attempt takes a new port.
        for _attempt in range(3):
            self.port = free_port()
            self.base = f"http://127.0.0.1:{self.port}/"
            if self._start():
                return self
        raise RuntimeError(f"mlflow ui did not start: {(Path(self.profile) / 'mlflow-ui.log').read_text()[-2000:]}")

    def _start(self) -> bool:
        """Start ``mlflow ui`` on ``self.port``; True once it answers /health, False if the port was taken."""
        self.log = open(Path(self.profile) / "mlflow-ui.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", self.tracking_uri,
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.close()
                return False
            try:
                with urllib.request.urlopen(self.base + "health", timeout=2) as r:
                    if r.status == 200:
                        return True
            except http.client.HTTPException:       # not an HTTP server on this port: someone else's
                self._stop()
                return False
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("mlflow ui did not answer /health in 120 s")

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        self.log.close()

    def __exit__(self, *exc) -> None:
        self._stop()
        shutil.rmtree(self.profile, ignore_errors=True)

    def page(self, fragment: str, *wait_for: str, budget_ms: int = 10000, loads: int = 5) -> str:
        """The DOM of ``<ui>/<fragment>`` after the page's scripts ran (``fragment`` like ``#/experiments/1``).

        ``budget_ms`` is virtual time: Chromium skips idle waits but still runs the UI's timers (polling,
        animations) through it, so a longer budget costs CPU without drawing more. A run page was complete
        after 4, 8 and 15 s of virtual time alike (2.8-6 s of real time, idle); 60 s took 6-8 s. The UI draws
        in stages (run data, then one request per metric chart, then images), and on a loaded 2-core
        machine a single load sometimes ended before the later stages: the page is loaded again, up to
        ``loads`` times, until every ``wait_for`` text is in it (3 loads were once not enough for a stage's
        model-metrics tab in a full-suite run), each time with twice the budget (5 loads of 10 s were once
        not enough either, in a full-suite run at 2026-12-07 night). The caller asserts on what comes back.
        The tall window puts every chart section in view."""
        html = ""
        for attempt in range(loads):
            budget = budget_ms * 2 ** attempt
            out = subprocess.run([self.browser, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}/chrome",
                                  "--window-size=1600,4000", f"--virtual-time-budget={budget}", "--dump-dom",
                                  self.base + fragment], capture_output=True, text=True, timeout=240)
            assert out.returncode == 0 and "<html" in out.stdout, out.stderr[-2000:]
            html = out.stdout
            if all(text in html for text in wait_for):
                break
        return html

    def get(self, path: str) -> bytes:
        """A resource of the UI server (e.g. an artifact the page's ``<img>`` points at)."""
        with urllib.request.urlopen(self.base + path, timeout=30) as r:
            assert r.status == 200
            return r.read()
