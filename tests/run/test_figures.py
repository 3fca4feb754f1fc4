"""The pictures of a pipeline run (texq/run/figures.py) and dvc.yaml's code deps."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                reason="the pipeline extra is not installed")


def test_loss_curves_plot_each_history_column_per_epoch():
    from texq.run.figures import loss_curves

    rows = [{"epoch": 0, "phase": "warmup", "quantized/lr": 1e-5, "generator/ce_loss": 3.0, "generator/bns_loss": 2.0},
            {"epoch": 1, "phase": "joint", "quantized/lr": 5e-6, "generator/ce_loss": 2.0, "generator/bns_loss": 1.5, "quantized/kd_loss": 0.9,
             "quantized/mixed_per_step": 15},
            {"epoch": 2, "phase": "joint", "quantized/lr": 0.0, "generator/ce_loss": 1.0, "generator/bns_loss": 1.0, "quantized/kd_loss": 0.7,
             "quantized/mixed_per_step": 14}]
    fig = loss_curves(rows)
    axes = fig.axes
    assert [ax.get_title().split(" ")[0] for ax in axes] == ["generator", "quantized", "mixup:", "learning"]
    assert [ln.get_label() for ln in axes[1].lines] == ["quantized/kd_loss"]  # the count is not a loss
    lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ax in axes for ln in ax.lines}
    assert lines["generator/ce_loss"] == ([1, 2, 3], [3.0, 2.0, 1.0])
    assert lines["quantized/kd_loss"] == ([2, 3], [0.9, 0.7])  # no q_* in the warm-up epoch
    assert lines["quantized/mixed_per_step"] == ([2, 3], [15, 14])
    assert lines["quantized/lr"] == ([1, 2, 3], [1e-5, 5e-6, 0.0]) and "phase" not in lines


def test_every_code_dep_in_dvc_yaml_exists():
    from flows import ROOT

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == {"teacher", "synthesize", "train", "evaluate"}
    for name, stage in stages.items():
        for dep in stage["deps"]:
            assert dep.startswith("out/pipeline/") or (ROOT / dep).exists(), (name, dep)


def _png_ok(path: Path, min_size: tuple[int, int]) -> None:
    """The file is a PNG of at least ``min_size`` pixels whose pixels are not all one colour."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= min_size[0] and im.size[1] >= min_size[1], im.size
        px = np.asarray(im.convert("RGB"), dtype=float)
    assert px.std() > 5.0  # not blank


def test_a_mosaic_puts_each_image_in_its_cell_below_its_title_band():
    import numpy as np

    from texq.run.figures import mosaic

    pics = np.stack([np.full((4, 3, 3), v, dtype=np.float32) for v in (0.1, 0.2, 0.3)])
    pics[1, 0, 0] = (0.0, 0.5, 1.0)  # a pixel that must land at its own place
    m = mosaic(pics, cols=2, band=2, pad=1)
    assert m.shape == (2 * (2 + 4 + 1), 2 * (3 + 1), 3)
    # cell (row, col) starts at y = row * 7 + 2 (after the band), x = col * 4
    for i, (y, x) in enumerate([(2, 0), (2, 4), (9, 0)]):
        assert np.array_equal(m[y:y + 4, x:x + 3], pics[i])
    assert (m[0:2] == 1).all() and (m[:, 3] == 1).all() and (m[9:13, 4:7] == 1).all()  # bands, gaps, empty cell
    assert np.array_equal(m[2, 4], [0.0, 0.5, 1.0])


