"""Commands the pipeline extra adds to the ``texq`` command line (entry points of the group
``texq.commands`` in pyproject.toml): ``texq compare`` and ``texq track``. Each adds its parser; its work is imported
only when it runs."""

from __future__ import annotations

import argparse


def add_compare(sub) -> None:
    c = sub.add_parser("compare", help="MLflow runs as a table: method x bits x switches -> top-1")
    c.add_argument("--experiment", default="texq", help="MLflow experiment (MLFLOW_TRACKING_URI)")
    c.add_argument("--out", help="also write compare.csv and compare.md into this folder")
    c.add_argument("--by", nargs="+", metavar="PARAM", help="more settings to group by, e.g. finetune.alpha6")
    c.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> dict:
    from texq.util.errors import TexqError

    try:
        from flows.compare import compare
    except ImportError as exc:
        raise TexqError(f"texq compare needs the pipeline extra (pip install -e '.[pipeline]'): {exc}")
    from flows.bookkeeping.store import unreadable_store

    try:
        table, md = compare(args.experiment, args.out, tuple(args.by or ()))
    except LookupError as exc:
        raise TexqError(str(exc)) from exc
    except Exception as exc:
        raise unreadable_store(exc) or exc
    print(md)
    rows = table.astype(object).where(table.notna(), None).to_dict(orient="records")
    return {"command": "compare", "experiment": args.experiment, "rows": len(table), "table": rows}


def add_track(sub) -> None:
    t = sub.add_parser("track", help="bring MLflow up to date from a pipeline's files; end runs whose work stopped")
    tsub = t.add_subparsers(dest="track_command", required=True)
    s = tsub.add_parser("sync", help="record what OUT's stages left unrecorded (a store that was down) and "
                        "end its MLflow run truthfully; idempotent")
    s.add_argument("out", nargs="?", default="out/pipeline", help="the pipeline's out folder (default out/pipeline)")
    s.add_argument("--params", default="params.yaml", help="the params file its stages ran with")
    s.set_defaults(func=cmd_track)
    r = tsub.add_parser("reconcile", help="end RUNNING MLflow runs whose Prefect flow run is over or whose "
                        "stage process on this host is gone (recording their finished work first)")
    r.set_defaults(func=cmd_track)


def cmd_track(args: argparse.Namespace) -> dict:
    from texq.util.errors import TexqError

    try:
        from flows.bookkeeping import sync
    except ImportError as exc:
        raise TexqError(f"texq track needs the pipeline extra (pip install -e '.[pipeline]'): {exc}")
    import logging

    from flows.bookkeeping.record_stage import tracking_error
    from flows.bookkeeping.store import tracking_uri
    from flows.credentials import refusal

    logging.getLogger("httpx").setLevel(logging.WARNING)  # Prefect's client logs each request at INFO
    try:
        if args.track_command == "sync":
            return sync.sync(args.out, args.params)
        return sync.reconcile()
    except TexqError:
        raise
    except Exception as exc:
        if line := refusal(exc):  # a lab's MLflow or Prefect server: 401/403, an unverified certificate
            raise TexqError(line) from exc
        if tracking_error(exc) and not isinstance(exc, OSError):
            from flows.bookkeeping.record_stage import failure_line

            raise TexqError(f"the MLflow store at {tracking_uri()} did not answer ({failure_line(exc)}): "
                            "nothing changed; run it again once the store is back") from exc
        raise
