"""Avalanche interop: benchmarks -> streams, contlearn plugins inside Avalanche
strategies, and metric parity (docs/avalanche.md)."""

from __future__ import annotations

import copy
import math
import pickle
import sys
import types
import warnings

import pytest
import torch
from _spies import EpochLog
from contlearn.scenarios import Batch, TensorData
from contlearn.scenarios.sources import digits

from contlearn import (
    ConfigError,
    ContlearnError,
    DataError,
    Experiment,
    PluginError,
    TrainingError,
    hookimpl,
    load_config,
)
from contlearn import metrics as M
from contlearn.experiment import seed_everything, stream_of
from contlearn.interop import avalanche as cav
from contlearn.models import MLP, ContinualModel, IncrementalLinear, MultiHead, Output, create_model
from contlearn.models.heads import MASKED_LOGIT


def test_missing_avalanche_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "avalanche", None)  # makes `import avalanche` fail
    with pytest.raises(ContlearnError, match=r"pip install 'contlearn\[avalanche\]'"):
        cav.stream_from_avalanche(object())
    with pytest.raises(ContlearnError, match=r"pip install 'contlearn\[avalanche\]'"):
        cav.as_avalanche_plugin(Quiet())
    with pytest.raises(ContlearnError, match=r"pip install 'contlearn\[avalanche\]'"):
        cav.as_avalanche_model(torch.nn.Linear(2, 2))


def test_the_avalanche_extra_imports_avalanche_training_without_warnings():
    """The extra brings quadprog, the QP backend Avalanche's GEM asks qpsolvers for;
    without one, qpsolvers warns "no QP solver found" at every import."""
    import subprocess

    script = "import contlearn.interop.avalanche, avalanche.training; print('imported')"
    done = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", script], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]


# --------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~10x faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def av():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import avalanche.benchmarks as benchmarks
        import avalanche.evaluation.metrics as metrics
        import avalanche.training as training
        from avalanche.training.plugins import EvaluationPlugin
    return types.SimpleNamespace(b=benchmarks, m=metrics, t=training, EvaluationPlugin=EvaluationPlugin)


@pytest.fixture(scope="module")
def raw():
    """sklearn digits, split as contlearn's digits source splits it (seed 0)."""
    return cav.split_tensors(digits(0.2, 0))


def dataset(x, y):
    return cav.tensor_dataset(x, y)


