"""Data sources: npz files, image folders, torchvision roots (missing, and a
tiny MNIST written in its own format), and the shipped configs."""

from __future__ import annotations

import json
import math
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from contlearn.scenarios import build_stream, sources
from contlearn.scenarios.loader import LoaderData

from contlearn import Experiment, load_config
from contlearn.cli import main
from contlearn.config import shipped_configs
from contlearn.errors import ConfigError, DataError

QUICK = ["train.epochs=1", "eval.fwt=false"]


def digits_npz(path, flat: bool = True, test: bool = False):
    split = sources.digits(0.2, 0)
    x = split.train.x.numpy()
    arrays = {"x": x.reshape(len(x), -1) if flat else x, "y": split.train.targets.numpy()}
    if test:
        arrays |= {"x_test": split.test.x.numpy().reshape(len(split.test), -1), "y_test": split.test.targets.numpy()}
    np.savez(path, **arrays)
    return path


def test_cli_runs_split_digits_on_an_npz_file(tmp_path, capsys):
    file = digits_npz(tmp_path / "mine.npz")
    out = tmp_path / "run"
    rc = main(["run", "split-digits", "scenario.source=npz", f"scenario.path={file}", "train.epochs=5",
               "eval.fwt=false", f"out={out}"])
    assert rc == 0, capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    R = data["accuracy_matrix"]
    assert len(R) == 5 and all(R[i][i] > 0.8 for i in range(5))
    assert data["config"]["scenario"]["path"] == str(file)


def test_digits_are_grey_8x8_images_in_0_1():
    split = sources.digits(0.2, 0)
    x = torch.cat([split.train.x, split.test.x])
    assert x.shape == (1797, 1, 8, 8) and float(x.min()) == 0 and float(x.max()) == 1
    assert torch.equal(x * 16, (x * 16).round())  # scikit-learn's 4-bit values 0..16, over 16


@pytest.mark.parametrize("test_fraction", [0.2, 0.3])
def test_digits_test_split_is_test_fraction_of_each_class(test_fraction):
    split = sources.digits(test_fraction, 0)
    n_test = math.ceil(test_fraction * 1797)
    assert len(split.test) == n_test and len(split.train) == 1797 - n_test
    per_class = torch.bincount(torch.cat([split.train.targets, split.test.targets]))
    assert float((torch.bincount(split.test.targets) - test_fraction * per_class).abs().max()) <= 1


def test_digits_split_follows_the_seed():
    a, again, b = sources.digits(0.2, 0), sources.digits(0.2, 0), sources.digits(0.2, 1)
    assert torch.equal(a.test.x, again.test.x) and torch.equal(a.test.targets, again.test.targets)
    assert not torch.equal(a.test.x, b.test.x)


