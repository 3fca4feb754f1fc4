"""Zombie flow runs on a self-hosted Prefect server: ``python -m flows.zombies`` (scripts/lab.sh
start runs it) creates, once, the automation of Prefect's guide "How to detect and respond to
zombie flows": a flow run that sent a heartbeat (``prefect.flow-run.heartbeat``, every
``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds: its process is alive) and then neither another one
nor a final state within ``within`` seconds lost its process or machine, and is marked Crashed
instead of Running forever. The flows' crash hooks cannot run in a process that is gone: their
MLflow runs are ended by ``texq track reconcile`` (run by each pipeline flow run when it starts).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta

NAME = "texq: crash zombie flow runs"
# Prefect's default PREFECT_FLOWS_HEARTBEAT_FREQUENCY: the window is sized for it, so that a worker
# left at the default never has a healthy run marked Crashed (a 90 s window, Prefect's guide's, did
# exactly that to a grid waiting on its children: one heartbeat every 180 s)
HEARTBEAT_SECONDS = 180
MIN_HEARTBEAT_SECONDS = 30  # Prefect's minimum frequency


def automation(within: int):
    """The automation (not yet created): missing heartbeats for ``within`` s -> Crashed."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=NAME,
        description=f"A flow run silent for {within} s after a heartbeat (its process or machine is "
                    "gone) is marked Crashed (texq's flows.zombies)",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=within)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {within} s: its process or machine is gone")])


def ensure(within: int = 3 * HEARTBEAT_SECONDS) -> dict:
    """Create the automation on the server at ``$PREFECT_API_URL`` unless one of that name exists
    (its window updated to ``within``); idempotent."""
    from prefect.automations import Automation

    try:
        found = Automation.read(name=NAME)
    except ValueError:  # not there yet
        found = None
    wanted = automation(within)
    if found is None:
        made = wanted.create()
        return {"automation": NAME, "id": str(made.id), "created": True, "within_s": within}
    if found.trigger.within != wanted.trigger.within:
        found.trigger = wanted.trigger
        found.actions = wanted.actions
        found.update()
    return {"automation": NAME, "id": str(found.id), "created": False, "within_s": within}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.zombies", description=__doc__.split("\n")[0])
    p.add_argument("--within", type=int, default=3 * HEARTBEAT_SECONDS,
                   help="seconds of silence after a heartbeat before a flow run is marked Crashed "
                        f"(default {3 * HEARTBEAT_SECONDS}: three of Prefect's default heartbeats; "
                        "90 when every worker sets PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30)")
    args = p.parse_args(argv)
    if args.within < 2 * MIN_HEARTBEAT_SECONDS:
        p.error(f"--within {args.within}: expected at least {2 * MIN_HEARTBEAT_SECONDS} s (two heartbeats at "
                "Prefect's fastest; a window under two of the workers' heartbeats marks healthy runs Crashed)")
    try:
        print(json.dumps(ensure(args.within)))
    except Exception as exc:
        from flows.credentials import refusal

        if line := refusal(exc):  # the lab's Prefect server: a wrong auth string, an unverified certificate
            print(f"{p.prog}: error: {line}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
