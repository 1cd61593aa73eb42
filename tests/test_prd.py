"""PRD (prototype-sample relation distillation): each loss term against a hand
computation, where its gradients go, the frozen teacher, no stored samples,
prediction, state and resume, the shipped configs."""

from __future__ import annotations

import copy
import dataclasses
import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from _crash import CrashAt, SimulatedCrash
from contlearn.plugins import prd as prd_module
from contlearn.plugins._supcon import supcon_loss
from contlearn.plugins._views import Views
from contlearn.plugins.prd import PRD, prototype_loss, relation_distillation, relation_scores
from torch import nn
from torch.nn import functional as F

from contlearn import Experiment, hookimpl, load_config
from contlearn.errors import ConfigError
from contlearn.models.heads import MASKED_LOGIT

#: 2 experiences of 5 classes, 20 training samples per class (7 steps of 16 per
#: experience), one epoch: a run in a second.
TINY = [
    "scenario.n_experiences=2",
    "scenario.samples_per_class=20",
    "train.epochs=1",
    "train.batch_size=16",
    "eval.fwt=false",
    "device=cpu",
    "plugins={}",
    "plugins.prd.projection_hidden=16",
    "plugins.prd.projection_dim=8",
    "plugins.prd.views=[random_crop:1]",
]


# ------------------------------------------------------------ losses by hand


def test_supcon_matches_a_hand_computation():
    torch.manual_seed(0)
    z = F.normalize(torch.randn(3, 2, 4), dim=2)
    labels = torch.tensor([0, 1, 0])
    tau, base = 0.1, 0.07
    anchors = [(z[i, v], int(labels[i]), (i, v)) for v in range(2) for i in range(3)]
    total = 0.0
    for za, ya, ia in anchors:
        others = [(zb, yb) for zb, yb, ib in anchors if ib != ia]
        denominator = sum(math.exp(float(za @ zb) / tau) for zb, _ in others)
        positives = [zb for zb, yb in others if yb == ya]
        total += -sum(math.log(math.exp(float(za @ zp) / tau) / denominator) for zp in positives) / len(positives)
    expected = (tau / base) * total / len(anchors)
    assert float(supcon_loss(z, labels, tau, base)) == pytest.approx(expected, rel=1e-5)


def test_supcon_without_labels_takes_only_the_other_view_as_positive():
    torch.manual_seed(1)
    z = F.normalize(torch.randn(4, 2, 3), dim=2)
    same_class = supcon_loss(z, torch.zeros(4, dtype=torch.long))
    own_views = supcon_loss(z, None)
    assert float(own_views) == pytest.approx(float(supcon_loss(z, torch.arange(4))), rel=1e-6)
    assert float(own_views) != pytest.approx(float(same_class), rel=1e-3)


def test_prototype_loss_matches_a_hand_computation():
    f = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 2.0, 0.0], [3.0, 1.0, 1.0]])
    p = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    targets = torch.tensor([0, 0, 1, -1])  # the last sample is of another experience's class
    cos = [1.0, 1 / math.sqrt(2), 1 / math.sqrt(2)]
    expected = sum(1 - c for c in cos) / 3
    assert float(prototype_loss(f, targets, p)) == pytest.approx(expected, rel=1e-6)
    assert float(prototype_loss(f, torch.full((4,), -1), p)) == 0.0


