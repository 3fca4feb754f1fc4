"""The quantized model of a pipeline run in MLflow: the run's logged model and, when the run
registers it, a version of the registered model ``texq-<model>-wXaY`` described by the run's
figures."""

from __future__ import annotations

from pathlib import Path

from flows.store import client_uri, safe_name


def log_quantized_model(c, run_id: str, path: Path, cfg, register: bool, scores: dict) -> str:
    """The quantized model as an MLflow model of the run (``mlflow.pytorch``, with a signature and
    an input example: one image in the model's normalised input space), logged after the run's
    scores so that the model page lists them; registered as a new version of
    ``texq-<model>-wXaY`` when ``register``, the version tagged with the run's figures
    (``scores``: the evaluate stage's metrics.json) and described in one line; returns its URI
    (also the run's tag ``texq.model_uri``). Pickled (not torch.export's pt2, which drops the
    module's attributes and its eval mode): loading it needs texq importable."""
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from texq.models import load_quantized

    q = load_quantized(path).eval()
    size = q.texq_info.input_size
    x = np.zeros((1, 3, size, size), dtype=np.float32)
    with torch.no_grad():
        y = q(torch.from_numpy(x)).numpy()
    name = (f"texq-{safe_name(cfg.model, keep='_-.', sub='-')}-w{cfg.w_bits}a{cfg.a_bits}"  # a factory's ':'
            if register else None)
    mlflow.set_tracking_uri(client_uri())
    with mlflow.start_run(run_id=run_id):  # mlflow.pytorch logs into the active run only
        info = mlflow.pytorch.log_model(
            q, name="quantized_model", signature=infer_signature(x, y), input_example=x,
            registered_model_name=name, pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            serialization_format="pickle", step=0)  # the module itself, texq_info and quantizers included
    c.set_tag(run_id, "texq.model_uri", info.model_uri)
    if name and info.registered_model_version is not None:
        version = str(info.registered_model_version)
        for key, value in version_tags(cfg, scores).items():
            c.set_model_version_tag(name, version, key, value)
        c.update_model_version(name, version, description=version_description(cfg, scores))
    return info.model_uri


def version_tags(cfg, scores: dict) -> dict[str, str]:
    """A registered version's tags: the run's figures and what produced them."""
    low, high = scores["top1_ci95"]
    return {"top1": f"{scores['top1']:.2f}", "top1_ci95": f"{low:.2f}-{high:.2f}",
            "fp_top1": f"{scores['fp_top1']:.2f}", "n": str(scores["n"]), "data": str(scores["data"]),
            "method": cfg.method, "w_bits": str(cfg.w_bits), "a_bits": str(cfg.a_bits),
            "seed": str(cfg.seed), "profile": cfg.profile}


def version_description(cfg, scores: dict) -> str:
    low, high = scores["top1_ci95"]
    return (f"{cfg.method} W{cfg.w_bits}A{cfg.a_bits}, seed {cfg.seed}, {cfg.profile} profile: top-1 "
            f"{scores['top1']:.2f} (95% interval {low:.2f}-{high:.2f}; full precision "
            f"{scores['fp_top1']:.2f}) on {scores['data']}, n = {scores['n']}, final-epoch model")