def test_a_split_without_a_test_set_is_stratified_and_follows_the_seed(tmp_path):
    y = np.repeat(np.arange(5), [50, 30, 10, 5, 5])
    x = np.arange(2 * len(y), dtype=np.float32).reshape(-1, 2)  # every row its own
    np.savez(tmp_path / "uneven.npz", x=x, y=y)
    tests = set()
    for seed in (0, 1, 2, 0):
        split = sources.npz(str(tmp_path / "uneven.npz"), 0.2, seed)
        assert torch.bincount(split.test.targets).tolist() == [10, 6, 2, 1, 1]  # a fifth of each class
        rows = torch.cat([split.train.x, split.test.x])[:, 0]
        assert sorted(rows.tolist()) == x[:, 0].tolist()  # every sample once
        assert torch.equal(split.test.targets, torch.as_tensor(y)[split.test.x[:, 0].long() // 2])
        tests.add(tuple(split.test.x[:, 0].tolist()))
    assert len(tests) == 3  # one split per seed

def test_npz_layouts_and_a_given_test_split(tmp_path):
    cfg = load_config("split-digits", ["scenario.source=npz", f"scenario.path={digits_npz(tmp_path / 'a.npz', test=True)}"])
    stream = build_stream(cfg.scenario, 0)
    assert stream.input_shape == (64,) and sum(len(e.test) for e in stream) == 360
    # uint8 channels-last images: made channels-first and divided by 255
    x = np.random.default_rng(0).integers(0, 256, size=(50, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "img.npz", x=x, y=np.arange(50) % 5)
    split = sources.npz(str(tmp_path / "img.npz"), 0.2, 0)
    assert split.input_shape == (3, 6, 6) and len(split.test) == 10
    loaded = split.train.load()
    assert loaded.dtype == torch.float32 and 0 <= float(loaded.min()) and float(loaded.max()) <= 1
    # [N, H, W] gets a channel axis
    np.savez(tmp_path / "hw.npz", x=x[..., 0], y=np.arange(50) % 5)
    assert sources.npz(str(tmp_path / "hw.npz"), 0.2, 0).input_shape == (1, 6, 6)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_npz_channels_last_images_become_channels_first(tmp_path, channels):
    x = np.random.default_rng(0).integers(0, 256, size=(20, 6, 5, channels), dtype=np.uint8)
    np.savez(tmp_path / "img.npz", x=x, y=np.arange(20) % 2, x_test=x[:4], y_test=np.arange(4) % 2)
    split = sources.npz(str(tmp_path / "img.npz"))
    assert split.input_shape == (channels, 6, 5)
    assert torch.equal(split.train.load(), torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)


def test_label_names_become_sorted_ids_shared_by_the_test_set(tmp_path):
    y, y_test = np.array(["dog", "cat", "eel"] * 10), np.array(["eel", "cat"] * 3)  # no dog in the test set
    x = np.zeros((30, 2), dtype=np.float32)
    np.savez(tmp_path / "named.npz", x=x, y=y, x_test=x[:6], y_test=y_test)
    split = sources.npz(str(tmp_path / "named.npz"))
    assert split.class_names == ["cat", "dog", "eel"]
    names = np.array(split.class_names)
    assert names[split.train.targets.numpy()].tolist() == y.tolist()
    assert names[split.test.targets.numpy()].tolist() == y_test.tolist()

@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"x": np.zeros((4, 2))}, r"lacks array\(s\) \['y'\]"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(3)}, "samples"),
        # one-hot labels were flattened: "x has 4 samples but y has 12"
        ({"x": np.zeros((4, 2)), "y": np.eye(3)[[0, 1, 2, 0]]}, r"labels y have shape \(4, 3\): .*give their argmax"),
    ],
)
def test_bad_npz_files(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=match):
        sources.npz(str(tmp_path / "bad.npz"))


def test_missing_npz_names_the_path_and_the_key(tmp_path):
    with pytest.raises(DataError, match="nothere.npz.*scenario.path"):
        sources.npz(str(tmp_path / "nothere.npz"))
    with pytest.raises(ConfigError, match="scenario.path=FILE"):
        build_stream(load_config("split-digits", ["scenario.source=npz"]).scenario, 0)


