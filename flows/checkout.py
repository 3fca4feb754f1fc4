"""Which checkout texq's pipeline works in: the one its code comes from.

A texq environment is installed from one checkout (``scripts/setup.sh``: editable) and its flows,
stages and ``texq track`` write beside that code: ``mlflow.db``, ``runs/`` (the flow runs'
workspaces), ``out/``. A command started inside *another* checkout of the project with that
environment (``TEXQ_VENV`` pointing at the other checkout's ``.venv``) would run the other
checkout's code and write into it without a word, so it is refused in one line. The rule: **the
project root is the checkout the running code comes from** (``flows.ROOT``); where a command runs
(its working folder, or for a Prefect worker the folder it was started in, as its shell recorded
it in ``PWD``) must be that checkout or lie outside every texq checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

from flows import ROOT
from texq.util.errors import TexqError


def texq_checkout(path: str | Path) -> Path | None:
    """The texq checkout holding ``path`` (a folder with texq's ``pyproject.toml`` and ``flows/``), else None."""
    here = Path(path).resolve()
    for folder in (here, *here.parents):
        project = folder / "pyproject.toml"
        try:
            if (folder / "flows").is_dir() and 'name = "texq"' in project.read_text():
                return folder
        except OSError:
            continue
    return None


def require_own_checkout(where: str | Path | None = None, what: str = "this command") -> None:
    """TexqError unless ``where`` (default: the working folder) is ROOT's checkout or in none."""
    where = Path(where if where is not None else os.getcwd())
    other = texq_checkout(where)
    if other is not None and other != ROOT.resolve():
        raise TexqError(
            f"{what} runs in the texq checkout {other}, but its code (and where it writes: mlflow.db, "
            f"runs/, out/) is the checkout {ROOT}, whose environment started it: use {other}'s own "
            f"environment (cd {other} && scripts/setup.sh, with TEXQ_VENV unset or naming an "
            f"environment of its own), or run it from {ROOT}")
