"""train.lr_schedule: learning rates per epoch or per step, restarted each experience, exact on resume."""

from __future__ import annotations

import math

import pytest
import torch
from _crash import SMALL_RUN, CrashAt, SimulatedCrash, assert_same_final_weights, comparable
from omegaconf import OmegaConf

from contlearn import ConfigError, Experiment, hookimpl, load_config
from contlearn.defaults import ScheduleWarning, epoch_lr, step_schedule_lr, warmup_steps


def _train(**fields):
    base = {"lr": 0.1, "epochs": 10, "lr_schedule": "none", "milestones": [], "gamma": 0.1, "min_lr": 0.0}
    return OmegaConf.create({**base, **fields})


def _torch_rates(make_scheduler, epochs: int) -> list[float]:  # also per step: one scheduler.step() per step
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = make_scheduler(optimizer)
    rates = []
    for _ in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_multistep_is_torchs_multisteplr_stepped_per_epoch():
    cfg = _train(lr_schedule="multistep", milestones=[3, 7], gamma=0.2)
    want = _torch_rates(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [3, 7], gamma=0.2), 10)
    assert [epoch_lr(0.1, cfg, e) for e in range(10)] == pytest.approx(want, rel=1e-12)


def test_cosine_is_torchs_cosineannealinglr_over_the_epochs():
    cfg = _train(lr_schedule="cosine", min_lr=0.001)
    want = _torch_rates(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 10, eta_min=0.001), 10)
    assert [epoch_lr(0.1, cfg, e) for e in range(10)] == pytest.approx(want, rel=1e-9)


def test_none_keeps_the_rate():
    assert epoch_lr(0.1, _train(), 7) == 0.1


class LrProbe:
    """Records (experience, epoch, learning rate of every group) at every step."""

    def __init__(self):
        self.seen: set[tuple[int, int, tuple[float, ...]]] = set()

    @hookimpl
    def after_step(self, run):
        rates = tuple(group["lr"] for group in run.optimizer.param_groups)
        self.seen.add((run.experience.index, run.epoch, rates))


def test_a_run_follows_the_schedule_and_restarts_it_each_experience():
    probe = LrProbe()
    overrides = [*SMALL_RUN, "train.epochs=3", "train.lr_schedule=multistep", "train.milestones=[1,2]", "train.gamma=0.5"]
    Experiment(load_config(None, overrides), plugins={"probe": probe}).run()
    assert probe.seen == {(e, k, (0.1 * 0.5**k,)) for e in range(3) for k in range(3)}


def test_resume_inside_an_experience_with_a_schedule_is_exact(tmp_path):
    overrides = [*SMALL_RUN, "train.lr_schedule=cosine", "train.min_lr=0.01", "checkpoint.every_n_steps=8"]
    Experiment(load_config(None, overrides), out_dir=tmp_path / "whole").run()
    with pytest.raises(SimulatedCrash):
        Experiment(load_config(None, overrides), out_dir=tmp_path / "run", plugins={"crash": CrashAt(17)}).run()
    Experiment.resume(tmp_path / "run").run()  # from step 16: experience 1 (steps 11-18), its second epoch
    assert comparable(tmp_path / "run") == comparable(tmp_path / "whole")
    assert_same_final_weights(tmp_path / "run", tmp_path / "whole")