def test_a_file_that_is_not_an_npz_archive_is_named_as_such(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("x,y\n1,2\n")
    with pytest.raises(DataError, match=r"notes.npz' is not a .npz archive.*numpy.savez") as info:
        sources.npz(str(text))
    assert "pickle" not in str(info.value)
    single = tmp_path / "x.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(DataError, match=r"x.npy' is a single .npy array, not a .npz archive"):
        sources.npz(str(single))


def test_a_corrupt_torchvision_folder_is_not_called_missing(tmp_path):
    root = tmp_path / "data"
    (root / "cifar-10-batches-py").mkdir(parents=True)
    (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"truncated")
    cfg = load_config("split-digits", ["scenario.source=cifar10", f"scenario.root={root}"])
    with pytest.raises(DataError, match=r"incomplete or corrupted: '.*cifar-10-batches-py' exists") as info:
        build_stream(cfg.scenario, 0)
    assert "not found" not in str(info.value) and "scenario.download=true" in str(info.value)


@pytest.mark.parametrize("name", sorted(sources.TORCHVISION))
def test_missing_torchvision_root_is_one_clear_error(tmp_path, name):
    root = tmp_path / "empty"
    cfg = load_config("split-digits", [f"scenario.source={name}", f"scenario.root={root}"])
    with pytest.raises(DataError) as info:
        build_stream(cfg.scenario, 0)
    message = str(info.value)
    assert str(root) in message and "scenario.download=true" in message and "not found" in message


def write_fake_mnist(root, n_train: int = 120, n_test: int = 40, seed: int = 0):
    """A tiny MNIST in torchvision's raw format (idx files): each digit is a
    bright square at a digit-specific position, plus noise."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            r, col = 2 + (c // 5) * 12, 2 + (c % 5) * 5
            images[i, r : r + 8, col : col + 4] = 255
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    return root


def test_torchvision_mnist_from_a_local_root(tmp_path):
    root = write_fake_mnist(tmp_path / "data")
    split = sources.torchvision_source("mnist", str(root))
    assert len(split.train) == 120 and len(split.test) == 40 and split.input_shape == (1, 28, 28)
    assert split.train.x.dtype == torch.uint8 and split.class_names[0].startswith("0")
    results = Experiment(load_config("split-mnist", [f"scenario.root={root}", *QUICK])).run()
    assert len(results.accuracy_matrix) == 5 and results.accuracy_matrix[0][0] > 0.5
    perm = Experiment(load_config("permuted-mnist", [f"scenario.root={root}", "scenario.n_experiences=2",
                                                     "train.epochs=3", "eval.fwt=false"])).run()
    assert len(perm.accuracy_matrix) == 2 and perm.accuracy_matrix[1][1] > 0.5


def test_environment_variable_sets_the_default_root(tmp_path, monkeypatch):
    root = write_fake_mnist(tmp_path / "envdata")
    monkeypatch.setenv("CONTLEARN_DATA", str(root))
    assert len(sources.torchvision_source("mnist", None).train) == 120


def test_torchvision_channels_last_images_become_channels_first(monkeypatch):
    """CIFAR's ``data`` is [N, H, W, 3] uint8 (a fake set here: nothing is read or downloaded)."""
    rng = np.random.default_rng(0)
    fake = {train: SimpleNamespace(data=rng.integers(0, 256, size=(n, 4, 5, 3), dtype=np.uint8),
                                   targets=[i % 2 for i in range(n)], classes=["cat", "dog"])
            for train, n in ((True, 6), (False, 4))}  # fmt: skip
    monkeypatch.setattr(sources, "_torchvision_set", lambda name, root, train, download: fake[train])
    split = sources.torchvision_source("cifar10", "unused")
    assert split.input_shape == (3, 4, 5) and split.class_names == ["cat", "dog"]
    for samples, train in ((split.train, True), (split.test, False)):
        assert torch.equal(samples.load(), torch.from_numpy(fake[train].data).permute(0, 3, 1, 2).float() / 255)

def write_image_folder(root, sizes=((5, 5),), per_class: int = 6, classes=("ant", "bee", "cow")):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            array = np.full((h, w, 3), 60 * c, dtype=np.uint8) + rng.integers(0, 20, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("storage", ["tensor", "loader"])
def test_image_folder(tmp_path, storage):
    root = write_image_folder(tmp_path / "imgs")
    cfg = load_config("split-digits", ["scenario.source=folder", f"scenario.path={root}", "scenario.n_experiences=3",
                                       f"scenario.storage={storage}", "scenario.num_workers=0",
                                       "scenario.test_fraction=0.3"])
    stream = build_stream(cfg.scenario, 0)
    assert sorted(stream.class_names) == ["ant", "bee", "cow"] and stream.input_shape == (3, 5, 5)
    assert sum(len(e.train) for e in stream) == 12 and sum(len(e.test) for e in stream) == 6
    assert isinstance(stream[0].train, LoaderData) == (storage == "loader")
    batch = next(stream[0].train.batches(4))
    assert batch.x.shape[1:] == (3, 5, 5) and 0 <= float(batch.x.min()) and float(batch.x.max()) <= 1


def test_image_folder_of_mixed_sizes_needs_image_size(tmp_path):
    root = write_image_folder(tmp_path / "mixed", sizes=((5, 5), (7, 4)))
    with pytest.raises(DataError, match="scenario.image_size"):
        sources.folder(str(root)).train.load()
    assert sources.folder(str(root), image_size=6).train.load().shape[1:] == (3, 6, 6)
    with pytest.raises(DataError, match="does not exist"):
        sources.folder(str(tmp_path / "none"))
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match="'.*a.png' is a file, not a folder of class sub-folders"):
        sources.folder(str(tmp_path / "a.png"))
    with pytest.raises(DataError, match="'.*mixed' is a directory, not a .npz file"):
        sources.npz(str(root))


@pytest.mark.parametrize("workers", [0, 1])
def test_images_that_fail_in_a_loader_batch_are_one_line(tmp_path, workers):
    """Through the DataLoader (loader storage, data above the memory limit), as
    when loading them whole: a worker's traceback is not part of the message."""
    mixed = write_image_folder(tmp_path / "mixed", sizes=((5, 5), (7, 4)))
    bad = write_image_folder(tmp_path / "bad")
    (bad / "ant" / "0.png").write_text("not an image")
    unreadable = r"^cannot read image '.*0.png': cannot identify image file"
    cfg = load_config("split-digits", ["scenario.source=folder", f"scenario.path={bad}", "scenario.n_experiences=3",
                                       "scenario.storage=loader", f"scenario.num_workers={workers}"])
    with pytest.raises(DataError, match=unreadable) as info:
        for exp in build_stream(cfg.scenario, 0):
            list(exp.train.batches(18)), list(exp.test.batches(18))
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)
    for root, message in ((mixed, r"^the inputs of this data set do not all have one shape \(stack expects"),
                          (bad, unreadable)):
        split = sources.folder(str(root))
        with pytest.raises(DataError, match=message) as info:
            split.train.load(num_workers=workers), split.test.load(num_workers=workers)
        assert "\n" not in str(info.value) and "Traceback" not in str(info.value)


