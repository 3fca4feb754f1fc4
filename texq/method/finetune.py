"""Steps 2 and 3 (sections 3.3.2-3.3.3): train the generator G (Eq. 12) and fine-tune the
quantized model Q (Eq. 13-14), epoch by epoch, with a state that checkpoints and resumes.

Per iteration: G draws a batch with uniform random labels; F (frozen, eval mode) scores it and
G takes a step on ``CE + a3 L_BNS + a4 L_L-BNS + a5 L_D-BNS``. After G's warm-up epochs, Q takes a
step on ``CE(Q(x), y) + a6 KL(F(x_mix) || Q(x_mix))`` over the generated batch plus calibration
images, where x_mix mixes samples only (Eq. 9). Q stays in eval mode (BatchNorm uses its running
statistics, its affine parameters learn), as in GDFQ; its activation ranges follow its inputs during
``act_calib_epochs`` epochs of G's warm-up (the first ones, or the last with ``act_calib_at='end'``;
G's samples, or Q's whole training batch with ``act_calib_inputs='batch'``), then freeze.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from texq.method.augment import draw_calibration
from texq.method.bns import (
    BNStatsCollector,
    LayerStats,
    bns_loss,
    concat,
    distort,
    layer_weights,
)
from texq.method.finetune_config import (  # noqa: F401 (re-exported: the config lives beside its code)
    ACT_CALIB_AT,
    ACT_CALIB_INPUTS,
    COUNT_TERMS,
    HISTORY_TERMS,
    MIX_SLOTS,
    FinetuneConfig,
    short_term,
)
from texq.method.generator import Generator, GeneratorConfig
from texq.method.kd import kd_loss
from texq.method.mixup import mix_capacity, mixed_scores
from texq.models import get_info
from texq.quant import act_quantizers, set_observing
from texq.util.graphs import GraphedStep, module_state
from texq.util.precision import autocast, compile_step, float32_batchnorm


@dataclass
class Sources:
    """Where Q's training images come from: G, a calibration set, and/or real batches."""

    generator: Generator | None = None
    calib_images: Tensor | None = None
    calib_labels: Tensor | None = None
    centers: list[LayerStats] | None = None  # per-class (K, C) centers; None: no center losses
    real: object | None = None  # an iterator of (images, labels) batches, method 'real'


