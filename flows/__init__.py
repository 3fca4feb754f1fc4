"""Orchestration around texq: MLflow tracking of pipeline stages and the Prefect flows.
The maths stays in ``texq``; nothing here computes a result."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the project root (dvc.yaml, params.yaml, mlflow.db)
