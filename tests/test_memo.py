"""MEMO (Zhou et al., ICLR 2023): the split, the surgery, the losses, the memory, resume."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _crash import CrashAt, SimulatedCrash, assert_same_final_weights, comparable
from contlearn.plugins import _herding
from contlearn.plugins._herding import HerdingMemory, herding
from contlearn.plugins._memo_net import (
    ExpandableBackbone,
    MemoNet,
    count_parameters,
    split_backbone,
)
from contlearn.plugins.memo import MEMO
from contlearn.scenarios import TensorData

from contlearn import Experiment, hookimpl, load_config
from contlearn import checkpoint as ckpt
from contlearn.errors import ConfigError
from contlearn.models import resnet

#: 3 experiences (4, 3, 3 classes), a CNN with batch norm in the specialized block
TINY = [
    "device=cpu",
    "eval.fwt=false",
    "scenario.n_experiences=3",
    "scenario.classes_per_experience=[4,3,3]",
    "scenario.samples_per_class=20",
    "model.backbone=cnn-bn",
    "model.hidden=[4,6]",
    "train.epochs=2",
    "train.batch_size=16",
    "train.momentum=0.9",
    "plugins={}",
    "plugins.memo.memory_size=30",
]


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------- the split


def test_resnet32_split_matches_the_paper():
    gen, spec, d = split_backbone(resnet.cifar_resnet(32))
    assert (count_parameters(gen), count_parameters(spec), d) == (112_016, 351_488, 64)
    x = torch.randn(2, 3, 32, 32)
    net = resnet.cifar_resnet(32).eval()
    g, s, _ = split_backbone(net)
    torch.testing.assert_close(s(g(x)), net(x))


def test_resnet18_split_matches_the_paper():
    gen, spec, d = split_backbone(resnet.resnet18(stem="7x7"))  # MEMO's get_resnet18_imagenet
    assert (count_parameters(gen), count_parameters(spec), d) == (2_782_784, 8_393_728, 512)
    gen, spec, d = split_backbone(resnet.resnet18(stem="3x3"))  # the CIFAR stem: 7,680 fewer
    assert (count_parameters(gen), count_parameters(spec), d) == (2_775_104, 8_393_728, 512)


def test_mlp_split_with_a_narrow_specialized_block():
    from contlearn.models import MLP

    gen, spec, d = split_backbone(MLP((64,), (32, 128)), specialized_width=8)
    assert d == 8 and spec(gen(torch.randn(5, 64))).shape == (5, 8)
    assert count_parameters(spec) == 32 * 8 + 8


def test_unsplittable_backbone_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot split a Linear backbone.*valid model.backbone"):
        split_backbone(torch.nn.Linear(3, 3))
    with pytest.raises(ConfigError, match=r"cannot split model\.backbone=tv:resnet18 into"):  # not its private class
        split_backbone(torch.nn.Linear(3, 3), name="tv:resnet18")
    with pytest.raises(ConfigError, match="specialized_width applies to the mlp and cnn"):
        split_backbone(resnet.cifar_resnet(20), specialized_width=8)


# ------------------------------------------------------------------ the network


def _net(d_in: int = 6, d: int = 4, n_classes: int = 3) -> MemoNet:
    gen = torch.nn.Sequential(torch.nn.Linear(d_in, 5), torch.nn.ReLU())
    spec = torch.nn.Sequential(torch.nn.Linear(5, d), torch.nn.BatchNorm1d(d), torch.nn.ReLU())
    return MemoNet(ExpandableBackbone(gen, spec, d), n_classes)


def test_classifier_grows_with_old_weights_intact():
    torch.manual_seed(0)
    net = _net()
    old_w, old_b = net.head.weight.detach().clone(), net.head.bias.detach().clone()
    net.adapt([3, 4])  # the loop grows the rows first
    net.expand(old_classes=[0, 1, 2])
    assert (net.head.in_features, net.head.out_features) == (8, 5)
    assert torch.equal(net.head.weight[:3, :4], old_w) and torch.equal(net.head.bias[:3], old_b)
    assert torch.equal(net.blocks[1][0].weight, net.blocks[0][0].weight)  # the new block is a copy
    out = net(torch.randn(7, 6))
    assert out.logits.shape == (7, 5) and out.features.shape == (7, 8)


def test_weight_aligning_matches_mean_norms_and_touches_only_new_rows():
    torch.manual_seed(0)
    net = _net(n_classes=5)
    with torch.no_grad():
        net.head.weight[3:] *= 7.0
    before = net.head.weight.detach().clone()
    bias = net.head.bias.detach().clone()
    gamma = net.weight_align([0, 1, 2], [3, 4])
    norms = net.head.weight.detach().norm(dim=1)
    expected = before[:3].norm(dim=1).mean() / before[3:].norm(dim=1).mean()
    assert gamma == pytest.approx(float(expected))
    assert float(norms[3:].mean()) == pytest.approx(float(norms[:3].mean()), rel=1e-5)
    assert torch.equal(net.head.weight[:3], before[:3]) and torch.equal(net.head.bias, bias)
    torch.testing.assert_close(net.head.weight[3:], before[3:] * gamma)


def test_aux_labels_map_new_classes_to_rank_plus_one_and_old_ones_to_zero():
    plugin = MEMO()
    plugin.new = [4, 5, 6]
    aux_map = plugin._make_aux_map(10, torch.device("cpu"))
    y = torch.tensor([0, 4, 5, 6, 3, 9])
    assert MEMO.aux_targets(aux_map, y).tolist() == [0, 1, 2, 3, 0, 0]


def test_the_auxiliary_head_reads_the_newest_blocks_features():
    torch.manual_seed(0)
    net = _net()
    net.expand([0, 1, 2])
    with torch.no_grad():
        net.blocks[1][0].weight.add_(1.0)  # trained away from the block it was copied from
    net.set_aux_head(3)
    net.eval()
    x = torch.randn(5, 6)
    out = net(x)
    newest = net.blocks[1](net.backbone.generalized(x))
    torch.testing.assert_close(out.features[:, 4:], newest)
    assert not torch.allclose(out.features[:, :4], newest)
    torch.testing.assert_close(out.extras["aux_logits"], net.aux_head(newest))


def test_a_new_block_is_a_copy_of_the_newest_block():
    torch.manual_seed(0)
    net = _net()
    net.expand([0, 1, 2])
    with torch.no_grad():  # block 1 trained (weights and batch-norm statistics) away from block 0
        for p in net.blocks[1].parameters():
            p.add_(0.5)
        net.blocks[1][1].running_mean.fill_(0.3)
    net.expand([0, 1, 2])
    oldest, newest, new = _tensors(net.blocks[0]), _tensors(net.blocks[1]), _tensors(net.blocks[2])
    assert new.keys() == newest.keys() and all(torch.equal(new[k], newest[k]) for k in new)
    assert not torch.equal(new["0.weight"], oldest["0.weight"])
    assert net.blocks[2][0].weight is not net.blocks[1][0].weight


def test_frozen_blocks_stay_in_eval_mode():
    net = _net()
    net.expand([0, 1, 2])
    net.freeze(1, generalized=True)
    net.train()
    assert not net.blocks[0].training and net.blocks[1].training and not net.backbone.generalized.training
    assert not any(p.requires_grad for p in net.blocks[0].parameters())
    assert all(p.requires_grad for p in net.blocks[1].parameters())
    assert not any(p.requires_grad for p in net.backbone.generalized.parameters())


# --------------------------------------------------------------------- herding


def test_herding_is_deterministic_without_repeats_and_starts_nearest_the_mean():
    g = torch.Generator().manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    order = herding(f, 20)
    assert torch.equal(order, herding(f.clone(), 20))
    assert len(set(order.tolist())) == 20
    assert int(order[0]) == int(((f - f.mean(0)) ** 2).sum(1).argmin())
    assert len(herding(f, 80)) == 50


def test_herding_memory_keeps_the_budget_and_the_head_of_each_ranking():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g)
    y = torch.arange(60) % 3
    data = TensorData(x, y)
    memory = HerdingMemory(10)
    identity = lambda v: v  # noqa: E731
    memory.update(identity, data.subset(torch.nonzero(y < 2).flatten()), [0, 1], n_seen=2)
    assert memory.counts() == {0: 5, 1: 5}
    first = {c: memory.x[memory.labels == c][:3].clone() for c in (0, 1)}
    memory.update(identity, data.subset(torch.nonzero(y == 2).flatten()), [2], n_seen=3)
    assert memory.counts() == {0: 3, 1: 3, 2: 3} and len(memory) <= 10
    for c in (0, 1):
        assert torch.equal(memory.x[memory.labels == c], first[c])
    rows = torch.nonzero(y == 2).flatten()
    expected = x[rows][herding(torch.nn.functional.normalize(x[rows], dim=1), 3)]
    assert torch.equal(memory.x[memory.labels == 2], expected)
    with pytest.raises(ConfigError, match="cannot hold one exemplar for each of 11 classes"):
        memory.per_class(11)


def test_herding_is_icarls_greedy_choice_at_every_step():
    """A brute-force iCaRL loop: step k takes the unpicked row whose addition
    brings the mean of the k picked rows closest to the class mean."""
    f = torch.nn.functional.normalize(torch.randn(6, 3, generator=torch.Generator().manual_seed(3)), dim=1).double()
    mu, order, total = f.mean(dim=0), [], torch.zeros(3, dtype=torch.double)
    for k in range(1, 7):
        rest = [i for i in range(6) if i not in order]
        best = min(rest, key=lambda i: (float(((mu - (total + f[i]) / k) ** 2).sum()), i))
        order.append(best)
        total = total + f[best]
    assert herding(f, 6).tolist() == order
    assert herding(f, 4).tolist() == order[:4]


def test_class_means_are_the_normalised_means_of_normalised_features():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, generator=g) * torch.arange(1, 13)[:, None]  # norms far apart
    y = torch.arange(12) % 2
    memory = HerdingMemory(8)
    identity = lambda v: v  # noqa: E731
    memory.update(identity, TensorData(x, y), [0, 1], n_seen=2)
    means = memory.class_means(identity, 3)
    assert torch.isnan(means[2]).all()  # no exemplar of class 2
    for c in (0, 1):
        f = torch.nn.functional.normalize(memory.x[memory.labels == c], dim=1)
        torch.testing.assert_close(means[c], torch.nn.functional.normalize(f.mean(dim=0), dim=0))
    torch.testing.assert_close(means[:2].norm(dim=1), torch.ones(2))


def test_nme_depends_on_the_direction_of_the_features_only():
    """iCaRL's nearest mean compares normalised features with the normalised class
    means. A class whose exemplars' directions cancel has a zero mean: at distance 1
    from every normalised feature, whatever the feature's length."""
    memory = HerdingMemory(4)
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    memory.update(lambda v: v, TensorData(x, torch.tensor([0, 0, 1, 1])), [0, 1], n_seen=2)
    plugin = MEMO()
    plugin.class_means = memory.class_means(lambda v: v, 2)
    torch.testing.assert_close(plugin.class_means, torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    f = torch.tensor([[0.0, 0.1], [0.3, 0.1], [1.0, 1.0], [-0.2, 0.05]])
    # cosine to class 1 above 1/2: nearer than the zero mean of class 0
    assert plugin.nme(f).tolist() == [1, 0, 1, 0]
    for scale in (0.1, 3.0, 10.0):
        assert torch.equal(plugin.nme(scale * f), plugin.nme(f))


def test_joined_appends_the_exemplars_to_the_training_set():
    memory = HerdingMemory(4)
    train = TensorData(torch.randn(6, 3), torch.tensor([2, 2, 2, 3, 3, 3]))
    assert memory.joined(train) is None
    memory.update(lambda v: v, TensorData(torch.randn(10, 3), torch.arange(10) % 2), [0, 1], n_seen=2)
    joined = memory.joined(train)
    assert torch.equal(joined.x, torch.cat([train.x, memory.x])) and joined.y.tolist() == [2, 2, 2, 3, 3, 3, 0, 0, 1, 1]


# ------------------------------------------------------------------ end to end


def test_weight_aligning_follows_each_later_experience_before_its_exemplars(monkeypatch):
    """The reference (``MEMO._train``) aligns after training every experience
    but the first, unconditionally, then builds the rehearsal memory."""
    calls: list[str] = []
    norms: list[float] = []
    align, update = MemoNet.weight_align, HerdingMemory.update

    def spy_align(self, old, new):
        w = self.head.weight.detach()
        norms.append(float(w[old].norm(dim=1).mean() / w[new].norm(dim=1).mean()))
        calls.append("align")
        return align(self, old, new)

    def spy_update(self, *args, **kwargs):
        calls.append("exemplars")
        return update(self, *args, **kwargs)

    monkeypatch.setattr(MemoNet, "weight_align", spy_align)
    monkeypatch.setattr(HerdingMemory, "update", spy_update)
    experiment = Experiment(load_config(None, TINY))
    experiment.run()
    assert calls == ["exemplars", "align", "exemplars", "align", "exemplars"]
    assert experiment.run_state.plugins["memo"].align_factors == pytest.approx(norms)
    calls.clear()
    experiment = Experiment(load_config(None, [*TINY, "plugins.memo.weight_align=false"]))
    experiment.run()
    assert calls == ["exemplars"] * 3 and experiment.run_state.plugins["memo"].align_factors == []


class Snapshot:
    """Copies the specialized blocks and the generalized blocks as each experience starts."""

    def __init__(self):
        self.at_start: list[dict[str, dict[str, torch.Tensor]]] = []

    @hookimpl
    def before_experience(self, run):
        model = run.model
        self.at_start.append({f"block{i}": _tensors(b) for i, b in enumerate(model.blocks)}
                             | {"generalized": _tensors(model.backbone.generalized)})


def test_old_blocks_and_their_bn_statistics_are_bit_identical_after_training(quick):
    snap = Snapshot()
    experiment = Experiment(load_config(None, TINY), plugins={"snap": snap})
    experiment.run()
    model = experiment.run_state.model
    assert isinstance(model, MemoNet) and len(model.blocks) == 3
    for i in (0, 1):  # block i as it was when experience i + 1 started (the snapshot runs before MEMO's surgery)
        before = snap.at_start[i + 1][f"block{i}"]
        after = _tensors(model.blocks[i])
        assert any("running_mean" in k for k in after)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), i
    # the newest block and the generalized blocks did train
    assert not torch.equal(_tensors(model.blocks[2])["0.weight"], _tensors(model.blocks[1])["0.weight"])
    assert not torch.equal(snap.at_start[2]["generalized"]["0.weight"], _tensors(model.backbone.generalized)["0.weight"])
    plugin = experiment.run_state.plugins["memo"]
    assert plugin.memory.counts() == {c: 3 for c in range(10)}
    assert model.aux_head.out_features == 4 and len(plugin.accuracy["nme"]) == 3
    report = plugin.memory_rows[-1]
    assert report["model_bytes"] == 4 * count_parameters(model) and report["bytes_per_exemplar"] == 64 * 4
    assert report["total_bytes"] == report["model_bytes"] + 30 * 256