def silent(av, *metrics):
    """An evaluator that prints nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "No loggers specified")
        return av.EvaluationPlugin(*metrics, loggers=[])


def train_eval(strategy, bench):
    """Train each experience, then evaluate the whole test stream: the results dicts."""
    results = []
    for exp in bench.train_stream:
        strategy.train(exp, eval_streams=[])
        results.append(strategy.eval(bench.test_stream))
    return results


class Quiet:
    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


# ------------------------------------------------------------- benchmark -> stream


def test_class_incremental_benchmark_is_renumbered_in_class_order(av, raw):
    x_tr, y_tr, x_te, y_te = raw
    bench = av.b.class_incremental_benchmark(
        {"train": dataset(x_tr, y_tr), "test": dataset(x_te, y_te)}, num_experiences=5, seed=3
    )
    stream = cav.stream_from_avalanche(bench)
    assert stream.setting == "class" and len(stream) == 5 and stream.n_classes == 10
    assert [e.classes for e in stream] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    names = [int(n) for n in stream.class_names]
    assert sorted(names) == list(range(10)) and names != list(range(10))  # seed 3 shuffles the order
    for exp, av_exp in zip(stream, bench.train_stream, strict=True):
        assert sorted(names[c] for c in exp.classes) == sorted(av_exp.classes_in_this_experience)
        assert exp.task == 0 and bool((exp.train.t == 0).all())
        assert set(exp.test.classes()) == set(exp.classes)
    # every sample lands in one experience with its original label
    for split_x, split_y, part in ((x_tr, y_tr, "train"), (x_te, y_te, "test")):
        data = TensorData.concat([getattr(e, part) for e in stream])
        original = torch.tensor(names)[data.y]
        assert len(data) == len(split_y)
        for c in range(10):
            assert int((original == c).sum()) == int((split_y == c).sum())
            assert torch.allclose(data.x[original == c].sum(0), split_x[split_y == c].sum(0), atol=1e-4)


def test_nc_benchmark_keeps_its_class_order(av, raw):
    x_tr, y_tr, x_te, y_te = raw
    bench = av.b.nc_benchmark(dataset(x_tr, y_tr), dataset(x_te, y_te), 5, task_labels=False, seed=1)
    stream = cav.stream_from_avalanche(bench, class_names=[f"digit {c}" for c in range(10)])
    assert stream.class_names == [f"digit {c}" for c in bench.classes_order]
    assert len(stream.experiences[0].train) == len(bench.train_stream[0].dataset)


def test_task_incremental_benchmarks_keep_task_labels(av, raw):
    x_tr, y_tr, x_te, y_te = raw
    old = av.b.nc_benchmark(
        dataset(x_tr, y_tr), dataset(x_te, y_te), 5, task_labels=True, seed=0, class_ids_from_zero_in_each_exp=True
    )
    new = av.b.task_incremental_benchmark(
        av.b.class_incremental_benchmark({"train": dataset(x_tr, y_tr), "test": dataset(x_te, y_te)}, num_experiences=5, seed=0)
    )
    for bench in (old, new):
        stream = cav.stream_from_avalanche(bench)
        assert stream.setting == "task" and stream.n_tasks == 5
        for k, exp in enumerate(stream):
            assert exp.task == k
            assert bool((exp.train.t == k).all()) and bool((exp.test.t == k).all()) and len(exp.test) > 0
    assert [e.classes for e in cav.stream_from_avalanche(old)] == [[0, 1]] * 5  # ids from zero in each task


def test_new_instances_benchmarks_are_domain_incremental(av, raw):
    x_tr, y_tr, x_te, y_te = raw
    for bench in (
        av.b.ni_benchmark(dataset(x_tr, y_tr), dataset(x_te, y_te), 3, seed=0),
        av.b.new_instances_benchmark(dataset(x_tr, y_tr), dataset(x_te, y_te), 3, seed=0),
    ):
        stream = cav.stream_from_avalanche(bench)
        assert stream.setting == "domain" and len(stream) == 3
        assert sum(len(e.train) for e in stream) == len(y_tr)
        assert all(len(e.test) == len(y_te) for e in stream)  # the single test set, for each experience


def test_tensors_benchmark_round_trip(av):
    stream = stream_of(load_config("split-digits"))
    bench = av.b.tensors_benchmark(
        [[e.train.x, e.train.y] for e in stream], [[e.test.x, e.test.y] for e in stream], task_labels=[0] * 5
    )
    back = cav.stream_from_avalanche(bench)
    assert back.setting == "class" and back.input_shape == stream.input_shape
    for a, b in zip(stream, back, strict=True):
        assert a.classes == b.classes
        assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
        assert torch.equal(a.test.x, b.test.x) and torch.equal(a.test.y, b.test.y)


def test_bad_benchmark_arguments(av):
    with pytest.raises(ContlearnError, match="train_stream"):
        cav.stream_from_avalanche(object())
    with pytest.raises(ConfigError, match="setting"):
        cav.stream_from_avalanche(object(), setting="online")
    with pytest.raises(ContlearnError, match="ToTensor"):
        cav.materialise([("an image", 0), ("another", 1)])
    with pytest.raises(ContlearnError, match="ToTensor"):
        cav.materialise([(torch.zeros(2), 0), (torch.zeros(3), 1)])
    data = cav.materialise([(torch.ones(2), 3, 1), (torch.zeros(2), 4, 1)])
    assert data.y.tolist() == [3, 4] and data.t.tolist() == [1, 1] and data.x.shape == (2, 2)


def test_labels_kept_or_renumbered_a_setting_given_and_streams_that_do_not_fit(av):
    x = torch.randn(12, 3)
    y = torch.tensor([4, 4, 7, 7, 4, 7, 1, 1, 9, 9, 1, 9])  # experience 0: classes 4 and 7; experience 1: 1 and 9
    train = [[x[:6], y[:6]], [x[6:], y[6:]]]
    bench = av.b.tensors_benchmark(train, train, task_labels=[0, 0])
    auto = cav.stream_from_avalanche(bench)
    assert [e.classes for e in auto] == [[0, 1], [2, 3]] and auto.n_classes == 4
    assert auto.class_names == ["4", "7", "1", "9"] and auto.experiences[1].train.y.tolist() == [2, 2, 3, 3, 2, 3]
    kept = cav.stream_from_avalanche(bench, remap=False)
    assert [e.classes for e in kept] == [[4, 7], [1, 9]] and kept.n_classes == 10 and kept.class_names[9] == "9"
    assert torch.equal(kept.experiences[1].train.y, y[6:]) and torch.equal(kept.experiences[1].test.y, y[6:])
    assert auto.setting == "class" and cav.stream_from_avalanche(bench, setting="domain").setting == "domain"
    with pytest.raises(ConfigError, match="remap must be 'auto', True or False, got 'yes'"):
        cav.stream_from_avalanche(bench, remap="yes")

    def experience(n):
        return types.SimpleNamespace(dataset=[(torch.zeros(3), 0)] * n, classes_in_this_experience=[0], task_label=0)

    uneven = types.SimpleNamespace(train_stream=[experience(2)] * 3, test_stream=[experience(1)] * 2)
    with pytest.raises(DataError, match="has 3 train but 2 test experiences"):
        cav.stream_from_avalanche(uneven)
    with pytest.raises(DataError, match="train stream has no experiences"):
        cav.stream_from_avalanche(types.SimpleNamespace(train_stream=[], test_stream=[]))
    hollow = types.SimpleNamespace(train_stream=[experience(2), experience(0)], test_stream=[experience(1)] * 2)
    with pytest.raises(DataError, match="train experience 1 of the Avalanche benchmark has no samples"):
        cav.stream_from_avalanche(hollow)


def test_an_unknown_transform_group_is_a_data_error(av, raw):
    x_tr, y_tr, x_te, y_te = raw
    bench = av.b.nc_benchmark(dataset(x_tr, y_tr), dataset(x_te, y_te), 5, task_labels=False, seed=1)
    with pytest.raises(ContlearnError, match="has no transform group 'foo'; use 'eval' or 'train'"):
        len(cav.stream_from_avalanche(bench, transforms="foo").experiences[0].train)  # read on first access


def test_a_key_error_of_the_data_itself_is_not_called_a_transform_group():
    class Records(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise KeyError("pixels")  # a record that lacks a field

    with pytest.raises(KeyError, match="pixels"):
        cav.materialise(Records())


def test_ids_renumbered_in_each_task_keep_their_own_names(av, raw):
    """One Avalanche id stands for a different label in each task: no single original label to name it by."""
    x_tr, y_tr, x_te, y_te = raw
    bench = av.b.nc_benchmark(dataset(x_tr, y_tr), dataset(x_te, y_te), 5, task_labels=True, seed=1,
                              class_ids_from_zero_in_each_exp=True)
    assert cav.stream_from_avalanche(bench).class_names == ["0", "1"]


# ------------------------------------------------------------------- configs


def test_stream_from_config_alias_and_dotted_factory(av, monkeypatch):
    section = {"factory": "class_incremental_benchmark", "args": {"num_experiences": 5}, "test_fraction": 0.2}
    a = cav.stream_from_config(section, seed=4)
    b = cav.stream_from_config(section, seed=4)
    c = cav.stream_from_config(section, seed=5)
    assert a.setting == "class" and len(a) == 5 and a.class_names == b.class_names != c.class_names

    module = types.ModuleType("my_benchmarks")

    def make(n_experiences, seed=None):
        x, y = torch.randn(40, 3), torch.arange(40) % 4
        return av.b.tensors_benchmark(
            [[x[y < 2], y[y < 2]], [x[y >= 2], y[y >= 2]]], [[x[y < 2], y[y < 2]], [x[y >= 2], y[y >= 2]]],
            task_labels=[0] * n_experiences,
        )

    module.make = make
    monkeypatch.setitem(sys.modules, "my_benchmarks", module)
    stream = cav.stream_from_config({"factory": "my_benchmarks.make", "args": {"n_experiences": 2}}, seed=0)
    assert [e.classes for e in stream] == [[0, 1], [2, 3]] and stream.input_shape == (3,)

    with pytest.raises(ConfigError, match="class_incremental_benchmark"):
        cav.stream_from_config({"factory": "split_mnist", "args": {}}, seed=0)
    with pytest.raises(ConfigError, match="cannot be imported"):
        cav.stream_from_config({"factory": "my_benchmarks.nothing", "args": {}}, seed=0)
    with pytest.raises(ConfigError, match="rejected"):
        cav.stream_from_config({"factory": "my_benchmarks.make", "args": {"bogus": 1}}, seed=0)
    with pytest.raises(ConfigError, match="needs scenario.factory"):
        cav.stream_from_config({"args": {}}, seed=0)

    def unloadable(n_experiences):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz\nmore lines")

    module.unloadable = unloadable
    with pytest.raises(ContlearnError, match=r"could not load its data \(RuntimeError: Error downloading .*\.gz\); "
                                             r"put the data under .*dataset_root"):
        cav.stream_from_config({"factory": "my_benchmarks.unloadable", "args": {"n_experiences": 2}}, seed=0)


# --------------------------------------------------------------- metric helpers


def test_metric_helpers():
    R = [[0.9, 0.1, 0.0], [0.5, 0.8, 0.1], [0.7, 0.4, 0.9]]
    # Avalanche: accuracy when last trained minus final, over experiences before the last
    assert cav.avalanche_forgetting(R) == pytest.approx(((0.9 - 0.7) + (0.8 - 0.4)) / 2)
    assert cav.avalanche_forgetting(R) == pytest.approx(-M.bwt(R))
    # contlearn's forgetting takes the best earlier accuracy: here the same
    assert M.forgetting(R) == pytest.approx(cav.avalanche_forgetting(R))
    R2 = [[0.5, 0.0, 0.0], [0.9, 0.8, 0.0], [0.6, 0.7, 0.9]]  # experience 0 improved after it was trained
    assert M.forgetting(R2) == pytest.approx(0.2) and cav.avalanche_forgetting(R2) == pytest.approx(0.0)
    assert cav.avalanche_stream_accuracy(R, [10, 10, 20]) == pytest.approx((7 + 4 + 18) / 40)
    results = [
        {"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000": 0.5, "Top1_Acc_Exp/eval_phase/test_stream/Task001/Exp001": 0.25,
         "Top1_Acc_Exp/eval_phase/train_stream/Task000/Exp000": 1.0, "Loss_Stream/eval_phase/test_stream": 3.0},
    ]
    assert cav.accuracy_matrix_from_avalanche(results) == [[0.5, 0.25]]
    no_tasks = {"Top1_Acc_Exp/eval_phase/test_stream/Exp000": 0.5, "Top1_Acc_Exp/eval_phase/test_stream/Exp001": 0.0}
    assert cav.accuracy_matrix_from_avalanche([no_tasks]) == [[0.5, 0.0]]  # the new API's keys have no Task part
    with pytest.raises(ContlearnError, match="Top1_Acc_Exp"):
        cav.accuracy_matrix_from_avalanche([{}])


# ------------------------------------------------------ Naive vs finetune, parity


class OrderedNaive:
    """Avalanche's Naive drawing each epoch's sample order as contlearn does:
    ``randperm`` from one CPU generator seeded with the run seed."""

    @staticmethod
    def make(av, *, seed, **kwargs):
        class _OrderedNaive(av.t.Naive):
            def make_train_dataloader(self, **_):
                data, gen = self.adapted_dataset, self.order_generator

                class Order(torch.utils.data.Sampler):
                    def __len__(self):
                        return len(data)

                    def __iter__(self):
                        return iter(torch.randperm(len(data), generator=gen).tolist())

                self.dataloader = torch.utils.data.DataLoader(
                    data, batch_size=self.train_mb_size, sampler=Order(), collate_fn=data.collate_fn
                )

        strategy = _OrderedNaive(**kwargs)
        strategy.order_generator = torch.Generator().manual_seed(seed)
        return strategy


def test_naive_equals_finetune_and_metric_parity(av):
    epochs, lr, batch_size, seed = 2, 0.1, 32, 0
    cfg = load_config(
        "split-digits",
        [f"train.epochs={epochs}", f"train.lr={lr}", f"train.batch_size={batch_size}", "eval.fwt=false", "model.hidden=[64]"],
    )
    cl_stream = stream_of(cfg)
    bench = av.b.tensors_benchmark(
        [[e.train.x, e.train.y] for e in cl_stream], [[e.test.x, e.test.y] for e in cl_stream], task_labels=[0] * 5
    )
    stream = cav.stream_from_avalanche(bench)

    seed_everything(seed)
    model = create_model(cfg.model, stream.input_shape)
    model.head.grow(stream.n_classes)  # full head from the start: same initial weights in both
    init = copy.deepcopy(model.state_dict())

    class Init(Quiet):
        @hookimpl
        def setup(self, run):
            run.model.head.grow(stream.n_classes)
            run.model.load_state_dict(init)

    contlearn_results = Experiment(cfg, stream=stream, plugins={"init": Init()}).run()

    evaluator = silent(
        av,
        av.m.accuracy_metrics(experience=True, stream=True),
        av.m.forgetting_metrics(experience=True, stream=True),
        av.m.bwt_metrics(experience=True, stream=True),
    )
    av_model = cav.as_avalanche_model(model)
    strategy = OrderedNaive.make(
        av, model=av_model, optimizer=torch.optim.SGD(av_model.parameters(), lr=lr), train_mb_size=batch_size,
        train_epochs=epochs, eval_mb_size=512, evaluator=evaluator, seed=seed,
    )
    results = train_eval(strategy, bench)
    R = cav.accuracy_matrix_from_avalanche(results)
    last = results[-1]
    print(f"\nfinal average accuracy: Avalanche Naive {M.average_accuracy(R):.4f}, contlearn finetune "
          f"{contlearn_results.average_accuracy:.4f}; StreamForgetting {last['StreamForgetting/eval_phase/test_stream']:.4f}")

    assert abs(M.average_accuracy(R) - contlearn_results.average_accuracy) <= 0.01
    assert M.average_accuracy(R) < 0.3  # class-incremental fine-tuning forgets
    for row_av, row_cl in zip(R, contlearn_results.accuracy_matrix, strict=True):
        assert row_av == pytest.approx(row_cl, abs=0.02)
    # metric parity on that run
    assert cav.avalanche_forgetting(R) == pytest.approx(last["StreamForgetting/eval_phase/test_stream"], abs=1e-9)
    assert M.bwt(R) == pytest.approx(last["StreamBWT/eval_phase/test_stream"], abs=1e-9)
    assert M.forgetting(R) >= cav.avalanche_forgetting(R) - 1e-12
    sizes = [len(e.test) for e in stream]
    assert cav.avalanche_stream_accuracy(R, sizes) == pytest.approx(last["Top1_Acc_Stream/eval_phase/test_stream/Task000"], abs=1e-6)
    for j in range(4):
        assert R[j][j] - R[4][j] == pytest.approx(last[f"ExperienceForgetting/eval_phase/test_stream/Task000/Exp{j:03d}"], abs=1e-9)


# ------------------------------------------------------ contlearn plugins in Avalanche


def permuted_digits(av, raw, n):
    """Domain-incremental digits: experience i permutes the 64 pixels with a fixed permutation."""
    x_tr, y_tr, x_te, y_te = raw
    g = torch.Generator().manual_seed(0)
    perms = [torch.randperm(64, generator=g) for _ in range(n)]

    def permute(x, p):
        return x.flatten(1)[:, p].reshape(x.shape)

    return av.b.tensors_benchmark(
        [[permute(x_tr, p), y_tr] for p in perms], [[permute(x_te, p), y_te] for p in perms], task_labels=[0] * n
    )


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def naive_mlp_matrix(av, bench, plugins):
    """The accuracy matrix of Avalanche's Naive training :func:`mlp` with ``plugins`` (SGD 0.05, 2 epochs)."""
    model = mlp()
    strategy = av.t.Naive(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=32, train_epochs=2,
        eval_mb_size=512, evaluator=silent(av, av.m.accuracy_metrics(experience=True)), plugins=plugins,
    )
    return cav.accuracy_matrix_from_avalanche(train_eval(strategy, bench))


