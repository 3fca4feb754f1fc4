"""ZeroQ's distilled data (the ``zeroq`` baseline): Gaussian noise optimised so that its BN
statistics match the FP model's running statistics (Eq. 3 alone, no labels)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor, nn

from texq.method.bns import BNStatsCollector, bns_loss, concat
from texq.models import get_info
from texq.util.domains import COUNT, POSITIVE, check_fields
from texq.util.nn_utils import frozen
from texq.util.progress import progress_bar


@dataclass(frozen=True)
class DistillConfig:
    """ZeroQ baseline: images distilled from noise with the BNS loss alone (Eq. 3)."""

    num_images: Annotated[int, COUNT] = 256  # distilled images (two of GDFQ's batches)
    iters: Annotated[int, COUNT] = 500  # ZeroQ's iterations
    lr: Annotated[float, POSITIVE] = 0.5  # ZeroQ's / IntraQ's Adam learning rate on images
    batch_size: Annotated[int, COUNT] = 128  # images optimised together

    def __post_init__(self) -> None:
        check_fields(self, "distill.")


def distill_images(model: nn.Module, cfg: DistillConfig, device: torch.device | str = "cpu",
                   seed: int = 0, progress: bool = True, bns_norm: str = "mse") -> Tensor:
    """``cfg.num_images`` BNS-distilled images in the model's normalised input space."""
    info = get_info(model)
    gen = torch.Generator().manual_seed(seed)
    out = []
    with frozen(model.to(device)), BNStatsCollector(model) as bns:
        running = concat(bns.running())
        n_batches = -(-cfg.num_images // cfg.batch_size)
        bar = progress_bar(n_batches * cfg.iters, "zeroq: distilling images", progress)
        for b in range(n_batches):
            size = min(cfg.batch_size, cfg.num_images - b * cfg.batch_size)
            x = torch.randn(size, 3, info.input_size, info.input_size, generator=gen).to(device)
            x.requires_grad_(True)
            opt = torch.optim.Adam([x], lr=cfg.lr)
            for it in range(cfg.iters):
                opt.zero_grad(set_to_none=True)
                model(x)
                loss = bns_loss(bns.stats_all(), running, norm=bns_norm)
                loss.backward()
                opt.step()
                bar.update(1)
                if it % 50 == 0 or it == cfg.iters - 1:  # a host sync: not at every step
                    bar.set_postfix(bns=f"{loss.item():.3f}")
            out.append(x.detach())
        bar.close()
    return torch.cat(out)
