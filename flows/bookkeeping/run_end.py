"""How texq ends an MLflow run, truthfully: its status (FINISHED, KILLED for a stop from outside,
FAILED for an error or a dead flow run) and, in ``texq.end``, the same in words with why, since
MLflow's UI draws KILLED and FAILED with one red icon; the stop signals a stage process turns
into exceptions; the end of a Prefect flow run's leftover runs."""

from __future__ import annotations

from flows.bookkeeping.store import client, experiment_name

FLOW_END_TAG = "texq.flow_run_end"  # the Prefect state that ended a flow run's MLflow runs
# How a run ended, in words (a column of texq's runs view): MLflow's UI draws KILLED and FAILED
# with one red icon, so "stopped" (KILLED: cancelled, a signal) and "failed" (an error, a crash)
# are said apart, with why
END_TAG = "texq.end"
END_WORDS = {"FINISHED": "finished", "KILLED": "stopped", "FAILED": "failed"}


def end_words(status: str, why: str = "") -> str:
    """``status`` (FINISHED, KILLED, FAILED) as :data:`END_TAG` says it: ``stopped: Prefect flow
    run Cancelled``."""
    return END_WORDS.get(status, status.lower()) + (f": {why}" if why else "")


def end_run(c, run_id: str, status: str, why: str = "") -> None:
    """End an MLflow run with ``status``, its :data:`END_TAG` saying how and why (tagged first:
    a run never shows an end without its words)."""
    c.set_tag(run_id, END_TAG, end_words(status, why))
    c.set_terminated(run_id, status)


class Terminated(BaseException):
    """The stage process was asked to stop (SIGTERM: Prefect cancelling its flow run, a worker
    or host shutting down); its run ends KILLED, not FAILED."""


class Orphaned(Terminated):
    """The stage's flow run is over (its process died: Prefect calls it Crashed); the stage stops
    and its run ends FAILED, as the flow run's own runs do."""


def end_state(exc: BaseException) -> str:
    """The MLflow status a run ends in when its stage raised ``exc``: KILLED when the stage was
    stopped from outside (SIGTERM, Ctrl-C), FAILED for an error or a flow run that died."""
    if isinstance(exc, Orphaned):
        return "FAILED"
    return "KILLED" if isinstance(exc, (Terminated, KeyboardInterrupt)) else "FAILED"


def end_flow_run_runs(flow_run_id: str, status: str, state: str = "") -> list[str]:
    """End every MLflow run still RUNNING that a Prefect flow run opened (its pipeline run, or a
    grid's parent run) with ``status`` (KILLED for a cancelled flow run, FAILED for a crashed one):
    the state Prefect gave it, ``state``, is tagged, so that a stage process that outlived its
    flow run opens no new run (``flows.bookkeeping.pipeline_run.find_or_create_run``). Returns the run ids ended."""
    c = client()
    exp = c.get_experiment_by_name(experiment_name())
    if exp is None or not flow_run_id:
        return []
    runs = c.search_runs([exp.experiment_id], f"tags.`prefect_flow_run_id` = '{flow_run_id}' "
                         "and attributes.status = 'RUNNING'", max_results=1000)
    for run in runs:
        c.set_tag(run.info.run_id, FLOW_END_TAG, state or status)
        end_run(c, run.info.run_id, status, f"Prefect flow run {state}" if state else "")
    return [r.info.run_id for r in runs]