def test_contlearn_ewc_in_avalanche_naive_reduces_forgetting(av, raw):
    bench = permuted_digits(av, raw, 2)
    lam = 1000.0

    naive = naive_mlp_matrix(av, bench, [])
    ewc = naive_mlp_matrix(av, bench, [cav.as_avalanche_plugin("ewc", {"lam": lam})])
    reference = naive_mlp_matrix(av, bench, [av.t.plugins.EWCPlugin(ewc_lambda=lam / 2)])  # Avalanche's penalty has no 1/2
    print(f"\nforgetting: Naive {M.forgetting(naive):.3f}, Naive + contlearn ewc {M.forgetting(ewc):.3f}, "
          f"Avalanche EWCPlugin {M.forgetting(reference):.3f}; average accuracy {M.average_accuracy(naive):.3f} / "
          f"{M.average_accuracy(ewc):.3f} / {M.average_accuracy(reference):.3f}")
    assert M.forgetting(naive) > 0.08
    assert M.forgetting(ewc) < M.forgetting(naive) - 0.05
    assert M.average_accuracy(ewc) > M.average_accuracy(naive)
    for row_ewc, row_ref in zip(ewc, reference, strict=True):  # the same method, implemented twice
        assert row_ewc == pytest.approx(row_ref, abs=0.02)


def test_power_law_rehearsal_through_extra_samples_runs_in_avalanche_and_its_mixture_is_refused(av, raw):
    """With via=extra_samples, power-law rehearsal's train_data only draws the
    phase's rehearsal (produces_train_data is false): the adapter calls it for
    that, and the drawn samples join the strategy's mini-batches."""
    x_tr, y_tr, x_te, y_te = raw
    bench = av.b.nc_benchmark(dataset(x_tr, y_tr), dataset(x_te, y_te), 2, task_labels=False,
                              fixed_class_order=list(range(10)))

    adapter = cav.as_avalanche_plugin("powerlaw", {"via": "extra_samples"})
    naive, rehearsed = naive_mlp_matrix(av, bench, []), naive_mlp_matrix(av, bench, [adapter])
    print(f"\naccuracy on digits 0-4 after 5-9: Naive {naive[1][0]:.3f}, with power-law rehearsal {rehearsed[1][0]:.3f}")
    history = adapter.plugin.history
    assert [h["phase"] for h in history] == [0, 1] and history[1]["tasks"] == [0] and history[1]["counts"][0] > 0
    assert naive[1][0] < 0.1 < 0.5 < rehearsed[1][0]  # the first five digits, kept by the rehearsal alone
    with pytest.raises(PluginError, match=r"implements train_data, which an Avalanche strategy cannot call"):
        cav.as_avalanche_plugin("powerlaw")  # the mixture replaces the experience's data

    class SaysNoDataButGivesSome(Quiet):
        produces_train_data = False

        @hookimpl
        def train_data(self, run, exp):
            return exp.train

    with pytest.raises(PluginError, match=r"returned training data \(train_data\) though it says it produces none"):
        naive_mlp_matrix(av, bench, [cav.as_avalanche_plugin(SaysNoDataButGivesSome())])


@pytest.mark.parametrize("hook, returned, message", [
    ("loss_terms", {"x": 0.5}, "loss term 'x' is a float, not a tensor"),
    ("loss_terms", {"x": torch.ones(3, requires_grad=True)}, r"loss term 'x' has shape \(3,\): a loss term is a scalar"),
    ("loss_terms", [torch.tensor(1.0)], "loss_terms must return a dict of named loss tensors or None, got list"),
    ("extra_samples", (torch.zeros(1, 64), torch.zeros(1)), "extra_samples must return a Batch or None, got a tuple"),
])  # fmt: skip
def test_a_hook_result_of_the_wrong_kind_is_the_loops_error_in_avalanche_too(av, raw, hook, returned, message):
    class Wrong(Quiet):
        pass

    setattr(Wrong, hook, hookimpl(lambda self, run, batch: returned))
    with pytest.raises(TrainingError, match=message):
        naive_mlp_matrix(av, permuted_digits(av, raw, 1), [cav.as_avalanche_plugin(Wrong())])


def test_plugins_see_an_avalanche_model_in_the_mode_avalanche_put_it_in(av, raw):
    modes = []

    class Mode(Quiet):
        @hookimpl
        def after_step(self, run):
            modes.append(("train", run.model.training))

        @hookimpl
        def after_eval_batch(self, run, batch, predictions):
            modes.append(("eval", run.model.training))

    naive_mlp_matrix(av, permuted_digits(av, raw, 1), [cav.as_avalanche_plugin(Mode())])
    assert {kind: mode for kind, mode in modes} == {"train": True, "eval": False} and len(set(modes)) == 2


