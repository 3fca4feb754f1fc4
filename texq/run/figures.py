"""The pictures of a finished run: loss curves, step 1's images, generator samples per class,
texture-energy histograms (the paper's Fig. 6 view) and per-class top-1 of F against Q, written as
PNG files under the run's ``figures/`` (the pipeline's tracking logs them). matplotlib's Figure
without pyplot: no global state, safe in worker threads; matplotlib is imported only here, when a
picture is drawn (the pipeline extra installs it)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from texq.data.photos import photo_crops
from texq.method.generator import Generator
from texq.method.texture import dominant_count, texture_energy
from texq.models import model_info
from texq.run.config import RunConfig
from texq.run.layout import Layout
from texq.run.methods import spec
from texq.util.errors import TexqError
from texq.util.io import atomic_path, load_torch

MAX_GRID = 100  # most images in a picture's grid (10 rows of 10)
COUNTS = {"quantized/mixed_per_step", "quantized/mix_overflow"}  # not losses: mixed samples per batch (Eq. 9), its own panel
PANELS = (("generator (Eq. 12 terms)", lambda k: k.startswith("generator/")),
          ("quantized model (Eq. 13-14 terms)", lambda k: k.endswith("_loss") and k.startswith("quantized/")),
          ("mixup: mixed samples per batch", lambda k: k in COUNTS),
          ("learning rate", lambda k: k.endswith("/lr")))


def read_history(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def loss_curves(rows: list[dict]):
    """A matplotlib Figure: one panel per group of history columns (``generator/*`` losses,
    ``quantized/*_loss``, mixed-sample counts, learning rates), one line per column over the epochs; a column missing
    from an epoch leaves a gap."""
    from matplotlib.figure import (
        Figure,  # no pyplot: no global state, safe in worker threads
    )

    groups = [(title, sorted({k for r in rows for k in r if wanted(k)
                              and isinstance(r[k], (int, float)) and not isinstance(r[k], bool)}))
              for title, wanted in PANELS]
    groups = [g for g in groups if g[1]]
    fig = Figure(figsize=(5 * max(1, len(groups)), 3.6))
    axes = fig.subplots(1, max(1, len(groups)), squeeze=False)
    for ax, (title, keys) in zip(axes[0], groups):
        for key in keys:
            pts = [(r["epoch"] + 1, r[key]) for r in rows if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _to_unit(images, mean, std):
    """Images in the model's normalised input space -> [0, 1] RGB, (N, H, W, 3) numpy."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (images.detach().cpu().float() * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def mosaic(pics, cols: int, band: int, pad: int = 2):
    """Images ((N, H, W, 3) in [0, 1]) tiled row by row, ``cols`` to a row, each cell ``band``
    white rows above its image (for its title) and ``pad`` white pixels between cells: an
    (rows * (band + H + pad), cols * (W + pad), 3) array (one image to draw, not N axes)."""
    import numpy as np

    n, h, w, _ = pics.shape
    rows = -(-n // cols)
    out = np.ones((rows * (band + h + pad), cols * (w + pad), 3), dtype=np.float32)
    for i in range(n):
        y, x = cell(i, cols, h, w, band, pad)
        out[y:y + h, x:x + w] = pics[i]
    return out


def cell(i: int, cols: int, h: int, w: int, band: int, pad: int) -> tuple[int, int]:
    """Where image ``i`` of a ``mosaic`` starts: its top row (below its title band) and left column."""
    r, c = divmod(i, cols)
    return r * (band + h + pad) + band, c * (w + pad)


def image_grid(images, titles: list[str], mean, std, title: str, cols: int = 10):
    """A Figure of images (normalised input space, (N, 3, H, W)) in rows of ``cols``, each with
    its title (a class name or index) above it. One mosaic image on one axes (``mosaic``): tens of
    axes took seconds to lay out."""
    from matplotlib.figure import Figure

    pics = _to_unit(images, mean, std)
    n, h, w = pics.shape[:3]
    rows, band, pad = -(-n // cols), max(4, h // 3), 2
    fig = Figure(figsize=(1.3 * cols, 1.45 * rows + 0.4))
    top = 1 - 0.4 / (1.45 * rows + 0.4)  # the suptitle's strip
    ax = fig.add_axes((0.005, 0.005, 0.99, top - 0.005))
    ax.imshow(mosaic(pics, cols, band, pad), interpolation="nearest")
    ax.axis("off")
    for i, text in enumerate(titles[:n]):
        y, x = cell(i, cols, h, w, band, pad)
        ax.text(x + w / 2, y - 1, text, ha="center", va="bottom", fontsize=8, clip_on=True)
    fig.suptitle(title, fontsize=10)
    return fig


def generator_samples(generator, num_classes: int, per_class: int = 4, classes: int = 10):
    """``per_class`` samples of each of the first ``classes`` classes, drawn together as in
    training (train-mode BatchNorm): (images, titles), ordered class by class."""
    k = min(classes, num_classes)
    labels = torch.arange(k).repeat_interleave(per_class)
    device = next(generator.parameters()).device
    with torch.no_grad():
        z = torch.randn(len(labels), generator.latent_dim, device=device)
        images = generator.train()(z, labels.to(device))
    return images.cpu(), [str(int(c)) for c in labels]


def texture_histograms(sets: dict):
    """The paper's Fig. 6 view: for each set of texture energies T (name -> (N, 16) tensor), the
    share of images by their number of dominant texture elements (fewest holding 80% of T)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.subplots()
    width = 0.8 / max(1, len(sets))
    for i, (name, t) in enumerate(sets.items()):
        counts = dominant_count(t).numpy()
        share = [(counts == n).mean() for n in range(1, 17)]
        ax.bar([n + (i - (len(sets) - 1) / 2) * width for n in range(1, 17)], share, width,
               label=f"{name} (n={len(counts)})")
    ax.set_xlabel("dominant texture elements (of 16) holding 80% of T")
    ax.set_ylabel("share of images")
    ax.set_xticks(range(1, 17))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def per_class_bars(fp: list, quantized: list, label: str = "quantized", names: list | None = None):
    """Per-class top-1 of the full-precision and the quantized model, side by side (x labels:
    ``names`` where given, else the class indices)."""
    from matplotlib.figure import Figure

    k = len(quantized)
    fig = Figure(figsize=(max(6.0, 0.45 * k), 3.6))
    ax = fig.subplots()
    xs = list(range(k))
    ax.bar([x - 0.2 for x in xs], [v or 0 for v in fp], 0.4, label="full precision")
    ax.bar([x + 0.2 for x in xs], [v or 0 for v in quantized], 0.4, label=label)
    if names is not None and k <= 100:
        ax.set_xticks(xs, [str(n) for n in names], rotation=45, ha="right", fontsize=8)
    else:
        ax.set_xticks(xs)
    ax.set_xlabel("class")
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def save(fig, dest: Path) -> Path:
    """Write a Figure as PNG, atomically."""
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return dest


def run_pictures(layout: Layout, cfg: RunConfig) -> list[Path]:
    """The pictures of the finished run in ``layout`` (``figures/*.png``): step 1's images (one
    per class), generator samples per class, texture-energy histograms of step 1's images, the
    generator's samples and real photo crops (where scikit-learn is installed), and per-class top-1
    of F against Q."""
    info = model_info(cfg.model)  # classes, size, normalisation: no weights needed
    made, textures = [], {}
    metrics = json.loads(layout.metrics.read_text())
    names = metrics["class_names"]  # the evaluate step's: names, else indices
    kind = spec(cfg).step1_images

    def name(c) -> str:  # a label's title
        return names[int(c)]
    step1 = load_torch(layout.step1) if layout.step1.exists() else {}
    images = step1.get("images")
    if images is not None:
        labels = step1.get("labels")
        keep = (torch.tensor([int((labels[:i] == labels[i]).sum()) == 0 for i in range(len(labels))])
                if labels is not None else torch.arange(len(images)) < 20)
        keep &= keep.cumsum(0) <= MAX_GRID  # ImageNet's 1000 classes: the first 100
        titles = [name(c) for c in labels[keep]] if labels is not None else [""] * int(keep.sum())
        title = f"{kind}, one per class" if labels is not None else kind
        made.append(save(image_grid(images[keep], titles, info.mean, info.std, title),
                         layout.figures / "calibration_images.png"))
        textures[kind] = texture_energy(images, cfg.calibration.texture, info.mean, info.std)
    if layout.generator.exists():
        g = Generator.for_model(info, cfg.generator.latent_dim)
        g.load_state_dict(load_torch(layout.generator))
        torch.manual_seed(cfg.seed)
        x, titles = generator_samples(g, info.num_classes)
        titles = [name(t) for t in titles]
        made.append(save(image_grid(x, titles, info.mean, info.std, "generator samples by class"),
                         layout.figures / "generator_samples.png"))
        textures["generator samples"] = texture_energy(g.training_samples(256), cfg.calibration.texture,
                                                       info.mean, info.std)
    try:
        textures["real photo crops"] = texture_energy(
            photo_crops(), replace(cfg.calibration.texture, denormalize=False))
    except TexqError:  # scikit-learn not installed: the histograms go without real photos
        pass
    if textures:
        made.append(save(texture_histograms(textures), layout.figures / "texture_histograms.png"))
    teacher = json.loads(layout.teacher.read_text()) if layout.teacher.exists() else {}
    fp = teacher.get("per_class_top1") or [None] * len(metrics["per_class_top1"])
    made.append(save(per_class_bars(fp, metrics["per_class_top1"], f"W{cfg.w_bits}A{cfg.a_bits} {cfg.method}",
                                     names), layout.figures / "per_class_top1.png"))
    return made
