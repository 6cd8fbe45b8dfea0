"""The tokenizer as an MLflow pyfunc model: what the pipeline registers, so that MLflow users can load and
serve it without this project's loading code.

    model = mlflow.pyfunc.load_model("models:/sftok-tiny@current")
    model.predict(pd.DataFrame({"image": [png_bytes, jpeg_bytes]}))                 # -> column "tokens"
    model.predict(df, params={"task": "reconstruct", "steps": 8})                    # -> column "image" (PNG)

    mlflow models serve -m models:/sftok-tiny@current --env-manager local -p 5001
    curl -X POST localhost:5001/invocations -H 'Content-Type: application/json' \
         -d '{"dataframe_split": {"columns": ["image"], "data": [["<base64 PNG>"]]}}'

Why a ``PythonModel`` around the safetensors export rather than ``mlflow.pytorch.log_model``: torch.export
(its default format) keeps only ``forward`` and would lose ``encode``/``decode_tokens`` (PLATFORM.md 2).
The export files travel as the model's artifacts; :meth:`SFTokPyfunc.load_context` rebuilds the tokenizer
with ``sftok.load_model`` (safetensors). The wrapper is logged as code (``serving_model.py``, MLflow's
"models from code"), so loading the model unpickles nothing.
Images are decoded, resized (shorter side) and centre-cropped to the tokenizer's ``image_size`` exactly
like the evaluation reader. A stage-1/2 tokenizer (no pixel head) carries the teacher export along and
reconstructs through it.
"""
from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Optional

import mlflow.pyfunc
import numpy as np
import pandas as pd

TASKS = ("tokenize", "reconstruct")
DEFAULT_PARAMS = {"task": "tokenize", "steps": 8}


