"""Input transforms: deterministic ones, applied once to the stored inputs, and
random augmentations, applied to each training batch.

A transform is written as a string in ``scenario.train_transform`` /
``scenario.eval_transform``, e.g. ``["normalize", "random_crop:4", "hflip"]``.

*Deterministic* transforms (``resize``, ``center_crop``, ``rgb``, ``grayscale``,
``normalize``) and the domain shifts of domain-incremental streams
(:class:`Permute`, :class:`Rotate`) are :class:`Op` objects: they map a batch
``[B, ...]`` to a batch and give every sample the same result whether it is
transformed alone or in a batch, so in-memory data (transformed once, as a
whole) and DataLoader data (transformed sample by sample in the workers) hold
the same values. *Random* transforms (``random_crop``, ``hflip``) are
:class:`RandomOp` objects: they run on each training batch, on the batch's
device, with parameters drawn from the run's CPU generator, after the sample
order is drawn, so both storage paths draw the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from contlearn.scenarios.stream import host_to_device
from torch.nn import functional as F

from contlearn.errors import ConfigError, DataError, choices


class Op:
    """A deterministic transform of a batch ``[B, ...] -> [B, ...]``."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of one transformed sample, given one input sample's shape."""
        return shape

    def apply_one(self, x: torch.Tensor) -> torch.Tensor:
        """Transform one sample (no batch dimension)."""
        return self(x.unsqueeze(0))[0]


def _image(x: torch.Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ConfigError(f"transform '{name}' needs image inputs [C, H, W], got samples of shape {tuple(x.shape[1:])}")


class TransformWarning(UserWarning):
    """Training and test inputs transformed in ways that do not match."""


class Normalize(Op):
    """``(x - mean) / std`` per channel (images) or per feature (vectors). Without
    explicit values, :func:`fit_ops` sets them from the training data."""

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32)

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Set mean and (population) std from batches of training inputs, summed
        in float64; a std below 1e-6 (a constant feature) becomes 1."""
        total = total_sq = None
        count = 0
        for x in batches:
            x64 = x.double().transpose(0, 1).reshape(x.shape[1], -1) if x.dim() > 1 else x.double()[None]
            s, sq = x64.sum(dim=1).cpu(), (x64 * x64).sum(dim=1).cpu()
            total = s if total is None else total + s
            total_sq = sq if total_sq is None else total_sq + sq
            count += x64.shape[1]
        if total is None or total_sq is None or count == 0:
            raise ConfigError("transform 'normalize' cannot be fitted on empty training data")
        mean = total / count
        std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
        bad = (~torch.isfinite(mean) | ~torch.isfinite(std)).nonzero().flatten().tolist()
        if bad:
            raise DataError(
                f"transform 'normalize': the training inputs hold non-finite values (NaN or inf) in "
                f"channel(s) {bad[:8]}"
            )
        self.mean = mean.float()
        # a feature constant in training keeps its scale (as scikit-learn's StandardScaler):
        # dividing by ~0 would blow up any other value it takes at test time
        self.std = torch.where(std < 1e-6, torch.ones_like(std), std).float()

    def _shaped(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if t.numel() not in (1, x.shape[1]):
            raise ConfigError(
                f"normalize has {t.numel()} values but the inputs have {x.shape[1]} channels"
            )
        return t.view(1, -1, *([1] * (x.dim() - 2))).to(x.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None or self.std is None:
            raise RuntimeError("Normalize used before it was fitted")
        return (x - self._shaped(self.mean, x)) / self._shaped(self.std, x)

    def __repr__(self) -> str:
        if self.mean is None or self.std is None:
            return "Normalize(unfitted)"
        return f"Normalize(mean={[round(v, 4) for v in self.mean.tolist()]}, std={[round(v, 4) for v in self.std.tolist()]})"


class Resize(Op):
    """Bilinear resize to ``size`` (``(H, W)``), antialiased when shrinking."""

    def __init__(self, size: tuple[int, int]):
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _image(x, "resize")
        if tuple(x.shape[-2:]) == self.size:
            return x
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)

    def out_shape(self, shape):
        return (shape[0], *self.size)


class CenterCrop(Op):
    """The central ``size`` (``(H, W)``) window."""

    def __init__(self, size: tuple[int, int]):
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _image(x, "center_crop")
        h, w = x.shape[-2:]
        th, tw = self.size
        if th > h or tw > w:
            raise ConfigError(f"center_crop:{th},{tw} is larger than the {h}x{w} inputs")
        top, left = (h - th) // 2, (w - tw) // 2
        return x[..., top : top + th, left : left + tw].contiguous()

    def out_shape(self, shape):
        return (shape[0], *self.size)


class ToRGB(Op):
    """Repeat a single grey channel three times (for backbones made for RGB)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _image(x, "rgb")
        return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x

    def out_shape(self, shape):
        return (3, *shape[1:]) if shape[0] == 1 else shape


