"""Progress as log lines when no terminal bar is wanted (pipeline stages, Prefect UI)."""

from __future__ import annotations

import logging

from texq.util.progress import LoggedProgress, progress_bar


def test_logged_progress_logs_each_tenth_once_with_the_postfix(caplog):
    bar = progress_bar(25, "step 1", enabled=False)
    assert isinstance(bar, LoggedProgress)
    with caplog.at_level(logging.INFO, logger="texq"):
        for i in range(25):
            bar.set_postfix({"loss": f"{i:.1f}"})
            bar.update()
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    # every = ceil(25 / 10) = 3 -> at 3, 6, ..., 24 and the last step 25
    assert [int(line.split(":")[1].split("/")[0]) for line in lines] == [3, 6, 9, 12, 15, 18, 21, 24, 25]
    assert lines[-1] == "step 1: 25/25 (100%) loss=24.0"


def test_logged_progress_resumes_from_initial_and_handles_tiny_totals(caplog):
    with caplog.at_level(logging.INFO, logger="texq"):
        bar = LoggedProgress(100, "train", initial=50)
        bar.update(5)   # 55: no new tenth
        bar.update(5)   # 60: one line
        tiny = LoggedProgress(3, "tiny")
        for _ in range(3):
            tiny.update()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["train: 60/100 (60%) ", "tiny: 1/3 (33%) ", "tiny: 2/3 (67%) ", "tiny: 3/3 (100%) "]
