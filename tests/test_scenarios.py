"""Builders' invariants: class splits, task labels, domain shifts, validation
and subsampling, and the equality of the tensor and DataLoader storages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from contlearn.scenarios import Stream, TensorData, build_stream, class_incremental, sources
from contlearn.scenarios.builders import (
    carve_validation,
    permutations,
    rotation_angles,
    subsample_per_class,
)
from contlearn.scenarios.loader import LoaderData
from contlearn.scenarios.transforms import (
    CenterCrop,
    Compose,
    Normalize,
    Permute,
    Resize,
    Rotate,
    ToGray,
    ToRGB,
    TransformWarning,
    parse_transforms,
)

from contlearn import Experiment, load_config
from contlearn.errors import ConfigError, DataError


def stream_of(*overrides: str) -> Stream:
    cfg = load_config("split-digits", list(overrides))
    return build_stream(cfg.scenario, cfg.seed)


def all_x(data) -> torch.Tensor:
    return torch.cat([b.x for b in data.batches(4096)])


# ----------------------------------------------------------- class / task


@pytest.mark.parametrize(
    "overrides",
    [[], ["scenario.n_experiences=2"], ["scenario.classes_per_experience=[4,2,2,1,1]"],
     ["scenario.class_order=[9,8,7,6,5,4,3,2,1,0]"], ["scenario.storage=loader", "scenario.num_workers=0"]],
)
def test_class_sets_are_disjoint_and_cover_the_order(overrides):
    stream = stream_of(*overrides)
    split = sources.digits(0.2, 0)
    seen: list[int] = []
    for exp in stream:
        assert set(exp.classes).isdisjoint(seen)
        seen += exp.classes
        assert sorted(exp.train.y.unique().tolist()) == exp.classes
        assert sorted(exp.test.y.unique().tolist()) == exp.classes
    assert seen == list(range(10))
    assert sum(len(e.train) for e in stream) == len(split.train)
    assert sum(len(e.test) for e in stream) == len(split.test)
    assert sorted(stream.class_names) == [str(d) for d in range(10)]


def test_class_names_map_back_to_the_original_labels():
    stream = stream_of("scenario.class_order=[3,1,4,0,5,9,2,6,8,7]")
    assert stream.class_names == ["3", "1", "4", "0", "5", "9", "2", "6", "8", "7"]
    split = sources.digits(0.2, 0)
    exp0 = stream[0]  # classes 0, 1 = digits 3 and 1
    digit3 = split.train.x[split.train.targets == 3]
    assert torch.equal(exp0.train.x[exp0.train.y == 0], digit3)


def test_default_class_order_is_the_labels_shuffled_with_the_seed():
    orders = {seed: stream_of(f"seed={seed}").class_names for seed in (0, 1, 2)}
    for seed, names in orders.items():  # pinned: numpy's default_rng(seed) permuting the sorted labels
        assert names == [str(c) for c in np.random.default_rng(seed).permutation(10)]
    assert len({tuple(names) for names in orders.values()}) == 3


def test_experience_i_holds_the_samples_of_its_classes_relabelled_by_their_place_in_the_order():
    order = [2, 0, 3, 1, 5, 4]  # not its own inverse: a table built backwards relabels 0 as 2, not 1
    y, y_test = torch.arange(60) % 6, torch.arange(18) % 6
    x = torch.stack([y.float(), torch.arange(60.0)], 1)  # [original label, sample id]
    x_test = torch.stack([y_test.float(), 100 + torch.arange(18.0)], 1)
    stream = Stream.from_tensors(x, y, x_test, y_test, n_experiences=3, class_order=order)
    assert stream.class_names == [str(c) for c in order] and stream.n_classes == 6
    assert [e.classes for e in stream] == [[0, 1], [2, 3], [4, 5]]
    for i, exp in enumerate(stream):
        for data in (exp.train, exp.test):
            assert torch.equal(data.x[:, 0].long(), torch.tensor(order)[data.y])  # class k is order[k]
            assert set(data.x[:, 0].long().tolist()) == set(order[2 * i : 2 * i + 2])
    assert torch.equal(torch.cat([e.train.x[:, 1] for e in stream]).sort().values, torch.arange(60.0))


def test_labels_with_gaps_are_renumbered_densely():
    y = torch.tensor([0, 5, 7, 10] * 5)
    stream = Stream.from_tensors(y.float()[:, None], y, y.float()[:, None], y, n_experiences=2, class_order=[10, 0, 7, 5])
    assert stream.n_classes == 4 and stream.class_names == ["10", "0", "7", "5"]
    assert [e.classes for e in stream] == [[0, 1], [2, 3]]


def test_a_test_label_between_the_training_labels_is_refused():
    x = np.zeros((6, 2), np.float32)
    with pytest.raises(DataError, match=r"^the test set has classes that the training set lacks: labels 1$"):
        Stream.from_tensors(x, [0, 2, 4] * 2, x[:2], [1, 2], n_experiences=1)


def test_listed_classes_per_experience():
    stream = stream_of("scenario.n_experiences=4", "scenario.classes_per_experience=[4,2,2,2]")
    assert [len(e.classes) for e in stream] == [4, 2, 2, 2]
    assert stream[0].classes == [0, 1, 2, 3]


@pytest.mark.parametrize("storage", ["tensor", "loader"])
def test_task_labels_are_present_and_right(storage):
    stream = stream_of("scenario.setting=task", f"scenario.storage={storage}", "scenario.num_workers=0")
    assert stream.setting == "task" and stream.n_tasks == 5
    for i, exp in enumerate(stream):
        assert exp.task == i
        assert bool((exp.train.t == i).all()) and bool((exp.test.t == i).all())
        assert bool((next(exp.test.batches(4096)).t == i).all())
    class_stream = stream_of()
    assert all(bool((e.train.t == 0).all()) for e in class_stream)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["scenario.n_experiences=3"], "do not split evenly"),
        (["scenario.class_order=[0,1,2]"], "missing"),
        (["scenario.classes_per_experience=[5,5]"], "n_experiences=5"),
        (["scenario.n_experiences=4", "scenario.classes_per_experience=[4,0,3,3]"], "positive entries"),
        (["scenario.transform=permute"], "setting=domain"),
        (["scenario.setting=domain"], r"transform=permute\|rotate .* and scenario.domains=.*; neither is set"),
        (["scenario.setting=domain", "scenario.transform=rotate", "scenario.domains=[digits,digits]"],
         r"; both are set \(transform=rotate\)"),
        (["scenario.setting=domain", "scenario.transform=permute", "scenario.class_order=[0,1,2,3,4,5,6,7,8,9]"], "do not apply"),
        (["scenario.source=nope"], "valid sources"),
        (["scenario.validation_fraction=1.5"], "validation_fraction"),
        (["scenario.validation_fraction=1"], r"'scenario.validation_fraction' must be in \[0, 1\)"),
        (["scenario.setting=domain", "scenario.transform=permute", "scenario.rotations=[0,90]"],
         "rotations needs scenario.transform=rotate"),  # would be ignored
        (["scenario.eval_transform=[hflip]"], "deterministic"),
        (["scenario.train_transform=[hflip,normalize]"], "before random"),
        (["scenario.train_transform=[sharpen]"], "unknown transform"),
        (["scenario.train_transform=[hflip:1.5]"], r"hflip needs a probability in \[0, 1\], got 1.5"),
        (["scenario.train_transform=[center_crop:0]"], "'center_crop:0' needs sizes of at least 1"),
        (["scenario.eval_transform=[resize:0]"], "'resize:0' needs sizes of at least 1"),
        (["scenario.image_size=0"], "'scenario.image_size' must be at least 1"),
        (["scenario.rotations=[0,90]"], "make domain-incremental streams; set scenario.setting=domain"),  # was ignored
        (["scenario.memory_limit_gb=-1"], r"^'scenario.memory_limit_gb' must be positive, got -1"),
        (["scenario.num_workers=-1"], r"^'scenario.num_workers' must be >= 0, got -1$"),
    ],
)
def test_bad_scenarios_are_one_clear_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        stream_of(*overrides)


def test_unknown_storage_is_rejected_by_validation():
    with pytest.raises(ConfigError, match="scenario.storage"):
        load_config("split-digits", ["scenario.storage=disk"])


# ---------------------------------------------------------------- domain


def test_permuted_experiences_share_classes_and_test_samples():
    stream = stream_of("scenario.setting=domain", "scenario.transform=permute", "scenario.n_experiences=4")
    split = sources.digits(0.2, 0)
    base_test = split.test.x
    perms = permutations(64, 4, seed=0)
    assert stream.setting == "domain" and stream.n_classes == 10 and len(stream) == 4
    for exp, perm in zip(stream, perms, strict=True):
        assert exp.classes == list(range(10)) and exp.task == 0
        assert torch.equal(exp.test.y, stream[0].test.y)
        # the same test samples, under this experience's permutation
        assert torch.equal(exp.test.x.flatten(1), base_test.flatten(1)[:, perm])
        inverse = torch.argsort(perm)
        assert torch.equal(exp.test.x.flatten(1)[:, inverse], base_test.flatten(1))
    assert not torch.equal(stream[0].test.x, base_test)  # experience 0 is permuted too, by default


def test_permutations_are_deterministic_per_seed_and_differ_across_experiences():
    a = permutations(64, 5, seed=3)
    b = permutations(64, 5, seed=3)
    c = permutations(64, 5, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert all(not torch.equal(a[i], a[j]) for i in range(5) for j in range(i + 1, 5))
    assert any(not torch.equal(p, q) for p, q in zip(a, c, strict=True))
    assert all(sorted(p.tolist()) == list(range(64)) for p in a)
    s1 = stream_of("scenario.setting=domain", "scenario.transform=permute", "scenario.n_experiences=3")
    s2 = stream_of("scenario.setting=domain", "scenario.transform=permute", "scenario.n_experiences=3")
    assert all(torch.equal(e.train.x, f.train.x) for e, f in zip(s1, s2, strict=True))


def test_permutations_are_drawn_one_per_experience_from_a_generator_seeded_with_the_seed():
    stream = stream_of("seed=3", "scenario.setting=domain", "scenario.transform=permute", "scenario.n_experiences=3")
    base = sources.digits(0.2, 3).test.x.flatten(1)
    generator = torch.Generator().manual_seed(3)
    for exp in stream:
        assert torch.equal(exp.test.x.flatten(1), base[:, torch.randperm(64, generator=generator)])


def test_identity_first_keeps_experience_zero_unpermuted_and_the_others_unchanged():
    base = stream_of("scenario.setting=domain", "scenario.transform=permute", "scenario.n_experiences=3")
    ident = stream_of("scenario.setting=domain", "scenario.transform=permute", "scenario.n_experiences=3",
                      "scenario.identity_first=true")
    assert torch.equal(ident[0].test.x, sources.digits(0.2, 0).test.x)
    assert torch.equal(ident[1].test.x, base[1].test.x) and torch.equal(ident[2].test.x, base[2].test.x)


def test_rotated_experiences():
    stream = stream_of("scenario.setting=domain", "scenario.transform=rotate", "scenario.n_experiences=5")
    base = sources.digits(0.2, 0).test.x
    assert [e.shift.degrees for e in stream] == rotation_angles(5) == [0, 36, 72, 108, 144]
    assert torch.equal(stream[0].test.x, base)
    for exp in stream:
        assert exp.classes == list(range(10)) and torch.equal(exp.test.y, stream[0].test.y)
    explicit = stream_of("scenario.setting=domain", "scenario.transform=rotate", "scenario.n_experiences=2",
                         "scenario.rotations=[0,90]")
    assert torch.allclose(explicit[1].test.x, torch.rot90(base, 1, (2, 3)), atol=1e-5)


def test_rotations_make_one_experience_each_whatever_n_experiences_says():
    stream = stream_of("scenario.setting=domain", "scenario.transform=rotate", "scenario.rotations=[0,90,180]")
    assert [e.shift.degrees for e in stream] == [0, 90, 180]  # n_experiences is 5


def test_rotated_streams_apply_the_transforms_after_rotating():
    stream = stream_of("scenario.setting=domain", "scenario.transform=rotate", "scenario.rotations=[0,45]",
                       "scenario.train_transform=[normalize]", "scenario.eval_transform=[normalize]")  # fmt: skip
    background = stream[0].train.x[:, 0, 0, 0]  # an unrotated corner: raw 0 in every digit, normalized
    assert float(background[0]) < 0 and torch.allclose(background, background[:1].expand_as(background))
    for data in (stream[1].train, stream[1].test):  # rotated in from outside the image: raw 0, normalized too
        assert torch.allclose(data.x[:, 0, 0, 0], background[:1].expand(len(data)), atol=1e-5)


@pytest.mark.parametrize("shift", [["scenario.transform=permute"], ["scenario.transform=rotate"]], ids=["permute", "rotate"])
def test_a_shifted_stream_reports_the_input_shape_after_its_transforms(shift):
    stream = stream_of("scenario.setting=domain", *shift, "scenario.n_experiences=2",
                       "scenario.train_transform=[resize:12]", "scenario.eval_transform=[resize:12]")  # fmt: skip
    assert stream.input_shape == stream[0].train.input_shape == stream[1].test.input_shape == (1, 12, 12)


def test_rotation_is_counter_clockwise_and_exact_at_right_angles():
    x = torch.rand(3, 2, 5, 5)
    assert torch.allclose(Rotate(90)(x), torch.rot90(x, 1, (2, 3)), atol=1e-5)
    assert torch.allclose(Rotate(-90)(x), torch.rot90(x, -1, (2, 3)), atol=1e-5)
    assert torch.equal(Rotate(0)(x), x)


def test_one_dataset_per_experience(tmp_path):
    split = sources.digits(0.2, 0)
    for name, x in (("a", split.train.x.numpy()), ("b", 1 - split.train.x.numpy())):
        np.savez(tmp_path / f"{name}.npz", x=x, y=split.train.targets.numpy())
    stream = stream_of("scenario.setting=domain", f"scenario.domains=[npz:{tmp_path}/a.npz,npz:{tmp_path}/b.npz]")
    assert len(stream) == 2 and stream.name == "a+b"
    assert all(e.classes == list(range(10)) for e in stream)
    assert torch.allclose(stream[0].train.x.sum() + stream[1].train.x.sum(),
                          torch.tensor(float(stream[0].train.x.numel())), rtol=1e-4)


def test_domains_must_share_their_classes(tmp_path):
    split = sources.digits(0.2, 0)
    x, y = split.train.x.numpy(), split.train.targets.numpy()
    np.savez(tmp_path / "a.npz", x=x, y=y)
    np.savez(tmp_path / "b.npz", x=x[y < 5], y=y[y < 5])
    from contlearn.errors import DataError

    with pytest.raises(DataError, match="share their classes"):
        stream_of("scenario.setting=domain", f"scenario.domains=[npz:{tmp_path}/a.npz,npz:{tmp_path}/b.npz]")


# ------------------------------------------------- validation, subsampling


def test_validation_is_carved_from_train_per_class():
    full = stream_of()
    stream = stream_of("scenario.validation_fraction=0.25")
    for exp, whole in zip(stream, full, strict=True):
        assert exp.val is not None and len(exp.train) + len(exp.val) == len(whole.train)
        assert sorted(exp.val.y.unique().tolist()) == exp.classes
        assert abs(len(exp.val) / len(whole.train) - 0.25) < 0.02
        rows = {tuple(r.tolist()) for r in whole.train.x.flatten(1)}
        val_rows = {tuple(r.tolist()) for r in exp.val.x.flatten(1)}
        train_rows = {tuple(r.tolist()) for r in exp.train.x.flatten(1)}
        assert val_rows <= rows and train_rows <= rows and not (val_rows & train_rows)


@pytest.mark.parametrize("storage", ["tensor", "loader"])
def test_validation_data_gets_the_deterministic_transforms_and_no_augmentation(storage):
    common = ["scenario.validation_fraction=0.2", "scenario.eval_transform=[normalize]"]
    stream = stream_of(*common, "scenario.train_transform=[normalize,hflip:1]", f"scenario.storage={storage}",
                       "scenario.num_workers=0")  # fmt: skip
    plain = stream_of(*common, "scenario.train_transform=[normalize]")
    for exp, ref in zip(stream, plain, strict=True):
        assert torch.equal(all_x(exp.val), ref.val.x)
        assert all(b.raw is None for b in exp.val.batches(64, True, torch.Generator().manual_seed(0)))
        assert torch.equal(all_x(exp.train), ref.train.x.flip(3))  # the training data is augmented


def seeded_streams(**scenario) -> dict:
    """Streams of 400 samples (x = sample id) whose only draw is the one ``scenario`` asks for."""
    x, y = torch.arange(400.0)[:, None], torch.arange(400) % 4
    return {seed: Stream.from_tensors(x, y, x[:8], y[:8], seed=seed, class_order=[0, 1, 2, 3], n_experiences=2,
                                      **scenario) for seed in (0, 1)}  # fmt: skip


def test_validation_split_is_drawn_with_the_seed_alone():
    torch.manual_seed(1)
    first = seeded_streams(validation_fraction=0.25)
    torch.manual_seed(2)  # the global RNG plays no part
    again = seeded_streams(validation_fraction=0.25)
    for exp, same, other in zip(first[0], again[0], first[1], strict=True):
        assert torch.equal(exp.val.x, same.val.x) and not torch.equal(exp.val.x, other.val.x)
        assert torch.bincount(exp.val.y).tolist()[min(exp.classes):] == [25, 25]


def test_validation_takes_the_nearest_count_of_each_class():
    y = torch.tensor([0] * 19 + [1] * 7 + [2] * 2 + [3])
    train, val = carve_validation(y, 0.25, 0)  # 4.75, 1.75, 0.5 (at least 1 of 2), 0.25 (none of 1)
    assert torch.bincount(y[val], minlength=4).tolist() == [5, 2, 1, 0]


def test_subsampling_is_drawn_with_the_seed_alone():
    torch.manual_seed(1)
    first = seeded_streams(samples_per_class=10)
    torch.manual_seed(2)
    again = seeded_streams(samples_per_class=10)
    for exp, same, other in zip(first[0], again[0], first[1], strict=True):
        assert torch.equal(exp.train.x, same.train.x) and not torch.equal(exp.train.x, other.train.x)
        assert torch.bincount(exp.train.y).tolist()[min(exp.classes):] == [10, 10]


def test_samples_per_class():
    stream = stream_of("scenario.samples_per_class=7")
    for exp in stream:
        assert torch.bincount(exp.train.y).tolist()[min(exp.classes):] == [7] * len(exp.classes)
    assert len(stream[0].test) == len(stream_of()[0].test)  # the test set is not subsampled
    y = torch.tensor([0] * 10 + [1] * 3)
    keep = subsample_per_class(y, 5, 0)
    assert torch.bincount(y[keep]).tolist() == [5, 3]
    assert torch.equal(keep, subsample_per_class(y, 5, 0))


def test_carve_validation_keeps_a_training_sample_of_every_class():
    y = torch.tensor([0, 0, 1, 2, 2, 2])
    train, val = carve_validation(y, 0.9, 0)
    assert sorted(torch.cat([train, val]).tolist()) == list(range(6))
    assert set(y[train].tolist()) == {0, 1, 2}


# ------------------------------------------------------ transforms, storage


def test_deterministic_ops_give_each_sample_the_same_result_alone_or_batched():
    x = torch.rand(6, 3, 9, 9)
    norm = Normalize()
    norm.fit([x[:4], x[4:]])
    assert torch.allclose(norm.mean, x.mean(dim=(0, 2, 3))) and torch.allclose(norm.std, x.std(dim=(0, 2, 3), unbiased=False), atol=1e-5)
    for op in (norm, Resize((5, 5)), Resize((12, 12)), CenterCrop((4, 4)), ToGray(), Rotate(33), Permute(torch.randperm(243)),
               Compose([ToGray(), ToRGB(), Rotate(-10)])):
        batched = op(x)
        assert all(torch.equal(batched[i], op.apply_one(x[i])) for i in range(6)), op
        assert tuple(batched.shape[1:]) == op.out_shape((3, 9, 9))


def test_random_ops_follow_the_generator():
    _, augment = parse_transforms(["random_crop:2", "hflip"], "k")
    x = torch.rand(8, 1, 6, 6)
    a = augment(x, torch.Generator().manual_seed(1))
    b = augment(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape
    _, flip = parse_transforms(["hflip:1"], "k")
    assert torch.equal(flip(x, None), x.flip(3))
    _, crop0 = parse_transforms(["random_crop:0"], "k")
    assert torch.equal(crop0(x, None), x)


@pytest.mark.parametrize("spec, message", [
    ("normalize:0/nan", "give as many positive stds as means"),
    ("normalize:0/-1", "give as many positive stds as means"),
    ("normalize:inf/1", "means and stds must be finite numbers in float32"),
    ("normalize:0/1e39", "means and stds must be finite numbers in float32"),
    ("normalize:0/1e-45", r"stds at least 1.18e-38"),  # a denormal in float32: x / std is inf
])
def test_a_normalize_that_would_make_every_input_nan_or_inf_is_refused(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_transforms([spec], "scenario.eval_transform")


def test_loader_data_batches_like_tensor_data():
    transforms = ["scenario.train_transform=[normalize,random_crop:1,hflip]", "scenario.eval_transform=[normalize]"]
    stream = stream_of(*transforms)
    loader = stream_of(*transforms, "scenario.storage=loader", "scenario.num_workers=0")
    t, ld = stream[0].train, loader[0].train
    assert isinstance(ld, LoaderData) and not isinstance(t, LoaderData)
    assert torch.equal(t.y, ld.y) and torch.equal(t.t, ld.t) and t.input_shape == ld.input_shape
    for x, y in zip(t.batches(50, True, torch.Generator().manual_seed(5)),
                    ld.batches(50, True, torch.Generator().manual_seed(5)), strict=True):
        assert torch.equal(x.x, y.x) and torch.equal(x.y, y.y)
    with pytest.raises(Exception, match="DataLoader"):
        _ = ld.x


@pytest.mark.parametrize(
    "overrides",
    [
        ["scenario.train_transform=[normalize,random_crop:1,hflip]", "scenario.eval_transform=[normalize]",
         "scenario.setting=domain", "scenario.transform=rotate", "scenario.n_experiences=2", "scenario.num_workers=2"],
        ["scenario.n_experiences=2", "scenario.classes_per_experience=[5,5]", "scenario.num_workers=0",
         "scenario.validation_fraction=0.1"],
    ],
    ids=["rotate-augment-2workers", "class-0workers"],
)
def test_tensor_and_dataloader_paths_give_identical_results(overrides):
    common = ["train.epochs=1", "eval.fwt=false", "model.backbone=cnn", "model.hidden=[8,16]", "train.batch_size=64",
              *overrides]
    runs = []
    for storage in ("tensor", "loader"):
        experiment = Experiment(load_config("split-digits", [*common, f"scenario.storage={storage}"]))
        results = experiment.run()
        runs.append((results.accuracy_matrix, experiment.run_state.model.state_dict()))
        assert isinstance(experiment.run_state.stream[0].train, LoaderData) == (storage == "loader")
    (acc_t, state_t), (acc_l, state_l) = runs
    assert acc_t == acc_l
    assert all(torch.equal(state_t[k], state_l[k]) for k in state_t)


@pytest.mark.parametrize("storage", ["tensor", "loader"])
def test_training_batches_are_augmented_shuffled_or_not_and_keep_their_raw_inputs(storage):
    data = stream_of("scenario.train_transform=[hflip:1]", f"scenario.storage={storage}", "scenario.num_workers=0")[0].train
    plain = stream_of()[0].train
    for shuffle in (False, True):
        batch = next(data.batches(50, shuffle, torch.Generator().manual_seed(0)))
        ref = next(plain.batches(50, shuffle, torch.Generator().manual_seed(0)))
        assert batch.raw is not None and torch.equal(batch.raw, ref.x) and torch.equal(batch.y, ref.y)
        assert torch.equal(batch.x, ref.x.flip(3))


@pytest.mark.parametrize("storage", ["tensor", "loader"])
def test_subset_and_with_tasks_change_only_what_they_say(storage):
    data = stream_of("scenario.train_transform=[hflip:1]", f"scenario.storage={storage}", "scenario.num_workers=0")[0].train
    tasked = data.with_tasks(3)
    assert bool((tasked.t == 3).all()) and torch.equal(tasked.y, data.y) and tasked.augment is data.augment
    part = data.subset(range(2, 7))
    assert torch.equal(part.y, data.y[2:7]) and part.augment is data.augment
    assert torch.equal(all_x(part), all_x(data.subset(torch.arange(2, 7))))


def test_a_batch_at_an_unsorted_index_is_the_same_in_both_storages():
    t = stream_of()[0].train
    ld = stream_of("scenario.storage=loader", "scenario.num_workers=0")[0].train
    index = torch.tensor([5, 1, 3, 0])
    a, b = t.batch(index), ld.batch(index)
    assert torch.equal(a.x, t.x[index]) and torch.equal(b.x, a.x) and torch.equal(b.y, a.y)


def test_auto_storage_counts_every_shifted_copy():
    limit = "scenario.memory_limit_gb=0.001"  # digits' 1,797 inputs of 64 float32: 0.46 MB, ten copies 4.6 MB
    assert not isinstance(stream_of(limit)[0].train, LoaderData)
    shifted = stream_of(limit, "scenario.num_workers=0", "scenario.setting=domain", "scenario.transform=permute",
                        "scenario.n_experiences=10")  # fmt: skip
    assert isinstance(shifted[0].train, LoaderData)


def test_auto_storage_picks_the_loader_above_the_memory_limit():
    assert not isinstance(stream_of()[0].train, LoaderData)
    assert isinstance(stream_of("scenario.memory_limit_gb=0.0001", "scenario.num_workers=0")[0].train, LoaderData)


def test_concat_of_tensor_and_loader_data():
    t = stream_of()[0].train
    ld = stream_of("scenario.storage=loader", "scenario.num_workers=0")[1].train
    both = type(t).concat([t, ld])
    assert isinstance(both, LoaderData) and len(both) == len(t) + len(ld)
    x = all_x(both)
    assert torch.equal(x[: len(t)], t.x)


@pytest.mark.parametrize("storage", ["tensor", "loader"])
def test_concat_augments_every_part_with_the_parts_augmentation(storage):
    """concat([exp.train, more]): ``more`` (raw exemplars, say) is trained on as
    exp.train is; two different augmentations cannot be one, and are refused."""
    train = stream_of(f"scenario.storage={storage}", "scenario.num_workers=0",
                      "scenario.train_transform=[hflip]")[0].train
    more = TensorData(torch.zeros(3, *train.x.shape[1:]) if storage == "tensor" else torch.zeros(3, 64),
                      torch.zeros(3, dtype=torch.long))
    assert train.augment is not None
    assert type(train).concat([train, more]).augment is train.augment
    assert type(train).concat([more, train]).augment is train.augment
    assert TensorData.concat([more, more]).augment is None
    other = stream_of("scenario.train_transform=[hflip]")[0].train.augment
    with pytest.raises(ValueError, match="2 different augmentations"):
        type(train).concat([train, more.with_augment(other)])


# --------------------------------------------------------------- tensors


def test_stream_from_tensors():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 5)).astype(np.float32)
    y = np.repeat(["cat", "dog", "eel", "fox"], 30)
    stream = Stream.from_tensors(x, y, n_experiences=2, seed=1)
    assert len(stream) == 2 and stream.n_classes == 4 and stream.input_shape == (5,)
    assert sorted(stream.class_names) == ["cat", "dog", "eel", "fox"]
    assert sum(len(e.test) for e in stream) == 24  # test_fraction 0.2, stratified
    domain = Stream.from_tensors(torch.from_numpy(x), torch.arange(120) % 3, setting="domain", transform="permute",
                                 n_experiences=3)
    assert len(domain) == 3 and all(e.classes == [0, 1, 2] for e in domain)
    with pytest.raises(ConfigError, match="unknown config key"):
        Stream.from_tensors(x, y, n_experience=2)


def test_from_tensors_takes_the_seeds_a_config_takes():
    x, y = np.eye(4, dtype=np.float32), [0, 1, 2, 3]
    with pytest.raises(ConfigError, match=r"seed must be an integer in \[0, 2\*\*32\), got 4294967296"):
        Stream.from_tensors(x, y, x, y, n_experiences=1, seed=2**32)
    assert len(Stream.from_tensors(x, y, x, y, n_experiences=1, seed=2**32 - 1)) == 1


def test_class_incremental_on_a_split_directly():
    split = sources.Split.from_arrays(torch.rand(40, 3), torch.arange(40) % 4, torch.rand(8, 3), torch.arange(8) % 4)
    stream = class_incremental(split, 2, class_order=[3, 2, 1, 0], task_labels=True)
    assert stream.class_names == ["3", "2", "1", "0"] and stream[1].task == 1
    assert torch.equal(stream[0].train.x, split.train.x[split.train.targets >= 2])


def test_build_stream_takes_a_plain_mapping_or_dataclass():
    from contlearn.config import ScenarioConfig

    assert len(build_stream({"n_experiences": 2}, 0)) == 2
    assert build_stream(ScenarioConfig(setting="task"), 0)[4].task == 4


# ------------------------------------------------ transforms against shifts


def test_normalize_leaves_a_feature_constant_in_training_at_its_scale():
    split = sources.digits(0.2, 0)
    x = split.train.x.numpy().reshape(len(split.train), -1)
    y = split.train.targets.numpy()
    stream = Stream.from_tensors(x, y, n_experiences=2, train_transform=["normalize"], eval_transform=["normalize"])
    train = torch.cat([e.train.x for e in stream])
    constant = train.std(dim=0) == 0
    assert bool(constant.any())  # digits' corner pixels are 0 in every training image
    test = torch.cat([e.test.x for e in stream])
    assert float(test[:, constant].abs().max()) <= 1  # raw values in [0, 1], minus a mean of 0, over 1 (was up to 62,500)


def test_normalize_takes_its_statistics_from_the_training_data_seen_through_the_transforms_before_it():
    stream = stream_of("scenario.train_transform=[center_crop:4,normalize]", "scenario.eval_transform=[center_crop:4,normalize]")
    train = torch.cat([e.train.x for e in stream])  # the central 4x4 of the digits: brighter than the whole 8x8
    assert train.shape[1:] == (1, 4, 4)
    assert abs(float(train.mean())) < 1e-4 and abs(float(train.std(unbiased=False)) - 1) < 1e-3


def test_permuted_streams_normalize_before_permuting():
    split = sources.digits(0.2, 0)
    x = split.train.x.numpy().reshape(len(split.train), -1)
    stream = Stream.from_tensors(x, split.train.targets.numpy(), setting="domain", transform="permute",
                                 n_experiences=3, train_transform=["normalize"], eval_transform=["normalize"])  # fmt: skip
    first = stream[0].train.x
    for exp in stream:  # the same values in other places: the statistics moved with their features
        assert torch.equal(exp.train.x.sort(dim=1).values, first.sort(dim=1).values)


def test_domains_share_the_first_domains_normalization(tmp_path):
    split = sources.digits(0.2, 0)
    for name, x in (("a", split.train.x.numpy()), ("b", 0.3 * split.train.x.numpy() + 0.6)):
        np.savez(tmp_path / f"{name}.npz", x=x, y=split.train.targets.numpy())
    stream = stream_of("scenario.setting=domain", f"scenario.domains=[npz:{tmp_path}/a.npz,npz:{tmp_path}/b.npz]",
                       "scenario.train_transform=[normalize]", "scenario.eval_transform=[normalize]")  # fmt: skip
    a, b = stream[0].train.x, stream[1].train.x
    assert abs(float(a.mean())) < 1e-3 and abs(float(a.std()) - 1) < 0.05  # fitted on domain a
    assert float((b - a).abs().max()) > 1  # domain b's shift is kept, not normalised away


def test_train_and_eval_transforms_that_disagree():
    with pytest.raises(ConfigError, match=r"training inputs of shape \(1, 16, 16\) but .* test inputs of shape \(1, 8, 8\)"):
        stream_of("scenario.train_transform=[resize:16]")
    with pytest.warns(TransformWarning, match="only the training inputs are normalized"):
        stream_of("scenario.train_transform=[normalize]")
    with pytest.warns(TransformWarning, match="only the test inputs are normalized"):
        stream_of("scenario.eval_transform=[normalize]")


def test_rotation_of_a_non_square_image_is_rigid():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    x = torch.zeros(1, 1, 8, 16)
    x[0, 0, 3:5, 2:14] = 1  # a horizontal bar
    for degrees in (90, 30):
        expected = TF.rotate(x, degrees, interpolation=InterpolationMode.BILINEAR)
        assert torch.allclose(Rotate(degrees)(x), expected, atol=1e-5)


def test_subset_takes_a_boolean_mask_as_the_rows_it_selects():
    data = Stream.from_tensors(np.eye(4, dtype=np.float32), [0, 1, 2, 3], x_test=np.eye(4, dtype=np.float32),
                               y_test=[0, 1, 2, 3], n_experiences=1)[0].train  # fmt: skip
    mask = data.y >= 2
    assert torch.equal(data.subset(mask).y, data.y[mask]) and len(data.subset(mask)) == 2


def test_zero_experiences_is_a_config_error():
    with pytest.raises(ConfigError, match="'scenario.n_experiences' must be at least 1"):
        Stream.from_tensors(np.eye(4, dtype=np.float32), [0, 1, 2, 3], np.eye(4, dtype=np.float32), [0, 1, 2, 3],
                            n_experiences=0)  # fmt: skip