class ToGray(Op):
    """ITU-R 601-2 luma of RGB inputs (the weights torchvision uses)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _image(x, "grayscale")
        if x.shape[1] == 1:
            return x
        return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).contiguous()

    def out_shape(self, shape):
        return (1, *shape[1:])


class Permute(Op):
    """A fixed permutation of each sample's values (pixels x channels), as in
    Permuted MNIST (Goodfellow et al., 2013; Kirkpatrick et al., 2017)."""

    def __init__(self, permutation: torch.Tensor):
        self.permutation = permutation.long()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.permutation.numel():
            raise ConfigError(f"a permutation of {self.permutation.numel()} values cannot permute samples of shape {tuple(x.shape[1:])}")
        return flat[:, self.permutation.to(x.device)].reshape(x.shape)

    def __repr__(self) -> str:
        return f"Permute(n={self.permutation.numel()}, head={self.permutation[:4].tolist()})"


class Rotate(Op):
    """Rotation of images by a fixed angle (degrees, counter-clockwise) about
    their centre, bilinear, zero outside the image, as in Rotated MNIST
    (Lopez-Paz & Ranzato, GEM, 2017)."""

    def __init__(self, degrees: float):
        self.degrees = float(degrees)
        self._grids: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def _grid(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        key = (h, w, device)
        if key not in self._grids:
            a = math.radians(self.degrees)
            # affine_grid's coordinates run over [-1, 1] on both axes: scale by the
            # aspect ratio so that a non-square image turns rigidly
            theta = torch.tensor([[math.cos(a), -math.sin(a) * h / w, 0.0], [math.sin(a) * w / h, math.cos(a), 0.0]],
                                 dtype=torch.float32)  # fmt: skip
            self._grids[key] = F.affine_grid(theta[None], [1, 1, h, w], align_corners=False).to(device)
        return self._grids[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _image(x, "rotate")
        if self.degrees % 360 == 0:
            return x
        grid = self._grid(x.shape[2], x.shape[3], x.device).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def __getstate__(self):
        return {"degrees": self.degrees, "_grids": {}}

    def __repr__(self) -> str:
        return f"Rotate({self.degrees:g})"


class RandomOp:
    """A random transform of a training batch; parameters come from ``generator``."""

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError


class RandomCrop(RandomOp):
    """Zero-pad by ``padding`` on each side, then crop back to the input size at
    a random offset per sample (the CIFAR augmentation of He et al., 2016).
    The padding is zero in the space of the stored inputs, i.e. after
    ``normalize`` it is the mean colour rather than black."""

    def __init__(self, padding: int):
        self.padding = int(padding)

    def __call__(self, x, generator):
        _image(x, "random_crop")
        p = self.padding
        b, _, h, w = x.shape
        offsets = host_to_device(torch.randint(0, 2 * p + 1, (b, 2), generator=generator), x.device)
        padded = F.pad(x, (p, p, p, p))
        rows = (offsets[:, 0:1] + torch.arange(h, device=x.device))[:, :, None]
        cols = (offsets[:, 1:2] + torch.arange(w, device=x.device))[:, None, :]
        index = torch.arange(b, device=x.device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[index, rows, cols].permute(0, 3, 1, 2).contiguous()


class HFlip(RandomOp):
    """Mirror each image left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        if not 0 <= p <= 1:
            raise ConfigError(f"hflip needs a probability in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, x, generator):
        _image(x, "hflip")
        flip = host_to_device(torch.rand(x.shape[0], generator=generator) < self.p, x.device)
        return torch.where(flip[:, None, None, None], x.flip(3), x)


class Augment:
    """Random transforms applied in order to each training batch."""

    def __init__(self, ops: Sequence[RandomOp]):
        self.ops = list(ops)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for op in self.ops:
            x = op(x, generator)
        return x

    def __repr__(self) -> str:
        return f"Augment({self.ops})"


class Compose(Op):
    """Deterministic ops applied in order."""

    def __init__(self, ops: Sequence[Op]):
        self.ops = list(ops)

    def __call__(self, x):
        for op in self.ops:
            x = op(x)
        return x

    def out_shape(self, shape):
        for op in self.ops:
            shape = op.out_shape(shape)
        return shape

    def __repr__(self) -> str:
        return f"Compose({self.ops})"


# ---------------------------------------------------------------- parsing


def _ints(arg: str, spec: str, n: tuple[int, ...] = (1, 2)) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in arg.split(","))
    except ValueError:
        values = ()
    if len(values) not in n or min(values, default=0) < 0:
        raise ConfigError(f"transform '{spec}' needs {' or '.join(map(str, n))} non-negative integers after ':'")
    return values


