"""Prefect deployment steps of texq's deployments (``prefect.yaml``'s ``pull`` section).

A worker runs a flow run's pull steps before it loads the flow. ``enter_checkout`` makes the flow
run start in the worker host's own checkout of the project, the one whose ``flows`` package the
worker's Python imports (its environment from ``scripts/setup.sh``, or ``PYTHONPATH``): each GPU
machine of a lab runs its own copy, at whatever path, instead of the folder ``prefect deploy`` was
run from (which exists only on the machine that deployed).
"""

from __future__ import annotations

import os

from flows import ROOT


def enter_checkout() -> dict[str, str]:
    """Change into this host's checkout (the project root of the imported ``flows`` package);
    refused when the worker was started inside another checkout of the project (its ``PWD``),
    whose environment is not the one that runs (flows.checkout)."""
    from flows.checkout import require_own_checkout

    if os.environ.get("PWD"):  # the folder the worker was started in, as its shell recorded it
        require_own_checkout(os.environ["PWD"], "this worker")
    os.chdir(ROOT)
    return {"directory": str(ROOT)}