def test_relation_scores_and_distillation_match_a_hand_computation():
    f = torch.tensor([[1.0, 2.0], [0.0, 1.0], [2.0, -1.0]])
    p = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    s = relation_scores(f, p)
    assert torch.allclose(s, torch.tensor([[11 / 5, 2.0], [4 / 5, 1.0], [2 / 5, -1.0]]))

    teacher = torch.tensor([[0.5, 1.0], [1.0, -1.0], [0.0, 0.3]])

    def softmax(row):
        e = [math.exp(v) for v in row]
        return [v / sum(e) for v in e]

    def kl(q, p):
        return sum(qi * math.log(qi / pi) for qi, pi in zip(q, p, strict=True))

    S, Tt = s.tolist(), teacher.tolist()
    per_sample = sum(kl(softmax(Tt[i]), softmax(S[i])) for i in range(3)) / 3
    assert float(relation_distillation(s, teacher, 1.0, "prototypes")) == pytest.approx(per_sample, rel=1e-5)
    columns = [list(c) for c in zip(*S, strict=True)], [list(c) for c in zip(*Tt, strict=True)]
    per_prototype = sum(kl(softmax(columns[1][c]), softmax(columns[0][c])) for c in range(2)) / 2
    assert float(relation_distillation(s, teacher, 1.0, "samples")) == pytest.approx(per_prototype, rel=1e-5)
    halved = [[v / 2 for v in row] for row in S], [[v / 2 for v in row] for row in Tt]
    at_2 = sum(kl(softmax(halved[1][i]), softmax(halved[0][i])) for i in range(3)) / 3
    assert float(relation_distillation(s, teacher, 2.0)) == pytest.approx(at_2, rel=1e-5)
    assert float(relation_distillation(s, s)) == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------- a trained run


class Spy:
    """Keeps what the tests look at: the encoder as each experience ended, the
    training inputs of every experience, and the run."""

    def __init__(self) -> None:
        self.encoders: list[dict[str, torch.Tensor]] = []
        self.inputs: list[torch.Tensor] = []
        self.run: Any = None

    @hookimpl
    def before_experience(self, run, exp):
        self.inputs.append(exp.train.x.clone())

    @hookimpl
    def after_experience(self, run):
        self.run = run
        self.encoders.append({k: v.clone() for k, v in run.model.backbone.state_dict().items()})


@pytest.fixture(scope="module")
def trained() -> tuple[PRD, Spy, Any]:
    """A 2-experience run with a BatchNorm backbone (so the teacher's statistics can be checked)."""
    cfg = load_config(None, [*TINY, "model.backbone=cnn-bn", "model.hidden=[8,16]"])
    spy = Spy()
    experiment = Experiment(cfg, plugins={"spy": spy})
    results = experiment.run()
    return experiment.run_state.plugins["prd"], spy, results


def test_the_teacher_is_the_frozen_encoder_of_the_previous_experience(trained):
    prd, spy, _ = trained
    assert prd.teacher is not None and prd.teacher is not spy.run.model.backbone
    assert all(not p.requires_grad and p.grad is None for p in prd.teacher.parameters())
    teacher = prd.teacher.state_dict()
    # exactly the encoder after experience 0, BatchNorm running statistics included: a
    # whole experience of teacher forwards (in train mode) changed nothing
    for name, value in spy.encoders[0].items():
        assert torch.equal(teacher[name], value), name
    assert any(not torch.equal(spy.encoders[1][k], v) for k, v in spy.encoders[0].items())
    assert len(prd.teacher_prototypes) == 1 and not prd.teacher_prototypes[0].requires_grad
    assert not torch.equal(prd.teacher_prototypes[0], prd.prototypes[0].detach())  # L_d moved the old prototypes


def _grads_of(prd: PRD, run: Any, term: str) -> dict[str, bool]:
    """Which parameter sets one loss term sends gradients to, on a fresh batch."""
    params = {
        "encoder": list(run.model.backbone.parameters()),
        "projection": list(prd.projection.parameters()),
        "old_prototypes": [prd.prototypes[0]],
        "new_prototypes": [prd.prototypes[1]],
        "teacher": list(prd.teacher.parameters()),
    }
    for group in params.values():
        for p in group:
            p.grad = None
    batch = next(run.stream[1].train.batches(8))
    out = prd.forward(run=run, batch=batch)
    loss = prd.compute_loss(run=run, batch=batch, out=out) if term == "supcon" else prd.loss_terms(run=run, batch=batch, out=out)[term]
    loss.backward()
    return {
        name: any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in group) for name, group in params.items()
    }


