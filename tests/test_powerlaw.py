"""Power-law rehearsal: the schedules, the pools and draws, the plugin's state."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _crash import SMALL_RUN, CrashAt, SimulatedCrash
from contlearn.plugins._schedules import Schedule, apportion
from contlearn.plugins.powerlaw import PowerLaw
from hypothesis import given, settings
from hypothesis import strategies as st

from contlearn import ConfigError, Experiment, hookimpl, load_config
from contlearn import checkpoint as ckpt
from contlearn.experiment import stream_of

#: a small class-incremental stream: 5 experiences of 2 digits, 20 samples per class
SMALL = ["scenario.samples_per_class=20", "train.batch_size=8", "eval.fwt=false"]


def make(
    seed: int = 0, overrides: tuple[str, ...] = (), **fields
) -> tuple[PowerLaw, SimpleNamespace]:
    """A plugin and a stand-in for the run (config, stream, step counters) to drive its hooks by hand."""
    cfg = load_config(None, [*SMALL, f"seed={seed}", *overrides])
    run = SimpleNamespace(
        config=cfg, stream=stream_of(cfg), step=0, epoch=0, device=torch.device("cpu")
    )
    plugin = PowerLaw(PowerLaw.Config(**fields))
    plugin.setup(run)
    return plugin, run


def drive(plugin: PowerLaw, run: SimpleNamespace, phases: range) -> list:
    """Call the plugin's experience hooks for ``phases`` as the loop would; the training data of each."""
    out = []
    for t in phases:
        exp = run.stream[t]
        out.append(plugin.train_data(run, exp))
        plugin.after_experience(run, exp)
    return out


# ----------------------------------------------------------------- schedules


def test_power_law_values_with_a_given_scale():
    s = Schedule("power_law", exponent=1.0, offset=0.0, scale=100.0, budget_fraction=None)
    assert s.plan([3, 2, 1], [1000] * 3, 0) == [33, 50, 100]  # 100 * age^-1
    s = Schedule("power_law", exponent=2.0, offset=1.0, scale=90.0, budget_fraction=None)
    assert s.plan([1, 2, 5], [1000] * 3, 0) == [23, 10, 3]  # 90 * (age + 1)^-2, halves rounded up
    # the study's earlier code: a task's count k phases after its 57927-sample introduction
    # is 33969, 20867, ..., 1592 (k = 1, 2, ..., 9): 57927 * (10 / (k + 10))^5.6, the defaults
    s = Schedule("power_law", scale=57927 * 10**5.6, budget_fraction=None)
    assert s.plan([1, 2, 9], [10**6] * 3, 0) == [33969, 20867, 1592]


def test_exponential_uniform_none_all_values():
    e = Schedule("exponential", tau=2.0, scale=100.0, budget_fraction=None)
    assert e.plan([3, 2, 1], [1000] * 3, 0) == [22, 37, 61]  # 100 * exp(-age / 2)
    u = Schedule("uniform", budget=90, budget_fraction=None)
    assert u.plan([3, 2, 1], [1000] * 3, 0) == [30, 30, 30]
    assert Schedule("none").plan([2, 1], [50, 60], 100) == [0, 0]
    assert Schedule("all").plan([2, 1], [50, 60], 100) == [50, 60]


def test_budget_is_shared_in_proportion_to_the_power_law():
    s = Schedule("power_law", exponent=1.0, offset=0.0, budget=1100, budget_fraction=None)
    # weights 1/1, 1/2, ..., 1/4 sum to 25/12: shares 528, 264, 176, 132
    assert s.plan([1, 2, 3, 4], [10**4] * 4, 0) == [528, 264, 176, 132]
    half = Schedule("power_law", budget_fraction=0.5)
    assert sum(half.plan([1, 2], [1000, 1000], 301)) == 151  # round(0.5 * 301)


def test_power_law_index_shares_the_budget_as_the_reference_environment():
    """environments.py's budgeted 'powerlaw' (alpha 5): task j of phase i gets
    replay_cnt * w_j / sum(w), w_j = alpha * (0.01 * (10 + j)) ** (alpha - 1)."""
    s = Schedule("power_law_index", budget=719, budget_fraction=None)
    for phase in range(1, 10):
        w = [5 * (0.01 * (10 + j)) ** 4 for j in range(phase)]
        counts = s.plan(list(range(phase, 0, -1)), [10**6] * phase, 0)
        assert sum(counts) == 719
        assert all(abs(c - 719 * wj / sum(w)) < 1 for c, wj in zip(counts, w, strict=True))
    # by the tasks' indices, not their positions: tasks 3 and 7 of a stream
    assert s.plan([6, 2], [10**6] * 2, 0, tasks=[3, 7]) == pytest.approx(
        [round(719 * 13**4 / (13**4 + 17**4)), round(719 * 17**4 / (13**4 + 17**4))], abs=1)
    with pytest.raises(ConfigError, match="power_law_index.*needs since: first"):
        Schedule("power_law_index", since="last")
    with pytest.raises(ConfigError, match="alpha must be at least 1"):
        Schedule("power_law_index", alpha=0.5)
    with pytest.raises(ConfigError, match="offset must be positive for schedule 'power_law_index'"):
        Schedule("power_law_index", offset=0.0)  # task 0 would weigh 0, never rehearsed
    with pytest.raises(ValueError, match="2 ages but 1 task indices"):
        s.plan([2, 1], [100, 100], 0, tasks=[0])


