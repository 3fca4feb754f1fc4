"""Bringing MLflow up to date from the files, and ending runs whose work has stopped.

``texq track sync [OUT]`` records into a pipeline run's MLflow run whatever its stages left in
``OUT`` and the store did not take (a server down, a locked SQLite file), then gives the run its
true state: FINISHED once ``metrics.json`` is recorded, else KILLED (no stage works in the folder:
sync holds its lock; the next stage reopens the run). Idempotent: a second sync logs nothing.

``texq track reconcile`` ends every RUNNING run whose work has stopped: its Prefect flow run is
over (the server marked it Crashed after its heartbeats stopped, or it was cancelled or failed),
or its stage process on this host is gone (a SIGKILLed ``dvc repro``); a run whose folder is on
this host is synced first, so that finished work is recorded, not lost.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from flows.bookkeeping.pipeline_run import (
    KEY_TAG,
    OUT_TAG,
    PID_TAG,
    STAGE_TAG,
    find_or_create_run,
    pipeline_key,
    stage_lock,
)
from flows.bookkeeping.provenance import HOST_ID_TAG, host_id
from flows.bookkeeping.record_stage import (
    RECORDED_TAG,
    current,
    drop_unrecorded,
    forget_unrecorded,
    quiet_store,
    record_stage,
    source_file,
    unrecorded,
)
from flows.bookkeeping.run_end import FLOW_END_TAG, end_run
from flows.bookkeeping.store import client, experiment_id, experiment_name
from texq.util.errors import ConfigError
from texq.util.io import file_digest

log = logging.getLogger("texq")
# Prefect's final states in MLflow's words: a run whose flow run completed ends FINISHED (its
# stages succeeded; what the store did not take is noted beside its files for texq track sync)
FINAL = {"COMPLETED": "FINISHED", "CRASHED": "FAILED", "FAILED": "FAILED", "CANCELLED": "KILLED"}


def sync(out: str | Path = "out/pipeline", params_file: str | Path = "params.yaml") -> dict:
    """Record what ``out`` holds into its pipeline run's MLflow run and end the run truthfully."""
    from flows.checkout import require_own_checkout
    from texq.pipeline import STAGES, read_config
    from texq.run.config import fingerprint
    from texq.run.layout import Layout
    from texq.util.io import read_json
    from texq.util.lock import folder_lock

    require_own_checkout(what="texq track sync")  # the store it records into is its code's checkout's
    out = Path(out)
    if not out.is_dir():
        found = "a file, not a folder" if out.exists() else "no such folder"
        raise ConfigError(f"{out}: {found} (expected a pipeline's out folder, e.g. out/pipeline)")
    config = read_config(params_file, "cpu")
    layout = Layout(out)
    results = [f for f in (source_file(out, s) for s in STAGES) if f is not None]
    if not any(f.is_file() for f in results) and not unrecorded(out):
        raise ConfigError(f"{out}: holds none of a pipeline's results ({', '.join(f.name for f in results)}): "
                          "nothing to record (expected a pipeline's out folder, e.g. out/pipeline)")
    if layout.summary.is_file():
        held = read_json(layout.summary).get("fingerprint")
        if held != fingerprint(config.run):
            raise ConfigError(f"{layout.summary}: trained with another configuration than {params_file} "
                              "(run texq track sync with the params file that produced it)")
    # no stage works or records meanwhile (a running one records itself)
    with stage_lock(out, "texq track sync"), folder_lock(out, "texq track sync"), quiet_store():
        # the notes about these very files name their pipeline run and MLflow run (the key of the
        # commit they were computed at); a note whose file was since replaced decides nothing
        notes = [n for n in unrecorded(out) if current(out, n)]
        key = next((n["key"] for n in notes if n.get("key")), None) or pipeline_key(params_file)
        c = client()
        noted = next((n["run_id"] for n in notes if n.get("run_id") and n.get("key") == key), None)
        run_id = noted or _run_of(c, out, key) or find_or_create_run(c, params_file, config.run, key=key)
        logged = [s for s in STAGES if record_stage(c, run_id, s, out, config.run, config.registers_model)]
        drop_unrecorded(out)  # every stage's files are recorded now: no note is left to act on
        run = c.get_run(run_id)
        done = (layout.metrics.is_file()
                and run.data.tags.get(RECORDED_TAG + "evaluate") == file_digest(layout.metrics))
        status = "FINISHED" if done else ("KILLED" if run.info.status == "RUNNING" else run.info.status)
        if status != run.info.status:
            end_run(c, run_id, status, "" if done else "no stage running (texq track sync)")
            if not done:
                c.set_tag(run_id, STAGE_TAG, "no stage running (texq track sync)")
    return {"command": "track sync", "out": str(out), "run_id": run_id, "recorded": logged,
            "status": status}