def test_train_base_false_freezes_the_generalized_blocks():
    snap = Snapshot()
    experiment = Experiment(load_config(None, [*TINY, "plugins.memo.train_base=false"]), plugins={"snap": snap})
    experiment.run()
    model = experiment.run_state.model
    assert model.generalized_frozen and not any(p.requires_grad for p in model.backbone.generalized.parameters())
    final = _tensors(model.backbone.generalized)
    before = snap.at_start[1]["generalized"]
    assert all(torch.equal(before[k], final[k]) for k in before)


def test_total_memory_sets_the_exemplar_budget():
    cfg = load_config(None, [*TINY, "plugins.memo.total_memory=200000"])
    experiment = Experiment(cfg)
    experiment.run()
    plugin = experiment.run_state.plugins["memo"]
    report = plugin.memory_rows[-1]
    assert report["model_bytes"] + plugin.budget * 256 <= 200_000 < report["model_bytes"] + (plugin.budget + 1) * 256
    with pytest.raises(ConfigError, match="leaves room for 0 exemplars"):
        Experiment(load_config(None, [*TINY, "plugins.memo.total_memory=1000"])).run()


def test_a_memory_smaller_than_the_classes_is_refused_before_training():
    experiment = Experiment(load_config(None, [*TINY, "plugins.memo.memory_size=9"]))  # 10 classes
    with pytest.raises(ConfigError, match="memory_size=9 exemplars is fewer than one per class of the stream \\(10\\)"):
        experiment.run()
    assert experiment.run_state.global_step == 0


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="predict must be one of 'classifier', 'nme'"):
        load_config(None, [*TINY, "plugins.memo.predict=knn"])
    with pytest.raises(ConfigError, match="needs model.head=incremental"):
        Experiment(load_config(None, [*TINY, "model.head=cosine"])).run()


