"""The MLflow store texq records into: where it is (``$MLFLOW_TRACKING_URI``, else a sqlite file in
the project root), the ``texq`` experiment (its artifact location, its kind, texq's view of its
runs table) and links to runs on a tracking server."""

from __future__ import annotations

import json
import os
from pathlib import Path

from flows import ROOT

EXPERIMENT = "texq"
# the runs table as texq's runs are read: MLflow shows Source, Models and Dataset by default and
# keeps metrics and params behind its column picker; this view (an experiment tag MLflow's UI reads
# from the link's viewStateShareKey) shows what tells runs apart and how they scored
VIEW_KEY = "texq"
# the fewest columns that tell runs apart (the run name shows what a grid's child differs in): top-1,
# the summary a grid's parent run holds, the bits, mixup KD, and how the run ended, in words, so
# that they fit a laptop's width (1366 px, MLflow's Assistant panel closed); MLflow orders each
# group's columns by name. Method, profile and seed are in a lone run's name, in a grid child's
# where they vary and in its parent's where they are fixed.
VIEW_COLUMNS = ("metrics.`top1`", "metrics.`top1_mean`", "params.`w_bits`", "params.`a_bits`", "params.`mkd`",
                "tags.`texq.end`")
VIEW_ORDER = {"orderByKey": "metrics.`top1`", "orderByAsc": False}
_SECTION = "texq-scores"  # the chart view's first section: the cards below, then MLflow's own


def view_state(params: tuple[str, ...] = ("w_bits", "a_bits", "mkd"), search: str = "") -> dict:
    """A runs-table view as MLflow's UI shares it (an experiment tag its link names): texq's
    columns, best top-1 first, runs matching ``search`` (MLflow's filter; empty: all), and a chart
    view (the runs page's compare) that opens on a parallel-coordinates plot of ``params`` against
    top-1 and a bar chart of top-1 (MLflow's own compare page starts on the runs' first logged
    metric, fp_top1, and has no setting for it)."""
    card = {"runsCountToCompare": 100, "metricSectionId": _SECTION, "deleted": False, "isGenerated": False}
    return {"selectedColumns": list(VIEW_COLUMNS), **VIEW_ORDER, **({"searchFilter": search} if search else {}),
            "compareRunSections": [{"uuid": _SECTION, "name": "top-1", "display": True, "isReordered": True,
                                    "deleted": False, "isGenerated": False}],
            "compareRunCharts": [
                {**card, "uuid": "texq-parallel", "type": "PARALLEL", "selectedParams": sorted(params),
                 "selectedMetrics": ["top1"], "showAllRuns": False},
                {**card, "uuid": "texq-top1", "type": "BAR", "metricKey": "top1"}],
            "isAccordionReordered": True}


EXPERIMENT_TAGS = {
    # a model-development experiment (MLflow's own kind tag; the 3.17 UI follows its per-browser
    # GenAI / Model training switch instead, which runs_view_url's link sets)
    "mlflow.experimentKind": "custom_model_development",
    f"mlflow.sharedViewState.{VIEW_KEY}": json.dumps(view_state()),
}


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else an absolute sqlite file in the project root (``$DVC_ROOT``
    when DVC runs the stage in a temporary copy, so queued experiments keep their runs)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(os.environ.get("DVC_ROOT") or ROOT).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def unreadable_store(exc: Exception):
    """A TexqError naming the tracking URI, for an error of the store itself (a server that does
    not answer or refuses the credentials, a file that is not an MLflow database); None for
    anything else."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    from flows.credentials import refusal
    from texq.util.errors import TexqError

    if line := refusal(exc):  # a lab's server: 401/403, or a certificate it cannot verify
        return TexqError(line)
    if not isinstance(exc, (MlflowException, SQLAlchemyError)):
        return None
    text = " ".join(str(getattr(exc, "orig", None) or exc).split())
    return TexqError(f"the MLflow store at {tracking_uri()} cannot be read: {text[:300]}")


WAIT_ENV = "TEXQ_TRACKING_WAIT"  # seconds a call waits out a locked SQLite store (default 60)
# MLflow's own retries of a tracking server's calls (connection refused, 5xx, timeouts), with
# exponential backoff: texq's defaults wait out a server restart of about a minute and then give
# up, so that a stage is not held for MLflow's default of about four minutes per call
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


def client_uri() -> str:
    """The URI clients connect to: :func:`tracking_uri`, a SQLite store with a busy timeout
    (``$TEXQ_TRACKING_WAIT`` seconds; SQLite's own default, 5 s, fails a call as soon as another
    process holds a long write) unless the URI sets one."""
    from texq.util.errors import ConfigError

    uri = tracking_uri()
    if uri.startswith("sqlite:") and "?" not in uri:
        text = os.environ.get(WAIT_ENV) or "60"
        try:
            wait = float(text)
        except ValueError:
            wait = -1.0
        if not 0 <= wait < float("inf"):
            raise ConfigError(f"{WAIT_ENV}={text!r}: expected seconds, a number >= 0")
        return f"{uri}?timeout={wait:g}"
    return uri


def client():
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient

    return MlflowClient(client_uri())


def sqlite_file(uri: str) -> Path | None:
    """The database file a ``sqlite:///PATH[?options]`` URI names; None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?")[0])