def test_steep_schedules_give_the_budget_to_the_youngest_task_without_float_errors():
    """Weights compared in logs: e^-1000 and 10^999 neither vanish nor overflow."""
    capacity = [500] * 3
    assert Schedule("exponential", tau=0.001, budget=100).plan([3, 2, 1], capacity, 0) == [0, 0, 100]
    assert Schedule("power_law", exponent=400, budget=100).plan([3, 2, 1], capacity, 0) == [0, 0, 100]
    assert Schedule("power_law_index", alpha=1000, budget=100).plan([3, 2, 1], capacity, 0) == [0, 0, 100]
    steep = Schedule("exponential", tau=0.001, since="last", budget=100)
    assert steep.recurrence([1, 2]) == [0.5, 0.0]
    assert steep.plan([2, 1], [500, 500], 0, torch.Generator().manual_seed(0)) == [0, 100]
    assert Schedule("exponential", tau=0.001, scale=100.0).plan([2, 1], capacity[:2], 0) == [0, 0]
    with pytest.raises(ConfigError, match=r"^plugins\.powerlaw\.schedule: its weights overflow \(a weight of e\^\d+\) "
                                          r"with plugins\.powerlaw\.scale set: lower the exponent or alpha"):
        Schedule("power_law_index", alpha=1000, scale=1.0, where="plugins.powerlaw.").plan([2, 1], capacity[:2], 0)


def test_apportion_caps_a_task_at_its_pool_and_gives_the_rest_to_the_others():
    assert apportion(100, [1.0, 1.0, 1.0], [10, 100, 100]) == [10, 45, 45]
    assert apportion(100, [4.0, 1.0], [30, 30]) == [30, 30]  # less than asked: all there is
    assert apportion(10, [1.0, 1.0, 1.0], [100] * 3) == [3, 3, 4]  # ties go to the later task
    assert apportion(5, [0.0, 1.0], [100, 100]) == [0, 5]


@settings(max_examples=60, deadline=None)
@given(
    ages=st.lists(st.integers(1, 30), min_size=1, max_size=12),
    caps=st.lists(st.integers(0, 400), min_size=12, max_size=12),
    budget=st.integers(0, 2000),
    seed=st.integers(0, 2**31),
)
def test_totals_match_across_schedules_under_a_budget(ages, caps, budget, seed):
    caps = caps[: len(ages)]
    expected = min(budget, sum(caps))
    for kind in ("power_law", "uniform", "exponential"):
        for since in ("first", "last"):
            s = Schedule(kind, since=since, budget=budget, exponent=1.5, offset=0.5)
            counts = s.plan(ages, caps, 0, torch.Generator().manual_seed(seed))
            assert all(0 <= c <= cap for c, cap in zip(counts, caps, strict=True))
            if since == "first" or min(caps) >= budget:
                assert sum(counts) == expected, (kind, since, counts)
            else:  # only the tasks met this phase can take the budget
                assert sum(counts) <= expected
    assert sum(Schedule("none").plan(ages, caps, 0)) == 0
    assert Schedule("all").plan(ages, caps, 0) == caps


def test_since_last_meets_at_least_one_task_and_spends_the_budget_on_met_ones():
    s = Schedule("power_law", since="last", budget=100, hazard=1.0, exponent=50.0, offset=0.0)
    # p(age) = age^-50: the age-1 task recurs surely, the others (almost) never
    assert s.meet([5, 3, 1], torch.Generator().manual_seed(0)) == [False, False, True]
    assert s.plan([5, 3, 1], [500] * 3, 0, torch.Generator().manual_seed(0)) == [0, 0, 100]
    rare = Schedule("power_law", since="last", budget=100, hazard=1e-9)
    assert sum(rare.plan([4, 2, 2], [500] * 3, 0, torch.Generator().manual_seed(0))) == 100
    assert rare.recurrence([1, 2]) == pytest.approx([1e-9, 1e-9 * (11 / 12) ** 5.6])


