"""``python -m flows.stage NAME``: one pipeline stage (what dvc.yaml runs), tracked in MLflow.

Same arguments as ``texq stage``; the stage runs inside its pipeline run's MLflow run (see
``flows.tracking``). Run by a Prefect flow (``flows.workspace``), it also reads the flow run's
context from its environment: ``TEXQ_PARENT_RUN_ID`` (the grid's MLflow run), ``TEXQ_FLOW_RUN_ID``
and ``TEXQ_DEVICE`` (the default of ``--device``). The last stdout line is the stage's JSON result; errors are one line on
stderr and a non-zero exit, and mark the MLflow run FAILED; SIGTERM (Prefect cancelling the flow run)
marks it KILLED.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from texq.util.errors import TexqError


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
    from flows.tracking import Terminated, run_tracked_stage

    def stop(signum, frame):  # Prefect cancels a flow run with SIGTERM to its process group
        raise Terminated(f"stopped by signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, stop)

    try:
        result = run_tracked_stage(args.name, args.params, args.out, args.device, not args.no_progress,
                                   parent_run_id=os.environ.get("TEXQ_PARENT_RUN_ID", ""),
                                   flow_run_id=os.environ.get("TEXQ_FLOW_RUN_ID", ""))
    except TexqError as exc:
        print(f"texq: error: {exc}", file=sys.stderr)
        return 2
    except Terminated as exc:  # the MLflow run is KILLED; 128 + signal, as the shell reports it
        print(f"texq: {args.name} {exc}", file=sys.stderr)
        return 128 + signal.SIGTERM
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
