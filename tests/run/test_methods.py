"""The method table (texq.run.methods): what each method does is read from it alone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from texq.run.config import RunConfig
from texq.run.methods import METHOD_SPECS, METHODS, SWITCHES, effective_settings

ROOT = Path(__file__).resolve().parents[2]
# a comparison with a method's name, or a method's name as a literal
NAME = r"[\"'](texq|gdfq|zeroq|real)[\"']"
DISPATCH = re.compile(rf"\.method\s*(==|!=|in\b)|{NAME}\s*(==|!=)|(==|!=)\s*{NAME}|\bin\s*[(\[{{]\s*{NAME}")


def test_no_method_name_is_dispatched_on_outside_the_table():
    hits = []
    for path in [*(ROOT / "texq").rglob("*.py"), *(ROOT / "flows").rglob("*.py")]:
        if path == ROOT / "texq" / "run" / "methods.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if DISPATCH.search(line.split("#")[0]):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "method-name dispatch outside texq/run/methods.py:\n" + "\n".join(hits)
    assert all(DISPATCH.search(t) for t in ('if cfg.method == "zeroq":', "cfg.method in ('a',)",
                                            'if m in ("texq", "zeroq"):', "'real' != m"))
    assert not DISPATCH.search('logging.getLogger("texq")')


def test_what_a_method_fixes_is_in_its_config_and_recorded_as_applied():
    gdfq = RunConfig(method="gdfq", checkpoint="x")  # the profile's 0.4 / 0.02 / 1.8 replaced
    assert (gdfq.generator.alpha3, gdfq.generator.alpha4, gdfq.generator.alpha5, gdfq.mkd) == (0.1, 0.0, 0.0, False)
    flat = effective_settings(gdfq)
    assert flat["generator.alpha3"] == 0.1 and flat["laws"] is None and flat["mkd"] is False
    assert not any(k.startswith(("calibration.", "distill.")) for k in flat)
    zeroq = effective_settings(RunConfig(method="zeroq", checkpoint="x"))
    assert {k.split(".")[0] for k in zeroq if "." in k} == {"quant", "distill"}
    assert all(zeroq[s] is None for s in SWITCHES)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_s_entry_is_coherent(method):
    spec = METHOD_SPECS[method]
    assert set(spec.switches) <= set(SWITCHES) and all(k.split(".")[0] in (*SWITCHES, *spec.sections)
                                                      for k in spec.fixed)
    assert (spec.step1 is None) == (spec.step1_images == "")
    assert not (spec.uses_calibration_set and spec.step1 is None)  # the set is step 1's output
    assert spec.fine_tunes or spec.step1 is not None  # ranges need images from somewhere
