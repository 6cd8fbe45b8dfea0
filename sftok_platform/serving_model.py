"""The models-from-code entry of the tokenizer's MLflow pyfunc (:mod:`sftok_platform.serving`).

MLflow runs this file when it loads the model, instead of unpickling a Python object from the artifact
store; the weights themselves are safetensors artifacts.
"""
import mlflow

from sftok_platform.serving import SFTokPyfunc

mlflow.models.set_model(SFTokPyfunc())