class Finetuner:
    """Holds F, Q, G and their optimisers; ``run_epoch`` trains one epoch.

    Each step's forward and backward pass is a function free of host syncs and of data-dependent
    shapes; on CUDA it is replayed as a CUDA graph (``cuda_graphs``, texq.util.graphs) and the
    optimizer steps run eagerly. Loss terms are summed on the device and read once per epoch.
    """

    def __init__(self, fp: nn.Module, qmodel: nn.Module, sources: Sources, gcfg: GeneratorConfig,
                 fcfg: FinetuneConfig, mkd: bool, device: torch.device, bns_norm: str = "mse",
                 cuda_graphs: bool = True, rehearse: bool = False, fixed_shapes: bool | None = None,
                 precision: str = "float32", compile: bool = False, compile_backend: str = "inductor"):
        """Note: F's parameters are frozen (``requires_grad=False``) for good. ``rehearse``
        (tests): run the graphs' warm-up and restore on any device, without capturing.
        ``fixed_shapes`` (default: when steps are captured) selects Q's fixed-shape batch.
        ``precision`` ('float32' | 'bf16') and ``compile``: texq.util.precision (BatchNorm layers of F, Q
        and G get float32 hooks for 'bf16')."""
        self.fp, self.q, self.src, self.gcfg, self.fcfg, self.mkd = fp, qmodel, sources, gcfg, fcfg, mkd
        self.bns_norm = bns_norm
        self.device = torch.device(device)
        self.calib_images = None if sources.calib_images is None else sources.calib_images.to(self.device)
        self.calib_labels = None if sources.calib_labels is None else sources.calib_labels.to(self.device)
        for p in fp.parameters():
            p.requires_grad_(False)
        fp.eval()
        self.q.eval()  # BN on running statistics, as GDFQ fine-tunes
        # foreach: a few multi-tensor ops per step on every device (PyTorch's CUDA default)
        self.opt_q = torch.optim.SGD(self.q.parameters(), lr=fcfg.lr, momentum=0.9, nesterov=True,
                                     weight_decay=fcfg.weight_decay, foreach=True)
        self.sched_q = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.opt_q, T_max=max(1, fcfg.epochs * fcfg.iters_per_epoch))
        g = sources.generator
        if g is not None:
            g.to(self.device).train()
            self.opt_g = torch.optim.Adam(g.parameters(), lr=gcfg.lr, betas=(gcfg.beta1, gcfg.beta2),
                                          foreach=True)
            self.sched_g = torch.optim.lr_scheduler.StepLR(self.opt_g, gcfg.lr_step_epochs,
                                                           gcfg.lr_gamma)
        self._act_quantizers = act_quantizers(qmodel)
        self.bns = BNStatsCollector(fp).attach()  # hooks stay on F; ``with self.bns`` records
        self.running = concat(self.bns.running())  # F is frozen: its running statistics are constant
        self.centers = None if sources.centers is None else concat(
            [LayerStats(c.mean.to(self.device), c.var.to(self.device)) for c in sources.centers])
        self.num_classes = get_info(fp).num_classes
        self.center_weights = layer_weights(len(self.bns.layers), gcfg.shallow_weight, gcfg.deep_weight)
        self.total_epochs = fcfg.warmup_epochs + fcfg.epochs
        self.use_centers = sources.centers is not None and bool(gcfg.alpha4 or gcfg.alpha5)
        self.g_terms = list(HISTORY_TERMS[:2] + (HISTORY_TERMS[2:4] if self.use_centers else ())
                            if g is not None else ())
        self.precision = precision
        self._amp_hooks = float32_batchnorm(fp, qmodel, g) if precision != "float32" else []
        state = module_state(g, qmodel)
        g_pass, q_pass = self._generator_pass, self._quant_pass
        if compile:
            g_pass, q_pass = (compile_step(g_pass, compile_backend),
                              compile_step(q_pass, compile_backend))
        self._g_step = (GraphedStep(g_pass, self.device, list(g.parameters()), state,
                                    cuda_graphs, rehearse=rehearse) if g is not None else None)
        # Q's graph bakes in its activation quantizers' mode and frozen ranges: a change recaptures
        self._q_step = GraphedStep(q_pass, self.device, list(qmodel.parameters()), state,
                                   cuda_graphs, rehearse=rehearse, key=lambda: [
                                       (a.observing, a._frozen) for a in self._act_quantizers])
        self.fixed_shapes = (self._q_step.capture or compile) if fixed_shapes is None else fixed_shapes
        # Q's batch: G's (or the real) samples plus the calibration images drawn per step
        calib = 0 if self.calib_images is None else min(fcfg.calib_per_batch, len(self.calib_images))
        self.mix_capacity = mix_capacity(fcfg.batch_size + calib, fcfg.mixup_p)

    @property
    def q_terms(self) -> list[str]:
        """Q's terms in the order ``quant_loss`` returns them."""
        return list(HISTORY_TERMS[4:] if self.bounded else HISTORY_TERMS[4:-1])

    @property
    def bounded(self) -> bool:
        """Whether Q's fixed-shape batch has ``mix_capacity`` slots for the mixes (``mix_slots:
        bounded``) rather than all n."""
        return self.fixed_shapes and self.mkd and self.fcfg.mix_slots == "bounded"

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state = {"q": self.q.state_dict(), "opt_q": self.opt_q.state_dict(),
                 "sched_q": self.sched_q.state_dict()}
        if self.src.generator is not None:
            state.update(g=self.src.generator.state_dict(), opt_g=self.opt_g.state_dict(),
                         sched_g=self.sched_g.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        for step in (self._g_step, self._q_step):
            if step is not None:
                step.reset()  # captured before the load: capture again
        self.q.load_state_dict(state["q"])
        self.opt_q.load_state_dict(state["opt_q"])
        self.sched_q.load_state_dict(state["sched_q"])
        if self.src.generator is not None:
            self.src.generator.load_state_dict(state["g"])
            self.opt_g.load_state_dict(state["opt_g"])
            self.sched_g.load_state_dict(state["sched_g"])

    # ------------------------------------------------------------------------------ losses
    def generator_loss(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Eq. 12 on a fresh batch of G: (loss, images, labels, the terms as a (T,) tensor in
        ``g_terms`` order). ``CE + a3 L_BNS (batch vs F's running stats) + a4 L_L-BNS (per class
        vs its center, Eq. 8) + a5 L_D-BNS (per class vs its distorted center, Eq. 11)``."""
        g, cfg = self.src.generator, self.gcfg
        with autocast(self.device, self.precision):  # G, F and Q forward only: losses in float32
            x, y = g.sample(self.fcfg.batch_size, self.device)
        x = x.float()
        with self.bns, autocast(self.device, self.precision):
            self.bns.set_groups(y, self.num_classes)
            logits = self.fp(x).float()
        grouped = self.bns.stats_all()  # every BN layer side by side, per class
        l_ce = F.cross_entropy(logits, y)
        l_bns = bns_loss(grouped.pooled(), self.running, norm=self.bns_norm)
        loss = l_ce + cfg.alpha3 * l_bns
        terms = [l_ce, l_bns]
        if self.use_centers:
            stats = grouped.of_groups()  # classes absent from the batch are left out
            centers = self.centers
            l_lbns = bns_loss(stats, centers, self.center_weights, self.bns_norm)
            l_dbns = bns_loss(stats, distort(centers, cfg.nu_mu, cfg.nu_sigma), self.center_weights,
                              self.bns_norm)
            loss = loss + cfg.alpha4 * l_lbns + cfg.alpha5 * l_dbns
            terms += [l_lbns, l_dbns]
        return loss, x, y, torch.stack(terms).detach()

    @property
    def mix_form(self) -> str:
        """How Q scores the mixes (texq.method.mixup.mixed_scores): ``none`` without MKD,
        ``bounded`` (``mix_slots: bounded``) or ``fixed`` with fixed shapes, else ``subset``."""
        if not self.mkd:
            return "none"
        return "bounded" if self.bounded else "fixed" if self.fixed_shapes else "subset"

    def quant_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Eq. 14 over ``x`` plus calibration images: (loss, terms in ``q_terms`` order).
        ``CE(Q(x), y) + a6 KL(F(x_mix) || Q(x_mix))``, Q's scores on the mixes as ``mix_form``
        has them (the same draws and the same maths in every form); without MKD the KD term is
        on x itself."""
        extra = self._calib_batch()
        if extra is not None:
            x, y = torch.cat([x, extra[0]]), torch.cat([y, extra[1]])
        with autocast(self.device, self.precision):  # Q's and F's forward passes only
            out, student, kd_in, mixed, overflow = mixed_scores(self.q, x, self.fcfg.mixup_p,
                                                                self.mix_form, self.mix_capacity)
            with torch.no_grad():
                teacher = self.fp(kd_in).float()
        l_ce = F.cross_entropy(out[:len(x)], y)
        l_kd = kd_loss(student, teacher, self.fcfg.kd_temperature, self.fcfg.kd_reduction)
        loss = l_ce + self.fcfg.alpha6 * l_kd
        terms = [l_ce, l_kd, mixed.sum().to(l_ce.dtype)]
        if overflow is not None:
            terms.append(overflow.to(l_ce.dtype))
        return loss, torch.stack(terms).detach()

    def _calib_batch(self) -> tuple[Tensor, Tensor] | None:
        """``calib_per_batch`` calibration images for Q's batch (texq.method.augment.draw_calibration)."""
        if self.calib_images is None or self.fcfg.calib_per_batch <= 0:
            return None
        return draw_calibration(self.calib_images, self.calib_labels, self.fcfg.calib_per_batch,
                                self.fcfg.calib_crop_scale if self.fcfg.calib_augment else None)

    # ------------------------------------------------------------------------------ steps
    def close(self) -> None:
        """Take the Finetuner's hooks off F, Q and G (the BN-statistics recorder's, and the
        float32 BatchNorm hooks of ``precision: bf16``): the models are as they were given."""
        self.bns.detach()
        for h in self._amp_hooks:
            h.remove()
        self._amp_hooks = []

    def _generator_pass(self) -> tuple[Tensor, Tensor, Tensor]:
        loss, x, y, terms = self.generator_loss()
        loss.backward()
        return x.detach(), y, terms

    def _quant_pass(self, x: Tensor, y: Tensor) -> Tensor:
        loss, terms = self.quant_loss(x, y)
        loss.backward()
        return terms

    def generator_step(self) -> tuple[Tensor, Tensor, Tensor]:
        """One step of G on Eq. 12; returns the (detached) batch, its labels and the terms."""
        x, y, terms = self._g_step()
        self.opt_g.step()
        return x, y, terms

    def quant_step(self, x: Tensor, y: Tensor) -> Tensor:
        """One step of Q on Eq. 14 over ``x`` plus calibration images; returns the terms."""
        for a in self._act_quantizers:
            if not a.observing:
                a.freeze()  # the range's host-side copy is made before, not inside, the step
        terms = self._q_step(x, y)
        self.opt_q.step()
        self.sched_q.step()
        return terms

    @torch.no_grad()
    def observe_step(self, x: Tensor) -> None:
        """Q's forward pass on ``x`` (G's batch), plus a calibration batch drawn and augmented as
        for training when ``act_calib_inputs`` is 'batch': activation ranges see those inputs."""
        if self.fcfg.act_calib_inputs == "batch":
            extra = self._calib_batch()
            if extra is not None:
                x = torch.cat([x, extra[0]])
        self.q(x)

    def run_epoch(self, epoch: int, bar=None) -> dict:
        """Train one epoch (0-based); returns the mean of each loss term (read from the device
        once, at the end of the epoch)."""
        cfg = self.fcfg
        observing = cfg.observes(epoch)
        training_q = epoch >= cfg.warmup_epochs
        set_observing(self.q, observing, reset=(epoch == cfg.first_observed_epoch()))
        names = self.g_terms + (self.q_terms if training_q else [])
        sums = torch.zeros(len(names), device=self.device)
        for _ in range(cfg.iters_per_epoch):
            parts = []
            if self.src.generator is not None:
                x, y, g_terms = self.generator_step()
                parts.append(g_terms)
            else:
                x, y = next(self.src.real)
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if training_q:
                parts.append(self.quant_step(x, y))
            elif observing:
                self.observe_step(x)
            if parts:
                sums += torch.cat(parts)
            if bar is not None:
                bar.update(1)
        set_observing(self.q, False)
        if self.src.generator is not None:
            self.sched_g.step()
        means = dict(zip(names, (sums / cfg.iters_per_epoch).tolist()))
        if bar is not None and means:
            bar.set_postfix({short_term(k): f"{v:.3g}" for k, v in means.items() if k not in COUNT_TERMS})
        return {"epoch": epoch, "phase": "joint" if training_q else "warmup",
                "quantized/lr": self.opt_q.param_groups[0]["lr"], **means}
