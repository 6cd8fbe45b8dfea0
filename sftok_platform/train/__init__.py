"""Ray Train for SFTok: one ``TorchTrainer`` per stage, the three-stage schedule as one MLflow-tracked
pipeline.

    from sftok_platform.train import run_pipeline, run_stage
    result = run_pipeline(load_config("tiny"))                                  # stages 0-3, eval, registry
    stage = run_stage(cfg, "stage2", shards=shards, parent_run_id=parent_id)   # one stage (Tune trials)

Modules: ``pipeline`` (driver: checks, stages, evaluation, registry), ``loop`` (``train_loop_per_worker``),
``stages`` (what each stage trains), ``checkpointing`` (run layout, safe state and export formats).
"""
from sftok_platform.train.pipeline import (PipelineResult, StageResult, preflight, run_dir, run_pipeline,
                                           run_stage, stage_inputs)

__all__ = ["run_stage", "run_pipeline", "StageResult", "PipelineResult", "preflight", "stage_inputs", "run_dir"]
