"""The pipeline's stages and their configuration file (no Prefect, MLflow or DVC imports here:
``flows/`` and ``dvc.yaml`` call these)."""

from texq.pipeline.params import load_params, run_config
from texq.pipeline.stages import STAGES, run_stage

__all__ = ["STAGES", "load_params", "run_config", "run_stage"]
