"""PRD (prototype-sample relation distillation): each loss term against a hand
computation, where its gradients go, the frozen teacher, no stored samples,
prediction, state and resume, the shipped configs."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from _crash import CrashAt, SimulatedCrash
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
