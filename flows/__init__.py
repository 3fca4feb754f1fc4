"""Orchestration around texq: MLflow tracking of pipeline stages and the Prefect flows.
The maths stays in ``texq``; nothing here computes a result."""
