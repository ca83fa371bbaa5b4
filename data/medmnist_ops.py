"""The MedMNIST training recipe's torchvision ops (``data.images.medmnist_transform`` applies them): timm's
``create_transform`` training pipeline rebuilt from torchvision.transforms.v2, and its pixel-mode random erasing.

A module of its own because torchvision imports torch._dynamo (~2.4 s of a core per process): ``data.images``
imports torchvision where an image is first transformed, so text-only data, conversion and most commands never
pay for it.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF


@functools.lru_cache(maxsize=8)
def medmnist_ops(size: int, mean: tuple[float, ...], std: tuple[float, ...]):
    """(crop, flip and RandAugment; random erasing): torchvision v2 ops with the parameters timm's
    ``create_transform(is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
    re_prob=0.25, re_mode="pixel", re_count=1)`` gives the original's MedMNIST recipe.

    - ``RandomResizedCrop``: area (0.08, 1), aspect (3/4, 4/3), bicubic; ``RandomHorizontalFlip`` p 0.5.
    - timm's RandAugment draws 2 ops (with replacement), each applied with probability 0.5, at magnitude 9 of
      10: two ``RandomApply(RandAugment(num_ops=1, magnitude=9, num_magnitude_bins=11), p=0.5)`` (9 of 10
      steps of torchvision's maxima, which equal timm's: shear 0.3, translate 0.45 of the side, rotate 30
      degrees, enhance factors 1 +- 0.9, solarize threshold 26), bicubic, filled with the mean colour as timm
      fills. What torchvision's op set does not give: timm's magnitude noise (std 0.5), its Invert and
      SolarizeAdd ops and its posterize to 1 bit (torchvision keeps 4 bits at this magnitude); torchvision
      adds an Identity op.
    - ``NormalisedNoiseErasing``: timm's pixel-mode random erasing (p 0.25, area (0.02, 1/3), aspect
      (0.3, 1/0.3), one box) on the uint8 image.
    """
    bicubic = v2.InterpolationMode.BICUBIC
    fill = [min(255, round(255 * m)) for m in mean]
    rand_augment = v2.RandomApply([v2.RandAugment(num_ops=1, magnitude=9, num_magnitude_bins=11,
                                                  interpolation=bicubic, fill=fill)], p=0.5)
    crop_flip_augment = v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=bicubic, antialias=True),
        v2.RandomHorizontalFlip(p=0.5), rand_augment, rand_augment])
    erase = NormalisedNoiseErasing(p=0.25, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), mean=mean, std=std)
    return crop_flip_augment, erase


class NormalisedNoiseErasing(v2.RandomErasing):
    """torchvision's random erasing with per-pixel N(0, 1) noise (timm's mode "pixel", applied after
    ``Normalize`` there) on a uint8 image the model normalises later: each erased value is the uint8 whose
    ``(x / 255 - mean) / std`` is nearest the noise (clipped to 0..255: the noise's tails beyond ~2.1
    standard deviations at ImageNet's statistics, beyond 1 at 0.5 / 0.5)."""

    def __init__(self, *, mean: Sequence[float], std: Sequence[float], **kwargs) -> None:
        super().__init__(value="random", **kwargs)
        self.mean, self.std = tuple(mean), tuple(std)
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)

    def transform(self, inpt, params: dict):
        if params["v"] is None:
            return inpt
        pixels = (params["v"] * self._std + self._mean).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
        return self._call_kernel(TF.erase, inpt, **{**params, "v": pixels}, inplace=self.inplace)