def test_bad_settings_are_config_errors_naming_the_choices():
    with pytest.raises(ConfigError, match="schedule must be one of .*power_law"):
        PowerLaw(PowerLaw.Config(schedule="zipf"))
    with pytest.raises(ConfigError, match="since must be one of"):
        PowerLaw(PowerLaw.Config(since="never"))
    with pytest.raises(ConfigError, match="scale .* and budget both set"):
        PowerLaw(PowerLaw.Config(scale=10.0, budget=100))
    with pytest.raises(ConfigError, match="needs scale, budget or budget_fraction"):
        PowerLaw(PowerLaw.Config(budget_fraction=None))
    with pytest.raises(ConfigError, match="via must be one of"):
        PowerLaw(PowerLaw.Config(via="loader"))
    with pytest.raises(ConfigError, match="offset must be greater than -1"):
        PowerLaw(PowerLaw.Config(offset=-1.0))


# ------------------------------------------------------------- pools, draws


def test_since_last_resets_a_task_clock_when_it_is_rehearsed():
    plugin, run = make(
        seed=0, since="last", budget=30, budget_fraction=None, hazard=0.8, exponent=1.0, offset=0.0
    )
    drive(plugin, run, range(5))
    history = plugin.history
    for before, after in zip(history[1:], history[2:], strict=False):
        for task, age, count in zip(before["tasks"], before["ages"], before["counts"], strict=True):
            now = after["ages"][after["tasks"].index(task)]
            assert now == (1 if count > 0 else age + 1), (before, after)
    events = [(a, c) for h in history[1:] for a, c in zip(h["ages"], h["counts"], strict=True)]
    assert any(c == 0 for _, c in events) and any(
        a > 1 and c > 0 for a, c in events
    )  # both cases happened
    first, run = make(seed=3, since="first", budget=30, budget_fraction=None)
    drive(first, run, range(5))
    assert [h["ages"] for h in first.history[1:]] == [[1], [2, 1], [3, 2, 1], [4, 3, 2, 1]]


def test_draws_come_only_from_past_pools_without_replacement():
    plugin, run = make(pool_size=12, budget_fraction=0.75)
    datas = drive(plugin, run, range(5))
    for t, data in enumerate(datas):
        h = plugin.history[t]
        assert h["tasks"] == list(range(t))
        if t == 0:
            assert data is None  # nothing to rehearse: the experience's own data
            continue
        assert sum(h["counts"]) == min(round(0.75 * len(run.stream[t].train)), 12 * t)  # the pools cap it
        assert len(data) == len(run.stream[t].train) + sum(h["counts"])
    # the last phase's draw: indices in each task's pool, distinct, and the mixture holds those samples
    t = 4
    rows, labels = [run.stream[t].train.x], [run.stream[t].train.y]
    for k, idx in sorted(plugin.draw.items()):
        assert k < t and len(idx) == len(set(idx.tolist()))
        assert set(idx.tolist()) <= set(plugin.pools[k].tolist())
        assert len(plugin.pools[k]) == 12
        rows.append(run.stream[k].train.x[idx])
        labels.append(run.stream[k].train.y[idx])
    assert torch.equal(datas[t].x, torch.cat(rows)) and torch.equal(datas[t].y, torch.cat(labels))
    assert datas[t].y.min() < 8  # class-incremental: labels of earlier classes come back


def test_draws_are_deterministic_per_seed():
    def draws(seed):
        plugin, run = make(seed=seed, pool_size=15)
        drive(plugin, run, range(5))
        return (
            plugin.history,
            {k: v.tolist() for k, v in plugin.draw.items()},
            {k: v.tolist() for k, v in plugin.pools.items()},
        )

    assert draws(1) == draws(1)
    assert draws(1)[1:] != draws(2)[1:]


def test_all_rehearses_every_pool_sample_and_none_nothing():
    plugin, run = make(schedule="all", pool_size=10)
    datas = drive(plugin, run, range(4))
    assert [sum(h["counts"]) for h in plugin.history] == [0, 10, 20, 30]
    assert len(datas[3]) == len(run.stream[3].train) + 30
    plugin, run = make(schedule="none")
    assert drive(plugin, run, range(3)) == [None, None, None]


def test_extra_samples_spread_the_draw_over_each_epoch_once():
    plugin, run = make(via="extra_samples", budget=25, budget_fraction=None)
    assert (
        drive(plugin, run, range(3))[2] is None
    )  # extra_samples: the experience's data is left alone
    exp = run.stream[2]
    steps = math.ceil(len(exp.train) / run.config.train.batch_size)
    drawn = torch.cat([run.stream[k].train.x[i] for k, i in sorted(plugin.draw.items())])
    for epoch in range(2):
        run.epoch, seen = epoch, []
        for j in range(steps):
            run.step = epoch * steps + j
            extra = plugin.extra_samples(run, None)
            if extra is not None:
                seen.append(extra.x)
        seen = torch.cat(seen)
        assert len(seen) == 25
        assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, drawn.tolist()))


