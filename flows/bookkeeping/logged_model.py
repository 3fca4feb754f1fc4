"""The quantized model of a pipeline run in MLflow: the run's logged model and, when the run
registers it, a version of the registered model ``texq-<model>-wXaY`` described by the run's
figures."""

from __future__ import annotations

from pathlib import Path

from flows.bookkeeping.store import client_uri, safe_name

RESULT_TAG = "texq.metrics_sha256"  # on a logged model: the metrics.json it was logged for


def log_quantized_model(c, run_id: str, path: Path, cfg, register: bool, scores: dict,
                        result: str = "") -> str:
    """The quantized model as an MLflow model of the run (``mlflow.pytorch``, with a signature and
    an input example: one image in the model's normalised input space), logged after the run's
    scores so that the model page lists them; registered as a version of ``texq-<model>-wXaY``
    when ``register``, the version tagged with the run's figures (``scores``: the evaluate stage's
    metrics.json) and described in one line; returns its URI (also the run's tag
    ``texq.model_uri``). Pickled (not torch.export's pt2, which drops the module's attributes and
    its eval mode): loading it needs texq importable.

    Idempotent for one ``result`` (the metrics.json's digest, a tag of the logged model): a model
    of this run already logged for it is not logged again, nor a version registered again, whatever
    failed in between. No active run is opened (MLflow's fluent run would set the run RUNNING and
    end it FAILED on an upload error): the run's state is never changed here."""
    from mlflow.entities import LoggedModelStatus

    run = c.get_run(run_id)
    found = [m for m in c.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
             if m.tags.get(RESULT_TAG) == result and m.status == LoggedModelStatus.READY] if result else []
    if found:
        model_id, uri = found[0].model_id, found[0].model_uri
    else:
        model_id, uri = _log(c, run, path, result)
    c.set_tag(run_id, "texq.model_uri", uri)
    if register:
        _register(c, run_id, model_id, cfg, scores)
    return uri


def _log(c, run, path: Path, result: str) -> tuple[str, str]:
    """Log the model of ``path`` into ``run`` (an MLflow Run); its logged model's id and URI."""
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
    run_id = run.info.run_id
    # made here, in the run's experiment (MLflow would put it in the active, else the default,
    # experiment), with the run's params as MLflow gives them and the result it was logged for
    model = c.create_logged_model(run.info.experiment_id, name="quantized_model", source_run_id=run_id,
                                  tags={RESULT_TAG: result} if result else None, params=run.data.params)
    mlflow.set_tracking_uri(client_uri())  # where Model.log's own client writes
    info = mlflow.pytorch.log_model(
        q, name="quantized_model", signature=infer_signature(x, y), input_example=x, run_id=run_id,
        model_id=model.model_id, pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        serialization_format="pickle", step=0)  # the module itself, texq_info and quantizers included
    return info.model_id, info.model_uri


def registered_name(cfg) -> str:
    """The registered model a run's model becomes a version of (a factory's ':' replaced)."""
    return f"texq-{safe_name(cfg.model, keep='_-.', sub='-')}-w{cfg.w_bits}a{cfg.a_bits}"


def _register(c, run_id: str, model_id: str, cfg, scores: dict) -> str:
    """The version of :func:`registered_name` holding logged model ``model_id`` (made once),
    tagged with the run's figures and described; returns its number."""
    import mlflow

    name = registered_name(cfg)
    versions = [v for v in c.search_model_versions(f"name='{name}' and run_id='{run_id}'")
                if getattr(v, "model_id", None) == model_id or v.source == f"models:/{model_id}"]
    if versions:
        version = str(versions[0].version)
    else:  # MLflow's own registration: it also links the version from the logged model's page
        mlflow.set_tracking_uri(client_uri())
        version = str(mlflow.register_model(f"models:/{model_id}", name).version)
    for key, value in version_tags(cfg, scores).items():
        c.set_model_version_tag(name, version, key, value)
    c.update_model_version(name, version, description=version_description(cfg, scores))
    return version


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
