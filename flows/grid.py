"""A grid search's parts that are not flows (the flow itself is ``flows.pipeline.grid_search``):
the ``grid`` parameter as the Prefect server checks it, its expansion into combinations and their
names, waiting for the children through a Prefect server that goes away, and the results table.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from typing import Annotated, Any

from pydantic import Field

from flows import ROOT
from flows.bookkeeping import store
from flows.bookkeeping.record_stage import quietly
from texq.pipeline import load_params
from texq.util.errors import TexqError
from texq.util.keys import leaves

# The grid as the Prefect form and API take it: keys of params.yaml (comma-joined for a zipped axis)
# to non-empty lists. The server refuses any other key when a run is submitted (the deployment's
# parameter schema), before a run exists; values are checked by the grid flow before any child.
# The keys' pattern is split in two branches of an anyOf, so that the server's refusal of a
# misspelled key is one short line naming it ("'finetune.alpah6' is not valid under any of the
# given schemas": jsonschema names a branch's own error, the pattern of every key, only where one
# branch fits better than the other); the flow itself names the closest keys (unknown_key).
_ORDER = {k: i for i, k in enumerate(leaves(load_params(ROOT / "params.yaml")))}  # params.yaml's key order
_KEYS = "|".join(re.escape(k) for k in sorted(_ORDER, key=len, reverse=True))
ONE_KEY = rf"^({_KEYS})$"
GRID_KEY = rf"^({_KEYS})(,({_KEYS}))*$"  # one key, or keys joined by commas (a zipped axis)
_KEY_NAMES = {"anyOf": [{"pattern": ONE_KEY}, {"pattern": rf"^({_KEYS})(,({_KEYS}))+$"}]}
GRID_EXAMPLE = {"w_bits,a_bits": [[3, 3], [4, 4]], "finetune.alpha6": [10, 20], "seed": [0, 1, 2]}
GRID_START = {"w_bits,a_bits": [[3, 3], [4, 4]], "mkd": [True, False]}  # the run form's starting grid
Grid = Annotated[
    dict[str, Annotated[list, Field(min_length=1)]],
    Field(min_length=1, examples=[GRID_EXAMPLE], json_schema_extra={"propertyNames": _KEY_NAMES,
                                                                   "default": GRID_START})]
# Run-wide settings of a grid (the profile, a method, any params.yaml key): every child's, not an axis
_TOP = "|".join(re.escape(k) for k in _ORDER if "." not in k)
_DOTTED = "|".join(re.escape(k) for k in _ORDER if "." in k)
Overrides = Annotated[
    dict[str, Any],
    Field(examples=[{"profile": "paper", "finetune.epochs": 200}], json_schema_extra={
        "propertyNames": {"anyOf": [{"pattern": rf"^({_TOP})$"}, {"pattern": rf"^({_DOTTED})$"}]}})]


def expand(grid: dict[str, list]) -> list[dict[str, Any]]:
    """{'w_bits,a_bits': [[3, 3], [4, 4]], 'mkd': [True, False]} -> the 4 override dicts. Each key
    is an axis; keys joined by commas are one axis whose values (lists of as many items) set them
    together, e.g. the paper's W3A3 and W4A4 without W3A4 and W4A3. Axes go in params.yaml's order
    of their first key (a grid's mapping may come back from a server's database in another
    order), so that a combination's name is the same however the grid was stored."""
    if not grid or any(not isinstance(v, list) or not v for v in grid.values()):
        raise TexqError(f"grid {grid!r}: expected a mapping of params keys to non-empty lists")
    axes = []
    for axis in ordered_axes(grid):
        values = grid[axis]
        keys = [k.strip() for k in axis.split(",")]
        if len(keys) == 1:
            axes.append([{keys[0]: v} for v in values])
            continue
        bad = [v for v in values if not isinstance(v, list) or len(v) != len(keys)]
        if bad:
            raise TexqError(f"grid axis {axis!r}: each value must list {len(keys)} items (one per "
                            f"key), got {bad[0]!r}")
        axes.append([dict(zip(keys, v)) for v in values])
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*axes)]


def axis_keys(grid: dict[str, list]) -> tuple[str, ...]:
    """The params keys the grid varies, in its axes' order (a zipped axis gives each of its keys)."""
    return tuple(dict.fromkeys(k.strip() for axis in ordered_axes(grid) for k in axis.split(",")))