def test_each_term_sends_gradients_only_where_it_should(trained):
    prd, spy, _ = trained
    assert _grads_of(prd, spy.run, "distill") == {
        "encoder": True, "projection": False, "old_prototypes": True, "new_prototypes": False, "teacher": False,
    }
    assert _grads_of(prd, spy.run, "prototype") == {
        "encoder": False, "projection": False, "old_prototypes": False, "new_prototypes": True, "teacher": False,
    }
    assert _grads_of(prd, spy.run, "supcon") == {
        "encoder": True, "projection": True, "old_prototypes": False, "new_prototypes": False, "teacher": False,
    }


def _copy_of(prd: PRD, run: Any, **changes: Any) -> PRD:
    """A PRD with ``prd``'s state (and ``changes`` to its config) set up on ``run``,
    for tests that alter it: the module's trained plugin stays as it was."""
    again = PRD(dataclasses.replace(prd.config, **changes))
    again.load_state_dict(prd.state_dict())
    again.setup(run=run)
    return again


def _step(prd: PRD, run: Any, n: int = 8) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    """One training step's batch of experience 1, PRD's output and its loss terms."""
    batch = next(run.stream[1].train.batches(n))
    out = prd.forward(run=run, batch=batch)
    return batch, out, prd.loss_terms(run=run, batch=batch, out=out)


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> float:
    """``KL(softmax(teacher) || softmax(student))`` per row, averaged over the rows (T = 1)."""
    q, p = teacher.double().log_softmax(dim=1), student.double().log_softmax(dim=1)
    return float((q.exp() * (q - p)).sum(dim=1).mean())


def test_the_two_views_are_two_draws_of_the_augmentation(trained):
    prd, spy, _ = trained
    state = prd.generator.get_state()
    batch, out, _ = _step(prd, spy.run)
    b, views = len(batch), out.extras["views"]
    again = torch.Generator().manual_seed(0)
    again.set_state(state)
    first, second = prd.views(batch.x, again), prd.views(batch.x, again)
    assert torch.equal(views, torch.cat([first, second]))
    assert not torch.equal(views[:b], views[b:])
    z = out.extras["projections"]
    assert z.shape[:2] == (b, 2) and not torch.allclose(z[:, 0], z[:, 1])
    torch.testing.assert_close(out.extras["view_features"], spy.run.model.backbone(views))


def test_the_teacher_sees_both_views(trained):
    prd, spy, _ = trained
    seen: list[torch.Tensor] = []
    handle = prd.teacher.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        batch, out, _ = _step(prd, spy.run)
    finally:
        handle.remove()
    views = out.extras["views"]
    assert not torch.equal(views[: len(batch)], views[len(batch) :])
    assert len(seen) == 1 and torch.equal(seen[0], views)


def test_the_prototype_term_is_its_weight_times_the_prototype_loss(trained):
    prd, spy, _ = trained
    batch, out, terms = _step(prd, spy.run)
    row = {c: r for r, c in enumerate(prd.classes[-1])}  # class -> row of the newest prototypes
    targets = torch.tensor([row.get(int(c), -1) for c in batch.y]).repeat(2)
    expected = prototype_loss(out.extras["view_features"].detach(), targets, prd.prototypes[-1].detach())
    assert (prd.config.prototype_weight, prd.config.distill_weight) == (2.0, 4.0)  # L_sc + 2 L_p + 4 L_d
    assert float(expected) > 0
    assert float(terms["prototype"].detach()) == pytest.approx(2.0 * float(expected), rel=1e-5)


def test_the_distill_term_is_the_kl_from_the_teachers_relations_to_the_students(trained):
    prd, spy, _ = trained
    plugin = _copy_of(prd, spy.run)
    with torch.no_grad():  # the old prototypes far from the teacher's: KL's two directions differ
        plugin.prototypes[0].add_(torch.randn(plugin.prototypes[0].shape, generator=torch.Generator().manual_seed(0)))
    _, out, terms = _step(plugin, spy.run)
    with torch.no_grad():
        teacher = relation_scores(plugin.teacher(out.extras["views"]), plugin.teacher_prototypes[0])
        student = relation_scores(out.extras["view_features"], plugin.prototypes[0])
    kl, reverse = _kl(teacher, student), _kl(student, teacher)
    assert abs(kl - reverse) > 0.05 * kl
    assert plugin.config.distill_weight == 4.0
    assert float(terms["distill"].detach()) == pytest.approx(4.0 * kl, rel=1e-4)


