"""What keeps the loop near a hand-written one: no host reads per step, the
same results as a plain loop, and the speed options (timings live in
benchmarks/overhead.py, not here)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from contlearn import Experiment, hookimpl, load_config
from contlearn.errors import ConfigError
from contlearn.experiment import stream_of
from contlearn.models import create_model

HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


class StepCounter:
    def __init__(self):
        self.steps = 0

    @hookimpl(trylast=True)
    def after_step(self):
        self.steps += 1


def count_host_reads(monkeypatch, cfg, plugins) -> int:
    """Run an experiment counting every read of a tensor back to the host."""
    reads = {"n": 0}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    Experiment(cfg, plugins=plugins).run()
    monkeypatch.undo()
    return reads["n"]


@pytest.mark.parametrize("extra", [[], ["plugins.finetune={}"]])
def test_training_step_never_reads_back_to_the_host(monkeypatch, extra):
    cfg = load_config(
        None,
        [
            "train.epochs=3",
            "train.batch_size=8",
            "eval.fwt=false",
            "scenario.n_experiences=2",
            *extra,
        ],
    )
    counter = StepCounter()
    reads = count_host_reads(monkeypatch, cfg, {"count": counter})
    # ~540 steps; reads happen per epoch (loss table), per experience (label check, evaluation)
    assert counter.steps > 400
    assert reads < counter.steps / 4, f"{reads} host reads for {counter.steps} steps"


def test_a_multi_head_model_reads_the_batch_s_task_labels_once_per_step_and_nothing_else(monkeypatch):
    """To run only the heads of the tasks present (docs/performance.md's one exception)."""
    overrides = ["train.epochs=3", "train.batch_size=8", "eval.fwt=false", "scenario.n_experiences=2"]
    counter = StepCounter()
    reads = count_host_reads(monkeypatch, load_config("task-digits", overrides), {"count": counter})
    counter_single = StepCounter()
    single = count_host_reads(monkeypatch, load_config(None, overrides), {"count": counter_single})
    assert counter.steps == counter_single.steps > 400
    second_experience = counter.steps // 2  # one head in the first experience: nothing to choose
    assert reads - single == pytest.approx(second_experience, abs=5), (reads, single, counter.steps)


def test_a_step_hook_that_reads_per_step_is_caught(monkeypatch):
    """The counter above would see a plugin (or loop change) that syncs every step."""

    class Syncs:
        @hookimpl
        def loss_terms(self, out):
            out.logits.sum().item()
            return None

    cfg = load_config(None, ["train.epochs=3", "eval.fwt=false", "scenario.n_experiences=2"])
    counter = StepCounter()
    reads = count_host_reads(monkeypatch, cfg, {"count": counter, "syncs": Syncs()})
    assert reads >= counter.steps


def plain_loop(cfg) -> list[float]:
    """A hand-written loop drawing the sample order exactly as contlearn does."""
    stream = stream_of(cfg)
    model = create_model(cfg.model, stream.input_shape)
    generator = torch.Generator().manual_seed(cfg.seed)
    for exp in stream:
        model.adapt(exp.classes, exp.task)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
        x, y = exp.train.x, exp.train.y
        for _ in range(cfg.train.epochs):
            order = torch.randperm(len(y), generator=generator)
            for start in range(0, len(y), cfg.train.batch_size):
                idx = order[start : start + cfg.train.batch_size]
                loss = F.cross_entropy(model(x[idx]).logits, y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    model.eval()
    with torch.no_grad():
        return [
            float((model(e.test.x).logits.argmax(1) == e.test.y).double().mean()) for e in stream
        ]


def test_same_results_as_a_plain_loop():
    cfg = load_config(None, ["train.epochs=2", "eval.fwt=false", "train.lr=0.05"])
    assert Experiment(cfg).run().accuracy_matrix[-1] == plain_loop(cfg)


def test_amp_trains_in_bf16_autocast():
    dtypes = []

    class Watch:
        @hookimpl
        def compute_loss(self, out):
            dtypes.append(out.logits.dtype)

    cfg = load_config(
        None, ["train.epochs=1", "eval.fwt=false", "scenario.n_experiences=2", "train.amp=true"]
    )
    results = Experiment(cfg, plugins={"watch": Watch()}).run()
    assert set(dtypes) == {torch.bfloat16}
    assert results.accuracy_matrix[0][0] > 0.5


def test_channels_last_model_and_inputs():
    cfg = load_config(
        None,
        [
            "train.epochs=1",
            "eval.fwt=false",
            "scenario.n_experiences=2",
            "model.backbone=cnn",
            "train.channels_last=true",
        ],
    )
    exp = Experiment(cfg)
    run = exp.build()
    assert run.stream[0].train.x.is_contiguous(memory_format=torch.channels_last)
    conv = next(m for m in run.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_compile_compiles_the_backbone_in_place(monkeypatch: pytest.MonkeyPatch):
    # Dynamo traces for real; the "eager" backend skips Inductor's C++ code generation,
    # which takes a minute on two cores and is torch's to test, not ours.
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **kw: compile_(self, backend="eager", **kw)
    )
    cfg = load_config(
        None, ["train.epochs=1", "eval.fwt=false", "scenario.n_experiences=2", "train.compile=true"]
    )
    exp = Experiment(cfg)
    names = [name for name, _ in exp.build().model.named_parameters()]  # before compiling
    results = exp.run()
    run = exp.run_state
    assert run.model.backbone._compiled_call_impl is not None  # the backbone, whose shapes never change
    assert run.model.head._compiled_call_impl is None  # the growing head stays eager
    assert [name for name, _ in run.model.named_parameters()] == names  # checkpoints keep their keys
    assert results.accuracy_matrix[0][0] > 0.5


def test_unknown_compile_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="train.compile_mode"):
        load_config(None, ["train.compile_mode=fastest"])