def test_each_picture_is_a_non_blank_png(tmp_path):
    import torch

    from texq.method.generator import Generator
    from texq.method.texture import TextureConfig, texture_energy
    from texq.run.figures import (
        generator_samples,
        image_grid,
        per_class_bars,
        save,
        texture_histograms,
    )

    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    torch.manual_seed(0)
    images = torch.randn(10, 3, 32, 32)
    grid = image_grid(images, [str(i) for i in range(10)], mean, std, "calibration images")
    assert [t.get_text() for t in grid.axes[0].texts] == [str(i) for i in range(10)]
    _png_ok(save(grid, tmp_path / "calib.png"), (600, 100))
    g = Generator(num_classes=10)
    x, titles = generator_samples(g, 10, per_class=2)
    assert x.shape == (20, 3, 32, 32) and titles[:4] == ["0", "0", "1", "1"]
    _png_ok(save(image_grid(x, titles, mean, std, "samples"), tmp_path / "gen.png"), (600, 150))
    t = {"noise": texture_energy(torch.randn(30, 3, 32, 32), TextureConfig(), mean, std),
         "smooth": texture_energy(torch.zeros(30, 3, 32, 32) + torch.linspace(0, 1, 32), TextureConfig(), mean, std)}
    hist = texture_histograms(t)
    bars = hist.axes[0].containers
    assert len(bars) == 2 and all(abs(sum(b.get_height() for b in c) - 1.0) < 1e-6 for c in bars)
    _png_ok(save(hist, tmp_path / "texture.png"), (400, 200))
    fig = per_class_bars([90.0] * 10, [80.0, None] + [70.0] * 8)
    heights = [b.get_height() for b in fig.axes[0].containers[1]]
    assert heights[:3] == [80.0, 0, 70.0]
    _png_ok(save(fig, tmp_path / "per_class.png"), (400, 200))


def test_run_pictures_name_the_classes(tiny_setup, tmp_path, monkeypatch):
    """A run folder's pictures; class names (where the evaluation set has them) title the images."""
    import torch

    import texq.run.figures as figures
    from texq.method.generator import Generator
    from texq.run.config import RunConfig
    from texq.run.figures import run_pictures
    from texq.run.layout import Layout
    from texq.util.io import save_torch, write_json

    ckpt, data, _ = tiny_setup
    cfg = RunConfig.for_profile("tiny", model="resnet8_cifar10", checkpoint=str(ckpt), data=str(data))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    save_torch(tmp_path / "step1.pt", {"images": torch.randn(10, 3, 32, 32), "labels": torch.arange(10)})
    (tmp_path / "train").mkdir()
    torch.save(Generator(num_classes=10).state_dict(), tmp_path / "train" / "generator.pt")
    write_json(tmp_path / "metrics.json", {"per_class_top1": [50.0] * 10, "class_names": names})
    titles, grid = [], figures.image_grid
    monkeypatch.setattr(figures, "image_grid", lambda x, t, *a, **k: titles.append(t) or grid(x, t, *a, **k))
    made = run_pictures(Layout(tmp_path), cfg)
    assert titles[0] == names and titles[1][:4] == ["airplane"] * 4 and titles[1][-1] == "truck"
    assert {p.name for p in made} == {"calibration_images.png", "generator_samples.png",
                                      "texture_histograms.png", "per_class_top1.png"}
    for p in made:
        _png_ok(p, (300, 100))


def test_a_recorder_takes_the_pictures_drawn_after_the_scores_and_redraws_older_ones(tiny_run, tmp_path, monkeypatch):
    """texq.run.records.pictures: the evaluate step's pictures are logged as drawn; pictures older
    than metrics.json (outputs restored by DVC, a run evaluated before) are drawn again."""
    import shutil

    import texq.run.records as records
    from texq.run.layout import Layout

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)  # copytree keeps the files' times
    layout, cfg = Layout(run), object()  # the stand-in draw below reads no config
    drawn = []
    monkeypatch.setattr(records, "draw_pictures", lambda lay, c: drawn.append(lay) or ["redrawn"])
    before = sorted(layout.figures.glob("*.png"))
    assert before and records.pictures(layout, cfg) == before and not drawn
    metrics = layout.metrics.stat()
    os.utime(layout.metrics, ns=(metrics.st_atime_ns, max(p.stat().st_mtime_ns for p in before) + 10**9))
    assert records.pictures(layout, cfg) == ["redrawn"] and drawn == [layout]

