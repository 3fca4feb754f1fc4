"""The pipeline: ``params.yaml`` read into a ``PipelineConfig`` and the stages that run one step
each (no Prefect, MLflow or DVC imports here: ``flows/`` and ``dvc.yaml`` call these)."""

from texq.pipeline.params import (
    PipelineConfig,
    load_params,
    pipeline_config,
    read_config,
)
from texq.pipeline.stages import STAGES, run_stage

__all__ = ["PipelineConfig", "STAGES", "load_params", "pipeline_config", "read_config", "run_stage"]