def artifact_location() -> str | None:
    """Beside a sqlite store, an absolute ``mlartifacts/`` folder (MLflow's default is ``./mlruns``
    relative to the working directory, lost when DVC runs a stage in a temporary copy); a tracking
    server decides for itself."""
    db = sqlite_file(tracking_uri())
    if db is not None:
        return (db.resolve().parent / "mlartifacts").as_uri()
    return None


def experiment_name() -> str:
    """The experiment texq records into: ``$MLFLOW_EXPERIMENT_NAME``, else ``texq``."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)


def experiment_id(c, name: str | None = None) -> str:
    """The experiment's id (created on first use). Beside a sqlite store, an experiment whose
    artifacts go anywhere but the ``mlartifacts/`` beside that store (MLflow fixes the absolute
    path when it creates the experiment: a moved or copied project's store still names the old
    folder) is refused, so that no run writes its artifacts into another checkout."""
    from texq.util.errors import ConfigError

    name = name or experiment_name()
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return c.create_experiment(name, artifact_location=artifact_location(), tags=EXPERIMENT_TAGS)
    for key, value in EXPERIMENT_TAGS.items():  # an experiment made before these tags existed
        if exp.tags.get(key) != value:
            c.set_experiment_tag(exp.experiment_id, key, value)
    expected = artifact_location()
    if expected and exp.artifact_location.rstrip("/") != expected.rstrip("/"):
        raise ConfigError(
            f"{tracking_uri()}: experiment {name!r} keeps its artifacts in {exp.artifact_location}, "
            f"not beside this store ({expected}): the store was moved or copied from another "
            "checkout. Use a fresh experiment (MLFLOW_EXPERIMENT_NAME=...), a fresh store (move "
            "mlflow.db away), or a tracking server, whose artifact locations are its own "
            "(mlflow-artifacts:/...)")
    return exp.experiment_id


# MLflow 3.17's UI opens a page in its GenAI layout unless the link (or its per-browser "Model
# training" switch) says otherwise: the experiment's kind tag is not read
ML_LAYOUT = "workflowType=machine_learning"


def runs_view_url(experiment: str, key: str = VIEW_KEY, charts: bool = False) -> str | None:
    """The link to ``experiment``'s runs table in texq's view ``key`` (:func:`view_state`; a
    grid's view shows its children only: :func:`add_grid_view`), or its chart view (``charts``:
    the runs compared on top-1), on a tracking server; None for a local store (``mlflow ui``
    serves it anywhere)."""
    uri = _server_uri()
    mode = "&compareRunsMode=CHART" if charts else ""
    return uri and f"{uri}/#/experiments/{experiment}/runs?viewStateShareKey={key}&{ML_LAYOUT}{mode}"


def add_grid_view(c, experiment: str, parent_id: str, params: tuple[str, ...] = ("w_bits", "a_bits", "mkd")) -> str:
    """A view of the runs table holding one grid's children only (filtered on their parent run),
    best top-1 first, its charts plotting the grid's axes ``params`` against top-1, as an
    experiment tag; returns its key for :func:`runs_view_url`."""
    key = f"grid-{parent_id}"
    c.set_experiment_tag(experiment, f"mlflow.sharedViewState.{key}", json.dumps(
        view_state(params, f"tags.mlflow.parentRunId = '{parent_id}'")))
    return key


def run_url(run_id: str) -> str | None:
    """A run's page on the tracking server (in MLflow's model-training layout); None for a local
    store."""
    uri = _server_uri()
    if not uri:
        return None
    return f"{uri}/#/experiments/{client().get_run(run_id).info.experiment_id}/runs/{run_id}?{ML_LAYOUT}"


def _server_uri() -> str | None:
    """The tracking server's address (no trailing slash), None for a local store."""
    uri = tracking_uri().rstrip("/")
    return uri if uri.startswith("http") else None


def safe_name(name: str, keep: str = "_-. :/", sub: str = "_") -> str:
    """``name`` with every character but alphanumerics and ``keep`` replaced by ``sub``: by
    default a class name as an MLflow metric-name part."""
    return "".join(ch if ch.isalnum() or ch in keep else sub for ch in str(name))