def test_image_folder_test_classes_must_be_training_classes(tmp_path):
    write_image_folder(tmp_path / "split" / "train")
    write_image_folder(tmp_path / "split" / "test", classes=("ant", "bee", "cow", "dog"))
    (tmp_path / "split" / "test" / "@eaDir").mkdir()  # a folder without images is not a class
    with pytest.raises(DataError, match="test set of image folder .* has classes that the training set lacks: dog \\(no "):
        sources.folder(str(tmp_path / "split"))
    for image in (tmp_path / "split" / "test" / "dog").iterdir():
        image.unlink()
    assert len(sources.folder(str(tmp_path / "split")).test) == 18


def test_image_folder_pixels_are_8_bit_values_over_255(tmp_path):
    from PIL import Image

    split = sources.folder(str(write_image_folder(tmp_path / "imgs")))
    decoded = [np.asarray(Image.open(p).convert("RGB")) for p in split.train.paths]
    expected = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(split.train.load(), expected)


def test_image_folder_train_and_test_folders_are_the_splits(tmp_path):
    write_image_folder(tmp_path / "split" / "train")
    write_image_folder(tmp_path / "split" / "test", per_class=2)
    split = sources.folder(str(tmp_path / "split"))
    assert len(split.train) == 18 and len(split.test) == 6
    for samples, where in ((split.train, "train"), (split.test, "test")):
        assert [p.parent.parent.name for p in samples.paths] == [where] * len(samples)  # no test image in training
        assert [split.class_names[t] for t in samples.targets] == [p.parent.name for p in samples.paths]

@pytest.mark.parametrize("name", ["task-digits", "permuted-digits", "rotated-digits", "split-mnist", "split-cifar10",
                                  "split-cifar100", "permuted-mnist"])
def test_shipped_configs_load(name):
    assert name in shipped_configs()
    cfg = load_config(name)
    assert cfg.name == name


def test_arrays_of_mixed_scales_and_bad_labels_are_data_errors():
    from contlearn.scenarios import Stream

    x = np.zeros((8, 4), dtype=np.uint8)
    y = np.arange(8) % 2
    with pytest.raises(DataError, match="x_train is torch.uint8 but x_test is torch.float32"):
        sources.Split.from_arrays(x, y, x.astype(np.float32), y)
    with pytest.raises(DataError, match="fractional"):
        sources.Split.from_arrays(x, torch.tensor(y + 0.5), x, y)
    with pytest.raises(DataError, match=r"negative label \(-1\)"):
        Stream.from_tensors(x, y - 1, x, y - 1, n_experiences=2)
    with pytest.raises(DataError, match=r"negative label \(-2\)"):  # no valid label left to size the mapping
        Stream.from_tensors(x, y - 2, x, y - 2, n_experiences=2)
    huge = y * 10**12  # the relabelling table would take 8 TB
    with pytest.raises(DataError, match="has label 1000000000000; labels must be below 10,000,000"):
        Stream.from_tensors(x, huge, x, huge, n_experiences=2)
    with pytest.raises(DataError, match=r"x_train has shape \(8,\); inputs are \[samples, features...\] \(one feature per sample: x\[:, None\]\)"):
        Stream.from_tensors(x[:, 0], y, n_experiences=2)