def _run_of(c, out: Path, key: str) -> str | None:
    """The run that already holds (some of) ``out``'s results: the latest run of this folder on
    this host that recorded one of its files as they are now, else the latest of pipeline run
    ``key``; None when there is none."""
    from texq.pipeline import STAGES

    exp = experiment_id(c)
    here = c.search_runs([exp], f"tags.`{OUT_TAG}` = '{out.resolve()}' and tags.`texq.host` = "
                         f"'{socket.gethostname()}'", max_results=50, order_by=["attributes.start_time DESC"])
    files = {s: source_file(out, s) for s in STAGES}
    digests = {s: file_digest(f) for s, f in files.items() if f is not None and f.is_file()}
    for run in here:
        if any(run.data.tags.get(RECORDED_TAG + s) == d for s, d in digests.items()):
            return run.info.run_id
    by_key = c.search_runs([exp], f"tags.`{KEY_TAG}` = '{key}'", max_results=1,
                           order_by=["attributes.start_time DESC"])
    return by_key[0].info.run_id if by_key else None


def _alive_stage(pid: int) -> bool:
    """Whether ``pid`` is a running stage process (``python -m flows.stage``) on this host."""
    from flows.stage import alive

    if not alive(pid):
        return False
    try:
        return b"flows.stage" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust the kernel's answer


def _prefect_states(flow_run_ids: set[str]) -> dict[str, str]:
    """Each flow run's state type (COMPLETED, CRASHED, ...) from the Prefect server at
    ``$PREFECT_API_URL``; {} without one (no ephemeral server is started for this)."""
    if not flow_run_ids or not os.environ.get("PREFECT_API_URL"):
        return {}
    from uuid import UUID

    from prefect.client.orchestration import get_client

    from flows.credentials import refusal

    states = {}
    with get_client(sync_client=True) as pc:
        for fid in flow_run_ids:
            try:
                run = pc.read_flow_run(UUID(fid))
            except Exception as exc:  # deleted, or not a flow run id: nothing tells; a refusal is said
                if refusal(exc):
                    raise
                continue
            if run.state is not None:
                states[fid] = run.state.type.value
    return states


def reconcile() -> dict:
    """End the RUNNING runs whose work has stopped (see the module's doc); returns what was done."""
    from flows.checkout import require_own_checkout

    require_own_checkout(what="texq track reconcile")
    with quiet_store():
        return _reconcile()


def _reconcile() -> dict:
    c = client()
    exp = c.get_experiment_by_name(experiment_name())
    if exp is None:
        return {"command": "track reconcile", "ended": []}
    runs = c.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
    states = _prefect_states({r.data.tags["prefect_flow_run_id"] for r in runs
                              if r.data.tags.get("prefect_flow_run_id")})
    host, here, ended = socket.gethostname(), host_id(), []
    for run in runs:
        tags, rid = run.data.tags, run.info.run_id
        state = states.get(tags.get("prefect_flow_run_id", ""))
        local = tags.get(HOST_ID_TAG) == here  # its pid means something here (not: the same name)
        dead = (local and tags.get(STAGE_TAG, "").endswith(" running") and tags.get(PID_TAG, "").isdigit()
                and not _alive_stage(int(tags[PID_TAG])))
        if state not in FINAL and not dead:
            continue  # still working (or nothing tells): left alone
        out = Path(tags.get(OUT_TAG, ""))
        if local and tags.get(KEY_TAG) and out.is_dir():  # finished work is recorded before the end
            _record_notes(c, rid, tags[KEY_TAG], out)
        if c.get_run(rid).info.status != "RUNNING":
            continue
        status = FINAL.get(state, "KILLED")
        if state:
            c.set_tag(rid, FLOW_END_TAG, state.title())
        if state == "COMPLETED" and RECORDED_TAG + "evaluate" not in tags:  # finished, not all recorded
            c.set_tag(rid, STAGE_TAG, f"finished; not all recorded: texq track sync {out} on "
                                      f"{tags.get('texq.host', 'its host')}")
        else:
            c.set_tag(rid, STAGE_TAG, tags.get(STAGE_TAG, "").replace(" running", " lost"))
        why = f"Prefect flow run {state.title()}" if state else f"stage process {tags.get(PID_TAG)} on {host} is gone"
        end_run(c, rid, status, why)
        ended.append({"run_id": rid, "status": status, "why": why})
    for e in ended:
        log.info("MLflow run %s ended %s: %s", e["run_id"], e["status"], e["why"])
    return {"command": "track reconcile", "ended": ended}


def _record_notes(c, run_id: str, key: str, out: Path) -> None:
    """Record the stages noted as unrecorded in ``out`` for pipeline run ``key`` (their config
    from the train stage's summary; without one, only teacher's score)."""
    from texq.run.config import RunConfig
    from texq.run.layout import Layout
    from texq.util.io import read_json
    from texq.util.keys import build

    notes = [n["stage"] for n in unrecorded(out, key)]
    if not notes:
        return
    layout = Layout(out)
    try:
        cfg = build(RunConfig, read_json(layout.summary)["config"])
    except Exception:  # no train stage yet, or a config this code cannot read: metrics and files only
        cfg = None
    for stage in notes:
        record_stage(c, run_id, stage, out, cfg)
    forget_unrecorded(out, notes, key)
    if "evaluate" in notes and layout.metrics.is_file():
        end_run(c, run_id, "FINISHED")