class StepLrProbe:
    """Records, per experience, the rate each step trains with (read before the optimizer steps)."""

    def __init__(self):
        self.rates: dict[int, list[float]] = {}

    @hookimpl
    def after_backward(self, run):
        self.rates.setdefault(run.experience.index, []).append(run.optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("schedule", [[], ["train.lr_schedule=cosine", "train.min_lr=0.01"]])
def test_warmup_rises_linearly_from_zero_over_its_share_of_each_experience(schedule):
    probe = StepLrProbe()
    overrides = [*SMALL_RUN, "train.epochs=3", "train.warmup=0.25", *schedule]
    cfg = load_config(None, overrides)
    Experiment(cfg, plugins={"probe": probe}).run()
    for rates in probe.rates.values():  # restarted each experience
        per_epoch = len(rates) // 3
        warmup = math.ceil(0.25 * len(rates))  # Hugging Face's warmup_ratio
        scheduled = [epoch_lr(0.1, cfg.train, s // per_epoch) for s in range(len(rates))]
        want = [scheduled[s] * min(s / warmup, 1.0) for s in range(len(rates))]
        assert rates == pytest.approx(want, rel=1e-12) and rates[0] == 0 and 0 < warmup < per_epoch * 3


def test_resume_inside_the_warmup_is_exact(tmp_path):
    overrides = [*SMALL_RUN, "train.warmup=0.4", "checkpoint.every_n_steps=2"]
    Experiment(load_config(None, overrides), out_dir=tmp_path / "whole").run()
    with pytest.raises(SimulatedCrash):
        Experiment(load_config(None, overrides), out_dir=tmp_path / "run", plugins={"crash": CrashAt(12)}).run()
    Experiment.resume(tmp_path / "run").run()  # from step 12: early in experience 1, inside its warm-up
    assert comparable(tmp_path / "run") == comparable(tmp_path / "whole")
    assert_same_final_weights(tmp_path / "run", tmp_path / "whole")


def test_multistep_by_step_is_torchs_multisteplr_stepped_per_step():
    cfg = _train(lr_schedule="multistep", lr_schedule_unit="step", milestones=[5, 23], gamma=0.3)
    want = _torch_rates(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [5, 23], gamma=0.3), 40)
    assert [step_schedule_lr(0.1, cfg, s, 40, 0) for s in range(40)] == pytest.approx(want, rel=1e-12)


def test_cosine_by_step_without_warmup_is_torchs_cosineannealinglr_stepped_per_step():
    cfg = _train(lr_schedule="cosine", lr_schedule_unit="step", min_lr=0.002)
    want = _torch_rates(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 37, eta_min=0.002), 37)
    assert [step_schedule_lr(0.1, cfg, s, 37, 0) for s in range(37)] == pytest.approx(want, rel=1e-9)


def _hugging_face_cosine_with_warmup(step: int, steps: int, warmup: int) -> float:
    """transformers' get_cosine_schedule_with_warmup multiplier (one half-cycle), written out."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, steps - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("schedule", [["train.lr_schedule=cosine"], ["train.lr_schedule=cosine", "train.min_lr=0.01"]])
def test_a_run_by_step_follows_hugging_faces_cosine_with_warmup_each_experience(schedule):
    probe = StepLrProbe()
    overrides = [*SMALL_RUN, "train.epochs=3", "train.warmup=0.25", "train.lr_schedule_unit=step", *schedule]
    cfg = load_config(None, overrides)
    Experiment(cfg, plugins={"probe": probe}).run()
    low = cfg.train.min_lr
    for rates in probe.rates.values():  # restarted each experience
        steps, warmup = len(rates), math.ceil(0.25 * len(rates))
        want = [
            0.1 * s / warmup if s < warmup else low + (0.1 - low) * _hugging_face_cosine_with_warmup(s, steps, warmup)
            for s in range(steps)
        ]
        assert rates == pytest.approx(want, rel=1e-12)
        after = rates[warmup:]
        assert after[0] == pytest.approx(0.1) and all(a > b for a, b in zip(after[:-1], after[1:], strict=True))  # moves each step


def test_resume_inside_an_experience_with_a_schedule_by_step_is_exact(tmp_path):
    overrides = [*SMALL_RUN, "train.lr_schedule=cosine", "train.lr_schedule_unit=step", "train.warmup=0.1",
                 "checkpoint.every_n_steps=5"]  # fmt: skip
    Experiment(load_config(None, overrides), out_dir=tmp_path / "whole").run()
    with pytest.raises(SimulatedCrash):
        Experiment(load_config(None, overrides), out_dir=tmp_path / "run", plugins={"crash": CrashAt(17)}).run()
    Experiment.resume(tmp_path / "run").run()  # from step 15: inside experience 1, mid-epoch
    assert comparable(tmp_path / "run") == comparable(tmp_path / "whole")
    assert_same_final_weights(tmp_path / "run", tmp_path / "whole")


def test_warmup_steps_round_as_hugging_face_on_the_integer_step_count():
    # transformers: ceil(num_training_steps * warmup_ratio); 0.05 * 3 * 20 is 3.0000000000000004 in floats
    assert warmup_steps(_train(epochs=3, warmup=0.05), 20) == math.ceil(60 * 0.05) == 3
    assert warmup_steps(_train(epochs=1, warmup=0.03), 101) == math.ceil(101 * 0.03) == 4


@pytest.mark.parametrize(
    "unit, milestones, warned",
    [("epoch", "[1]", None), ("epoch", "[1,2,5]", "[2, 5]"), ("step", "[3]", None), ("step", "[3,80]", "[80]")],
)
def test_milestones_that_never_apply_are_warned_about(unit, milestones, warned, recwarn):
    overrides = [*SMALL_RUN, "train.lr_schedule=multistep", f"train.milestones={milestones}",
                 f"train.lr_schedule_unit={unit}", "scenario.n_experiences=2", "scenario.classes_per_experience=[5,5]"]  # fmt: skip
    experiment = Experiment(load_config(None, overrides))
    experiment.run()  # 2 epochs per experience, of fewer than 40 steps each
    messages = [str(w.message) for w in recwarn if issubclass(w.category, ScheduleWarning)]
    if warned is None:
        assert messages == []
    else:
        assert len(messages) == 2 and all(m.startswith(f"train.milestones {warned} are at or past") for m in messages)
        sizes = [len(exp.train) for exp in experiment.run_state.stream]
        ends = [2 * math.ceil(n / 16) if unit == "step" else 2 for n in sizes]
        assert [f"experience {i} ({end} {unit}s): they never apply" in m for i, (m, end) in enumerate(zip(messages, ends, strict=True))] == [True, True]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.milestones=[5]"], "milestones need lr_schedule=multistep"),
        (["train.lr_schedule=multistep"], "'train.milestones' is empty"),
        (["train.lr_schedule=multistep", "train.milestones=[5,3]"], "must be increasing"),
        (["train.lr_schedule=multistep", "train.milestones=[0,3]"], "must be increasing epochs of at least 1"),
        (["train.gamma=0"], "'train.gamma' must be positive"),
        (["train.lr_schedule=cosine", "train.min_lr=0.5"], r"'train.min_lr' must be in \[0, train.lr\)"),
        (["train.lr_schedule=step"], "'train.lr_schedule' must be one of"),
        (["train.lr_schedule_unit=iteration"], "'train.lr_schedule_unit' must be one of"),
        (["train.lr_schedule=multistep", "train.lr_schedule_unit=step", "train.milestones=[0]"],
         "must be increasing steps of at least 1"),
        (["train.warmup=1"], r"'train.warmup' must be a fraction of an experience's steps in \[0, 1\)"),
    ],
)
def test_bad_schedules_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
