"""Data sources: where the samples of a stream come from.

A source returns a :class:`Split`: training and test :class:`Samples`, i.e.
labels known up front and inputs decoded on access (one sample, or all at once
for in-memory storage). Sources that ship no test set are split, stratified by
class, with the experiment's seed.

Sources by ``scenario.source``: ``digits`` (bundled with scikit-learn, the
default), ``npz`` (a file), ``mnist``, ``fashion_mnist``, ``cifar10``,
``cifar100``, ``svhn`` (torchvision, from ``scenario.root``) and ``folder``
(one sub-folder of images per class).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from contlearn.errors import ConfigError, DataError, choices

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class Samples(Dataset):
    """Inputs and labels of one data set. ``targets`` are int64 labels [N];
    ``samples[i]`` is input ``i`` as a float32 tensor; :meth:`load` gives them
    all as one tensor."""

    targets: torch.Tensor

    def __len__(self) -> int:
        return self.targets.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def load(self, num_workers: int = 0) -> torch.Tensor:
        """Every input, stacked; subclasses that hold arrays do it in one step."""
        loader = DataLoader(self, batch_size=256, num_workers=num_workers, collate_fn=torch.stack,
                            generator=torch.Generator())
        try:
            return torch.cat(list(loader)) if len(self) else torch.empty(0)
        except (DataError, RuntimeError) as exc:
            from contlearn.scenarios.loader import loading_error  # loader builds on this module

            raise loading_error(exc) from None

    def subset(self, index: torch.Tensor) -> Samples:
        raise NotImplementedError

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self[0].shape) if len(self) else ()


class ArraySamples(Samples):
    """Samples held in an array: ``x`` [N, ...] of any dtype, converted to
    float32 on access and divided by ``divisor`` (255 for 8-bit images, as
    torchvision's ``ToTensor`` does)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, divisor: float | None = None):
        if x.shape[0] != y.shape[0]:
            raise DataError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        self.x = x
        self.targets = y.long()
        self.divisor = divisor

    def _convert(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        return x.div(self.divisor) if self.divisor is not None else x

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._convert(self.x[i])

    def load(self, num_workers: int = 0) -> torch.Tensor:
        x = self._convert(self.x)
        # canonical strides: a size-1 channel axis with another stride makes
        # convolutions take a channels-last path, whose float sums differ from
        # those of batches stacked by a DataLoader
        return x if x.stride() == _strides(x.shape) else x.clone(memory_format=torch.contiguous_format)

    def subset(self, index: torch.Tensor) -> ArraySamples:
        return ArraySamples(self.x[index], self.targets[index], self.divisor)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


class ImageFileSamples(Samples):
    """Image files decoded with Pillow to RGB in [0, 1], resized to
    ``image_size`` when given."""

    def __init__(self, paths: Sequence[Path], y: torch.Tensor, image_size: int | None = None):
        self.paths = list(paths)
        self.targets = y.long()
        self.image_size = image_size

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as file:
                img = file.convert("RGB")
                if self.image_size is not None and img.size != (self.image_size, self.image_size):
                    img = img.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
                array = np.asarray(img, dtype=np.uint8).copy()
        except OSError as exc:
            raise DataError(f"cannot read image '{self.paths[i]}': {exc}") from None
        return torch.from_numpy(array).permute(2, 0, 1).to(torch.float32).div(255)

    def subset(self, index: torch.Tensor) -> ImageFileSamples:
        return ImageFileSamples([self.paths[int(i)] for i in index], self.targets[index], self.image_size)


@dataclass
class Split:
    """Training and test data of one data set: :class:`Samples` as a source
    gives them, or (after :func:`contlearn.scenarios.build.store`) stored data.

    :ivar class_names: the name of each label id, if the source has names.
    """

    train: Any
    test: Any
    name: str = ""
    class_names: list[str] | None = None

    @property
    def y_train(self) -> torch.Tensor:
        return _labels(self.train)

    @property
    def y_test(self) -> torch.Tensor:
        return _labels(self.test)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.train.sample_shape if isinstance(self.train, Samples) else self.train.input_shape

    @staticmethod
    def from_arrays(
        x_train: Any, y_train: Any, x_test: Any = None, y_test: Any = None, *,
        name: str = "tensors", test_fraction: float = 0.2, seed: int = 0,
    ) -> Split:
        """A split from arrays or tensors; without a test set, a stratified split
        of the training arrays with ``seed``. 8-bit inputs are divided by 255."""
        if (x_test is None) != (y_test is None):
            raise DataError("give both x_test and y_test, or neither")
        if y_test is not None and _are_names(y_train) != _are_names(y_test):
            kinds = ("names", "integers") if _are_names(y_train) else ("integers", "names")
            raise DataError(f"{name}: y_train holds {kinds[0]} but y_test holds {kinds[1]}; give both the same kind")
        x_train, y_train, names = _inputs(x_train, name, "train"), *_labels_of(y_train, None)
        if x_train.shape[0] != y_train.shape[0]:
            raise DataError(f"{name}: x has {x_train.shape[0]} samples but y has {y_train.shape[0]}")
        if x_test is None:
            x_train, y_train, x_test, y_test = stratified_split(x_train, y_train, test_fraction, seed)
        else:
            x_test, (y_test, names) = _inputs(x_test, name, "test"), _labels_of(y_test, names)
        for what, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
            if x.shape[0] != y.shape[0]:
                raise DataError(f"{name}: x_{what} has {x.shape[0]} samples but y_{what} has {y.shape[0]}")
        if (x_train.dtype == torch.uint8) != (x_test.dtype == torch.uint8):
            raise DataError(
                f"{name}: x_train is {x_train.dtype} but x_test is {x_test.dtype}; 8-bit inputs are divided by 255, "
                f"so give both as uint8 or both as floats on the same scale"
            )
        divisor = 255.0 if x_train.dtype == torch.uint8 else None
        return Split(ArraySamples(x_train, y_train, divisor), ArraySamples(x_test, y_test, divisor), name, names)


def _strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _labels(data: Any) -> torch.Tensor:
    return data.targets if isinstance(data, Samples) else data.y


def _as_tensor(x: Any) -> torch.Tensor:
    x = torch.as_tensor(np.ascontiguousarray(x)) if not isinstance(x, torch.Tensor) else x
    if not (x.dtype.is_floating_point or x.dtype == torch.uint8):
        x = x.to(torch.float32)
    return x


def _inputs(x: Any, name: str, what: str) -> torch.Tensor:
    x = _as_tensor(x)
    if x.dim() < 2:
        raise DataError(
            f"{name}: x_{what} has shape {tuple(x.shape)}; inputs are [samples, features...] "
            f"(one feature per sample: x[:, None])"
        )
    if x.is_floating_point():
        bad = int((~torch.isfinite(x.to(torch.float32))).sum())  # as the samples are read: float32
        if bad:
            raise DataError(f"{name}: x_{what} holds {bad} values that are not finite in float32 "
                            f"(NaN, inf, or beyond ±{torch.finfo(torch.float32).max:.3g})")
    return x


def _are_names(y: Any) -> bool:
    """Whether labels are names (strings), not numbers."""
    if isinstance(y, torch.Tensor):
        return False
    kind = np.asarray(y).dtype
    return not (np.issubdtype(kind, np.number) or np.issubdtype(kind, np.bool_))


def _labels_of(y: Any, names: list[str] | None) -> tuple[torch.Tensor, list[str] | None]:
    """Integer labels as int64; other labels (strings) as ids into sorted names.
    One label per sample: ``[N]`` (or ``[N, 1]``)."""
    shape = tuple(y.shape) if hasattr(y, "shape") else np.shape(y)
    if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
        raise DataError(
            f"labels y have shape {shape}: a label is one class per sample, y of shape (N,) "
            f"(for one-hot or soft targets, give their argmax)"
        )
    if isinstance(y, torch.Tensor):
        if y.is_floating_point() and not bool((y == y.round()).all()):
            raise DataError("labels y must be integers or names, got fractional numbers")
        return y.long().reshape(-1), names
    array = np.asarray(y).reshape(-1)
    if np.issubdtype(array.dtype, np.integer):
        return torch.as_tensor(array.astype(np.int64)), names
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(array == np.round(array)):
            raise DataError("labels y must be integers or names, got fractional numbers")
        return torch.as_tensor(array.astype(np.int64)), names
    values = [str(v) for v in array]
    names = names if names is not None else sorted(set(values))
    lookup = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(values) - set(lookup))
    if unknown:
        raise DataError(f"test labels {unknown[:5]} do not occur in the training labels")
    return torch.tensor([lookup[v] for v in values], dtype=torch.long), names


def stratified_split(x: Any, y: Any, test_fraction: float, seed: int) -> tuple[Any, Any, Any, Any]:
    """Split ``(x, y)`` into ``(x_train, y_train, x_test, y_test)`` with each
    class in the same proportion in both (scikit-learn, ``random_state=seed``)."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(y))
    try:
        train, test = train_test_split(index, test_size=test_fraction, stratify=np.asarray(y), random_state=seed)
    except ValueError as exc:
        raise DataError(f"cannot split the data into train and test: {exc}") from None
    return x[train], y[train], x[test], y[test]


# ---------------------------------------------------------------- the sources


def digits(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """scikit-learn's bundled handwritten digits: 1,797 8x8 grey images of the
    digits 0-9, shipped with scikit-learn (never downloaded). Inputs are
    [N, 1, 8, 8] in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = data.target.astype(np.int64)
    try:
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    except ValueError as exc:
        raise DataError(f"cannot split digits into train and test: {exc}") from None
    return Split(
        ArraySamples(torch.from_numpy(x_tr), torch.from_numpy(y_tr)),
        ArraySamples(torch.from_numpy(x_te), torch.from_numpy(y_te)),
        "digits",
        [str(d) for d in range(10)],
    )


def _images_layout(x: np.ndarray) -> np.ndarray:
    """[N, H, W] -> [N, 1, H, W]; channels-last [N, H, W, C<=4] -> [N, C, H, W]."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x


def npz(path: str | None, test_fraction: float = 0.2, seed: int = 0) -> Split:
    """Arrays ``x`` (N x ...) and ``y`` (N), and optionally ``x_test`` and
    ``y_test``, from a ``.npz`` file. Without a test split, a stratified split
    by ``seed``. [N, H, W] inputs get a channel axis, channels-last images are
    made channels-first, uint8 inputs are divided by 255; labels may be
    integers or names."""
    if path is None:
        raise ConfigError("scenario.source=npz needs scenario.path=FILE (a .npz with arrays x and y)")
    file = Path(path).expanduser()
    if not file.is_file():
        what = "is a directory, not a .npz file" if file.is_dir() else "does not exist"
        raise DataError(f"npz file '{file}' {what} (scenario.path)")
    try:
        _check_npz_magic(file)
        with np.load(file, allow_pickle=False) as arrays:
            data = {k: arrays[k] for k in arrays.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read npz file '{file}': {exc}") from None
    missing = [k for k in ("x", "y") if k not in data]
    if missing:
        raise DataError(f"npz file '{file}' lacks array(s) {missing}; it has {sorted(data)} (need x, y and optionally x_test, y_test)")
    x_test = data.get("x_test")
    return Split.from_arrays(
        _images_layout(data["x"]), data["y"],
        None if x_test is None else _images_layout(x_test), data.get("y_test"),
        name=file.stem, test_fraction=test_fraction, seed=seed,
    )


def _check_npz_magic(file: Path) -> None:
    """Refuse a file that is not a zip archive before numpy reads it: numpy would
    take it for a pickle and say so, which misleads."""
    with file.open("rb") as f:
        head = f.read(6)
    if head.startswith(b"PK"):
        return
    if head == b"\x93NUMPY":
        raise DataError(
            f"'{file}' is a single .npy array, not a .npz archive; "
            f"save the data with numpy.savez(path, x=..., y=...) (scenario.path)"
        )
    raise DataError(
        f"'{file}' is not a .npz archive (numpy.savez writes a zip of arrays x and y, "
        f"optionally x_test and y_test) (scenario.path)"
    )


#: torchvision data sets: source name -> (class name in torchvision.datasets, folder it makes under root).
TORCHVISION = {
    "mnist": ("MNIST", "MNIST"),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", "cifar-100-python"),
    "svhn": ("SVHN", "{split}_32x32.mat"),
}


def default_root() -> str:
    """Where torchvision data sets are looked for when ``scenario.root`` is unset:
    ``$CONTLEARN_DATA``, else ``./data``."""
    return os.environ.get("CONTLEARN_DATA", "data")


def _torchvision_set(name: str, root: Path, train: bool, download: bool) -> Any:
    import torchvision.datasets as tvd

    cls_name, folder = TORCHVISION[name]
    cls = getattr(tvd, cls_name)
    kwargs = {"split": "train" if train else "test"} if name == "svhn" else {"train": train}
    try:
        return cls(str(root), download=download, **kwargs)
    except RuntimeError as exc:
        if "not found" in str(exc).lower() or "corrupted" in str(exc).lower():
            where = root / folder.format(split=kwargs.get("split"))
            if where.exists():
                raise DataError(
                    f"{cls_name} under '{root}' is incomplete or corrupted: '{where}' exists but failed "
                    f"torchvision's integrity check; delete it and set scenario.download=true to download it again"
                ) from None
            raise DataError(
                f"{cls_name} was not found under '{root}' (looked for {root / folder.format(split=kwargs.get('split'))}); "
                f"set scenario.download=true to download it there, or scenario.root=DIR to a folder that holds it"
            ) from None
        raise DataError(f"cannot load {cls_name} from '{root}': {exc}") from None
    except OSError as exc:  # download failures (no network)
        reason = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())  # torchvision's tries, one per line
        raise DataError(f"cannot download {cls_name} into '{root}': {reason}") from None


def torchvision_source(name: str, root: str | None, download: bool = False) -> Split:
    """MNIST, FashionMNIST, CIFAR-10, CIFAR-100 or SVHN from a local ``root``
    through torchvision (downloaded there only with ``download``). Inputs are
    8-bit images kept as uint8 [N, C, H, W] and divided by 255 when read."""
    path = Path(root if root is not None else default_root()).expanduser()
    parts = []
    names: list[str] | None = None
    for train in (True, False):
        ds = _torchvision_set(name, path, train, download)
        data = ds.data
        x = torch.as_tensor(data) if not isinstance(data, torch.Tensor) else data
        if x.dim() == 3:
            x = x[:, None]
        elif x.dim() == 4 and x.shape[-1] in (1, 3):
            x = x.permute(0, 3, 1, 2)
        y = torch.as_tensor(np.asarray(ds.labels if name == "svhn" else ds.targets), dtype=torch.long)
        parts.append(ArraySamples(x.contiguous(), y, divisor=255.0))
        if name == "svhn":
            names = [str(d) for d in range(10)]
        else:
            names = [str(c) for c in getattr(ds, "classes", [])] or None
    return Split(parts[0], parts[1], name, names)


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_of(folder: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for label, name in enumerate(classes):
        sub = folder / name
        if not sub.is_dir():
            continue
        files = sorted(p for p in sub.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    return paths, labels


def folder(path: str | None, image_size: int | None = None, test_fraction: float = 0.2, seed: int = 0) -> Split:
    """Images in one sub-folder per class (``path/<class>/*.png``), decoded to
    RGB. If ``path`` has ``train/`` and ``test/`` sub-folders, those are the
    splits; otherwise a stratified split by ``seed``."""
    if path is None:
        raise ConfigError("scenario.source=folder needs scenario.path=DIR (one sub-folder of images per class)")
    root = Path(path).expanduser()
    if not root.is_dir():
        what = "is a file, not a folder of class sub-folders" if root.exists() else "does not exist"
        raise DataError(f"image folder '{root}' {what} (scenario.path)")
    split_dirs = (root / "train").is_dir() and (root / "test").is_dir()
    classes = [p.name for p in _class_folders(root / "train" if split_dirs else root)]
    if not classes:
        raise DataError(f"image folder '{root}' has no class sub-folders (expected {root}/<class>/<image>)")
    if split_dirs:
        extra = sorted(p.name for p in _class_folders(root / "test")
                       if p.name not in classes and _images_of(root / "test", [p.name])[0])
        if extra:
            raise DataError(
                f"the test set of image folder '{root}' has classes that the training set lacks: "
                f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''} (no {root}/train/<class> folder)"
            )
        train_paths, train_y = _images_of(root / "train", classes)
        test_paths, test_y = _images_of(root / "test", classes)
    else:
        paths, labels = _images_of(root, classes)
        index = np.arange(len(paths))
        if not len(index):
            raise DataError(f"image folder '{root}' has no images ({', '.join(IMAGE_SUFFIXES)})")
        tr, ytr, te, yte = stratified_split(index, np.asarray(labels), test_fraction, seed)
        train_paths, train_y = [paths[i] for i in tr], list(ytr)
        test_paths, test_y = [paths[i] for i in te], list(yte)
    if not train_paths:
        raise DataError(f"image folder '{root}' has no training images ({', '.join(IMAGE_SUFFIXES)})")
    return Split(
        ImageFileSamples(train_paths, torch.tensor(train_y, dtype=torch.long), image_size),
        ImageFileSamples(test_paths, torch.tensor(test_y, dtype=torch.long), image_size),
        root.name,
        classes,
    )


SourceFn = Callable[[Any, int], Split]


def _torchvision(name: str) -> SourceFn:
    return lambda cfg, seed: torchvision_source(name, cfg.root, cfg.download)


#: Data sources by name: ``scenario.source`` -> loader(scenario_cfg, seed) -> Split.
#: Add an entry to make a data set of your own available to configs.
SOURCES: dict[str, SourceFn] = {
    "digits": lambda cfg, seed: digits(cfg.test_fraction, seed),
    "npz": lambda cfg, seed: npz(cfg.path, cfg.test_fraction, seed),
    "folder": lambda cfg, seed: folder(cfg.path, getattr(cfg, "image_size", None), cfg.test_fraction, seed),
    **{name: _torchvision(name) for name in TORCHVISION},
}

#: The sources contlearn ships (a config's checks know what these read).
BUILTIN_SOURCES = frozenset(SOURCES)


def load_source(name: str, cfg: Any, seed: int) -> Split:
    """The split the source ``name`` gives for a scenario config. ``name`` may
    carry a path: ``npz:FILE`` or ``folder:DIR`` (for ``scenario.domains``)."""
    source, sep, arg = name.partition(":")
    if source not in SOURCES:
        raise ConfigError(f"unknown data source '{name}'; valid sources: {choices(SOURCES)}")
    if sep:
        from omegaconf import OmegaConf

        cfg = OmegaConf.merge(cfg, {"path": arg})
    return SOURCES[source](cfg, seed)
