"""Steps 2 and 3 (sections 3.3.2-3.3.3): train the generator G (Eq. 12) and fine-tune the
quantized model Q (Eq. 13-14), epoch by epoch, with a state that checkpoints and resumes.

Per iteration: G draws a batch with uniform random labels; F (frozen, eval mode) scores it and
G takes a step on ``CE + a3 L_BNS + a4 L_L-BNS + a5 L_D-BNS``. After G's warm-up epochs, Q takes a
step on ``CE(Q(x), y) + a6 KL(F(x_mix) || Q(x_mix))`` over the generated batch plus calibration
images, where x_mix mixes samples only (Eq. 9). Q stays in eval mode (BatchNorm uses its running
statistics, its affine parameters learn), as in GDFQ; its activation ranges follow its inputs during
the first ``act_calib_epochs`` epochs, then freeze.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from texq.bns import BNStatsCollector, LayerStats, bns_loss, distort, layer_weights, select_groups
from texq.config import KD_REDUCTIONS, FinetuneConfig, GeneratorConfig
from texq.generator import Generator
from texq.mixup import mixup_samples
from texq.quant import set_observing


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
            reduction: str = "mean") -> Tensor:
    """KL(teacher || student) on temperature-softened outputs times T^2.

    ``reduction='mean'`` averages the element-wise KL terms over batch x classes (the lineage's
    ``nn.KLDivLoss()`` default), ``'batchmean'`` sums over classes and averages over the batch
    (the KL divergence proper: ``num_classes`` times larger)."""
    if reduction not in KD_REDUCTIONS:
        raise ValueError(f"kd reduction {reduction!r}: expected one of {KD_REDUCTIONS}")
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                  reduction="batchmean")  # torch's 'mean' is to change meaning: divide explicitly
    if reduction == "mean":
        kl = kl / student_logits.shape[1]
    return kl * (t * t)


def augment(images: Tensor, scale: tuple[float, float] = (0.5, 1.0)) -> Tensor:
    """Random resized crop (area ``scale``) and horizontal flip, drawn per image from torch's
    global RNG (so a resumed run draws the same)."""
    from torchvision.transforms import v2

    size = images.shape[-1]
    tf = v2.Compose([v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True),
                     v2.RandomHorizontalFlip()])
    return torch.stack([tf(img) for img in images])


@dataclass
class Sources:
    """Where Q's training images come from: G, a calibration set, and/or real batches."""

    generator: Generator | None = None
    calib_images: Tensor | None = None
    calib_labels: Tensor | None = None
    centers: list[LayerStats] | None = None  # per-class (K, C) centers; None: no center losses
    real: object | None = None  # an iterator of (images, labels) batches, method 'real'


