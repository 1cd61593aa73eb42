"""Random augmentations of image batches, for the two views of contrastive strategies (PRD).

Every op works on a whole batch ``[B, C, H, W]`` on its device, with its random
parameters drawn from a CPU generator (so a run draws the same numbers on every
device), and gives each sample its own draw. Written as strings, like
``scenario.train_transform``:

- ``random_crop:P`` -- zero-pad by ``P`` and crop back at a random offset
  (:class:`contlearn.scenarios.transforms.RandomCrop`);
- ``random_resized_crop:S`` -- a random window of ``S`` to 1 times the image's
  area, aspect ratio 3/4 to 4/3, resized back bilinearly (SupCon's augmentation,
  Khosla et al., NeurIPS 2020);
- ``hflip[:p]`` -- mirror left-right with probability ``p`` (default 0.5);
- ``color_jitter:B,C,S[,p]`` -- with probability ``p`` (default 1), scale
  brightness by a factor drawn from ``[1-B, 1+B]``, contrast by one from
  ``[1-C, 1+C]`` and saturation (RGB only) by one from ``[1-S, 1+S]``;
- ``grayscale[:p]`` -- with probability ``p`` (default 0.2), replace an RGB image
  by its luma in all three channels (no-op on grey images).

``color_jitter`` applies brightness, contrast and saturation in this fixed order
(torchvision and kornia shuffle it) and does not clip, since the stored inputs
may be normalised.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from contlearn.scenarios.stream import host_to_device
from contlearn.scenarios.transforms import HFlip, RandomCrop, RandomOp
from torch.nn import functional as F

from contlearn.errors import ConfigError, choices

_LUMA = (0.299, 0.587, 0.114)


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


@functools.cache
def _luma_weights(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The luma weights as a ``[1, 3, 1, 1]`` tensor, copied to a device once."""
    return host_to_device(torch.tensor(_LUMA, dtype=dtype).view(1, 3, 1, 1), device)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """``[B, 1, H, W]`` grey level of ``[B, C, H, W]`` images (the image itself when ``C == 1``)."""
    if x.shape[1] != 3:
        return x.mean(dim=1, keepdim=True)
    return (x * _luma_weights(x.device, x.dtype)).sum(dim=1, keepdim=True)


