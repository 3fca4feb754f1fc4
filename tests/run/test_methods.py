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


def test_a_value_the_method_would_replace_is_refused_in_one_line_and_its_default_is_not(tmp_path, capsys):
    from texq.cli import main
    from texq.util.errors import ConfigError

    k = dict(model="resnet8_cifar10", pretrained=True)
    with pytest.raises(ConfigError, match=r"^generator\.alpha3=0\.5 with method 'gdfq': the method "
                                          r"always uses generator\.alpha3=0\.1; .*default, 0\.4"):
        RunConfig.for_profile("tiny", method="gdfq", overrides={"generator.alpha3": 0.5}, **k)
    with pytest.raises(ConfigError, match=r"generator\.alpha4=0\.3 with method 'gdfq'"):
        RunConfig.for_profile("tiny", method="gdfq", overrides={"generator": {"alpha4": 0.3}}, **k)
    # what params.yaml lists (every key at its default) and the method's own values are taken
    given = {"generator.alpha3": 0.4, "generator.alpha4": 0.02, "generator.alpha5": 1.8, "mkd": True}
    gdfq = RunConfig.for_profile("tiny", method="gdfq", overrides=given, **k)
    assert (gdfq.generator.alpha3, gdfq.generator.alpha4, gdfq.mkd) == (0.1, 0.0, False)
    assert RunConfig.for_profile("tiny", method="gdfq", overrides={"generator.alpha3": 0.1}, **k).generator.alpha3 == 0.1
    # texq fixes nothing: any value is its own
    assert RunConfig.for_profile("tiny", overrides={"generator.alpha3": 0.5}, **k).generator.alpha3 == 0.5
    # the command line: exit 2, one line, nothing written
    out = tmp_path / "run"
    rc = main(["run", "--model", "resnet8_cifar10", "--pretrained", "--profile", "tiny", "--method", "gdfq",
               "--set", "generator.alpha3=0.5", "--data", "cifar10", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "generator.alpha3=0.5 with method 'gdfq'" in err[0]
    assert not out.exists()