class Finetuner:
    """Holds F, Q, G and their optimisers; ``run_epoch`` trains one epoch."""

    def __init__(self, fp: nn.Module, qmodel: nn.Module, sources: Sources, gcfg: GeneratorConfig,
                 fcfg: FinetuneConfig, mkd: bool, device: torch.device, bns_norm: str = "mse"):
        """Note: F's parameters are frozen (``requires_grad=False``) for good."""
        self.fp, self.q, self.src, self.gcfg, self.fcfg, self.mkd = fp, qmodel, sources, gcfg, fcfg, mkd
        self.bns_norm = bns_norm
        self.device = device
        for p in fp.parameters():
            p.requires_grad_(False)
        fp.eval()
        self.q.eval()  # BN on running statistics, as GDFQ fine-tunes
        self.opt_q = torch.optim.SGD(self.q.parameters(), lr=fcfg.lr, momentum=0.9, nesterov=True,
                                     weight_decay=fcfg.weight_decay)
        self.sched_q = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.opt_q, T_max=max(1, fcfg.epochs * fcfg.iters_per_epoch))
        g = sources.generator
        if g is not None:
            g.to(device).train()
            self.opt_g = torch.optim.Adam(g.parameters(), lr=gcfg.lr, betas=(gcfg.beta1, gcfg.beta2))
            self.sched_g = torch.optim.lr_scheduler.StepLR(self.opt_g, gcfg.lr_step_epochs,
                                                           gcfg.lr_gamma)
        self.bns = BNStatsCollector(fp)
        self.center_weights = layer_weights(len(self.bns.layers), gcfg.shallow_weight, gcfg.deep_weight)
        self.total_epochs = fcfg.warmup_epochs + fcfg.epochs

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state = {"q": self.q.state_dict(), "opt_q": self.opt_q.state_dict(),
                 "sched_q": self.sched_q.state_dict()}
        if self.src.generator is not None:
            state.update(g=self.src.generator.state_dict(), opt_g=self.opt_g.state_dict(),
                         sched_g=self.sched_g.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.q.load_state_dict(state["q"])
        self.opt_q.load_state_dict(state["opt_q"])
        self.sched_q.load_state_dict(state["sched_q"])
        if self.src.generator is not None:
            self.src.generator.load_state_dict(state["g"])
            self.opt_g.load_state_dict(state["opt_g"])
            self.sched_g.load_state_dict(state["sched_g"])

    # ------------------------------------------------------------------------------ steps
    def generator_step(self) -> tuple[Tensor, Tensor, dict]:
        """One step of G on Eq. 12; returns the (detached) batch and its labels."""
        g, cfg = self.src.generator, self.gcfg
        x, y = g.sample(self.fcfg.batch_size, self.device)
        with self.bns:
            self.bns.groups = y
            logits = self.fp(x)
        grouped = self.bns.collected()
        l_ce = F.cross_entropy(logits, y)
        l_bns = bns_loss([s.pooled() for s in grouped], self.bns.running(), norm=self.bns_norm)
        loss = l_ce + cfg.alpha3 * l_bns
        terms = {"g_ce": l_ce.item(), "g_bns": l_bns.item()}
        if self.src.centers is not None and (cfg.alpha4 or cfg.alpha5):
            stats = [s.of_groups() for s in grouped]
            centers = select_groups(self.src.centers, grouped)
            l_lbns = bns_loss(stats, centers, self.center_weights, self.bns_norm)
            l_dbns = bns_loss(stats, distort(centers, cfg.nu_mu, cfg.nu_sigma), self.center_weights,
                              self.bns_norm)
            loss = loss + cfg.alpha4 * l_lbns + cfg.alpha5 * l_dbns
            terms.update(g_lbns=l_lbns.item(), g_dbns=l_dbns.item())
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()
        return x.detach(), y, terms

    def _calib_batch(self) -> tuple[Tensor, Tensor] | None:
        imgs = self.src.calib_images
        if imgs is None or self.fcfg.calib_per_batch <= 0:
            return None
        n = min(self.fcfg.calib_per_batch, len(imgs))
        idx = torch.randperm(len(imgs))[:n]
        x = imgs[idx]
        if self.fcfg.calib_augment:
            x = augment(x, self.fcfg.calib_crop_scale)
        return x, self.src.calib_labels[idx]

    def quant_step(self, x: Tensor, y: Tensor) -> dict:
        """One step of Q on Eq. 14 over ``x`` plus calibration images."""
        extra = self._calib_batch()
        if extra is not None:
            x, y = torch.cat([x, extra[0].to(self.device)]), torch.cat([y, extra[1].to(self.device)])
        n = len(x)
        if self.mkd:
            x_mix, mixed = mixup_samples(x, self.fcfg.mixup_p)
            inputs = torch.cat([x, x_mix[mixed]])  # unmixed samples are their own mix
        else:
            mixed, inputs = torch.zeros(n, dtype=torch.bool, device=x.device), x
        out = self.q(inputs)  # eval-mode Q and frozen ranges: samples do not interact
        with torch.no_grad():
            teacher = self.fp(inputs)
        student_mix, teacher_mix = out[:n].clone(), teacher[:n].clone()
        student_mix[mixed], teacher_mix[mixed] = out[n:], teacher[n:]
        l_ce = F.cross_entropy(out[:n], y)
        l_kd = kd_loss(student_mix, teacher_mix, self.fcfg.kd_temperature, self.fcfg.kd_reduction)
        loss = l_ce + self.fcfg.alpha6 * l_kd
        self.opt_q.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_q.step()
        self.sched_q.step()
        return {"q_ce": l_ce.item(), "q_kd": l_kd.item(), "q_mixed": int(mixed.sum())}

    @torch.no_grad()
    def observe_step(self, x: Tensor) -> None:
        self.q(x)

    def run_epoch(self, epoch: int, bar=None) -> dict:
        """Train one epoch (0-based); returns the mean of each loss term."""
        cfg = self.fcfg
        observing = epoch < cfg.act_calib_epochs
        training_q = epoch >= cfg.warmup_epochs
        set_observing(self.q, observing, reset=(epoch == 0))
        sums: dict[str, float] = {}
        for _ in range(cfg.iters_per_epoch):
            terms: dict = {}
            if self.src.generator is not None:
                x, y, terms = self.generator_step()
            else:
                x, y = next(self.src.real)
                x, y = x.to(self.device), y.to(self.device)
            if training_q:
                terms.update(self.quant_step(x, y))
            elif observing:
                self.observe_step(x)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in terms.items() if k != "q_mixed"})
        set_observing(self.q, False)
        if self.src.generator is not None:
            self.sched_g.step()
        means = {k: v / cfg.iters_per_epoch for k, v in sums.items()}
        return {"epoch": epoch, "phase": "joint" if training_q else "warmup",
                "lr_q": self.opt_q.param_groups[0]["lr"], **means}