class RandomResizedCrop(RandomOp):
    """A random window covering ``scale`` to 1 of the area (aspect ratio in
    ``ratio``), resized back to the input size (bilinear, through one
    ``affine_grid``/``grid_sample`` for the whole batch)."""

    def __init__(self, min_scale: float = 0.2, ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        if not 0 < min_scale <= 1:
            raise ConfigError(f"random_resized_crop needs a scale in (0, 1], got {min_scale}")
        self.min_scale = float(min_scale)
        self.ratio = ratio

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        b = x.shape[0]
        area = _uniform(b, self.min_scale, 1.0, generator)
        log_ratio = _uniform(b, math.log(self.ratio[0]), math.log(self.ratio[1]), generator)
        aspect = log_ratio.exp()
        w = (area * aspect).sqrt().clamp(max=1.0)  # window width / image width
        h = (area / aspect).sqrt().clamp(max=1.0)
        cx = (2 * torch.rand(b, generator=generator) - 1) * (1 - w)  # centre, in [-1, 1] coordinates
        cy = (2 * torch.rand(b, generator=generator) - 1) * (1 - h)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
        grid = F.affine_grid(host_to_device(theta, x.device).to(x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def __repr__(self) -> str:
        return f"RandomResizedCrop({self.min_scale:g})"


class ColorJitter(RandomOp):
    """Random brightness, contrast and saturation factors, applied with probability ``p``."""

    def __init__(self, brightness: float, contrast: float, saturation: float, p: float = 1.0):
        if min(brightness, contrast, saturation) < 0 or not 0 <= p <= 1:
            raise ConfigError("color_jitter needs non-negative strengths and a probability in [0, 1]")
        self.brightness, self.contrast, self.saturation, self.p = brightness, contrast, saturation, p

    def _factor(self, strength: float, b: int, generator: torch.Generator | None) -> torch.Tensor:
        return _uniform(b, max(0.0, 1 - strength), 1 + strength, generator)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        b = x.shape[0]
        apply = torch.rand(b, generator=generator) < self.p
        one = torch.ones(b)
        fb = torch.where(apply, self._factor(self.brightness, b, generator), one)
        fc = torch.where(apply, self._factor(self.contrast, b, generator), one)
        fs = torch.where(apply, self._factor(self.saturation, b, generator), one)
        fb, fc, fs = (host_to_device(f, x.device).to(x.dtype).view(b, 1, 1, 1) for f in (fb, fc, fs))
        x = x * fb
        mean = _luma(x).mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * fc + mean
        if x.shape[1] == 3:
            grey = _luma(x)
            x = (x - grey) * fs + grey
        return x

    def __repr__(self) -> str:
        return f"ColorJitter({self.brightness:g}, {self.contrast:g}, {self.saturation:g}, p={self.p:g})"


class RandomGrayscale(RandomOp):
    """RGB images replaced by their luma (in all three channels) with probability ``p``."""

    def __init__(self, p: float = 0.2):
        if not 0 <= p <= 1:
            raise ConfigError(f"grayscale needs a probability in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        grey = host_to_device(torch.rand(x.shape[0], generator=generator) < self.p, x.device)
        if x.shape[1] != 3:
            return x
        return torch.where(grey[:, None, None, None], _luma(x).expand_as(x), x)

    def __repr__(self) -> str:
        return f"RandomGrayscale({self.p:g})"


def _floats(arg: str, spec: str, n: tuple[int, ...]) -> list[float]:
    try:
        values = [float(v) for v in arg.split(",")] if arg else []
    except ValueError:
        values = []
    if len(values) not in n:
        raise ConfigError(f"view augmentation '{spec}' needs {' or '.join(map(str, n))} numbers after ':'")
    return values


def _crop(arg: str, spec: str) -> RandomOp:
    values = _floats(arg or "4", spec, (1,))
    if values[0] < 0 or values[0] != int(values[0]):
        raise ConfigError(f"view augmentation '{spec}' needs a non-negative integer padding")
    return RandomCrop(int(values[0]))


#: Augmentations by name: parser(argument, spec) -> op.
AUGMENTATIONS = {
    "random_crop": _crop,
    "random_resized_crop": lambda arg, spec: RandomResizedCrop(_floats(arg or "0.2", spec, (1,))[0]),
    "hflip": lambda arg, spec: HFlip(*_floats(arg or "0.5", spec, (1,))),
    "color_jitter": lambda arg, spec: ColorJitter(*_floats(arg, spec, (3, 4))),
    "grayscale": lambda arg, spec: RandomGrayscale(*_floats(arg or "0.2", spec, (1,))),
}


class Views:
    """The augmentation that makes one view of a batch: ``ops`` in order."""

    def __init__(self, specs: Sequence[str], key: str = "views"):
        self.key = key
        self.ops: list[RandomOp] = []
        for spec in specs:
            name, _, arg = str(spec).partition(":")
            if name.strip() not in AUGMENTATIONS:
                raise ConfigError(f"{key}: unknown augmentation '{spec}'; valid: {choices(AUGMENTATIONS)}")
            self.ops.append(AUGMENTATIONS[name.strip()](arg.strip(), spec))

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if not self.ops:
            return x
        if x.dim() != 4:
            raise ConfigError(
                f"{self.key} augment images [C, H, W], but the inputs have shape {tuple(x.shape[1:])}; "
                f"set {self.key}=[] for other inputs"
            )
        for op in self.ops:
            x = op(x, generator)
        return x

    def __repr__(self) -> str:
        return f"Views({self.ops})"