def _size(arg: str, spec: str) -> tuple[int, int]:
    values = _ints(arg, spec)
    if min(values) < 1:
        raise ConfigError(f"transform '{spec}' needs sizes of at least 1")
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _normalize(arg: str, spec: str) -> Normalize:
    if not arg:
        return Normalize()
    try:
        mean, std = (tuple(float(v) for v in part.split(",")) for part in arg.split("/"))
    except ValueError:
        raise ConfigError(f"transform '{spec}' must be 'normalize' or 'normalize:M1,M2,../S1,S2,..'") from None
    if len(mean) != len(std) or not min(std) > 0:
        raise ConfigError(f"transform '{spec}': give as many positive stds as means")
    limit = torch.finfo(torch.float32)
    if not all(abs(v) <= limit.max for v in mean) or not all(limit.tiny <= v <= limit.max for v in std):
        raise ConfigError(f"transform '{spec}': means and stds must be finite numbers in float32, "
                          f"stds at least {limit.tiny:.3g}")
    return Normalize(mean, std)


#: Deterministic transforms by name: parser(argument, spec) -> Op.
DETERMINISTIC = {
    "normalize": _normalize,
    "resize": lambda arg, spec: Resize(_size(arg, spec)),
    "center_crop": lambda arg, spec: CenterCrop(_size(arg, spec)),
    "rgb": lambda arg, spec: ToRGB(),
    "grayscale": lambda arg, spec: ToGray(),
}

#: Random (per-batch) transforms by name: parser(argument, spec) -> RandomOp.
RANDOM = {
    "random_crop": lambda arg, spec: RandomCrop(_ints(arg or "4", spec, (1,))[0]),
    "hflip": lambda arg, spec: HFlip(float(arg) if arg else 0.5),
}


def parse_transforms(specs: Sequence[str], key: str) -> tuple[list[Op], Augment | None]:
    """Split a list of transform strings into deterministic ops and an
    :class:`Augment` of the random ones (which must come last)."""
    ops: list[Op] = []
    random_ops: list[RandomOp] = []
    for spec in specs:
        name, _, arg = str(spec).partition(":")
        name = name.strip()
        if name in DETERMINISTIC:
            if random_ops:
                raise ConfigError(
                    f"{key}: '{spec}' follows a random transform; list deterministic transforms "
                    f"({', '.join(DETERMINISTIC)}) before random ones ({', '.join(RANDOM)})"
                )
            ops.append(DETERMINISTIC[name](arg.strip(), spec))
        elif name in RANDOM:
            try:
                random_ops.append(RANDOM[name](arg.strip(), spec))
            except ValueError:
                raise ConfigError(f"{key}: cannot read the argument of '{spec}'") from None
        else:
            raise ConfigError(f"{key}: unknown transform '{spec}'; valid: {choices([*DETERMINISTIC, *RANDOM])}")
    return ops, (Augment(random_ops) if random_ops else None)
