"""MLflow tracking of pipeline runs: one MLflow run per pipeline run, whatever stages it reruns.

A pipeline run is identified by the content of its params file, the git commit, the DVC experiment
name and the parent (grid) run: the first stage that runs creates the MLflow run (tagged with that
key), later stages of the same pipeline run find it, ``evaluate`` ends it FINISHED, and a failing
stage ends it FAILED before the error propagates (so ``dvc repro`` fails too).
Everything is logged with ``MlflowClient`` and an explicit run id (no active-run globals: safe in
Prefect's worker threads).
"""

from __future__ import annotations

import hashlib
import logging
import os
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from flows.bookkeeping.provenance import git_commit, where_tags
from flows.bookkeeping.record_stage import (
    METRICS_TAG,
    TRAINED_TAG,
    failure_line,
    forget_unrecorded,
    note_unrecorded,
    quiet_store,
    record_stage,
    tracking_error,
    unrecorded,
)
from flows.bookkeeping.run_end import (
    END_WORDS,
    FLOW_END_TAG,
    Orphaned,
    Terminated,
    end_run,
    end_state,
)
from flows.bookkeeping.store import client, experiment_id, experiment_name, tracking_uri
from texq.util.io import file_digest

__all__ = ["TRAINED_TAG", "METRICS_TAG"]  # re-exported: flows.compare reads them from here
KEY_TAG = "texq.pipeline_key"
STAGE_TAG = "texq.stage"  # "<stage> running" while a stage process works in the run, then "<stage> done"
PID_TAG = "texq.stage_pid"  # that process (with texq.host_id: where), for texq track reconcile
OUT_TAG = "texq.out"  # the folder the stages write (on texq.host), for texq track reconcile
RESUMED_TAG = "texq.resumed"  # how often the run was reopened by a later session of the same pipeline run
RUN_NAME_ENV = "TEXQ_RUN_NAME"  # a grid child's name: its combination (flows.pipeline)


def pipeline_key(params_file: str | Path, parent_run_id: str = "") -> str:
    parts = [Path(params_file).read_text(), git_commit(), os.environ.get("DVC_EXP_NAME", ""),
             parent_run_id]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def flat_params(cfg) -> dict[str, str]:
    """The settings the run uses under their one dotted name (texq.run.methods.effective_settings: what
    its method applies, None for a switch it has no module for, no section it never reads)."""
    from texq.run.methods import effective_settings

    return {k: str(v) for k, v in effective_settings(cfg).items() if k != "device"}


def find_or_create_run(c, params_file: str | Path, cfg, parent_run_id: str = "",
                       flow_run_id: str = "", key: str | None = None) -> str:
    """The RUNNING MLflow run of this pipeline run (``key``: by default the params file's, with
    the commit and parent), else the one an earlier session of it left stopped (reopened), else a
    new one with its params and tags."""
    from mlflow.entities import RunTag

    key = key or pipeline_key(params_file, parent_run_id)
    exp = experiment_id(c)
    found = c.search_runs([exp], f"tags.`{KEY_TAG}` = '{key}' and attributes.status = 'RUNNING'",
                          max_results=1)
    if found:
        _log_params(c, found[0], cfg)
        return found[0].info.run_id
    # an earlier session of this very pipeline run (same flow run, or none: dvc repro) that was
    # stopped or failed: the session that resumes its work continues its record
    for run in c.search_runs([exp], f"tags.`{KEY_TAG}` = '{key}' and attributes.status != 'FINISHED'",
                             max_results=20, order_by=["attributes.start_time DESC"]):
        tags = run.data.tags
        if tags.get("prefect_flow_run_id", "") == flow_run_id and FLOW_END_TAG not in tags:
            c.update_run(run.info.run_id, "RUNNING")
            c.set_tag(run.info.run_id, RESUMED_TAG, str(int(tags.get(RESUMED_TAG, "0")) + 1))
            _log_params(c, run, cfg)
            return run.info.run_id
    if flow_run_id:  # a stage of a flow run already ended (its process died) opens no new run
        runs = c.search_runs([exp], f"tags.`prefect_flow_run_id` = '{flow_run_id}'", max_results=100)
        ended = [r.data.tags[FLOW_END_TAG] for r in runs if FLOW_END_TAG in r.data.tags]
        if ended:
            raise Orphaned(f"its Prefect flow run {flow_run_id} ended {ended[0]}: not recording into it")
    # mlflow.source.*: the runs table's Source column and the run page's commit, as MLflow shows them
    tags = {KEY_TAG: key, "mlflow.source.git.commit": git_commit(), "mlflow.source.type": "LOCAL",
            "mlflow.source.name": f"texq pipeline ({Path(params_file).name})",
            "prefect_flow_run_id": flow_run_id,
            "method": cfg.method, "profile": cfg.profile, **where_tags()}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    # a grid child is named by what differs (its combination); a lone run by what it is
    name = (os.environ.get(RUN_NAME_ENV)
            or f"{cfg.method}-w{cfg.w_bits}a{cfg.a_bits}-s{cfg.seed}-{cfg.profile}")
    run = c.create_run(exp, tags=tags, run_name=name)
    c.log_batch(run.info.run_id, tags=[RunTag("texq.params_file", str(params_file))])
    _log_params(c, run, cfg)
    return run.info.run_id


