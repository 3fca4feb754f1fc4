"""The conditional generator G(z | y) of GDFQ, which TexQ imports (section 4.1).

CIFAR form: the label embedding multiplies the noise, a linear layer maps it to 128 x s/4 x s/4,
then BN, two (upsample x2, 3x3 conv, BN, LeakyReLU 0.2) blocks, a 3x3 conv to the image channels,
tanh, and a BatchNorm without affine parameters, so that the output batch has zero mean and unit
variance per channel (the model's normalised input space). GDFQ's BNs inside the blocks are built
as ``BatchNorm2d(c, 0.8)`` -- eps = 0.8 -- and texq keeps that.

ImageNet form (GDFQ's ``Generator_imagenet``): no label embedding; the three inner BNs are
class-conditional (affine-free BN, then a per-class scale and shift).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from texq.util.domains import COUNT, MOMENTUM, NON_NEGATIVE, POSITIVE, check_fields


@dataclass(frozen=True)
class GeneratorConfig:
    """Step 2: GDFQ's generator trained with Eq. 12."""

    latent_dim: Annotated[int, COUNT] = 100  # GDFQ's noise size
    lr: Annotated[float, POSITIVE] = 1e-3  # Adam, initial learning rate (paper)
    beta1: Annotated[float, MOMENTUM] = 0.5  # GDFQ's Adam betas
    beta2: Annotated[float, MOMENTUM] = 0.999  # GDFQ's
    lr_step_epochs: Annotated[int, COUNT] = 100  # lr x0.1 every 100 epochs (paper)
    lr_gamma: Annotated[float, POSITIVE] = 0.1  # the x0.1 (paper)
    alpha3: Annotated[float, NON_NEGATIVE] = 0.4  # weight of the global BNS loss L_BNS^G (paper)
    alpha4: Annotated[float, NON_NEGATIVE] = 0.02  # weight of the layered center loss L_L-BNS^G, Eq. 8 (paper)
    alpha5: Annotated[float, NON_NEGATIVE] = 1.8  # weight of the distorted center loss L_D-BNS^G, Eq. 11 (paper)
    nu_mu: Annotated[float, NON_NEGATIVE] = 0.5  # std of the noise on center means, Eq. 11 (paper)
    nu_sigma: Annotated[float, NON_NEGATIVE] = 1.0  # std of the noise on center variances, Eq. 11 (paper)
    shallow_weight: Annotated[float, NON_NEGATIVE] = 0.0  # w_l of Eq. 8/11 for l < ceil(L/2) - 2 (paper)
    deep_weight: Annotated[float, NON_NEGATIVE] = 1.0  # w_l of Eq. 8/11 for the deeper layers (paper)

    def __post_init__(self) -> None:
        check_fields(self, "generator.")

GDFQ_BN_EPS = 0.8  # GDFQ passes 0.8 as BatchNorm2d's second positional argument, eps


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without affine parameters, then a per-class scale (init 1) and shift (init 0)."""

    def __init__(self, num_classes: int, channels: int, eps: float = 1e-5):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=eps, affine=False)
        self.weight = nn.Embedding(num_classes, channels)
        self.bias = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.weight.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        out = self.bn(x)
        return out * self.weight(labels)[:, :, None, None] + self.bias(labels)[:, :, None, None]


class Generator(nn.Module):
    """G(z | y): (N, latent_dim) noise and (N,) labels -> (N, channels, img_size, img_size)."""

    def __init__(self, num_classes: int, img_size: int = 32, latent_dim: int = 100,
                 channels: int = 3, conditional_bn: bool = False, width: int = 128):
        super().__init__()
        if img_size % 4:
            raise ValueError(f"img_size must be a multiple of 4, got {img_size}")
        self.num_classes, self.latent_dim, self.conditional_bn = num_classes, latent_dim, conditional_bn
        self.init_size = img_size // 4
        self.width = width
        self.label_emb = None if conditional_bn else nn.Embedding(num_classes, latent_dim)
        self.l1 = nn.Linear(latent_dim, width * self.init_size ** 2)
        if conditional_bn:
            self.bn0 = ConditionalBatchNorm2d(num_classes, width)
            self.bn1 = ConditionalBatchNorm2d(num_classes, width, GDFQ_BN_EPS)
            self.bn2 = ConditionalBatchNorm2d(num_classes, width // 2, GDFQ_BN_EPS)
        else:
            self.bn0 = nn.BatchNorm2d(width)
            self.bn1 = nn.BatchNorm2d(width, eps=GDFQ_BN_EPS)
            self.bn2 = nn.BatchNorm2d(width // 2, eps=GDFQ_BN_EPS)
        self.conv1 = nn.Conv2d(width, width, 3, 1, 1)
        self.conv2 = nn.Conv2d(width, width // 2, 3, 1, 1)
        self.conv3 = nn.Conv2d(width // 2, channels, 3, 1, 1)
        self.out_bn = nn.BatchNorm2d(channels, affine=False)

    @classmethod
    def for_model(cls, info, latent_dim: int = 100) -> "Generator":
        """The generator for a model described by ``info`` (a ModelInfo): its classes and input
        size; GDFQ's class-conditional BN for ImageNet-scale models (inputs over 64 px)."""
        return cls(info.num_classes, info.input_size, latent_dim,
                   conditional_bn=info.imagenet_scale)

    def _bn(self, bn: nn.Module, x: Tensor, labels: Tensor) -> Tensor:
        return bn(x, labels) if self.conditional_bn else bn(x)

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        h = z if self.label_emb is None else self.label_emb(labels) * z
        h = self.l1(h).view(z.shape[0], self.width, self.init_size, self.init_size)
        h = self._bn(self.bn0, h, labels)
        h = F.interpolate(h, scale_factor=2)
        h = F.leaky_relu(self._bn(self.bn1, self.conv1(h), labels), 0.2)
        h = F.interpolate(h, scale_factor=2)
        h = F.leaky_relu(self._bn(self.bn2, self.conv2(h), labels), 0.2)
        return self.out_bn(torch.tanh(self.conv3(h)))

    def sample(self, n: int, device: torch.device | str | None = None,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Uniform random labels and their images, drawn on ``device`` (default: where G lives;
        ``generator``, if given, must live there too)."""
        device = self.l1.weight.device if device is None else device
        z = torch.randn(n, self.latent_dim, generator=generator, device=device)
        labels = torch.randint(0, self.num_classes, (n,), generator=generator, device=device)
        return self(z, labels), labels

    @torch.no_grad()
    def training_samples(self, n: int, batch_size: int = 64) -> Tensor:
        """``n`` images drawn as during training (train-mode BatchNorm: each batch of
        ``batch_size`` is normalised by its own statistics), on the CPU. G stays in train mode."""
        self.train()
        return torch.cat([self.sample(min(batch_size, n - i))[0].cpu() for i in range(0, n, batch_size)])
