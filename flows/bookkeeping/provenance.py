"""Where and from which code a run ran, as its MLflow tags: the project's git commit, the host and
its process space (so that a stage's process id is judged only where it means something), the GPUs
the worker was given and the checkout."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from flows import ROOT

HOST_ID_TAG = "texq.host_id"  # the process space the stage ran in (host_id): where its pid means something


def git_commit() -> str:
    """The project's commit: that of ``$DVC_ROOT`` (the repo a queued DVC experiment came from),
    else of the checkout holding this code (a Prefect run's workspace need not be in one)."""
    for where in (os.environ.get("DVC_ROOT"), ROOT):
        if not where:
            continue
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                                 text=True, timeout=10)
        except OSError:
            continue
        if out.returncode == 0:
            return out.stdout.strip()
    return "unknown"


def host_id() -> str:
    """This process space: the machine (its machine-id), its boot and its PID namespace, hashed.
    A stage's process id means something only where this is the same: two machines or containers
    with one host name differ here, and texq track reconcile judges only the pids of its own."""
    import socket

    parts = [socket.gethostname()]
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id", "/proc/sys/kernel/random/boot_id"):
        try:
            parts.append(Path(path).read_text().strip())
        except OSError:
            parts.append("")
    try:
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        parts.append("")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def where_tags() -> dict[str, str]:
    """Where a stage runs, as run tags: the host, the GPUs it sees (``CUDA_VISIBLE_DEVICES`` as the
    worker set it, and the devices' names, or ``cpu``) and the checkout its code comes from."""
    import socket

    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
             if torch.cuda.is_available() else [])
    return {"texq.host": socket.gethostname(), HOST_ID_TAG: host_id(),
            "texq.cuda_visible_devices": "(unset)" if visible is None else visible,
            "texq.gpu": ", ".join(names) if names else "cpu",
            "texq.checkout": str(ROOT)}