def test_contlearn_reglora_in_avalanche_adapts_a_contlearn_model_and_holds_its_key_elements(av, raw):
    """Model surgery inside Avalanche: the adapters join the strategy's optimizer, the base weights
    change only by the merges, and the key elements accumulate over the experiences."""
    bench = permuted_digits(av, raw, 3)
    model = create_model(load_config(None, ["model.hidden=[32]"]).model, (1, 8, 8))
    av_model = cav.as_avalanche_model(model)
    adapter = cav.as_avalanche_plugin("reglora", {"rank": 4})
    from avalanche.core import SupervisedPlugin

    class AdaptersTrain(SupervisedPlugin):
        """After each epoch: are the adapters in the optimizer, and did B move from zero?"""

        def __init__(self):
            super().__init__()
            self.seen: list[tuple[int, bool, bool]] = []

        def after_training_epoch(self, strategy, *args, **kwargs):
            layer = model.backbone.net[1]
            optimized = {id(p) for group in strategy.optimizer.param_groups for p in group["params"]}
            self.seen.append((strategy.clock.train_exp_counter, id(layer.lora_B) in optimized,
                              bool(torch.count_nonzero(layer.lora_B))))

    probe = AdaptersTrain()
    strategy = av.t.Naive(
        model=av_model, optimizer=torch.optim.AdamW(av_model.parameters(), lr=1e-2), train_mb_size=32,
        train_epochs=2, eval_mb_size=512, evaluator=silent(av, av.m.accuracy_metrics(experience=True)),
        plugins=[adapter, probe],
    )
    base = model.backbone.net[1].weight.detach().clone()
    R = cav.accuracy_matrix_from_avalanche(train_eval(strategy, bench))
    layer = model.backbone.net[1]
    assert type(layer).__name__ == "LoRALinear" and torch.count_nonzero(layer.lora_B) == 0  # merged
    assert not torch.equal(layer.base.weight, base)  # changed by the merges only: the base is frozen
    optimized = {id(p) for group in strategy.optimizer.param_groups for p in group["params"]}
    assert id(layer.lora_A) in optimized and id(layer.lora_B) in optimized
    reglora = adapter.plugin
    assert reglora.keys["net.1"].numel() == 3 * int(0.02 * 64 * 32)
    assert R[0][0] > 0.5 and R[2][2] > 0.5
    assert probe.seen == [(k, True, True) for k in range(3) for _ in range(2)]  # experience 0 too


class Recorder(Quiet):
    """Records what the adapter calls and what the hooks see."""

    def __init__(self):
        self.calls: list[str] = []
        self.batch_sizes: list[int] = []
        self.metrics: list[dict] = []
        self.seen: dict[str, object] = {}

    @hookimpl
    def setup(self, run):
        self.calls.append("setup")

    @hookimpl
    def before_experience(self, run, exp):
        self.calls.append(f"before_experience {exp.index}")
        self.seen[f"exp{exp.index}"] = (run.experience is exp, len(exp.train), len(exp.test), exp.classes, exp.task)
        self.seen["stream"] = (len(run.stream), run.stream.setting)
        self.seen["batch_size"] = run.config.train.batch_size

    @hookimpl
    def extra_samples(self, run, batch):
        return Batch(batch.x[:2], batch.y[:2], batch.t[:2])

    @hookimpl
    def loss_terms(self, run, batch, out):
        assert isinstance(out, Output) and out.features is None
        assert out.logits.shape[0] == len(batch)
        self.batch_sizes.append(len(batch))
        return {"zero": 0.0 * out.logits.sum()}

    @hookimpl
    def after_backward(self, run):
        self.calls.append("after_backward")

    @hookimpl
    def after_step(self, run):
        self.calls.append("after_step")

    @hookimpl
    def after_experience(self, run, exp):
        self.calls.append(f"after_experience {exp.index}")

    @hookimpl
    def after_eval_batch(self, run, batch, predictions):
        self.calls.append("after_eval_batch")

    @hookimpl
    def on_metrics(self, run, metrics):
        self.metrics.append(metrics)

    @hookimpl
    def teardown(self, run):
        self.calls.append("teardown")

    @hookimpl
    def unlearn(self, run, request):
        return {"request": request}


def test_adapter_calls_the_hooks_at_the_matching_callbacks(av, raw):
    x_tr, y_tr, x_te, y_te = raw
    small = [(y_tr < 2), (y_tr >= 2) & (y_tr < 4)]
    small_te = [(y_te < 2), (y_te >= 2) & (y_te < 4)]
    bench = av.b.tensors_benchmark(
        [[x_tr[m], y_tr[m]] for m in small], [[x_te[m], y_te[m]] for m in small_te], task_labels=[0, 1]
    )
    recorder = Recorder()
    adapter = cav.as_avalanche_plugin(recorder)
    model = mlp()
    strategy = av.t.Naive(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=64, train_epochs=1,
        eval_mb_size=512, evaluator=silent(av), plugins=[adapter],
    )
    train_eval(strategy, bench)
    n_train = [int(m.sum()) for m in small]
    steps = sum(-(-n // 64) for n in n_train)
    assert recorder.calls.count("setup") == 1
    assert recorder.calls.count("after_step") == recorder.calls.count("after_backward") == steps
    assert [c for c in recorder.calls if "experience" in c] == [
        "before_experience 0", "after_experience 0", "before_experience 1", "after_experience 1"
    ]
    assert recorder.seen["exp0"] == (True, n_train[0], int(small_te[0].sum()), [0, 1], 0)
    assert recorder.seen["exp1"] == (True, n_train[1], int(small_te[1].sum()), [2, 3], 1)
    assert recorder.seen["stream"] == (2, "task") and recorder.seen["batch_size"] == 64
    assert recorder.batch_sizes[0] == 64 + 2  # extra samples joined the mini-batch
    assert recorder.calls.count("after_eval_batch") == 2 * 2  # two evaluations of two test experiences
    evals = [m for m in recorder.metrics if m["kind"] == "eval"]
    epochs = [m for m in recorder.metrics if m["kind"] == "epoch"]
    assert len(evals) == 2 and len(evals[-1]["accuracy"]) == 2 and len(epochs) == 2 and "loss/zero" in epochs[0]
    assert adapter.run.accuracy_rows == [m["accuracy"] for m in evals]
    assert adapter.unlearn(classes=[1]) == {"request": {"classes": [1]}}
    adapter.close()
    assert recorder.calls[-1] == "teardown"


def test_adapter_uses_a_plugin_optimizer(av, raw):
    x_tr, y_tr, x_te, y_te = raw

    class Frozen(Quiet):
        @hookimpl
        def configure_optimizer(self, run, exp):
            return torch.optim.SGD(run.model.parameters(), lr=0.0)

    bench = av.b.tensors_benchmark([[x_tr[:64], y_tr[:64]]], [[x_te[:64], y_te[:64]]], task_labels=[0])
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    strategy = av.t.Naive(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), train_mb_size=32, train_epochs=1,
        evaluator=silent(av), plugins=[cav.as_avalanche_plugin(Frozen())],
    )
    strategy.train(bench.train_stream[0], eval_streams=[])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())