def _image_bytes(value) -> bytes:
    """An ``image`` cell: raw bytes, or base64 text (what a JSON request carries)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return base64.b64decode(value)
    raise TypeError(f"the image column holds {type(value).__name__}; send encoded image bytes (PNG/JPEG) "
                    "or their base64 text.")


def _png(image_chw: np.ndarray) -> bytes:
    from PIL import Image
    arr = (np.clip(image_chw.transpose(1, 2, 0), 0, 1) * 255.0 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class SFTokPyfunc(mlflow.pyfunc.PythonModel):
    """``predict(DataFrame[image]) -> DataFrame[tokens]`` or, with ``params={"task": "reconstruct"}``,
    ``DataFrame[image]`` (PNG bytes of the reconstruction after ``steps`` decoding steps)."""

    def load_context(self, context) -> None:
        import torch

        from sftok.checkpoint import load_model
        torch.set_num_threads(max(1, int(os.environ.get("SFTOK_SERVING_THREADS", torch.get_num_threads()))))
        self.model = load_model(context.artifacts["tokenizer"]).eval()
        self.teacher = None
        if "teacher" in context.artifacts:
            from sftok.maskgit_vqgan import load_teacher
            from sftok_platform.train.checkpointing import load_teacher_dir
            path = Path(context.artifacts["teacher"])     # a stage-0 export dir, or the official weights file
            self.teacher = load_teacher_dir(path) if path.is_dir() else load_teacher(path).eval()
        self.image_size = int(self.model.cfg.image_size)

    def predict(self, context, model_input: pd.DataFrame, params: Optional[dict] = None) -> pd.DataFrame:
        # the DataFrame hint is one MLflow takes as "validate by the logged signature" (no schema from the
        # hint); without any hint MLflow warns at every load that type hints are missing
        import torch

        from sftok_platform.data.transforms import eval_transform, to_chw_float
        p = {**DEFAULT_PARAMS, **(params or {})}
        if p["task"] not in TASKS:
            raise ValueError(f"params.task={p['task']!r}: use one of {', '.join(TASKS)}.")
        steps = int(p["steps"])
        if steps < 1:
            raise ValueError(f"params.steps={steps}: use a number of decoding steps >= 1.")
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise ValueError(f"the input needs a column 'image' of encoded images; got {list(frame.columns)}.")
        images = [eval_transform(_image_bytes(v), self.image_size) for v in frame["image"]]
        x = torch.from_numpy(to_chw_float(images))
        with torch.no_grad():
            tokens = self.model.encode(x)
            if p["task"] == "tokenize":
                return pd.DataFrame({"tokens": [row.tolist() for row in tokens.cpu().numpy().astype(np.int64)]})
            if not self.model.cfg.pixel_head and self.teacher is None:
                raise ValueError("this tokenizer has no pixel head and no teacher was logged with it: it can "
                                 "tokenize but not reconstruct.")
            recon = self.model.decode_tokens(tokens, num_steps=steps, temperature=0.0, teacher=self.teacher)
        return pd.DataFrame({"image": [_png(r) for r in recon.clamp(0, 1).cpu().numpy()]})


def example_image(size: int = 64) -> bytes:
    """A small PNG for the logged input example (a coloured gradient)."""
    from PIL import Image
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    arr = (np.stack([xx, yy, 1 - xx], -1) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def save_pyfunc(export_dir: str | os.PathLike, path: str | os.PathLike, *,
                teacher_dir: Optional[str | os.PathLike] = None) -> Path:
    """Write the tokenizer export as an MLflow pyfunc model directory at ``path`` (``MLmodel``, the wrapper's
    code, the export as artifacts, signature and input example) and return it.

    The signature says: input a binary column ``image``; output ``tokens`` (the default task); params
    ``task`` (tokenize | reconstruct) and ``steps``. MLflow validates the input example by loading the model
    and predicting once, so a model that cannot serve fails here, not at the user's first request.
    """
    import pandas as pd
    from mlflow.models import infer_signature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    import shutil
    import tempfile
    from unittest.mock import patch
    example = pd.DataFrame({"image": [example_image()]})
    signature = infer_signature(example)
    signature.outputs = Schema([ColSpec(Array(DataType.long), "tokens")])
    signature.params = ParamSchema([ParamSpec("task", DataType.string, DEFAULT_PARAMS["task"]),
                                    ParamSpec("steps", DataType.long, DEFAULT_PARAMS["steps"])])
    entry = Path(__file__).with_name("serving_model.py")      # models from code: nothing is unpickled on load
    with tempfile.TemporaryDirectory(prefix="sftok-artifacts-") as staging:
        # MLflow names an artifact's copy after its basename: staged so the model always holds
        # artifacts/tokenizer (and artifacts/teacher), whatever the export dirs are called
        artifacts = {"tokenizer": str(shutil.copytree(export_dir, Path(staging) / "tokenizer"))}
        if teacher_dir:
            src = Path(teacher_dir)                  # a stage-0 export dir, or the official weights file
            dst = Path(staging) / ("teacher" if src.is_dir() else f"teacher{src.suffix}")
            artifacts["teacher"] = str(shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst))
        # no "Downloading artifacts" progress bar on the pipeline's console: MLflow copies the artifacts
        # into a temp dir to validate the input example (a local copy of two small folders)
        with patch.dict(os.environ, {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):
            mlflow.pyfunc.save_model(path=str(path), python_model=str(entry), artifacts=artifacts,
                                     signature=signature, input_example=example, pip_requirements=_requirements())
    return Path(path)


def _requirements() -> list[str]:
    """The serving environment's packages, pinned as installed (saves MLflow's slow requirement inference;
    ``mlflow models serve --env-manager local`` uses the current environment anyway)."""
    from importlib.metadata import PackageNotFoundError, version
    out = []
    for pkg in ("torch", "timm", "safetensors", "numpy", "pillow", "pandas", "pyyaml", "mlflow"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            pass
    return out


__all__ = ["SFTokPyfunc", "save_pyfunc", "example_image", "TASKS", "DEFAULT_PARAMS"]