def test_the_teacher_scores_use_the_frozen_prototypes_not_the_live_ones(trained, monkeypatch):
    prd, spy, _ = trained
    run = spy.run
    plugin = _copy_of(prd, run)
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    distill = prd_module.relation_distillation

    def record(student, teacher, *args):
        calls.append((student.detach().clone(), teacher.detach().clone()))
        return distill(student, teacher, *args)

    monkeypatch.setattr(prd_module, "relation_distillation", record)
    batch, out, _ = _step(plugin, run)
    with torch.no_grad():
        frozen = relation_scores(plugin.teacher(out.extras["views"]), plugin.teacher_prototypes[0])
        plugin.prototypes[0].mul_(-2.0)  # the live old prototypes move; the teacher's stay
    plugin.loss_terms(run=run, batch=batch, out=out)
    (student_before, teacher_before), (student_after, teacher_after) = calls
    assert torch.equal(teacher_before, frozen) and torch.equal(teacher_after, frozen)
    assert not torch.allclose(student_before, student_after)


def test_the_distill_term_sums_over_every_earlier_experience(trained):
    prd, spy, _ = trained
    run = spy.run
    plugin = _copy_of(prd, run)
    plugin.before_experience(run=run, exp=SimpleNamespace(index=2, classes=[10, 11], task=0))  # a third experience
    assert len(plugin.prototypes) == 3 and len(plugin.teacher_prototypes) == 2
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the old prototypes of both earlier experiences move away from the teacher's
        for p in plugin.prototypes[:2]:
            p.add_(torch.randn(p.shape, generator=g))
    _, out, terms = _step(plugin, run)
    with torch.no_grad():
        old_features = plugin.teacher(out.extras["views"])
        kls = [
            _kl(relation_scores(old_features, t), relation_scores(out.extras["view_features"], s))
            for s, t in zip(plugin.prototypes[:2], plugin.teacher_prototypes, strict=True)
        ]
    assert min(kls) > 0.01
    assert float(terms["distill"].detach()) == pytest.approx(4.0 * sum(kls), rel=1e-4)


def test_teacher_bn_batch_normalises_by_the_batch_and_running_by_the_running_statistics(trained):
    prd, spy, _ = trained
    run = spy.run
    x = next(run.stream[1].train.batches(16)).x
    previous = copy.deepcopy(run.model.backbone)  # the encoder after experience 0
    previous.load_state_dict(spy.encoders[0])
    with torch.no_grad():
        assert prd.config.teacher_bn == "batch" and prd.teacher.training
        torch.testing.assert_close(prd.teacher(x), copy.deepcopy(previous).train()(x))
        assert not torch.allclose(prd.teacher(x)[:4], prd.teacher(x[:4]))  # each batch's own statistics
        running = _copy_of(prd, run, teacher_bn="running").teacher
        assert not running.training
        torch.testing.assert_close(running(x), previous.eval()(x))
        torch.testing.assert_close(running(x)[:4], running(x[:4]))


def _tensors(obj: Any, seen: set[int]) -> list[torch.Tensor]:
    """Every tensor reachable from ``obj``: containers, modules, object attributes."""
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, torch.Generator):
        return []
    if isinstance(obj, nn.Module):
        return [*obj.parameters(), *obj.buffers()]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v, seen)]
    if isinstance(obj, (list, tuple, set)):
        return [t for v in obj for t in _tensors(v, seen)]
    if hasattr(obj, "__dict__"):
        return _tensors(vars(obj), seen)
    return []