class Recorder:
    """Records, per experience: what it should train on (its data and the exemplars
    stored as it starts), the inputs of its first epoch's batches, its epoch metrics;
    and the width of the features that herding and the class means are computed on,
    beside the network's."""

    def __init__(self) -> None:
        self.run: Any = None
        self.expected: dict[int, tuple[torch.Tensor, int]] = {}
        self.seen: dict[int, list[torch.Tensor]] = {}
        self.metrics: list[dict[str, Any]] = []
        self.widths: list[tuple[int, int]] = []

    def features(self, normalized_features):
        def spy(feature_fn, x, chunk=512):
            feats = normalized_features(feature_fn, x, chunk)
            self.widths.append((feats.shape[1], self.run.model.backbone.out_features))
            return feats

        return spy

    @hookimpl
    def setup(self, run):
        self.run = run

    @hookimpl
    def before_experience(self, run, exp):
        memory = run.plugins["memo"].memory
        parts = [exp.train.x] + ([memory.x] if len(memory) else [])
        self.expected[exp.index] = (torch.cat(parts).clone(), len(memory))

    @hookimpl
    def loss_terms(self, run, batch):
        if run.epoch == 0:
            self.seen.setdefault(run.experience.index, []).append(batch.x.clone())

    @hookimpl
    def on_metrics(self, metrics):
        if metrics.get("kind") == "epoch":
            self.metrics.append(dict(metrics))


