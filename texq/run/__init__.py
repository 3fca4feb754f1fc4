"""A run's plumbing: its configuration (``config``), the method table (``methods``), the file
layout (``layout``), its four steps (``teacher``, ``synthesize``, ``train``, ``evaluate``), the
whole run in one process (``runner.run``) and the pictures of a finished run (``figures``)."""


def __getattr__(name: str):
    """``from texq.run import RunConfig, run``: the whole run, imported on first use (a pipeline stage
    imports one step module and loads only what its dvc.yaml deps list)."""
    if name == "run":
        from texq.run.runner import run

        return run
    if name == "RunConfig":
        from texq.run.config import RunConfig

        return RunConfig
    raise AttributeError(f"module 'texq.run' has no attribute {name!r}")