def _holds_a_sample(tensors: list[torch.Tensor], inputs: torch.Tensor) -> bool:
    """Whether a tensor holds one of ``inputs`` (its values, in a row or as a whole)."""
    flat = inputs.reshape(len(inputs), -1).float()
    for t in tensors:
        t = t.detach().float().cpu()
        if t.numel() % flat.shape[1] == 0 and t.numel() > 0:
            if bool((torch.cdist(t.reshape(-1, flat.shape[1]), flat).min() < 1e-4).item()):
                return True
    return False


def test_no_sample_of_any_experience_is_kept(trained):
    prd, spy, _ = trained
    inputs = torch.cat(spy.inputs)
    stored = _tensors(prd, set()) + _tensors(prd.state_dict(), set())
    assert stored and not _holds_a_sample(stored, inputs)
    assert _holds_a_sample([*stored, inputs[3].clone()], inputs)  # the check does find a kept sample


def test_prediction_is_the_nearest_prototype_by_cosine(trained):
    prd, spy, _ = trained
    run = spy.run
    x = run.stream[0].test.x
    features = F.normalize(run.model.backbone.eval()(x), dim=1)
    protos = F.normalize(torch.cat(list(prd.prototypes)), dim=1).detach()
    expected = (features @ protos.T).argmax(1)  # rows are classes 0-9 in order
    batch = next(run.stream[0].test.batches(len(x)))
    assert torch.equal(prd.predict(run=run, batch=batch), expected)


def test_task_aware_scores_use_only_the_samples_task():
    prd = PRD(PRD.Config())
    prd.prototypes = nn.ParameterList([nn.Parameter(torch.eye(3)[:2]), nn.Parameter(torch.eye(3)[1:])])
    prd.classes, prd.tasks, prd.experiences = [[0, 1], [2, 3]], [0, 1], [0, 1]
    f = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    free = prd.class_scores(f)
    assert free.argmax(1).tolist() == [3, 3, 0]
    scores = prd.class_scores(f, torch.tensor([0, 1, 1]))
    assert scores.argmax(1).tolist() == [0, 3, 2]  # sample 0 cannot be class 3, sample 2 not class 0
    assert (scores[0, 2:] == MASKED_LOGIT).all() and (scores[1:, :2] == MASKED_LOGIT).all()


def test_prototypes_have_their_own_parameter_group(trained):
    prd, spy, _ = trained
    run = spy.run
    optimizer = prd.configure_optimizer(run=run, exp=run.stream[1])
    model_group, proto_group = optimizer.param_groups
    assert {id(p) for p in proto_group["params"]} == {id(p) for p in prd.prototypes}
    assert (proto_group["lr"], proto_group["momentum"], proto_group["weight_decay"]) == (0.01, 0.0, 0.0)
    assert model_group["lr"] == run.config.train.lr
    assert {id(p) for p in prd.projection.parameters()} <= {id(p) for p in model_group["params"]}


def test_state_round_trips_onto_a_new_run(trained):
    prd, spy, _ = trained
    run = spy.run
    state = prd.state_dict()
    again = PRD(prd.config)
    again.load_state_dict(state)
    again.setup(run=run)
    batch = next(run.stream[1].test.batches(64))
    assert torch.equal(again.predict(run=run, batch=batch), prd.predict(run=run, batch=batch))
    for a, b in zip(again.teacher.state_dict().values(), prd.teacher.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(again.generator.get_state(), prd.generator.get_state())




def test_resume_inside_the_second_experience_is_exact(tmp_path):
    overrides = [*TINY, "checkpoint.every_n_steps=2", "checkpoint.keep_last=50"]
    whole = Experiment(load_config(None, overrides), out_dir=tmp_path / "whole").run()
    out = tmp_path / "run"
    with pytest.raises(SimulatedCrash):  # 7 steps per experience: the last checkpoint, at step 8, is inside experience 1
        Experiment(load_config(None, overrides), out_dir=out, plugins={"crash": CrashAt(10)}).run()
    resumed = Experiment.resume(out).run()
    assert resumed.accuracy_matrix == whole.accuracy_matrix


# ------------------------------------------------------------ config and views


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [("relation", "rows", "relation must be one of"), ("teacher_bn", "frozen", "teacher_bn must be one of"),
     ("temperature", 0.0, "temperature must be positive"), ("views", ["blur"], "unknown augmentation 'blur'")],
)
def test_bad_settings_are_named(field, value, match):
    with pytest.raises(ConfigError, match=match):
        PRD(PRD.Config(**{field: value}))


