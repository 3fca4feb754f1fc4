"""The grid's pure parts, in the fast loop: its children's names, its summary, the run form's
checks of its keys (as the Prefect server makes them) and how a run's end is said."""

from __future__ import annotations

import importlib.util
import statistics

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("prefect") is None,
                                reason="the pipeline extra is not installed")


def test_a_child_is_named_by_what_sets_it_apart_bits_first_and_short():
    from flows.grid import expand, label

    combos = expand({"mkd": [True, False], "w_bits,a_bits": [[3, 3], [4, 4]], "finetune.alpha6": [10, 0.5]})
    names = [label(c) for c in combos]
    assert names[0] == "W3A3,mkd=true,alpha6=10" and "W4A4,mkd=false,alpha6=0.5" in names
    assert len(set(names)) == len(combos) == 8  # one name per combination
    # a key whose last part another key shares stays whole; a one-letter ending takes its section
    assert label({"finetune.lr": 0.001, "generator.lr": 0.01}) == "finetune.lr=0.001,generator.lr=0.01"
    assert label({"calibration.laws.k": 5, "method": "gdfq", "w_bits": 3}) == "laws.k=5,method=gdfq,w_bits=3"
    assert label({"finetune.calib_crop_scale": [0.5, 1.0]}) == "calib_crop_scale=[0.5, 1.0]"


def test_short_keys_name_one_params_key_each():
    from flows.grid import _ORDER, short_key

    shorts = [short_key(k) for k in _ORDER]
    assert len(set(shorts)) == len(shorts)
    for key, short in zip(_ORDER, shorts):
        assert key == short or key.endswith("." + short)


def test_the_summary_counts_ends_and_scores_the_completed_runs():
    from flows.grid import summary

    rows = [{"state": "COMPLETED", "top1": 80.0}, {"state": "COMPLETED", "top1": 90.5},
            {"state": "COMPLETED", "top1": 85.0}, {"state": "CANCELLED", "top1": None},
            {"state": "FAILED", "top1": None}, {"state": "CRASHED", "top1": None}]
    assert summary(rows) == {"runs": 6, "runs_completed": 3, "runs_cancelled": 1, "runs_failed": 2,
                             "top1_best": 90.5, "top1_mean": pytest.approx(85.1666666),
                             "top1_std": pytest.approx(statistics.stdev([80.0, 90.5, 85.0]))}
    assert summary([{"state": "COMPLETED", "top1": 70.0}])["top1_std"] == 0.0
    assert "top1_mean" not in summary([{"state": "FAILED", "top1": None}])


@pytest.mark.parametrize("params, message", [
    ({"grid": {"finetune.alpah6": [1, 2]}}, "'finetune.alpah6' is not valid under any of the given schemas"),
    ({"grid": {"w_bits,a_bitz": [[3, 3]]}}, "'w_bits,a_bitz' is not valid under any of the given schemas"),
    ({"grid": {"seed": [0]}, "overrides": {"profil": "paper"}}, "'profil' is not valid under any"),
    ({"grid": {"seed": []}}, "[] should be non-empty"),
    ({"grid": {}}, "should be non-empty"),
])
def test_the_run_form_refuses_a_bad_grid_in_one_short_line_naming_it(params, message):
    """What the Prefect server answers when a run is submitted (its own validate, on the
    deployment's schema): a short line naming the key, not the pattern of every key."""
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    from flows.pipeline import grid_search

    with pytest.raises(ValidationError) as exc:
        validate(params, grid_search.parameters.model_dump(), raise_on_error=True, preprocess=True)
    assert message in str(exc.value) and len(str(exc.value)) < 160


def test_the_run_form_takes_a_grid_with_run_wide_overrides_and_starts_from_a_small_grid():
    from prefect.utilities.schema_tools.validation import validate

    from flows.grid import GRID_START, expand, run_wide
    from flows.pipeline import grid_search

    schema = grid_search.parameters.model_dump()
    assert schema["required"] == ["grid"] and schema["properties"]["grid"]["default"] == GRID_START
    validate({"grid": {"w_bits,a_bits": [[3, 3]], "mkd": [True]},
              "overrides": {"profile": "paper", "finetune.lr": 1e-6}}, schema, raise_on_error=True)
    assert len(expand(GRID_START)) == 4
    assert run_wide({"seed": [0, 1]}, {"profile": "paper"}) == {"profile": "paper"}
    from texq.util.errors import TexqError

    with pytest.raises(TexqError, match="w_bits: both a grid axis and in overrides"):
        run_wide({"w_bits,a_bits": [[3, 3]]}, {"w_bits": 4})