def _log_params(c, run, cfg) -> None:
    """Log the settings ``run`` does not hold yet: all of them for a new run, the rest for a run
    whose params a store that went away did not take (found again by its key, it gets them now)."""
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in flat_params(cfg).items() if k not in run.data.params]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        c.log_batch(run.info.run_id, params=items[i:i + 100])


def say(text: str) -> None:
    """A line on stderr, also when its reader (dvc, the flow run) is gone."""
    import sys

    try:
        print(text, file=sys.stderr, flush=True)
    except OSError:  # the reader (dvc, the flow run) is gone
        pass


@contextmanager
def tracked_stage(stage: str, params_file: str | Path, out: Path, cfg, parent_run_id: str = "",
                  flow_run_id: str = "", register: bool = False) -> Iterator[str | None]:
    """Run a stage inside its pipeline run's MLflow run (FAILED on error, KILLED when stopped,
    FINISHED after ``evaluate``). The store is a bookkeeper, never a precondition: when it cannot
    be reached the stage runs unrecorded (it yields None), and once the stage's work is done no
    failure of the store fails it; what was not recorded is noted (``flows.bookkeeping.record_stage``) and recorded
    by the next stage of the run or ``texq track sync``."""
    with quiet_store():
        yield from _tracked_stage(stage, params_file, out, cfg, parent_run_id, flow_run_id, register)


def _tracked_stage(stage, params_file, out, cfg, parent_run_id, flow_run_id, register):
    out, key = Path(out), pipeline_key(params_file, parent_run_id)
    c, run_id = None, None
    try:
        c = client()  # a SQLite store is opened (and its tables checked) here
        run_id = find_or_create_run(c, params_file, cfg, parent_run_id, flow_run_id, key)
        _begin(c, run_id, stage, out)
        _catch_up(c, run_id, key, out, cfg, register)
    except Exception as exc:
        if not tracking_error(exc):
            raise  # texq's refusals (a store moved from another checkout) stop the stage before its work
        say(f"texq: the MLflow store at {tracking_uri()} did not answer ({failure_line(exc)}): stage "
             f"{stage} runs, and records its results when the store is back (texq track sync {out})")
        run_id = None
    try:
        yield run_id
    except BaseException as exc:
        if run_id is not None:
            try:
                status = end_state(exc)
                end_run(c, run_id, status, f"stage {stage} " + ("stopped by a signal" if status == "KILLED"
                                                               else f"raised {type(exc).__name__}"))
                c.set_tag(run_id, STAGE_TAG, f"{stage} {END_WORDS[status]}")
            except Exception as err:  # the stage's own error is the one to report
                say(f"texq: the MLflow store at {tracking_uri()} did not take run {run_id}'s end "
                     f"({failure_line(err)}); texq track reconcile ends it")
        raise
    # the work is done and its outputs are written: nothing below fails the stage, and a stop
    # (SIGTERM: a cancel, the flow-process watch) ends the recording, not the stage, which is done
    try:
        logging.getLogger("texq").info("texq: recording stage %s into MLflow%s", stage,
                                       f" run {run_id}" if run_id else "")
        if run_id is None:
            c = c or client()
            run_id = find_or_create_run(c, params_file, cfg, parent_run_id, flow_run_id, key)
            _catch_up(c, run_id, key, out, cfg, register)
        record_stage(c, run_id, stage, out, cfg, register)
        c.set_tag(run_id, STAGE_TAG, f"{stage} done")
        if stage == "evaluate":
            end_run(c, run_id, "FINISHED")
    except (Exception, Terminated) as exc:
        noted = note_unrecorded(out, stage, key, run_id, exc)
        then = (f"texq track sync {out} records them" if noted else
                f"noting that failed too: run texq track sync {out} once the store is back")
        kept = f"texq: stage {stage} finished and its outputs are kept in {out}, but "
        if isinstance(exc, Terminated):
            say(f"{kept}its recording into MLflow was {exc}; {then}")
        elif tracking_error(exc):
            say(f"{kept}the MLflow store at {tracking_uri()} did not record them ({failure_line(exc)}); {then}")
        else:  # not the store's: an error of texq's own recording code, shown whole
            say(f"{kept}recording them failed on an error of texq's, not the store's "
                f"({type(exc).__name__}: {exc}); {then} (please report this error)")
            logging.getLogger("texq").exception("recording stage %s", stage)


