"""LwF: the distillation term, its restriction to old outputs, the teacher."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from contlearn.plugins.lwf import LwF, distillation
from contlearn.scenarios import Batch
from omegaconf import OmegaConf
from torch.nn import functional as F

from contlearn import ConfigError, PluginError, load_config
from contlearn.models import MLP, ContinualModel, IncrementalLinear, Output


def test_at_t1_it_is_the_cross_entropy_to_the_teacher_probabilities():
    """Teacher logits [0, log 3] give targets [1/4, 3/4]; a uniform student
    predicts [1/2, 1/2]: the cross-entropy is -(1/4 + 3/4) log(1/2) = log 2."""
    teacher = torch.tensor([[0.0, math.log(3.0)]])
    student = torch.zeros(1, 2)
    assert distillation(student, teacher, T=1.0).item() == pytest.approx(math.log(2.0))
    # a student equal to the teacher scores the teacher's entropy, the minimum
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert distillation(teacher, teacher, T=1.0).item() == pytest.approx(entropy)


def test_temperature_softens_both_sides_and_gradient_is_kl_gradient():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(4, 3, generator=g, requires_grad=True)
    teacher = torch.randn(4, 3, generator=g)
    T = 2.0
    value = distillation(student, teacher, T)
    assert value.item() == pytest.approx(distillation(student / T, teacher / T, 1.0).item())
    value.backward()
    expected = (F.softmax(student.detach() / T, 1) - F.softmax(teacher / T, 1)) / T / 4
    torch.testing.assert_close(student.grad, expected)


def tiny_run() -> SimpleNamespace:
    torch.manual_seed(0)
    model = ContinualModel(MLP((5,), [6]), IncrementalLinear(6))
    model.head.grow(2)
    return SimpleNamespace(model=model, config=OmegaConf.create({"seed": 0}), device=torch.device("cpu"), plugins={})


def test_only_the_teachers_classes_are_distilled_and_the_teacher_is_frozen():
    run = tiny_run()
    plugin = LwF(LwF.Config(T=2.0, alpha=0.5))
    batch = Batch(torch.randn(8, 5), torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long))
    assert plugin.loss_terms(run, batch, Output(torch.zeros(8, 2))) is None
    plugin.after_experience(run)
    teacher_logits = run.model(batch.x).logits.detach()
    run.model.head.grow(5)
    with torch.no_grad():
        for p in run.model.parameters():
            p.add_(0.3)  # the model moves, the teacher must not
    logits = run.model(batch.x).logits
    value = plugin.loss_terms(run, batch, Output(logits))["lwf"]
    assert value.item() == pytest.approx(0.5 * distillation(logits[:, :2], teacher_logits, 2.0).item(), rel=1e-6)
    value.backward()
    assert all(not p.requires_grad for p in plugin.teacher.parameters())
    changed = logits.detach().clone()
    changed[:, 2:] += 10.0
    changed.requires_grad_()  # as a forward's logits
    assert plugin.loss_terms(run, batch, Output(changed))["lwf"].item() == pytest.approx(value.item())


def test_state_round_trip_rebuilds_the_teacher_over_a_grown_model():
    run = tiny_run()
    plugin = LwF(LwF.Config())
    plugin.after_experience(run)
    x = torch.randn(3, 5)
    before = plugin.teacher(x).logits
    state = plugin.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state["teacher"].values())
    run.model.head.grow(4)
    with torch.no_grad():
        for p in run.model.parameters():
            p.mul_(2.0)
    copy = LwF(LwF.Config())
    copy.load_state_dict(state)
    copy.setup(run)
    torch.testing.assert_close(copy.teacher(x).logits, before)


def test_state_round_trip_keeps_the_teachers_batchnorm_statistics():
    """The teacher's buffers (running mean and variance) are saved with its
    parameters, not taken from the model it is rebuilt over."""
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU())
    model = ContinualModel(backbone, IncrementalLinear(6))
    model.head.grow(2)
    model(torch.randn(16, 5) * 3 + 1)  # a training-mode forward: running statistics away from 0 and 1
    run = SimpleNamespace(model=model, config=OmegaConf.create({"seed": 0}), device=torch.device("cpu"), plugins={})
    plugin = LwF(LwF.Config())
    plugin.after_experience(run)
    x = torch.randn(3, 5)
    before = plugin.teacher(x).logits
    state = plugin.state_dict()
    model(torch.randn(16, 5) * 5 - 2)  # the model's statistics move on in the next experience
    copy = LwF(LwF.Config())
    copy.load_state_dict(state)
    copy.setup(run)
    assert not copy.teacher.training
    torch.testing.assert_close(copy.teacher(x).logits, before)


@pytest.mark.parametrize(
    "override",
    ["plugins.lwf.T=0", "plugins.lwf.alpha=-1", "plugins.lwf.T=nan", "plugins.lwf.alpha=nan", "plugins.lwf.alpha=inf"],
)
def test_bad_config(override):
    with pytest.raises(ConfigError, match="plugins.lwf"):
        load_config(None, [override])


def test_shipped_config_runs_by_name(quick):
    from contlearn import Experiment

    cfg = load_config("split-digits-lwf", [*quick, "scenario.n_experiences=2"])
    assert list(cfg.plugins) == ["lwf"] and cfg.plugins.lwf.alpha == LwF.Config().alpha
    assert Experiment(cfg).run().accuracy_matrix[0][0] > 0.5


def _lwf_after_old_tasks(n_old: int, alpha: float) -> tuple[ContinualModel, SimpleNamespace, LwF]:
    """A multi-head model after ``n_old`` tasks of two classes (LwF's teacher taken),
    then the next task's head added and every parameter moved a little."""
    from contlearn.models.heads import MultiHead

    torch.manual_seed(0)
    model = ContinualModel(MLP((5,), [6]), MultiHead(6))
    for t in range(n_old):
        model.head.adapt([2 * t, 2 * t + 1], task=t)
    run = SimpleNamespace(model=model)
    plugin = LwF(LwF.Config(T=2.0, alpha=alpha))
    plugin.after_experience(run)
    model.head.adapt([2 * n_old, 2 * n_old + 1], task=n_old)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, run, plugin


def test_multi_head_distils_every_old_tasks_head_on_the_new_data():
    """Task-incremental: the new data's own (task 1) logits mask the old task's
    classes, so LwF applies task 0's head to it, for the teacher and the model."""
    model, run, plugin = _lwf_after_old_tasks(1, alpha=1.0)
    batch = Batch(torch.randn(8, 5), torch.full((8,), 2), torch.ones(8, dtype=torch.long))
    out = model(batch.x, batch.t)
    value = plugin.loss_terms(run, batch, out)["lwf"]
    with torch.no_grad():
        teacher_old = plugin.teacher.head.heads["0"](plugin.teacher.backbone(batch.x))
    want = distillation(model.head.heads["0"](out.features), teacher_old, 2.0)
    assert value.item() == pytest.approx(want.item(), rel=1e-6)
    assert value.item() > distillation(teacher_old, teacher_old, 2.0).item() + 1e-4  # the model moved
    value.backward()
    assert model.head.heads["0"].weight.grad.abs().sum() > 0  # the old head is held to its outputs
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_multi_head_sums_the_distillation_of_every_old_task():
    """Two old tasks: the term is the sum of their heads' distillations (Li and Hoiem), not their mean."""
    model, run, plugin = _lwf_after_old_tasks(2, alpha=3.0)
    batch = Batch(torch.randn(8, 5), torch.full((8,), 4), torch.full((8,), 2))
    out = model(batch.x, batch.t)
    with torch.no_grad():
        features = plugin.teacher.backbone(batch.x)
    per_task = [distillation(model.head.heads[t](out.features), plugin.teacher.head.heads[t](features), 2.0).item()
                for t in ("0", "1")]
    value = plugin.loss_terms(run, batch, out)["lwf"].item()
    assert value == pytest.approx(3.0 * sum(per_task), rel=1e-6)


def test_task_incremental_resume_inside_an_experience_equals_the_uninterrupted_run(tmp_path):
    """The teacher rebuilt on resume must not gain the head of the experience under way."""
    from _crash import CrashAt, SimulatedCrash, assert_same_final_weights, comparable

    from contlearn import Experiment

    overrides = [
        "plugins={}", "plugins.lwf={}", "train.epochs=2", "train.batch_size=8", "eval.fwt=false",
        "scenario.samples_per_class=20", "checkpoint.every_n_steps=3", "checkpoint.keep_last=50",
    ]  # fmt: skip
    Experiment(load_config("task-digits", overrides), out_dir=tmp_path / "whole").run()
    with pytest.raises(SimulatedCrash):  # 4 steps per epoch: inside experience 1, after checkpoint 12
        Experiment(load_config("task-digits", overrides), out_dir=tmp_path / "run", plugins={"crash": CrashAt(13)}).run()
    resumed = Experiment.resume(tmp_path / "run")
    assert resumed._resume_from[1]["position"]["inside_experience"]
    resumed.run()
    assert comparable(tmp_path / "run") == comparable(tmp_path / "whole")
    assert_same_final_weights(tmp_path / "run", tmp_path / "whole")


def test_a_known_task_that_gains_classes_is_distilled_on_its_old_classes():
    from contlearn.models.heads import MultiHead

    torch.manual_seed(0)
    model = ContinualModel(MLP((5,), [6]), MultiHead(6))
    model.head.adapt([0, 1], task=0)
    run = SimpleNamespace(model=model)
    plugin = LwF(LwF.Config())
    plugin.after_experience(run)
    model.head.adapt([4], task=0)  # task 0 comes back with a third class
    batch = Batch(torch.randn(4, 5), torch.full((4,), 4), torch.zeros(4, dtype=torch.long))
    out = model(batch.x, batch.t)
    with torch.no_grad():
        old = plugin.teacher.head.heads["0"](plugin.teacher.backbone(batch.x))
    want = 4.0 * distillation(model.head.heads["0"](out.features)[:, :2], old, 2.0)
    assert plugin.loss_terms(run, batch, out)["lwf"].item() == pytest.approx(want.item(), rel=1e-6)


def test_logits_made_without_gradient_are_refused_at_the_first_distillation():
    run = tiny_run()
    plugin = LwF(LwF.Config())
    batch = Batch(torch.randn(8, 5), torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long))
    plugin.after_experience(run)
    with torch.no_grad():
        logits = run.model(batch.x).logits  # as a forward that scores without gradient
    with pytest.raises(PluginError, match="the forward pass made them without gradient"):
        plugin.loss_terms(run, batch, Output(logits))