def test_views_are_random_per_sample_and_keep_the_shape():
    x = torch.rand(16, 3, 8, 8)
    views = Views(["random_resized_crop:0.3", "hflip", "color_jitter:0.4,0.4,0.4,0.8", "grayscale:0.5", "random_crop:2"])
    a, b = views(x, torch.Generator().manual_seed(0)), views(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and not torch.equal(a, b)
    assert torch.equal(a, views(x, torch.Generator().manual_seed(0)))
    assert torch.equal(Views([])(x, None), x)
    with pytest.raises(ConfigError, match="augment images"):
        Views(["hflip"])(torch.rand(4, 10), None)
    for spec in ("hflip:7", "grayscale:5", "grayscale:-0.1"):
        with pytest.raises(ConfigError, match=r"needs a probability in \[0, 1\]"):
            Views([spec])


@pytest.mark.parametrize("name", ["split-digits-prd", "task-digits-prd"])
def test_shipped_configs_run_by_name(name):
    cfg = load_config(name, ["train.epochs=1", "scenario.n_experiences=2", "eval.fwt=false", "device=cpu"])
    assert list(cfg.plugins) == ["prd"]
    results = Experiment(cfg).run()
    assert results.accuracy_matrix[0][0] > 0.5


class TaskOfPredictions:
    """Records whether each prediction is a class of its sample's task."""

    def __init__(self):
        self.inside: list[bool] = []

    @hookimpl
    def after_eval_batch(self, run, batch, predictions):
        if run.experience.index < len(run.stream) - 1:  # the last evaluation: every task has its head
            return
        of_task = {exp.task: set(exp.classes) for exp in run.stream}
        self.inside += [int(p) in of_task[int(t)] for p, t in zip(predictions, batch.t, strict=True)]


def test_routing_follows_the_streams_setting_not_the_configs():
    """A task-incremental stream given to the Experiment (as an Avalanche benchmark's
    is, its setting detected) routes by task even where scenario.setting says class."""
    from contlearn.experiment import stream_of

    cfg = load_config("task-digits-prd", ["train.epochs=1", "eval.fwt=false", "scenario.n_experiences=2"])
    stream = stream_of(cfg)
    cfg.scenario.setting = "class"  # what a config says when the stream comes from elsewhere
    probe = TaskOfPredictions()
    Experiment(cfg, stream=stream, plugins={"probe": probe}).run()
    assert stream.setting == "task" and probe.inside and all(probe.inside)


def test_lwf_on_prd_is_refused_since_prd_scores_its_classes_without_gradient():
    from contlearn import Experiment, PluginError

    with pytest.raises(PluginError, match="lwf distils the model's logits, but plugin 'prd' makes them without gradient"):
        Experiment(load_config(None, [*TINY, "plugins.lwf={}"])).run()  # refused at setup, before training


@pytest.mark.parametrize("other, work", [
    ("ewc", "weighs parameters by the Fisher information of the model's logits"),
    ("ssd", "selects parameters by the Fisher information of the model's logits"),
])
def test_plugins_that_weigh_parameters_by_the_model_s_logits_are_refused_beside_it(other, work):
    """PRD predicts by prototypes; the model's head never trains: a Fisher of
    its logits weighs the backbone through a random head."""
    from contlearn.errors import PluginError

    overrides = ["scenario.samples_per_class=20", "scenario.n_experiences=2", "train.epochs=1", f"plugins.{other}={{}}"]
    with pytest.raises(PluginError, match=rf"^plugin {other} {work}, but plugin 'prd' makes them without gradient"):
        Experiment(load_config("split-digits-prd", overrides)).run()