@pytest.fixture(scope="module")
def recorded() -> Recorder:
    """One TINY run (one epoch per experience) under a :class:`Recorder`."""
    recorder = Recorder()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_herding, "normalized_features", recorder.features(_herding.normalized_features))
        Experiment(load_config(None, [*TINY, "train.epochs=1"]), plugins={"recorder": recorder}).run()
    return recorder


def _rows(x: torch.Tensor) -> list[tuple[float, ...]]:
    return sorted(map(tuple, x.reshape(len(x), -1).tolist()))


def test_each_experience_trains_on_its_data_and_the_exemplars(recorded):
    assert sorted(recorded.seen) == [0, 1, 2]
    assert recorded.expected[0][1] == 0 and all(recorded.expected[k][1] > 0 for k in (1, 2))
    for k, (expected, _) in recorded.expected.items():
        assert _rows(torch.cat(recorded.seen[k])) == _rows(expected), k


def test_the_auxiliary_loss_starts_with_the_second_experience(recorded):
    by_experience = {m["experience"]: m for m in recorded.metrics}
    assert sorted(by_experience) == [0, 1, 2]
    assert "loss/aux" not in by_experience[0]
    assert all(by_experience[k]["loss/aux"] > 0 for k in (1, 2))


def test_herding_and_class_means_use_the_whole_networks_features(recorded):
    d = recorded.run.model.backbone.block_features
    assert recorded.widths and all(width == whole for width, whole in recorded.widths)
    assert {whole for _, whole in recorded.widths} == {d, 2 * d, 3 * d}