def run_wide(grid: dict[str, list], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """A grid's run-wide ``overrides`` (every child's), refused where a key is also an axis."""
    overrides = dict(overrides or {})
    both = sorted(set(overrides) & set(axis_keys(grid)))
    if both:
        raise TexqError(f"{', '.join(both)}: both a grid axis and in overrides; give each key in one of them")
    return overrides


def ordered_axes(grid: dict[str, list]) -> list[str]:
    """The grid's axes in params.yaml's order of their first key (see :func:`expand`)."""
    return sorted(grid, key=lambda axis: _ORDER.get(axis.split(",")[0].strip(), len(_ORDER)))


def child_folder(combo: dict[str, Any]) -> str:
    """A child's folder: its run name (:func:`label`), or a hash of it past 60 characters."""
    text = label(combo)
    return text if len(text) <= 60 and "/" not in text else hashlib.sha1(text.encode()).hexdigest()[:12]


WAIT_PATIENCE_S = 600  # how long a grid waits for a Prefect server that went away (a restart), per outage


def wait_final(fid, log, wait=None, probe=None, patience: float = WAIT_PATIENCE_S, pause: float = 5.0,
                clock=time.monotonic, sleep=time.sleep):
    """The child flow run once final, by Prefect's own waiting (``wait_for_flow_run``: its events
    stream; ``wait`` in tests). The stream does not survive the server going away (a restart, its
    database paused): the grid then polls the server (``probe``: read the flow run) until it
    answers again, up to ``patience`` seconds for each outage, instead of failing while its
    children work on. Only a server that did not answer is waited out (:func:`server_gone`):
    anything else, a refused credential or texq's own error, is raised at once."""
    if wait is None:
        from prefect.flow_runs import wait_for_flow_run
        from prefect.utilities.asyncutils import run_coro_as_sync

        def wait():
            return run_coro_as_sync(wait_for_flow_run(fid, timeout=None))
    probe = probe or (lambda: _read_flow_run(fid))
    while True:
        try:
            return wait()
        except Exception as exc:
            if not server_gone(exc):
                raise
            log.warning("waiting for flow run %s: the Prefect server did not answer (%s); waiting up "
                        "to %.0f s for it", fid, type(exc).__name__, patience)
        deadline = clock() + patience  # this outage's own patience
        while True:
            try:
                run = probe()
                break
            except Exception as exc:
                if not server_gone(exc) or clock() > deadline:
                    raise
                sleep(pause)
        if run.state is not None and run.state.is_final():
            return run
        log.info("the Prefect server answers again: waiting for flow run %s", fid)


def _read_flow_run(fid):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as pc:
        return pc.read_flow_run(fid)


def server_gone(exc: BaseException) -> bool:
    """Whether ``exc`` says the Prefect server did not answer (no connection, a dropped events
    stream, a time-out, a 5xx while it restarts), not that it refused or that texq failed."""
    import httpx
    from websockets.exceptions import InvalidStatus, WebSocketException

    if isinstance(exc, BaseExceptionGroup):
        return all(server_gone(e) for e in exc.exceptions)
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500
    if isinstance(exc, InvalidStatus):
        return exc.response.status_code >= 500
    return isinstance(exc, (httpx.TransportError, WebSocketException, OSError, TimeoutError))


def child_result(fid) -> dict:
    """A child's top-1 and MLflow run, from its ``texq-result`` artifact on the Prefect server
    (nothing read from the child's files: it may have run on another host)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    with get_client(sync_client=True) as pc:
        arts = pc.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[fid]), key=ArtifactFilterKey(any_=["texq-result"])))
    if not arts:
        return {"top1": None, "mlflow_run_id": "", "stages_run": ""}
    row = json.loads(arts[-1].data)[0]
    return {"top1": row["top1"], "mlflow_run_id": row["mlflow_run_id"], "stages_run": row["stages_run"]}


def short_key(key: str) -> str:
    """A key as a run name shows it: its shortest ending of whole parts that no other params.yaml
    key ends in and that has 3 characters or more (``finetune.alpha6`` -> ``alpha6``,
    ``calibration.laws.k`` -> ``laws.k``), else the key in full (``finetune.lr``: generator.lr too)."""
    parts = key.split(".")
    for n in range(1, len(parts)):
        end = ".".join(parts[-n:])
        if len(end) >= 3 and sum(k == end or k.endswith("." + end) for k in _ORDER) == 1:
            return end
    return key


def value_text(value: Any) -> str:
    """A value as params.yaml writes it: true, 0.001, [3, 3], a plain word unquoted."""
    return value if isinstance(value, str) else json.dumps(value)


def label(combo: dict[str, Any]) -> str:
    """A child run's name, short enough to read whole in a runs table: what sets it apart, the bit
    widths first (``W4A4`` for w_bits and a_bits both in the grid), then each other axis by its
    short key (``W4A4,mkd=true,alpha6=10``); one name per combination of one grid."""
    rest = dict(combo)
    parts = []
    if "w_bits" in rest and "a_bits" in rest:
        parts.append(f"W{value_text(rest.pop('w_bits'))}A{value_text(rest.pop('a_bits'))}")
    parts += [f"{short_key(k)}={value_text(v)}" for k, v in rest.items()]
    return ",".join(parts)


def summary(rows: list[dict]) -> dict[str, float]:
    """A grid's summary as its MLflow parent run's metrics: how many runs ended how, and the top-1
    of the completed ones (best, mean, sample std: the final-epoch models', never a best epoch)."""
    import statistics

    done = [r["top1"] for r in rows if r["state"] == "COMPLETED" and r.get("top1") is not None]
    out = {"runs": len(rows), "runs_completed": len(done),
           "runs_cancelled": sum(r["state"] in ("CANCELLED", "CANCELLING") for r in rows)}
    out["runs_failed"] = len(rows) - out["runs_completed"] - out["runs_cancelled"]
    if done:
        out.update(top1_best=max(done), top1_mean=statistics.fmean(done),
                   top1_std=statistics.stdev(done) if len(done) > 1 else 0.0)
    return out


def record_grid(c, parent_id: str, combos: list[dict], rows: list[dict], log) -> list[dict]:
    """The grid's results table (:func:`results_table`) and its :func:`summary` as metrics, logged
    on its MLflow parent run, which ends as its children did (FINISHED, KILLED when some were cancelled, else FAILED). The
    children are final: a store that does not answer now fails nothing; the table then names the
    runs the children reported, and texq track reconcile ends the parent run later."""
    table = quietly(log, "the grid's MLflow links", None, lambda: results_table(c, parent_id, combos, rows))
    if table is None:
        table = results_table(None, parent_id, combos, rows)
    totals = summary(rows)
    states = {r["state"] for r in rows}
    status = ("FINISHED" if states == {"COMPLETED"} else
              "KILLED" if states <= {"COMPLETED", "CANCELLED", "CANCELLING"} else "FAILED")

    def end() -> None:
        from mlflow.entities import Metric

        from flows.bookkeeping.run_end import end_run

        _log_table(c, parent_id, table)
        now = int(time.time() * 1000)
        c.log_batch(parent_id, metrics=[Metric(k, float(v), now, 0) for k, v in totals.items()])
        end_run(c, parent_id, status, f"{totals['runs_completed']} of {totals['runs']} runs completed")

    quietly(log, f"the grid's results table and end ({status}) on MLflow run {parent_id}", None, end)
    return table


def results_table(c, parent_id: str, combos: list[dict], rows: list[dict]) -> list[dict]:
    """One row per child (``combos[i]`` and its ``rows[i]``): its combination, state, top-1, the
    stages it ran and its MLflow run (a link when the tracking URI is a server's); a child that
    left no result (failed, cancelled) is found by its flow run's tag (with a client ``c``; None:
    the runs the children reported, as ids)."""
    by_flow = {}
    if c is not None:
        children = c.search_runs([c.get_run(parent_id).info.experiment_id],
                                 f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=10_000)
        by_flow = {r.data.tags.get("prefect_flow_run_id"): r.info.run_id for r in children}
    table = []
    for combo, r in zip(combos, rows):
        run_id = r.get("mlflow_run_id") or by_flow.get(r["flow_run"], "")
        link = (store.run_url(run_id) or run_id) if run_id and c is not None else run_id
        table.append({"combination": label(combo), "state": r["state"], "top1": r["top1"],
                      "stages_run": r.get("stages_run", ""), "mlflow_run": link or ""})
    return table


def _log_table(c, parent_id: str, table: list[dict]) -> None:
    """The results table on the MLflow parent run (``grid_results.json``, the UI's table view)."""
    c.log_table(parent_id, {k: [row[k] for row in table] for k in table[0]}, "grid_results.json")