def test_a_loss_term_returned_at_some_steps_only_is_averaged_over_every_step_as_the_loop_does(av, raw):
    class EveryOtherStep:
        def __init__(self):
            self.epochs = []

        @hookimpl
        def loss_terms(self, run, out):
            return {"sometimes": 0.0 * out.logits.sum() + 1.0} if run.step % 2 == 0 else None

        @hookimpl
        def on_metrics(self, metrics):
            if metrics["kind"] == "epoch":
                self.epochs.append(metrics)

    x_tr, y_tr, x_te, y_te = raw
    train, test = y_tr < 2, y_te < 2
    bench = av.b.tensors_benchmark([[x_tr[train], y_tr[train]]], [[x_te[test], y_te[test]]], task_labels=[0])
    plugin = EveryOtherStep()
    model = mlp()
    strategy = av.t.Naive(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=16, train_epochs=1,
        eval_mb_size=512, evaluator=silent(av), plugins=[cav.as_avalanche_plugin(plugin)],
    )
    train_eval(strategy, bench)
    steps = -(-int(train.sum()) // 16)
    assert plugin.epochs[0]["loss/sometimes"] == pytest.approx(((steps + 1) // 2) / steps)  # 1 at even steps, 0 at odd


def test_unmappable_hooks_are_refused(av):
    class Forwarding(Quiet):
        @hookimpl
        def forward(self, run, batch):
            return None

    class Predicting(Quiet):
        @hookimpl
        def predict(self, run, batch):
            return None

    with pytest.raises(PluginError, match="forward"):
        cav.as_avalanche_plugin(Forwarding())
    with pytest.raises(PluginError, match="predict"):
        cav.as_avalanche_plugin(Predicting())
    with pytest.raises(PluginError, match="unknown plugin"):
        cav.as_avalanche_plugin("no-such-plugin")


    class StreamingLDA:  # the attributes of an Avalanche strategy that takes no gradient steps
        optimizer, train_mb_size, eval_mb_size, train_epochs, device = None, 16, 16, 1, "cpu"

    with pytest.raises(PluginError, match="needs a strategy trained by gradient steps.*StreamingLDA has no optimizer"):
        cav.as_avalanche_plugin("ewc")._make_run(StreamingLDA())
    with pytest.raises(ConfigError, match="lamda"):
        cav.as_avalanche_plugin("ewc", {"lamda": 1.0})
    with pytest.raises(ContlearnError, match="not trained"):
        cav.as_avalanche_plugin(Recorder()).unlearn(classes=[0])


def test_adapter_stream_with_and_without_a_benchmark(av, raw):
    """run.stream: the benchmark given (test data included); the experience's origin
    stream (Avalanche's new API records no benchmark: no test data); or, for
    experiences without a stream, the experiences trained so far."""
    from avalanche.benchmarks.scenarios.dataset_scenario import DatasetExperience

    x_tr, y_tr, x_te, y_te = raw
    keep, keep_te = y_tr < 4, y_te < 4
    bench = av.b.class_incremental_benchmark(
        {"train": dataset(x_tr[keep], y_tr[keep]), "test": dataset(x_te[keep_te], y_te[keep_te])},
        class_order=[0, 1, 2, 3], num_experiences=2,
    )
    loose = [DatasetExperience(dataset=e.dataset, current_experience=k) for k, e in enumerate(bench.train_stream)]
    n_train = [int((y_tr == a).sum() + (y_tr == b).sum()) for a, b in ((0, 1), (2, 3))]
    n_test = [int((y_te == a).sum() + (y_te == b).sum()) for a, b in ((0, 1), (2, 3))]

    def seen_by_plugin(experiences, **kwargs):
        seen = []

        class Look(Quiet):
            @hookimpl
            def before_experience(self, run, exp):
                seen.append((len(run.stream), [e.classes for e in run.stream], len(exp.train), len(exp.test)))

        model = mlp()
        strategy = av.t.Naive(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=64,
            evaluator=silent(av), plugins=[cav.as_avalanche_plugin(Look(), **kwargs)],
        )
        for exp in experiences:
            strategy.train(exp, eval_streams=[])
        return seen

    both = [[0, 1], [2, 3]]
    assert seen_by_plugin(bench.train_stream, benchmark=bench) == [
        (2, both, n_train[0], n_test[0]), (2, both, n_train[1], n_test[1])
    ]
    assert seen_by_plugin(bench.train_stream) == [(2, both, n_train[0], 0), (2, both, n_train[1], 0)]
    assert seen_by_plugin(loose) == [(1, both[:1], n_train[0], 0), (2, both, n_train[1], 0)]


# ------------------------------------------------------ contlearn models in Avalanche


def contlearn_model(head):
    torch.manual_seed(0)
    return ContinualModel(MLP((64,), (32,)), head(32))


def naive(av, model, plugins=()):
    return av.t.Naive(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_mb_size=32, train_epochs=1,
        eval_mb_size=512, evaluator=silent(av, av.m.accuracy_metrics(experience=True)), plugins=list(plugins),
    )


def test_wrapped_model_grows_its_head_from_each_training_experience(av, raw):
    """Avalanche's model_adaptation grows the contlearn head before each training
    experience (Avalanche's class ids, no manual adapt); evaluation experiences,
    even of classes not trained yet, leave it as it is."""
    from avalanche.models import DynamicModule, MultiTaskModule

    x_tr, y_tr, x_te, y_te = raw
    keep, keep_te = y_tr < 6, y_te < 6
    bench = av.b.class_incremental_benchmark(
        {"train": dataset(x_tr[keep], y_tr[keep]), "test": dataset(x_te[keep_te], y_te[keep_te])},
        class_order=[1, 0, 4, 2, 5, 3], num_experiences=3,
    )
    seen_by_plugin = []

    class Look(Quiet):
        @hookimpl
        def before_experience(self, run, exp):
            seen_by_plugin.append((run.model is model, run.model.head.out_features))

    model = contlearn_model(IncrementalLinear)
    wrapped = cav.as_avalanche_model(model)
    assert isinstance(wrapped, DynamicModule) and not isinstance(wrapped, MultiTaskModule)
    strategy = naive(av, wrapped, [cav.as_avalanche_plugin(Look())])
    strategy.eval(bench.test_stream)  # before any training: nothing grows
    assert model.head.out_features == 0
    widths, results = [], []
    for exp in bench.train_stream:
        strategy.train(exp, eval_streams=[])
        widths.append(model.head.out_features)
        assert any(p is model.head.weight for group in strategy.optimizer.param_groups for p in group["params"])
        results.append(strategy.eval(bench.test_stream))  # includes classes the head does not have yet
        assert model.head.out_features == widths[-1]
    assert widths == [2, 5, 6]  # max class id + 1 of the classes seen: {0, 1}, {2, 4}, {3, 5}
    assert seen_by_plugin == [(True, 2), (True, 5), (True, 6)]  # plugins see the grown head
    R = cav.accuracy_matrix_from_avalanche(results)
    assert all(R[i][i] > 0.4 for i in range(3)) and R[1][1] > 0.8  # each new head trained
    assert R[0][1] == R[0][2] == 0.0  # masked logits: classes the head lacks are never predicted
    # evaluated on classes beyond the head, logits are padded with MASKED_LOGIT: finite, never the argmax
    wrapped.eval()
    wrapped.adaptation(types.SimpleNamespace(classes_in_this_experience=[7, 9]))
    with torch.no_grad():
        logits = wrapped(x_te[:5])
    assert logits.shape == (5, 10) and bool((logits[:, 6:] == MASKED_LOGIT).all()) and bool((logits.argmax(1) < 6).all())
    assert math.isfinite(float(torch.nn.functional.cross_entropy(logits, torch.tensor([9, 7, 9, 7, 9]))))
    # a model the user already adapted: adapt is idempotent, nothing grows twice
    model.adapt([0, 1, 2, 3, 4, 5, 6, 7])
    strategy.train(bench.train_stream[0], eval_streams=[])
    assert model.head.out_features == 8
    # the wrapper pickles (Avalanche checkpoints pickle the strategy's model)
    again = pickle.loads(pickle.dumps(wrapped))
    assert type(again) is type(wrapped) and again.model.head.out_features == 8
    with pytest.raises(ContlearnError, match="torch Module"):
        cav.as_avalanche_model(object())


@pytest.mark.parametrize("old_api", [False, True])
def test_wrapped_multi_head_model_grows_a_head_per_task(av, raw, old_api):
    """A MultiHead model is a MultiTaskModule: Avalanche passes the task labels and
    model_adaptation adds the head of each new task (also from the new API's
    task_incremental_benchmark, whose experiences lack classes_in_this_experience,
    and from nc_benchmark with class ids from zero in each task)."""
    from avalanche.models import MultiTaskModule

    x_tr, y_tr, x_te, y_te = raw
    keep, keep_te = y_tr < 4, y_te < 4
    train, test = dataset(x_tr[keep], y_tr[keep]), dataset(x_te[keep_te], y_te[keep_te])
    if old_api:
        bench = av.b.nc_benchmark(
            train, test, 2, task_labels=True, fixed_class_order=[0, 1, 2, 3], class_ids_from_zero_in_each_exp=True
        )
    else:
        bench = av.b.task_incremental_benchmark(
            av.b.class_incremental_benchmark({"train": train, "test": test}, class_order=[0, 1, 2, 3], num_experiences=2)
        )
    model = contlearn_model(MultiHead)
    wrapped = cav.as_avalanche_model(model)
    assert isinstance(wrapped, MultiTaskModule)
    strategy = naive(av, wrapped)
    expected = [{0: [0, 1]}, {0: [0, 1], 1: [0, 1] if old_api else [2, 3]}]
    results = []
    for k, exp in enumerate(bench.train_stream):
        strategy.train(exp, eval_streams=[])
        assert model.head.task_classes == expected[k]
        results.append(strategy.eval(bench.test_stream))  # the test stream of task 1 adds no head
        assert model.head.task_classes == expected[k]
    R = cav.accuracy_matrix_from_avalanche(results)
    assert R[0][0] > 0.8 and R[1][1] > 0.8 and R[1][0] > 0.6  # task labels select the head
    outputs = wrapped(x_te[:3])  # no task labels: every task's logits, as MultiTaskModule returns them
    assert sorted(outputs) == [0, 1] and all(v.shape == (3, 2 if old_api else 4) for v in outputs.values())


def test_experience_with_several_tasks_grows_each_tasks_head(av, raw):
    x_tr, y_tr, x_te, y_te = raw
    keep = y_tr < 4
    bench = av.b.task_incremental_benchmark(
        av.b.class_incremental_benchmark(
            {"train": dataset(x_tr[keep], y_tr[keep]), "test": dataset(x_tr[keep], y_tr[keep])},
            class_order=[0, 1, 2, 3], num_experiences=2,
        )
    )
    both = bench.train_stream[0].dataset.concat(bench.train_stream[1].dataset)
    mixed = av.b.with_task_labels(av.b.benchmark_from_datasets(train=[both], test=[both]))
    model = contlearn_model(MultiHead)
    naive(av, cav.as_avalanche_model(model)).train(mixed.train_stream[0], eval_streams=[])
    assert model.head.task_classes == {0: [0, 1], 1: [2, 3]}


def test_config_names_an_avalanche_benchmark():
    """``scenario.source=avalanche`` builds the stream through the factory it names."""
    from contlearn import Experiment, load_config

    cfg = load_config(
        None,
        [
            "scenario.source=avalanche",
            "scenario.factory=class_incremental_benchmark",
            "scenario.args={num_experiences: 5}",
            "train.epochs=1",
            "eval.fwt=false",
        ],
    )
    results = Experiment(cfg).run()
    assert len(results.accuracy_matrix) == 5
    assert results.accuracy_matrix[-1][-1] > 0.5


# ------------------------------------------------------------- found by a review


def test_an_adapter_survives_avalanches_checkpoint_pickler():
    import dill  # Avalanche's save_checkpoint pickles with dill

    adapter = cav.as_avalanche_plugin("ewc")
    restored = dill.loads(dill.dumps(adapter))
    assert type(restored) is type(adapter)  # by reference: not rebuilt without its bases
    assert type(restored).before_training_exp is type(adapter).before_training_exp


def test_lwf_on_a_multi_head_model_gets_its_features_inside_avalanche(av, raw):
    x_tr, y_tr, x_te, y_te = raw
    bench = av.b.task_incremental_benchmark(av.b.class_incremental_benchmark(
        {"train": dataset(x_tr, y_tr), "test": dataset(x_te, y_te)}, num_experiences=3, seed=0))  # fmt: skip
    torch.manual_seed(0)
    model = ContinualModel(MLP((64,), (32,)), MultiHead(32))
    wrapped = cav.as_avalanche_model(model)
    strategy = av.t.Naive(model=wrapped, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_mb_size=32,
                          train_epochs=1, evaluator=silent(av), plugins=[cav.as_avalanche_plugin("lwf")])  # fmt: skip
    for exp in bench.train_stream[:2]:
        strategy.train(exp, eval_streams=[])  # was: "lwf: a multi-head model must return its features"
    assert "last_output" not in copy.deepcopy(wrapped).__dict__  # copies leave the last forward out
    pickle.loads(pickle.dumps(wrapped))


def test_test_data_never_get_the_training_augmentation(av, raw):
    x_tr, y_tr, x_te, y_te = raw
    flip = lambda x: x.flip(-1)  # noqa: E731
    bench = av.b.nc_benchmark(dataset(x_tr, y_tr), dataset(x_te, y_te), n_experiences=5, task_labels=False, seed=0,
                              train_transform=flip, eval_transform=None)  # fmt: skip
    plain, augmented = cav.stream_from_avalanche(bench), cav.stream_from_avalanche(bench, transforms="train")
    assert torch.equal(augmented[0].train.x, plain[0].train.x.flip(-1))
    assert torch.equal(augmented[0].test.x, plain[0].test.x)


def test_an_old_api_experience_with_several_task_labels(raw):
    from avalanche.benchmarks import dataset_benchmark
    from avalanche.benchmarks.utils.classification_dataset import (
        _make_taskaware_classification_dataset,
    )
    from torch.utils.data import TensorDataset

    x_tr, y_tr, _, _ = raw
    keep = y_tr < 4
    data = TensorDataset(x_tr[keep], y_tr[keep])
    data.targets = y_tr[keep].tolist()
    tasks = (y_tr[keep] >= 2).long().tolist()
    avd = _make_taskaware_classification_dataset(data, task_labels=tasks)
    stream = cav.stream_from_avalanche(dataset_benchmark([avd], [avd]))  # was a bare ValueError
    assert stream[0].task == 0 and sorted(stream[0].train.t.unique().tolist()) == [0, 1]


def test_adapter_data_are_on_the_strategys_device(av, raw):
    from contlearn.interop._avalanche_stream import LazyExperience

    exp = LazyExperience(0, [0], 0, lambda: TensorData(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)),
                         lambda: TensorData(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)))  # fmt: skip
    exp.device = torch.device("meta")  # stands for a GPU: the strategy's device
    assert exp.train.x.device.type == "meta" and exp.test.y.device.type == "meta"


def test_class_names_follow_the_data_sets_labels_when_avalanche_renumbered(av, raw):
    x_tr, y_tr, x_te, y_te = raw
    names = [f"digit {k}" for k in range(10)]
    kept = av.b.nc_benchmark(dataset(x_tr, y_tr), dataset(x_te, y_te), n_experiences=5, task_labels=False, seed=1)
    renumbered = av.b.nc_benchmark(dataset(x_tr, y_tr), dataset(x_te, y_te), n_experiences=5, task_labels=False,
                                   seed=1, class_ids_from_zero_from_first_exp=True)  # fmt: skip
    a = cav.stream_from_avalanche(kept, class_names=names)
    b = cav.stream_from_avalanche(renumbered, class_names=names)
    assert b.class_names == a.class_names and torch.equal(a[0].train.y, b[0].train.y)
    first = int(renumbered.classes_order_original_ids[0])
    assert b.class_names[0] == f"digit {first}" and first != 0  # class 0 is the data set's first class drawn
    assert cav.stream_from_avalanche(renumbered).class_names[0] == str(first)


def test_lwf_on_an_avalanche_multi_task_model_distils_every_old_tasks_classifier(av, raw):
    from avalanche.models import MultiHeadClassifier, MultiTaskModule

    class Net(MultiTaskModule):  # forward(x, task_labels) only, as Avalanche's MTSimpleMLP
        def __init__(self):
            super().__init__()
            self.body, self.classifier = torch.nn.Linear(64, 32), MultiHeadClassifier(32)

        def forward(self, x, task_labels):
            return self.classifier(torch.relu(self.body(x)), task_labels)

    x_tr, y_tr, x_te, y_te = raw
    x_tr, x_te = x_tr.flatten(1), x_te.flatten(1)
    keep, keep_te = y_tr < 6, y_te < 6
    bench = av.b.nc_benchmark(dataset(x_tr[keep], y_tr[keep]), dataset(x_te[keep_te], y_te[keep_te]), 3,
                              task_labels=True, fixed_class_order=list(range(6)),
                              class_ids_from_zero_in_each_exp=True)  # fmt: skip
    torch.manual_seed(0)
    adapter = cav.as_avalanche_plugin("lwf")
    strategy = naive(av, Net(), [adapter])
    strategy.train(bench.train_stream[0], eval_streams=[])
    lwf = adapter.plugin
    assert lwf.teacher.trained_tasks == [0]
    x = x_tr[keep][:16]
    batch = Batch(x, torch.zeros(16, dtype=torch.long), torch.ones(16, dtype=torch.long))  # new task 1's data
    term = lwf.loss_terms(run=adapter.run, batch=batch, out=Output(torch.zeros(16, 2)))["lwf"]
    with torch.no_grad():  # the student is still the teacher: the soft targets' own entropy, from task 0's head
        old = lwf.teacher.task_logits(x, 0)
        soft = torch.softmax(old / lwf.config.T, dim=1)
        expected = -(soft * torch.log_softmax(old / lwf.config.T, dim=1)).sum(1).mean() * lwf.config.alpha
    assert old.shape == (16, 2) and term.requires_grad
    torch.testing.assert_close(term.detach(), expected)
    for exp in bench.train_stream[1:]:  # was a KeyError: the teacher has no classifier for task 1
        strategy.train(exp, eval_streams=[])
    assert lwf.teacher.trained_tasks == [0, 1, 2]


def lwf_on_an_incremental_classifier(av, raw, class_order):
    """The digits of ``class_order`` in experiences of two classes (ids kept), an
    MLP with Avalanche's IncrementalClassifier, and Naive with contlearn's LwF:
    (bench, model, adapter, strategy, flattened test inputs)."""
    from avalanche.models import IncrementalClassifier

    x_tr, y_tr, x_te, y_te = raw
    x_tr, x_te = x_tr.flatten(1), x_te.flatten(1)
    keep, keep_te = y_tr < len(class_order), y_te < len(class_order)
    bench = av.b.class_incremental_benchmark({"train": dataset(x_tr[keep], y_tr[keep]),
                                              "test": dataset(x_te[keep_te], y_te[keep_te])},
                                             class_order=class_order, num_experiences=len(class_order) // 2)  # fmt: skip
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), IncrementalClassifier(32, 2))
    adapter = cav.as_avalanche_plugin("lwf")
    return bench, model, adapter, naive(av, model, [adapter]), x_te