@pytest.mark.parametrize("crash_step", [13, 20])  # inside experience 1 (mid-epoch), inside experience 2
def test_resume_restores_every_block_and_gives_the_same_run(tmp_path, crash_step):
    overrides = [*TINY, "checkpoint.every_n_steps=3", "checkpoint.keep_last=50"]
    whole_dir = tmp_path / "whole"
    whole = Experiment(load_config(None, overrides), out_dir=whole_dir)
    whole.run()
    out = tmp_path / "run"
    with pytest.raises(SimulatedCrash):
        Experiment(load_config(None, overrides), out_dir=out, plugins={"crash": CrashAt(crash_step)}).run()
    state = ckpt.load(ckpt.list_checkpoints(out / "checkpoints")[-1])
    assert state["position"]["inside_experience"] and state["plugins"]["memo"]["n_blocks"] >= 2
    resumed = Experiment.resume(out)
    resumed.run()
    assert comparable(out) == comparable(whole_dir)
    assert_same_final_weights(out, whole_dir)
    a, b = whole.run_state.model.state_dict(), resumed.run_state.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.run_state.plugins["memo"].accuracy == whole.run_state.plugins["memo"].accuracy
    assert resumed.run_state.plugins["memo"].align_factors == whole.run_state.plugins["memo"].align_factors