def test_from_tensors_refuses_what_it_would_ignore_or_misread():
    from contlearn.scenarios import Stream

    from contlearn import ConfigError

    x, y = torch.rand(100, 8), torch.arange(100) % 5
    with pytest.raises(ConfigError, match="scenario.domains names data sets to load; Stream.from_tensors streams"):
        Stream.from_tensors(x, y, setting="domain", domains=["digits", "digits"])
    with pytest.raises(ConfigError, match=r"'scenario.test_fraction' must be in \(0, 1\), got 0.0"):
        Stream.from_tensors(x, y, test_fraction=0)
    with pytest.raises(ConfigError, match=r"seed must be an integer in \[0, 2\*\*32\), got -1"):
        Stream.from_tensors(x, y, x[:20], y[:20], seed=-1, setting="domain", transform="permute")
    names = np.array([f"k{i % 5}" for i in range(20)])
    with pytest.raises(DataError, match="y_train holds integers but y_test holds names; give both the same kind"):
        Stream.from_tensors(x, y, x[:20], names, n_experiences=1)
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(DataError, match=r"x_train holds 1 values that are not finite in float32 \(NaN, inf, or beyond"):
        Stream.from_tensors(bad, y, n_experiences=1)
    huge = x.double()
    huge[3, 2] = 1e39  # finite in float64, inf in the float32 the samples are read as
    with pytest.raises(DataError, match=r"x_train holds 1 values that are not finite in float32"):
        Stream.from_tensors(huge, y, n_experiences=1)


def test_normalize_refuses_training_inputs_that_are_not_finite():
    from contlearn.scenarios.transforms import Normalize

    batch = torch.rand(4, 3, 2, 2)
    batch[1, 2, 0, 0] = float("inf")
    with pytest.raises(DataError, match=r"transform 'normalize': the training inputs hold non-finite values .* channel\(s\) \[2\]"):
        Normalize().fit([batch])



def test_test_labels_the_training_set_lacks_are_named(tmp_path):
    x, y = np.zeros((40, 2), dtype=np.float32), np.arange(40) % 4
    np.savez(tmp_path / "extra.npz", x=x, y=y, x_test=x[:8], y_test=np.array([0, 1, 2, 3, 7, 9, 9, 3]))
    cfg = load_config(None, ["scenario.source=npz", f"scenario.path={tmp_path / 'extra.npz'}", "scenario.n_experiences=2"])
    with pytest.raises(DataError, match=r"^the test set has classes that the training set lacks: labels 7, 9$"):
        build_stream(cfg.scenario, 0)


def test_domain_entries_read_their_own_files(tmp_path):
    split = sources.digits(0.2, 0)
    x, y = split.train.x.numpy(), split.train.targets.numpy()
    for name, values in (("a", x), ("b", 1 - x), ("other", 0.5 * x)):
        np.savez(tmp_path / f"{name}.npz", x=values, y=y)
    # scenario.path (refused next to domains by a config's checks, not by a plain mapping) does not replace FILE
    stream = build_stream({"setting": "domain", "domains": [f"npz:{tmp_path}/a.npz", f"npz:{tmp_path}/b.npz"],
                           "path": str(tmp_path / "other.npz")}, 0)  # fmt: skip
    assert stream.name == "a+b"
    for exp, name in zip(stream, "ab", strict=True):
        own = sources.npz(str(tmp_path / f"{name}.npz"), 0.2, 0).train.load()
        assert torch.equal(exp.train.x.flatten(1).sort(0).values, own.flatten(1).sort(0).values)


def test_image_folder_class_ids_follow_the_folder_names_sorted(tmp_path):
    for where in ("train", "test"):
        write_image_folder(tmp_path / where, per_class=2, classes=("cow", "ant", "bee"))  # made out of order
    split = sources.folder(str(tmp_path))
    assert split.class_names == ["ant", "bee", "cow"]
    assert [split.class_names[t] for t in split.train.targets] == [p.parent.name for p in split.train.paths]


def test_image_folder_reads_images_in_nested_folders(tmp_path):
    for where in ("train", "test"):
        write_image_folder(tmp_path / where, per_class=1, classes=("ant", "bee"))
    for name in ("ant", "bee"):
        write_image_folder(tmp_path / "train" / name, per_class=1, classes=("day2",))  # train/<class>/day2/0.png
    assert len(sources.folder(str(tmp_path)).train) == 4
