"""An exported file under ONNX Runtime (CPU), compared with texq's own fake-quantized model."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from texq.export.graph import INPUT_NAME
from texq.models import ModelInfo

if TYPE_CHECKING:
    import onnxruntime


def session(model: str | os.PathLike | bytes, threads: int | None = None, spinning: bool = True
            ) -> "onnxruntime.InferenceSession":
    """A CPU inference session; ``threads`` intra-op threads (None: ONNX Runtime's default).
    ``spinning=False`` lets idle threads sleep at once (for timing several sessions in turn:
    one session's spinning threads would otherwise take the cores from the next)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def onnx_logits(sess: "onnxruntime.InferenceSession", x: torch.Tensor | np.ndarray) -> np.ndarray:
    """The session's output for one batch of normalised images (N, 3, H, W)."""
    x = x.numpy() if isinstance(x, torch.Tensor) else x
    return sess.run(None, {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]


@dataclass(frozen=True)
class Agreement:
    """ONNX Runtime's outputs against texq's on the same inputs."""

    n: int  # inputs compared
    agreement: float  # percent of inputs given the same class by both
    max_abs_logit_diff: float  # largest |ONNX logit - texq logit| over all inputs and classes
    mean_abs_logit_diff: float
    onnx_top1: float | None  # percent, where labels are known
    texq_top1: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def _percent(k: int, n: int) -> float:
    return round(100.0 * k / n, 2)


@torch.no_grad()
def check_agreement(sess: "onnxruntime.InferenceSession", qmodel: nn.Module,
            batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]]) -> Agreement:
    """Run ``sess`` and ``qmodel`` (on the CPU, eval mode) on ``batches`` of (images, labels or
    None) and compare their predictions and logits."""
    qmodel = qmodel.cpu().eval()
    diffs, n, same, labels, ours_ok, theirs_ok = [], 0, 0, True, 0, 0
    for x, y in batches:
        n += len(x)
        ours = qmodel(x.float()).numpy()
        theirs = onnx_logits(sess, x)
        diffs.append(np.abs(ours - theirs).reshape(-1))
        p_ours, p_theirs = ours.argmax(1), theirs.argmax(1)
        same += int((p_ours == p_theirs).sum())
        if y is None:
            labels = False
        else:
            ours_ok += int((p_ours == y.numpy()).sum())
            theirs_ok += int((p_theirs == y.numpy()).sum())
    if n == 0:
        raise ValueError("check_agreement() got no inputs")
    d = np.concatenate(diffs)
    return Agreement(n, _percent(same, n), float(d.max()), float(d.mean()),
                     _percent(theirs_ok, n) if labels else None,
                     _percent(ours_ok, n) if labels else None)


def check_batches(info: ModelInfo, data: str | None, noise_images: int = 64, seed: int = 0,
                  batch_size: int = 256) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    """Inputs for :func:`check_agreement`: the evaluation set ``data`` (labelled), or else
    ``noise_images`` Gaussian-noise images in the model's input space (no labels)."""
    if data is None:
        from texq.data import gaussian_batches

        return [(x, None) for x in gaussian_batches(info, 1, noise_images, seed)]
    from texq.data import load_eval_data

    return DataLoader(load_eval_data(data, info), batch_size=batch_size)