def test_a_teacher_of_an_incremental_classifier_has_only_the_classes_trained(av, raw):
    """Avalanche's IncrementalClassifier grows on evaluation experiences too, its
    new units masked at -1000; LwF distilled those as the old model's answer."""
    bench, model, adapter, strategy, x_te = lwf_on_an_incremental_classifier(av, raw, list(range(6)))
    widths = []
    for exp in bench.train_stream[:2]:
        strategy.train(exp, eval_streams=[])
        strategy.eval(bench.test_stream)  # grows the classifier to 6 outputs
        widths.append((model[2].classifier.out_features, adapter.plugin.teacher(x_te[:4]).logits.shape[1]))
    assert widths == [(6, 2), (6, 4)]
    assert adapter.plugin.teacher(x_te[:4]).logits.min() > -100  # no masked unit among the targets


def test_lwf_distils_only_the_trained_classes_when_class_ids_have_gaps(av, raw):
    """A shuffled class order kept unrenumbered trains classes 3 and 7 first: the
    teacher's columns 0-2 and 4-6 are masked units, not old classes."""
    bench, _, adapter, strategy, x_te = lwf_on_an_incremental_classifier(av, raw, [3, 7, 1, 5, 0, 2, 4, 6])
    strategy.train(bench.train_stream[0], eval_streams=[])
    lwf = adapter.plugin
    assert lwf.teacher.trained_classes == [3, 7]
    student = torch.zeros(16, 8, requires_grad=True)  # uniform over any set of columns
    batch = Batch(x=x_te[:16], y=torch.zeros(16, dtype=torch.long), t=torch.zeros(16, dtype=torch.long))
    term = lwf.loss_terms(run=adapter.run, batch=batch, out=Output(student))["lwf"]
    assert term.item() == pytest.approx(lwf.config.alpha * math.log(2))  # 2 classes, not the 8 columns
    strategy.train(bench.train_stream[1], eval_streams=[])
    assert lwf.teacher.trained_classes == [1, 3, 5, 7]


