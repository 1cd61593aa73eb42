"""Joint (cumulative) training: each experience trains on all data seen so far."""

from __future__ import annotations

from contlearn import Experiment, load_config


def test_each_experience_trains_on_everything_seen(quick):
    cfg = load_config(None, [*quick, "plugins={}", "plugins.joint={}"])
    experiment = Experiment(cfg)
    run = experiment.build()
    joint = run.plugins["joint"]
    sizes = [len(joint.train_data(run, exp)) for exp in run.stream]
    train_sizes = [len(exp.train) for exp in run.stream]
    assert sizes == [sum(train_sizes[: k + 1]) for k in range(5)]
    labels = joint.train_data(run, run.stream[2]).y
    assert set(labels.tolist()) == set(range(6))


def test_joint_does_not_forget_what_finetune_forgets(quick):
    base = [*quick, "scenario.n_experiences=2", "plugins={}"]
    joint = Experiment(load_config(None, [*base, "plugins.joint={}"])).run()
    finetune = Experiment(load_config(None, [*base, "plugins.finetune={}"])).run()
    assert finetune.accuracy_matrix[1][0] < 0.2
    assert joint.accuracy_matrix[1][0] > 0.6