def _begin(c, run_id: str, stage: str, out: Path) -> None:
    """Mark the run as worked on by this process (texq track reconcile reads the marks)."""
    from mlflow.entities import RunTag

    c.log_batch(run_id, tags=[RunTag(STAGE_TAG, f"{stage} running"), RunTag(PID_TAG, str(os.getpid())),
                              RunTag(OUT_TAG, str(out.resolve()))])


def _catch_up(c, run_id: str, key: str, out: Path, cfg, register: bool) -> None:
    """Record the stages of this pipeline run that an earlier stage could not record."""
    stages = [e["stage"] for e in unrecorded(out, key)]
    for stage in stages:
        record_stage(c, run_id, stage, out, cfg, register)
    if stages:
        forget_unrecorded(out, stages, key)
        say(f"texq: recorded stage(s) {', '.join(stages)} left unrecorded earlier into run {run_id}")


def result_run_id(flow_run_id: str, metrics: Path) -> str | None:
    """The MLflow run that holds a pipeline run's result: the one its Prefect flow run opened, else
    (every stage up to date or restored from DVC's run cache, so none was opened) the latest
    finished run that logged this very ``metrics.json``."""
    c = client()
    exp = c.get_experiment_by_name(experiment_name())
    if exp is None:
        return None
    for query in (f"tags.`prefect_flow_run_id` = '{flow_run_id}'" if flow_run_id else None,
                  f"tags.`{METRICS_TAG}` = '{file_digest(metrics)}' and attributes.status = 'FINISHED'"):
        if query:
            runs = c.search_runs([exp.experiment_id], query, max_results=1,
                                 order_by=["attributes.start_time DESC"])
            if runs:
                return runs[0].info.run_id
    return None


def run_tracked_stage(name: str, params_file: str | Path, out: str | Path, device: str = "auto",
                      progress: bool = True, parent_run_id: str = "", flow_run_id: str = "") -> dict:
    """``texq.pipeline.run_stage`` inside its pipeline run's MLflow run, the params file read
    once (the run's configuration, and whether it registers its model), under ``out``'s lock
    from before the run is opened to after it is recorded."""
    from texq.pipeline import read_config, run_stage

    config = read_config(params_file, device)
    # the stage's lock first: a process refused because another one works there touches no run;
    # held through the recording, so that no sync or second stage records the folder meanwhile
    with stage_lock(out, f"stage {name}"), tracked_stage(name, params_file, out, config.run, parent_run_id,
                                                         flow_run_id, config.registers_model):
        return run_stage(name, config, out, progress)


STAGE_LOCK = ".stage"  # under a pipeline's out folder: the folder whose lock a stage process holds


@contextmanager
def stage_lock(out: str | Path, what: str) -> Iterator[None]:
    """A pipeline folder's lock for a whole stage process or ``texq track sync``: held from before
    the MLflow run is opened until the stage's record is written (``<out>/.stage/.lock``; texq's own
    ``<out>/.lock``, which a step holds while it writes, is taken inside it). A second holder is
    refused at once (FolderBusy, naming the owner), before it touches any run."""
    from texq.util.lock import FolderBusy, folder_lock

    with ExitStack() as held:
        try:
            held.enter_context(folder_lock(Path(out) / STAGE_LOCK, what))
        except FolderBusy as exc:  # named by the pipeline folder, not by its lock's
            raise FolderBusy(str(exc).replace(str(Path(out) / STAGE_LOCK), str(out), 1)) from None
        yield
