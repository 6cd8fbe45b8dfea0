"""`mlflow models serve` on the registered tokenizer pyfunc: one real HTTP request on localhost."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_mlflow_models_serve_tokenizes_and_reconstructs_over_http(tmp_path):
    from sftok.checkpoint import save_model
    from sftok.model import SFTok
    from sftok_platform.config import load_config
    from sftok_platform.data.transforms import eval_transform, to_chw_float
    from sftok_platform.serving import example_image, save_pyfunc
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = SFTok(cfg.model).eval()
    model_dir = save_pyfunc(save_model(model, tmp_path / "export"), tmp_path / "pyfunc")
    from sftok_platform.cluster import free_port
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir),
                               "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, "the server did not come up: " + (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        png = example_image(80)

        def post(payload: dict) -> dict:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
            return json.loads(urllib.request.urlopen(req, timeout=120).read())

        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(png).decode()]]}}
        tokens = post(body)["predictions"][0]["tokens"]
        with torch.no_grad():
            direct = model.encode(torch.from_numpy(to_chw_float([eval_transform(png, cfg.model.image_size)])))[0].tolist()
        assert tokens == direct
        recon = post({**body, "params": {"task": "reconstruct", "steps": 2}})["predictions"][0]["image"]
        assert base64.b64decode(recon)[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()