def test_materialised_samples_are_float_inputs_and_one_class_id_each():
    x = torch.arange(6, dtype=torch.uint8).reshape(3, 2) * 51
    data = cav.materialise([(x[i], torch.tensor([i])) for i in range(3)])  # 8-bit images, labels of shape [1]
    assert data.x.dtype == torch.float32 and data.x.max() == 1.0 and data.y.tolist() == [0, 1, 2]
    one_hot = torch.eye(3)
    with pytest.raises(ContlearnError, match=r"labels of shape \(3, 3\) for 3 inputs; .* give their argmax"):
        cav.materialise([(torch.zeros(2), one_hot[i]) for i in range(3)])
    with pytest.raises(ContlearnError, match="fractional labels such as 0.7"):
        cav.materialise([(torch.zeros(2), 0.7), (torch.zeros(2), 1.0)])
    with pytest.raises(ContlearnError, match="yields the label -1; class ids start at 0"):
        cav.materialise([(torch.zeros(2), -1), (torch.zeros(2), 1)])
    with pytest.raises(ContlearnError, match="inputs of dtype torch.int64"):
        cav.materialise([(torch.zeros(2, dtype=torch.long), 0)])


def test_a_test_class_no_experience_trains_is_refused_whether_or_not_labels_are_renumbered(av):
    x, y = torch.randn(40, 3), torch.arange(40) % 4
    for train_classes in ([0, 1], [2, 3]):  # kept as they are, renumbered
        keep = torch.isin(y, torch.tensor(train_classes))
        bench = av.b.tensors_benchmark([[x[keep], y[keep]]], [[x, y]], task_labels=[0])
        with pytest.raises(ContlearnError, match="test experience 0 has classes .* that no training experience has"):
            cav.stream_from_avalanche(bench)


def test_interop_helpers_refuse_what_they_cannot_use():
    with pytest.raises(ContlearnError, match="Linear has no adapt: give a plain torch model to the Avalanche strategy"):
        cav.as_avalanche_model(torch.nn.Linear(64, 10))
    with pytest.raises(ContlearnError, match="a list of one metrics dict per training experience"):
        cav.accuracy_matrix_from_avalanche({"Top1_Acc_Exp/eval_phase/test_stream/Exp000": 0.5})
    from contlearn.plugins.lwf import LwF

    with pytest.raises(PluginError, match="plugin 'lwf' is the class LwF"):
        cav.as_avalanche_plugin(LwF)


AVALANCHE_SOURCE = ["scenario.source=avalanche", "scenario.factory=class_incremental_benchmark",
                    "scenario.args={num_experiences: 5}"]  # fmt: skip


def test_an_avalanche_source_gets_contlearns_subsampling_transforms_and_validation():
    cfg = load_config(None, [*AVALANCHE_SOURCE, "scenario.samples_per_class=6", "scenario.validation_fraction=0.5",
                             "scenario.train_transform=[normalize, hflip]", "scenario.eval_transform=[normalize]"])
    stream = stream_of(cfg)
    plain = stream_of(load_config(None, [*AVALANCHE_SOURCE, "scenario.samples_per_class=6"]))
    for exp in stream:
        assert sorted(torch.bincount(torch.cat([exp.train.y, exp.val.y])).tolist()) == [0] * exp.classes[0] + [6, 6]
        assert exp.train.augment is not None and exp.val.augment is None
    whole = torch.cat([e.train.x for e in plain])
    first = plain[0].test.x
    expected = (first - whole.mean()) / whole.std(correction=0)  # normalize: fitted on all (subsampled) training inputs
    assert torch.allclose(stream[0].test.x, expected, atol=1e-5)


@pytest.mark.parametrize("override", ["scenario.n_experiences=3", "scenario.setting=task", "scenario.class_order=[0]"])
def test_keys_that_shape_experiences_do_not_apply_to_an_avalanche_source(override):
    with pytest.raises(ConfigError, match=f"scenario.{override.split('=')[0][9:]} does not apply to "
                                          "scenario.source=avalanche"):
        stream_of(load_config(None, [*AVALANCHE_SOURCE, override]))


def test_more_experiences_than_classes_is_a_config_error():
    with pytest.raises(ConfigError, match=r"scenario.args \{'num_experiences': 20\} makes train experience \d+ "
                                          r"without samples"):
        stream_of(load_config(None, [*AVALANCHE_SOURCE[:2], "scenario.args={num_experiences: 20}"]))


def test_build_stream_refuses_keys_that_shape_experiences_of_an_avalanche_source():
    from contlearn.scenarios import build_stream

    with pytest.raises(ConfigError, match="scenario.setting does not apply to scenario.source=avalanche"):
        build_stream({"source": "avalanche", "factory": "nc_benchmark", "args": {"n_experiences": 5}, "setting": "task"}, 0)


# ------------------------------------------------------------- found by a mutation review


def first_four_digits(av, raw, task_labels=(0, 0)):
    """Two experiences of digits 0-1 and 2-3, tensors as they are."""
    x_tr, y_tr, x_te, y_te = raw
    small = [(y_tr < 2), (y_tr >= 2) & (y_tr < 4)]
    small_te = [(y_te < 2), (y_te >= 2) & (y_te < 4)]
    return av.b.tensors_benchmark(
        [[x_tr[m], y_tr[m]] for m in small], [[x_te[m], y_te[m]] for m in small_te], task_labels=list(task_labels)
    )


def rows_of(x):
    """The inputs as a sorted list of rows: the same samples in any order compare equal."""
    return sorted(map(tuple, x.flatten(1).tolist()))


def test_an_alias_factory_splits_its_data_source_with_the_sections_test_fraction(av, raw):
    x_tr, y_tr, x_te, y_te = raw
    section = {"factory": "class_incremental_benchmark", "args": {"num_experiences": 5}, "test_fraction": 0.2}
    stream = cav.stream_from_config(section, seed=0)
    test, train = torch.cat([e.test.x for e in stream]), torch.cat([e.train.x for e in stream])
    assert len(test) == len(y_te) and len(train) == len(y_tr)
    assert rows_of(test) == rows_of(x_te) and rows_of(train) == rows_of(x_tr)  # the source's test set, never trained
    other = cav.stream_from_config({**section, "test_fraction": 0.3}, seed=0)
    n_test = len(cav.split_tensors(digits(0.3, 0))[3])
    assert sum(len(e.test) for e in other) == n_test != len(y_te)