def test_the_flow_names_the_closest_keys_of_a_misspelled_grid_key(tiny_params):
    from flows.grid import expand
    from flows.pipeline import merged_params
    from texq.util.errors import TexqError

    with pytest.raises(TexqError, match="did you mean finetune.alpha6"):
        for combo in expand({"finetune.alpah6": [1]}):
            merged_params(tiny_params, combo)


def test_a_run_s_end_is_said_in_words_that_tell_stopped_from_failed():
    from flows.bookkeeping.run_end import end_words

    assert end_words("KILLED", "Prefect flow run Cancelled") == "stopped: Prefect flow run Cancelled"
    assert end_words("FAILED", "stage train raised RuntimeError") == "failed: stage train raised RuntimeError"
    assert end_words("FINISHED") == "finished"


def test_a_grid_s_view_shows_its_children_only_best_first(tmp_path, monkeypatch):
    import json

    from flows.bookkeeping.store import VIEW_COLUMNS, add_grid_view, client, experiment_id, run_url, runs_view_url

    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    c = client()
    exp = experiment_id(c)
    parent = c.create_run(exp).info.run_id
    key = add_grid_view(c, exp, parent, ("w_bits", "a_bits", "finetune.alpha6"))
    view = json.loads(c.get_experiment(exp).tags[f"mlflow.sharedViewState.{key}"])
    assert view["searchFilter"] == f"tags.mlflow.parentRunId = '{parent}'"
    # its chart view (the runs page's compare) opens on the grid's axes against top-1
    parallel, bar = view["compareRunCharts"]
    assert parallel["type"] == "PARALLEL" and parallel["selectedMetrics"] == ["top1"]
    assert parallel["selectedParams"] == ["a_bits", "finetune.alpha6", "w_bits"]
    assert bar["type"] == "BAR" and bar["metricKey"] == "top1"
    assert {card["metricSectionId"] for card in view["compareRunCharts"]} == {
        s["uuid"] for s in view["compareRunSections"]}
    assert view["orderByKey"] == "metrics.`top1`" and view["orderByAsc"] is False
    assert view["selectedColumns"] == list(VIEW_COLUMNS) and len(VIEW_COLUMNS) <= 6
    child = c.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id
    c.create_run(exp)  # another grid's or a lone run: not in this view
    assert [r.info.run_id for r in c.search_runs([exp], view["searchFilter"])] == [child]
    assert run_url(child) is None  # a local store: no server to link
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert runs_view_url(exp, key) == (f"http://127.0.0.1:5000/#/experiments/{exp}/runs?viewStateShareKey={key}"
                                       "&workflowType=machine_learning")
    assert runs_view_url(exp, key, charts=True) == runs_view_url(exp, key) + "&compareRunsMode=CHART"


def test_grid_axes_and_overrides_are_checked_before_any_run(tiny_params):
    from flows.grid import expand
    from flows.pipeline import merged_params
    from texq.util.errors import TexqError

    combos = expand({"w_bits,a_bits": [[3, 3], [4, 4]], "seed": [0, 1]})
    assert combos == [{"w_bits": 3, "a_bits": 3, "seed": 0}, {"w_bits": 3, "a_bits": 3, "seed": 1},
                      {"w_bits": 4, "a_bits": 4, "seed": 0}, {"w_bits": 4, "a_bits": 4, "seed": 1}]
    with pytest.raises(TexqError, match="each value must list 2 items"):
        expand({"w_bits,a_bits": [[3, 3], 4]})
    with pytest.raises(TexqError, match="non-empty lists"):
        expand({"seed": []})
    params = merged_params(tiny_params, {"finetune.alpha6": 7.0, "w_bits": 3})  # --set's keys
    assert params["finetune"]["alpha6"] == 7.0 and params["w_bits"] == 3
    with pytest.raises(TexqError, match="'finetune.alpha7'"):
        merged_params(tiny_params, {"finetune.alpha7": 1})
    with pytest.raises(TexqError, match="alpha6='x': expected a number"):
        merged_params(tiny_params, {"finetune.alpha6": "x"})