# ------------------------------------------------------------------- state


def _through_bytes(state):
    buf = io.BytesIO()
    ckpt.check_plain(state)
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("since", ["first", "last"])
def test_state_round_trip_continues_the_same_draws(since):
    reference, run = make(seed=5, since=since, pool_size=14)
    drive(reference, run, range(5))

    first, run = make(seed=5, since=since, pool_size=14)
    drive(first, run, range(3))
    state = _through_bytes(first.state_dict())
    resumed, run = make(seed=5, since=since, pool_size=14)
    resumed.load_state_dict(state)
    drive(resumed, run, range(3, 5))
    assert resumed.history == reference.history
    assert {k: v.tolist() for k, v in resumed.draw.items()} == {
        k: v.tolist() for k, v in reference.draw.items()
    }


def test_resume_inside_an_experience_reuses_the_held_draw():
    reference, run = make(seed=2, since="last", pool_size=14)
    drive(reference, run, range(5))

    first, run = make(seed=2, since="last", pool_size=14)
    drive(first, run, range(3))
    held = first.train_data(run, run.stream[3])  # experience 3 started, then the process died
    resumed, run = make(seed=2, since="last", pool_size=14)
    resumed.load_state_dict(_through_bytes(first.state_dict()))
    again = resumed.train_data(run, run.stream[3])  # what _run_state.restore calls
    assert torch.equal(again.x, held.x)
    resumed.after_experience(run, run.stream[3])
    drive(resumed, run, range(4, 5))
    assert resumed.history == reference.history


# -------------------------------------------------------------- end to end

TINY = [*SMALL_RUN, "eval.fwt=false", "plugins={}"]




def _results(run_dir: Path) -> dict:
    data = json.loads((run_dir / "results.json").read_text())
    return {k: data[k] for k in ("accuracy_matrix", "average_accuracy", "forgetting")}


@pytest.mark.parametrize("via", ["mixture", "extra_samples"])
def test_experiment_resumed_mid_experience_equals_the_uninterrupted_run(tmp_path, via):
    overrides = [
        *TINY,
        f"plugins.powerlaw.via={via}",
        "plugins.powerlaw.since=last",
        "checkpoint.every_n_steps=5",
    ]
    Experiment(load_config(None, overrides), out_dir=tmp_path / "ref").run()
    out = tmp_path / "run"
    with pytest.raises(
        SimulatedCrash
    ):  # experience 0: 5 steps an epoch, 10 in all; experience 1 from step 11
        Experiment(load_config(None, overrides), out_dir=out, plugins={"crash": CrashAt(17)}).run()
    assert ckpt.list_checkpoints(out / "checkpoints")[-1].name == "ckpt-001-000000015.pt"
    Experiment.resume(out).run()
    assert _results(out) == _results(tmp_path / "ref")


@pytest.mark.parametrize("name", ["permuted-digits-powerlaw", "split-digits-powerlaw"])
def test_shipped_configs_run_by_name(name):
    cfg = load_config(
        name,
        [
            "train.epochs=1",
            "eval.fwt=false",
            "scenario.n_experiences=2",
            "scenario.samples_per_class=15",
        ],
    )
    assert "powerlaw" in cfg.plugins
    results = Experiment(cfg).run()
    assert len(results.accuracy_matrix) == 2


def test_a_schedule_whose_weights_overflow_is_refused_before_training(tmp_path):
    """It was found when the second experience planned its rehearsal, after the
    first had trained and been checkpointed."""
    Schedule("power_law_index", alpha=2.0, scale=1.0).check_phases(100)  # in range: nothing to say
    Schedule("power_law", exponent=1000, offset=-0.5, scale=1.0, since="last").check_phases(5)  # draws, no weights
    with pytest.raises(ConfigError, match="weights overflow"):
        Schedule("power_law", exponent=1000, offset=-0.99, scale=1.0).check_phases(2)
    steps = []

    class Count:
        @hookimpl
        def after_step(self, run):
            steps.append(run.global_step)

    overrides = ["scenario.n_experiences=2", "train.epochs=1", "plugins.powerlaw.schedule=power_law_index",
                 "plugins.powerlaw.alpha=1000", "plugins.powerlaw.scale=1", "plugins.powerlaw.budget_fraction=null"]
    with pytest.raises(ConfigError, match=r"^plugins\.powerlaw\.schedule: its weights overflow"):
        Experiment(load_config("split-digits-powerlaw", overrides), out_dir=tmp_path, plugins={"count": Count()}).run()
    assert steps == []
