"""Experience replay in runs: what the buffer sees, what is replayed, and replay + ewc."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _crash import SMALL_RUN, CrashAt, SimulatedCrash
from contlearn.plugins._buffers import BalancedBuffer, ReservoirBuffer
from contlearn.plugins.replay import Replay
from contlearn.scenarios import TensorData
from omegaconf import OmegaConf

from contlearn import ConfigError, Experiment, hookimpl, load_config
from contlearn.experiment import stream_of


class BatchSizes:
    """Records the size of every training batch (after extra samples)."""

    def __init__(self):
        self.sizes: list[tuple[int, int]] = []

    @hookimpl
    def loss_terms(self, run, batch):
        self.sizes.append((run.experience.index, len(batch)))


def two_experiences(quick, *extra: str) -> list[str]:
    return [*quick, "scenario.n_experiences=2", "plugins={}", *extra]


def test_reservoir_sees_each_sample_once_and_replays_full_batches(quick):
    sizes = BatchSizes()
    cfg = load_config(None, two_experiences(quick, "train.epochs=2", "plugins.replay.size=50", "plugins.replay.batch_size=10"))
    experiment = Experiment(cfg, plugins={"sizes": sizes})
    experiment.run()
    run = experiment.run_state
    buffer = run.plugins["replay"].buffer
    assert isinstance(buffer, ReservoirBuffer)
    assert buffer.n_seen == sum(len(exp.train) for exp in run.stream), "offered once, in the first epoch"
    assert len(buffer) == 50
    # the first step has an empty buffer; afterwards every full batch gets 10 replayed samples
    assert sizes.sizes[0] == (0, 32)
    assert all(n in (42, len(run.stream[e].train) % 32 + 10) for e, n in sizes.sizes[1:])


class ReplayedInputs:
    """Records, at each step of the second experience, the inputs of the batch
    the model trains on: the current samples first, the replayed ones after."""

    def __init__(self):
        self.batches: list[torch.Tensor] = []

    @hookimpl
    def loss_terms(self, run, batch):
        if run.experience.index == 1:
            self.batches.append(batch.x.clone())


def shifted_up(x, generator):
    """A random augmentation whose output cannot be mistaken for a digit (in [0, 1]): x + 2 + U(0, 1) per sample."""
    return x + 2 + torch.rand(len(x), generator=generator).to(x.device).view(-1, *[1] * (x.dim() - 1))


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
@pytest.mark.parametrize("augment", [True, False])
def test_replay_stores_samples_unaugmented_and_augments_them_when_drawn(quick, policy, augment):
    cfg = load_config(None, two_experiences(quick, "plugins.replay.size=50", "plugins.replay.batch_size=10",
                                            f"plugins.replay.policy={policy}", f"plugins.replay.augment={augment}",
                                            "train.lr=0.01"))
    stream = stream_of(cfg)
    for exp in stream:
        exp.train.augment = shifted_up
    seen = ReplayedInputs()
    experiment = Experiment(cfg, stream=stream, plugins={"seen": seen})
    experiment.run()
    stored = experiment.run_state.plugins["replay"].buffer.sample(50, "cpu").x
    assert len(stored) == 50 and stored.max() <= 1  # kept before the augmentation
    replayed = torch.cat([x[-10:] for x in seen.batches]).flatten(1)
    assert bool((seen.batches[0][:-10] >= 2).all())  # the current samples are augmented by the loop
    if augment:
        assert bool((replayed >= 2).all())
        corner = replayed[:, 0]  # 0 in every digit image, so x + 2 + u there gives each sample's draw u
        assert len(corner.unique()) > len(replayed) // 2  # drawn afresh, not stored
    else:
        assert replayed.max() <= 1


def test_replayed_samples_are_augmented_from_the_plugins_own_generator():
    """Drawing and augmenting a replay batch leaves the loop's generator as it was
    (plugins do not shift the run's random stream: plugin_generator)."""
    data = TensorData(torch.rand(8, 3), torch.zeros(8), augment=shifted_up)
    run = SimpleNamespace(config=OmegaConf.create({"seed": 0, "train": {"batch_size": 4}}), device=torch.device("cpu"),
                          generator=torch.Generator().manual_seed(5), epoch=0,
                          experience=SimpleNamespace(train=data))
    plugin = Replay(Replay.Config(size=10))
    plugin.setup(run)
    batches = list(data.batches(4, shuffle=True, generator=run.generator))
    assert plugin.extra_samples(run, batches[0]) is None  # nothing stored yet
    loop_state = run.generator.get_state()
    replayed = plugin.extra_samples(run, batches[1])
    assert torch.equal(run.generator.get_state(), loop_state)
    assert len(replayed) == 4 and bool((replayed.x >= 2).all()) and bool((replayed.raw <= 1).all())


def test_replay_batch_size_defaults_to_the_train_batch_size(quick):
    sizes = BatchSizes()
    cfg = load_config(None, two_experiences(quick, "train.batch_size=16", "plugins.replay={}"))
    Experiment(cfg, plugins={"sizes": sizes}).run()
    assert max(n for _, n in sizes.sizes) == 32


def test_class_balanced_buffer_after_a_run(quick):
    cfg = load_config(None, two_experiences(quick, "plugins.replay.policy=class_balanced", "plugins.replay.size=30"))
    experiment = Experiment(cfg)
    results = experiment.run()
    buffer = experiment.run_state.plugins["replay"].buffer
    assert isinstance(buffer, BalancedBuffer)
    counts = buffer.counts()
    assert sorted(counts) == list(range(10)) and sum(counts.values()) == 30  # 2 experiences of 5 classes
    assert set(counts.values()) == {3}
    assert results.accuracy_matrix[1][0] > 0.2, "replayed classes are remembered"


def test_experience_balanced_buffer_keeps_an_equal_share_of_each_experience(quick):
    cfg = load_config(None, [*quick, "scenario.n_experiences=5", "plugins={}", "plugins.replay.size=31",
                             "plugins.replay.policy=experience_balanced"])
    experiment = Experiment(cfg)
    experiment.run()
    run = experiment.run_state
    buffer = run.plugins["replay"].buffer
    assert buffer.counts() == {0: 7, 1: 6, 2: 6, 3: 6, 4: 6}  # 31 slots: one more for the first experience
    stored = buffer.sample(31, "cpu").y.tolist()
    for exp in run.stream:  # each experience's share holds its own classes, not a class-balanced mix
        assert sum(y in exp.classes for y in stored) == buffer.counts()[exp.index]


def test_a_balanced_buffer_loads_the_state_of_earlier_versions(quick):
    cfg = load_config(None, two_experiences(quick, "plugins.replay.policy=class_balanced", "plugins.replay.size=20"))
    experiment = Experiment(cfg)
    experiment.run()
    buffer = experiment.run_state.plugins["replay"].buffer
    state = buffer.state_dict()
    state["labels"] = state.pop("groups")  # the key before experience balancing came
    restored = BalancedBuffer(20, torch.Generator())
    restored.load_state_dict(state)
    assert restored.counts() == buffer.counts() and len(restored) == 20


def test_cpu_storage(quick):
    cfg = load_config(None, two_experiences(quick, "plugins.replay.storage=cpu", "device=cpu"))
    experiment = Experiment(cfg)
    experiment.run()
    assert experiment.run_state.plugins["replay"].buffer.storage.x.device.type == "cpu"


def test_replay_is_deterministic_and_remembers(quick):
    args = two_experiences(quick, "plugins.replay.size=100")
    a = Experiment(load_config(None, args)).run()
    b = Experiment(load_config(None, args)).run()
    finetune = Experiment(load_config(None, two_experiences(quick, "plugins.finetune={}"))).run()
    assert a.accuracy_matrix == b.accuracy_matrix
    assert a.accuracy_matrix[1][0] > finetune.accuracy_matrix[1][0] + 0.2


def test_replay_and_ewc_together(quick):
    """Both act in one run: replayed samples in the batches and the EWC term in the loss."""
    seen: list[dict] = []
    sizes = BatchSizes()

    class Recorder:
        @hookimpl
        def on_metrics(self, metrics):
            seen.append(metrics)

    cfg = load_config(None, two_experiences(quick, "plugins.replay.size=100", "plugins.ewc.lam=10"))
    assert list(cfg.plugins) == ["replay", "ewc"]
    results = Experiment(cfg, plugins={"rec": Recorder(), "sizes": sizes}).run()
    second = [m for m in seen if m["kind"] == "epoch" and m["experience"] == 1]
    assert second and second[0]["loss/ewc"] > 0.0
    assert max(n for e, n in sizes.sizes if e == 1) == 64
    assert results.accuracy_matrix[1][0] > 0.2


def test_state_round_trip_restores_the_buffer(quick):
    cfg = load_config(None, two_experiences(quick, "plugins.replay.size=40"))
    experiment = Experiment(cfg)
    experiment.run()
    run = experiment.run_state
    plugin = run.plugins["replay"]
    state = plugin.state_dict()
    copy = Replay(Replay.Config(size=40))
    copy.load_state_dict(state)
    copy.setup(run)
    assert torch.equal(copy.buffer.storage.x, plugin.buffer.storage.x)
    assert copy.buffer.n_seen == plugin.buffer.n_seen
    a = plugin.buffer.sample(8, "cpu")
    b = copy.buffer.sample(8, "cpu")
    assert torch.equal(a.x, b.x), "the generator state is restored too"


def test_shipped_config_runs_by_name(quick):
    cfg = load_config("split-digits-replay", [*quick, "scenario.n_experiences=2"])
    assert list(cfg.plugins) == ["replay"] and cfg.plugins.replay.size == 200
    assert Experiment(cfg).run().accuracy_matrix[1][0] > 0.2


@pytest.mark.parametrize("override", ["plugins.replay.policy=fifo", "plugins.replay.storage=disk", "plugins.replay.size=0"])
def test_bad_config(override):
    with pytest.raises(ConfigError, match="plugins.replay"):
        load_config(None, [override])




@pytest.mark.parametrize("policy", ["reservoir", "class_balanced", "experience_balanced"])
def test_baselines_resume_exactly_from_a_checkpoint_inside_an_experience(tmp_path, policy):
    """replay, ewc, lwf and l2 together: a run crashed in the middle of an
    experience and resumed from its checkpoint gives the uninterrupted results,
    so their state_dict() holds everything they learnt (buffers, generators,
    anchors, Fisher, teacher), with augmentation drawn by the loop and by replay."""
    tiny = [
        *SMALL_RUN,
        "scenario.train_transform=[random_crop:1,hflip]",
        "eval.fwt=false",
        "plugins={}",
        f"plugins.replay.policy={policy}",
        "plugins.replay.size=24",
        "plugins.ewc.lam=10",
        "plugins.lwf={}",
        "plugins.l2.lam=0.01",
        "checkpoint.every_n_steps=4",
    ]
    reference = Experiment(load_config(None, tiny), out_dir=tmp_path / "reference").run()
    out = tmp_path / "crashed"
    with pytest.raises(SimulatedCrash):
        Experiment(load_config(None, tiny), out_dir=out, plugins={"crash": CrashAt(22)}).run()
    resumed = Experiment.resume(out).run()
    assert resumed.accuracy_matrix == reference.accuracy_matrix
