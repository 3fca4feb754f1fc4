"""``texq compare``: finished MLflow runs as the table users compare settings with.

One row per method x bit widths x Table 3 switches (as applied: "n/a" where a method has no such
module) x profile: top-1 mean +- std over the runs
(seeds) and their number. Failed and unfinished runs are left out; grid parent runs too; a trained
model scored more than once on the same data (``evaluate`` rerun alone) counts once, its latest
score.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

GROUP = ["method", "w_bits", "a_bits", "laws", "layered_bns", "mkd", "profile"]


def load_runs(experiment: str = "texq", extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """Finished pipeline runs of ``experiment`` (one row each: params, top1, seed; ``extra``
    params too, e.g. ``alpha6``)."""
    from flows.bookkeeping.pipeline_run import TRAINED_TAG
    from flows.bookkeeping.store import client, sqlite_file, tracking_uri

    db = sqlite_file(tracking_uri())
    if db is not None and not db.is_file():
        raise LookupError(f"no MLflow store at {db}: nothing is recorded there "
                          "(dvc repro, a flow or texq track sync records runs; MLFLOW_TRACKING_URI "
                          "names another store)")
    c = client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment named {experiment!r} at this tracking URI")
    rows = []
    for run in c.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                             max_results=50_000, order_by=["attributes.start_time ASC"]):
        if "top1" not in run.data.metrics:  # a grid's parent run holds no result
            continue
        p = run.data.params
        rows.append({**{k: p.get(k) for k in (*GROUP, *extra)}, "seed": p.get("seed"),
                     "top1": run.data.metrics["top1"], "run_id": run.info.run_id,
                     "trained": run.data.tags.get(TRAINED_TAG, run.info.run_id), "data": p.get("data")})
    runs = pd.DataFrame(rows, columns=[*GROUP, *extra, "seed", "top1", "run_id", "trained", "data"])
    return runs.drop_duplicates(["trained", "data"], keep="last").reset_index(drop=True)


def compare_table(runs: pd.DataFrame, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """method x bits x switches (x ``extra``) -> top-1 mean, sample std (NaN for one run), n."""
    keys = [*GROUP, *extra]
    if runs.empty:
        return pd.DataFrame(columns=[*keys, "top1_mean", "top1_std", "n", "seeds"])
    g = runs.groupby(keys, dropna=False)
    out = g["top1"].agg(top1_mean="mean", top1_std="std", n="count").reset_index()
    out["seeds"] = g["seed"].apply(lambda s: " ".join(sorted(s.astype(str)))).values
    return out.sort_values(keys).reset_index(drop=True)


def to_markdown(table: pd.DataFrame, extra: tuple[str, ...] = ()) -> str:
    cols = ["method", "bits", "LAWS", "L-BNS", "MKD", "profile", *extra, "top-1 mean +- std", "n", "seeds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in table.to_dict(orient="records"):
        std = "" if pd.isna(r["top1_std"]) else f" +- {r['top1_std']:.2f}"
        switches = ["n/a" if r[k] in (None, "None") else r[k] for k in ("laws", "layered_bns", "mkd")]
        cells = [r["method"], f"W{r['w_bits']}A{r['a_bits']}", *switches,
                 r["profile"], *(r[k] for k in extra), f"{r['top1_mean']:.2f}{std}", r["n"], r["seeds"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def compare(experiment: str = "texq", out: str | Path | None = None,
            extra: tuple[str, ...] = ()) -> tuple[pd.DataFrame, str]:
    """The comparison table and its Markdown; with ``out``, also ``compare.csv`` and ``compare.md``."""
    from texq.util.io import atomic_path

    table = compare_table(load_runs(experiment, extra), extra)
    md = to_markdown(table, extra)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "compare.csv") as tmp:
            table.to_csv(tmp, index=False)
        with atomic_path(out / "compare.md") as tmp:
            Path(tmp).write_text(md + "\n")
    return table, md