def test_compile_survives_the_surgery(monkeypatch: pytest.MonkeyPatch):
    # Dynamo traces for real; the "eager" backend skips Inductor's code generation.
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, backend="eager", **kw))
    experiment = Experiment(load_config(None, [*TINY, "train.compile=true"]))
    experiment.run()
    backbone = experiment.run_state.model.backbone
    assert backbone.generalized._compiled_call_impl is not None
    assert all(block._compiled_call_impl is not None for block in backbone.specialized)


@pytest.mark.parametrize("order", [["plugins.memo={}", "plugins.l2.anchor=initial"], ["plugins.l2.anchor=initial", "plugins.memo={}"]])
def test_other_plugins_setup_sees_the_memo_network_whatever_the_order(order):
    from contlearn.plugins._memo_net import MemoNet

    config = load_config(None, [*TINY[:-1], *order])
    run = Experiment(config).build()
    run.hook.setup(run=run)
    assert isinstance(run.model, MemoNet)
    parameters = dict(run.model.named_parameters())
    anchor = run.plugins["l2"].anchor  # taken from the network that trains, not the one MEMO discards
    assert anchor and all(name in parameters and parameters[name].shape == t.shape for name, t in anchor.items())


@pytest.mark.parametrize("after", [0, 1])
def test_its_accuracies_count_the_run_evaluations_only(after):
    """SSD's measurements before and after it forgets call ``predict`` on test
    and training data: they were counted into MEMO's accuracies of the next
    evaluation. Predicting with the classifier, MEMO's matrix is the run's.
    After the first experience SSD predicts before MEMO's class means are
    computed again for the network's new block (NME failed on their width)."""
    overrides = ["scenario.samples_per_class=20", "scenario.n_experiences=2", "train.epochs=2", "eval.fwt=false",
                 "plugins={}", "model.hidden=[16]", "plugins.memo.memory_size=20", "plugins.memo.predict=classifier",
                 f"plugins.ssd.forget=[{{after: {after}, classes: ['4']}}]"]
    experiment = Experiment(load_config("split-digits", overrides))
    results = experiment.run()
    memo = experiment.run_state.plugins["memo"]
    assert experiment.run_state.plugins["ssd"].reports  # SSD did measure
    expected = [list(row) for row in results.accuracy_matrix]
    assert len(memo.accuracy["classifier"]) == 2
    for mine, run in zip(memo.accuracy["classifier"], expected, strict=True):
        assert mine == pytest.approx(run, abs=1e-6)  # counted in float32 there
