"""``python -m flows.stage NAME``: one pipeline stage (what dvc.yaml runs), tracked in MLflow.

Same arguments as ``texq stage``; the stage runs inside its pipeline run's MLflow run (see
``flows.bookkeeping.pipeline_run``). Run by a Prefect flow (``flows.workspace``), it also reads the flow run's
context from its environment: ``TEXQ_PARENT_RUN_ID`` (the grid's MLflow run), ``TEXQ_FLOW_RUN_ID``,
``TEXQ_DEVICE`` (the default of ``--device``) and ``TEXQ_FLOW_PID``, the flow run's process: when
that process is gone (its worker or machine lost, Prefect: Crashed), the stage stops too and its
MLflow run ends FAILED, so that no orphan trains on unwatched or leaves a run RUNNING. The last stdout line is the stage's JSON result; errors are one line on
stderr and a non-zero exit, and mark the MLflow run FAILED; SIGTERM (Prefect cancelling the flow run)
marks it KILLED. The store is a bookkeeper, never a precondition (``flows.bookkeeping.pipeline_run.tracked_stage``):
a store that does not answer leaves the stage running unrecorded, and a stage whose work is done
succeeds whatever the store does; what it could not record is recorded by ``texq track sync``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable

from texq.util.errors import user_message

FLOW_PID_ENV = "TEXQ_FLOW_PID"  # the flow-run process that started the stage (flows.workspace)


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


def watch(pid: int, on_gone: Callable[[], None], period: float = 2.0) -> threading.Thread:
    """A daemon thread that calls ``on_gone`` once, when process ``pid`` is gone."""
    def loop() -> None:
        while alive(pid):
            time.sleep(period)
        on_gone()

    thread = threading.Thread(target=loop, name=f"watch-{pid}", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    from texq.pipeline import STAGES
    from texq.util.device import DEVICES

    p = argparse.ArgumentParser(prog="python -m flows.stage", description=__doc__.split("\n")[0])
    p.add_argument("name", choices=STAGES)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--out", default="out/pipeline")
    p.add_argument("--device", choices=DEVICES,
                   default=os.environ.get("TEXQ_DEVICE") or "auto")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from flows.bookkeeping.pipeline_run import run_tracked_stage, say
    from flows.bookkeeping.run_end import Orphaned, Terminated

    flow_pid = int(os.environ.get(FLOW_PID_ENV) or 0)
    orphaned, stopping = threading.Event(), threading.Event()

    def stop(signum, frame):  # Prefect cancels a flow run with SIGTERM to its process group
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the run's end is recorded uninterrupted
        stopping.set()
        if orphaned.is_set():
            raise Orphaned(f"stopped: its flow run's process {flow_pid} is gone")
        raise Terminated(f"stopped by signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, stop)
    if flow_pid:
        if not alive(flow_pid):
            say(f"texq: {args.name} not started: its flow run's process {flow_pid} is gone")
            return 128 + signal.SIGTERM

        def gone() -> None:
            if not stopping.is_set():  # a stop already under way (SIGTERM) is not interrupted
                orphaned.set()
                os.kill(os.getpid(), signal.SIGTERM)

        watch(flow_pid, gone)

    try:
        from flows.checkout import require_own_checkout

        require_own_checkout(what=f"stage {args.name}")  # its working folder: the code's checkout, or none
        result = run_tracked_stage(args.name, args.params, args.out, args.device, not args.no_progress,
                                   parent_run_id=os.environ.get("TEXQ_PARENT_RUN_ID", ""),
                                   flow_run_id=os.environ.get("TEXQ_FLOW_RUN_ID", ""))
    except Exception as exc:  # bad input, the user's disk: one line (flows.workspace reads it)
        message = user_message(exc)
        if message is None:
            raise  # a bug: its traceback
        say(f"texq: error: {message}")
        return 2
    except Terminated as exc:  # the MLflow run is KILLED (FAILED if orphaned); 128 + signal, as the shell reports it
        say(f"texq: {args.name} {exc}")
        return 128 + signal.SIGTERM
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
