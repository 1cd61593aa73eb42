"""contlearn.snapshots: the model copies plugins keep, and the documented plugin
example that uses them resuming exactly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from _crash import SMALL_RUN, CrashAt, SimulatedCrash, assert_same_final_weights, comparable
from torch import nn

from contlearn import Experiment, load_config
from contlearn.snapshots import (
    frozen_copy,
    load_tensors,
    module_tensors,
    overlap,
    selected_parameters,
    snapshot,
)

DOCS = Path(__file__).resolve().parents[1] / "docs"


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_frozen_copy_is_an_independent_teacher_in_eval_mode():
    model = small_model().train()
    teacher = frozen_copy(model)
    assert not teacher.training and model.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(teacher[0].weight, model[0].weight)


def test_module_tensors_then_load_tensors_gives_back_parameters_and_buffers():
    model = small_model()
    model(torch.randn(16, 4))  # moves the BatchNorm statistics away from their start
    saved = {k: v.clone() for k, v in module_tensors(model).items()}
    assert set(saved) == set(model.state_dict()) and all(not v.requires_grad for v in saved.values())
    other = small_model()
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    load_tensors(other, saved)
    for name, value in other.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_load_tensors_takes_the_saved_shape_of_a_grown_head():
    model = small_model()
    old_head = {"3.weight": torch.randn(2, 8), "3.bias": torch.randn(2)}
    load_tensors(model, old_head)
    assert model[3].weight.shape == (2, 8) and torch.equal(model[3].bias, old_head["3.bias"])
    assert model(torch.randn(5, 4)).shape == (5, 2)


def test_load_tensors_names_unknown_tensors_and_changes_nothing():
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyError, match=r"no parameters or buffers named \['head.weight'\]"):
        load_tensors(model, {"0.bias": torch.zeros(8), "head.weight": torch.zeros(3, 8)})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_snapshot_and_selected_parameters_follow_the_pattern_and_trainability():
    model = small_model()
    model[1].weight.requires_grad_(False)
    assert [n for n, _ in selected_parameters(model, re.compile(r"^3\."))] == ["3.weight", "3.bias"]
    assert [n for n, _ in selected_parameters(model, r"^3\.")] == ["3.weight", "3.bias"]  # a string compiles
    anchor = snapshot(model)
    assert "1.weight" not in anchor and set(anchor) == {"0.weight", "0.bias", "1.bias", "3.weight", "3.bias"}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(anchor["0.weight"], model[0].weight)


def test_overlap_cuts_a_grown_parameter_to_its_anchor():
    anchor = torch.zeros(2, 8)
    grown = torch.arange(40.0).view(5, 8)
    assert torch.equal(overlap(grown, anchor), grown[:2])
    assert overlap(anchor, anchor) is anchor
    assert overlap(torch.zeros(1, 8), anchor) is None  # smaller: another parameter
    assert overlap(torch.zeros(16), anchor) is None


def documented_plugin() -> type:
    """The ``LogitAnchor`` class of docs/writing-a-plugin.md, as printed there."""
    text = (DOCS / "writing-a-plugin.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(block.split("\ncfg = ")[0], namespace)
    return namespace["LogitAnchor"]


def test_the_documented_plugin_resumes_exactly(tmp_path):
    LogitAnchor = documented_plugin()
    overrides = [*SMALL_RUN, "checkpoint.every_n_steps=4", "checkpoint.keep_last=50"]

    def anchor():
        return LogitAnchor(LogitAnchor.Config(weight=5.0))

    Experiment(load_config(None, overrides), out_dir=tmp_path / "whole", plugins={"anchor": anchor()}).run()
    out = tmp_path / "run"
    with pytest.raises(SimulatedCrash):  # step 21: in experience 2, the teacher saved in a checkpoint
        Experiment(load_config(None, overrides), out_dir=out, plugins={"anchor": anchor(), "crash": CrashAt(21)}).run()
    Experiment.resume(out, plugins={"anchor": anchor()}).run()
    assert comparable(out) == comparable(tmp_path / "whole")
    assert_same_final_weights(out, tmp_path / "whole")
