"""Commands the pipeline extra adds to the ``texq`` command line (entry points of the group
``texq.commands`` in pyproject.toml): ``texq compare``. Each adds its parser; its work is imported
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
    from flows.store import unreadable_store

    try:
        table, md = compare(args.experiment, args.out, tuple(args.by or ()))
    except LookupError as exc:
        raise TexqError(str(exc)) from exc
    except Exception as exc:
        raise unreadable_store(exc) or exc
    print(md)
    rows = table.astype(object).where(table.notna(), None).to_dict(orient="records")
    return {"command": "compare", "experiment": args.experiment, "rows": len(table), "table": rows}