def test_config_seeds_reach_the_factory_unless_args_fix_the_class_order(av, monkeypatch):
    order = [3, 1, 4, 0, 5, 9, 2, 6, 8, 7]
    fixed = {"factory": "class_incremental_benchmark", "args": {"num_experiences": 5, "class_order": order}}
    stream = cav.stream_from_config(fixed, seed=4)  # Avalanche refuses a seed with a fixed class order
    assert [sorted(int(stream.class_names[c]) for c in e.classes) for e in stream] == [
        sorted(order[k : k + 2]) for k in range(0, 10, 2)
    ]
    seeded = {"factory": "class_incremental_benchmark", "args": {"num_experiences": 5, "seed": 1}}
    assert cav.stream_from_config(seeded, seed=4).class_names == cav.stream_from_config(seeded, seed=5).class_names

    module = types.ModuleType("seeded_benchmarks")
    calls = []

    def make(seed=None, class_order=None):
        calls.append(seed)
        x, y = torch.randn(8, 3), torch.arange(8) % 2
        return av.b.tensors_benchmark([[x, y]], [[x, y]], task_labels=[0])

    module.make = make
    monkeypatch.setitem(sys.modules, "seeded_benchmarks", module)
    for args in ({}, {"seed": 2}, {"class_order": [1, 0]}):
        cav.stream_from_config({"factory": "seeded_benchmarks.make", "args": args}, seed=7)
    assert calls == [7, 2, None]  # the experiment's seed; the user's; none with a fixed order


class AvalancheProbe:
    """An Avalanche plugin that records what the strategy computed: each training
    step's loss and each evaluation step's argmax predictions."""

    def __new__(cls):
        from avalanche.core import SupervisedPlugin

        class Probe(SupervisedPlugin):
            def __init__(self):
                super().__init__()
                self.losses, self.predictions = [], []

            def before_training_epoch(self, strategy, *args, **kwargs):
                self.losses.append([])

            def before_backward(self, strategy, *args, **kwargs):
                self.losses[-1].append(float(strategy.loss.detach()))

            def after_eval_iteration(self, strategy, *args, **kwargs):
                self.predictions.append(strategy.mb_output.argmax(1))

        return Probe()


def test_adapter_accuracy_and_predictions_are_avalanches_and_batches_keep_their_task_labels(av, raw):
    class Look(Quiet):
        def __init__(self):
            self.predictions, self.evals, self.tasks = [], [], {}

        @hookimpl
        def loss_terms(self, run, batch):
            self.tasks.setdefault(("train", run.experience.index), set()).update(batch.t.tolist())

        @hookimpl
        def after_eval_batch(self, run, batch, predictions):
            self.predictions.append(predictions)
            self.tasks.setdefault(("eval", int(batch.y.min()) // 2), set()).update(batch.t.tolist())

        @hookimpl
        def on_metrics(self, metrics):
            if metrics["kind"] == "eval":
                self.evals.append(metrics)

    bench = first_four_digits(av, raw, task_labels=(0, 1))
    look, probe = Look(), AvalancheProbe()
    adapter = cav.as_avalanche_plugin(look)
    model = mlp()
    strategy = av.t.Naive(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=64, train_epochs=1,
        eval_mb_size=64, evaluator=silent(av, av.m.accuracy_metrics(experience=True)), plugins=[adapter, probe],
    )
    R = cav.accuracy_matrix_from_avalanche(train_eval(strategy, bench))
    assert len(adapter.run.accuracy_rows) == 2
    for row, expected in zip(adapter.run.accuracy_rows, R, strict=True):
        assert row == pytest.approx(expected, abs=1e-9)
    assert [m["accuracy"] for m in look.evals] == adapter.run.accuracy_rows
    assert [m["average_accuracy"] for m in look.evals] == pytest.approx([sum(r) / len(r) for r in R])
    assert len(look.predictions) == len(probe.predictions) > 2
    assert all(torch.equal(a, b) for a, b in zip(look.predictions, probe.predictions, strict=True))
    assert look.tasks == {("train", 0): {0}, ("train", 1): {1}, ("eval", 0): {0}, ("eval", 1): {1}}


def test_adapter_run_holds_the_strategys_settings_and_counts_steps_as_the_loop_does(av, raw):
    class Count(Quiet):
        def __init__(self):
            self.settings, self.counters = None, []

        @hookimpl
        def setup(self, run):
            train = run.config.train
            self.settings = (train.lr, train.epochs, train.momentum, train.optimizer, train.weight_decay,
                             train.batch_size, run.config.seed, run.generator.initial_seed())  # fmt: skip

        @hookimpl
        def after_step(self, run):
            self.counters.append((run.experience.index, run.epoch, run.step, run.global_step))

    bench = first_four_digits(av, raw)
    count, metrics, probe = Count(), EpochLog(), AvalancheProbe()  # EpochLog implements on_metrics only
    model = mlp()
    strategy = av.t.Naive(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.5), train_mb_size=128,
        train_epochs=2, evaluator=silent(av),
        plugins=[cav.as_avalanche_plugin(count, seed=7), cav.as_avalanche_plugin(metrics), probe],
    )
    for exp in bench.train_stream:
        strategy.train(exp, eval_streams=[])
    assert count.settings == (pytest.approx(0.03), 2, pytest.approx(0.5), "sgd", 0.0, 128, 7, 7)
    steps = [-(-len(exp.dataset) // 128) for exp in bench.train_stream]
    expected, total = [], 0
    for k, n in enumerate(steps):
        for epoch in range(2):
            for i in range(n):
                expected.append((k, epoch, epoch * n + i, total))
                total += 1
    assert count.counters == expected
    assert [(m["experience"], m["epoch"]) for m in metrics.epochs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [m["loss"] for m in metrics.epochs] == pytest.approx([sum(v) / len(v) for v in probe.losses], rel=1e-5)
    adamw = Count()
    strategy = av.t.Naive(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.002, weight_decay=0.1),
                          evaluator=silent(av), plugins=[cav.as_avalanche_plugin(adamw)])  # fmt: skip
    strategy.train(bench.train_stream[0], eval_streams=[])
    assert adamw.settings[:5] == (pytest.approx(0.002), 1, 0.0, "adamw", pytest.approx(0.1))
    assert adamw.settings[6:] == (0, 0)  # seed= defaults to 0


def test_evaluations_during_training_add_no_accuracy_row(av, raw):
    bench = first_four_digits(av, raw)
    adapter = cav.as_avalanche_plugin(Recorder())
    model = mlp()
    strategy = av.t.Naive(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=64, train_epochs=1,
        eval_every=1, evaluator=silent(av), plugins=[adapter],
    )
    for exp in bench.train_stream:
        strategy.train(exp, eval_streams=[bench.test_stream])
    assert adapter.run.accuracy_rows == []
    assert sum(m["kind"] == "eval" for m in adapter.plugin.metrics) > 0  # the periodic evaluations were seen
    strategy.eval(bench.test_stream)
    assert len(adapter.run.accuracy_rows) == 1 and len(adapter.run.accuracy_rows[0]) == 2


def test_adapter_experiences_read_their_own_test_data_without_augmentation(av, raw):
    from contlearn.interop._avalanche_stream import LazyExperience

    x_tr, y_tr, x_te, y_te = raw
    keep, keep_te = y_tr < 4, y_te < 4
    flip = lambda x: x.flip(-1)  # noqa: E731
    bench = av.b.nc_benchmark(dataset(x_tr[keep], y_tr[keep]), dataset(x_te[keep_te], y_te[keep_te]), 2,
                              task_labels=False, fixed_class_order=[2, 3, 0, 1], train_transform=flip,
                              eval_transform=None)  # fmt: skip
    seen = []

    class Look(Quiet):
        @hookimpl
        def before_experience(self, run, exp):
            seen.append((exp.classes, exp.test.classes(), rows_of(exp.test.x), rows_of(exp.train.x)))

    model = mlp()
    strategy = av.t.Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=64,
                          evaluator=silent(av),
                          plugins=[cav.as_avalanche_plugin(Look(), benchmark=bench, transforms="train")])  # fmt: skip
    for exp in bench.train_stream:
        strategy.train(exp, eval_streams=[])
    for (classes, test_classes, test_x, train_x), pair in zip(seen, ([2, 3], [0, 1]), strict=True):
        assert classes == test_classes == pair
        mask, mask_te = torch.isin(y_tr, torch.tensor(pair)), torch.isin(y_te, torch.tensor(pair))
        assert test_x == rows_of(x_te[mask_te])  # read with the eval transforms
        assert train_x == rows_of(x_tr[mask].flip(-1))  # the train group asked for
    exp = LazyExperience(0, [0], 0, lambda: TensorData(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)),
                         lambda: TensorData(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)))  # fmt: skip
    replaced = TensorData(torch.ones(1, 3), torch.ones(1, dtype=torch.long))
    exp.train, exp.test = replaced, replaced
    assert exp.train is replaced and exp.test is replaced
