"""End-to-end runs of the loop on split digits."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pytest
import torch

from contlearn import Experiment, hookimpl, load_config
from contlearn.experiment import resolve_device


def test_finetune_forgets_catastrophically(tmp_path):
    """The sanity check that split digits is truly class-incremental."""
    results = Experiment(load_config("split-digits"), out_dir=tmp_path).run()
    R = results.accuracy_matrix
    assert results.average_accuracy <= 0.25
    assert R[-1][-1] >= 0.95
    assert all(R[i][i] >= 0.9 for i in range(5))
    assert results.forgetting > 0.9
    # a class-incremental head knows nothing about future classes
    assert all(R[i][j] == 0.0 for i in range(5) for j in range(i + 1, 5))


def test_run_directory_contents(tmp_path, quick):
    Experiment(load_config(None, quick[:1]), out_dir=tmp_path).run()
    data = json.loads((tmp_path / "results.json").read_text())
    for key in ("accuracy_matrix", "average_accuracy", "average_incremental_accuracy", "forgetting", "bwt", "fwt", "seed", "versions", "config"):
        assert key in data, key
    assert set(data["timings"]) == {"train_seconds", "eval_seconds", "total_seconds"}
    assert len(data["accuracy_matrix"]) == 5 and all(0 <= a <= 1 for row in data["accuracy_matrix"] for a in row)
    assert data["fwt"] is not None and len(data["initial_accuracy"]) == 5
    assert data["config"]["train"]["epochs"] == 1
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines[0] == "trained_experience,eval_experience,accuracy" and len(csv_lines) == 26
    assert "epochs: 1" in (tmp_path / "config.yaml").read_text()


def test_same_seed_same_results(quick):
    a = Experiment(load_config(None, quick)).run()
    b = Experiment(load_config(None, quick)).run()
    c = Experiment(load_config(None, [*quick, "seed=1"])).run()
    assert a.accuracy_matrix == b.accuracy_matrix
    assert a.accuracy_matrix != c.accuracy_matrix


def test_fwt_baseline_does_not_change_the_run(quick):
    with_fwt = Experiment(load_config(None, quick[:1])).run()
    without = Experiment(load_config(None, quick)).run()
    assert with_fwt.accuracy_matrix == without.accuracy_matrix
    assert without.fwt is None and with_fwt.fwt is not None


def test_explicit_class_order_is_used(quick):
    results = Experiment(load_config(None, [*quick, "scenario.class_order=[9,8,7,6,5,4,3,2,1,0]"])).run()
    assert results.class_names == [str(c) for c in range(9, -1, -1)]


def test_cnn_backbone_and_adam(quick):
    results = Experiment(load_config(None, [*quick, "model.backbone=cnn", "model.hidden=[8,16]", "train.optimizer=adam", "train.lr=0.01"])).run()
    assert results.accuracy_matrix[0][0] > 0.5


def test_head_grows_with_each_experience(quick):
    exp = Experiment(load_config(None, quick))
    sizes = []

    from contlearn import hookimpl

    class Watch:
        @hookimpl
        def before_experience(self, run):
            sizes.append(run.model.head.out_features)

    exp.extra_plugins["watch"] = Watch()
    exp.run()
    assert sizes == [2, 4, 6, 8, 10]


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        from contlearn import ConfigError

        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_unwritable_output_directory_fails_before_training(tmp_path, quick):
    from contlearn import ContlearnError

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ContlearnError, match="cannot write to the output directory"):
        Experiment(load_config(None, quick), out_dir=blocker / "run").run()


def test_library_use_matches_the_readme():
    from contlearn import Experiment, load_config

    cfg = load_config("split-digits", ["train.epochs=1"])
    results = Experiment(cfg).run()
    assert len(results.accuracy_matrix) == cfg.scenario.n_experiences


def test_threads_apply_during_the_run_and_are_restored(quick):
    seen = []

    class Probe:
        @hookimpl
        def after_experience(self):
            seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    Experiment(load_config(None, [*quick, "threads=2"]), plugins={"probe": Probe()}).run()
    assert before != 2 and seen and set(seen) == {2}  # the suite runs on one thread (conftest)
    assert torch.get_num_threads() == before


def test_a_config_object_is_validated_again_with_its_overrides(quick):
    from contlearn import ConfigError

    cfg = load_config(None, quick)
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'"):
        Experiment(cfg, ["train.epoch=1"])
    with pytest.raises(ConfigError, match="wrong value for 'train.epochs'"):
        Experiment(cfg, ["train.epochs=abc"])
    with pytest.raises(ConfigError, match="got the string 'train.epochs=1'"):
        Experiment(cfg, "train.epochs=1")
    cfg.train.epochs = 0  # edited after loading
    with pytest.raises(ConfigError, match="'train.epochs' must be at least 1, got 0"):
        Experiment(cfg)
    with pytest.raises(ConfigError, match="must be a mapping of keys to values"):
        Experiment(5)
    plain = Experiment({"train": {"epochs": 1}, "eval": {"fwt": False}, "scenario": {"n_experiences": 2}})
    assert plain.config.train.epochs == 1 and plain.config.train.lr == 0.1  # the schema's defaults filled in


def test_a_loss_term_that_is_not_a_tensor_is_named(quick):
    from contlearn import TrainingError

    class FloatTerm:
        @hookimpl
        def loss_terms(self):
            return {"anchor": 0.5}

    with pytest.raises(TrainingError, match="loss term 'anchor' is a float, not a tensor"):
        Experiment(load_config(None, quick), plugins={"float": FloatTerm()}).run()


class PerSampleTerm:
    @hookimpl
    def loss_terms(self, out):
        return {"per_sample": out.logits.sum(dim=1)}


class PerSampleLoss:
    @hookimpl(tryfirst=True)
    def compute_loss(self, out):
        return out.logits.sum(dim=1)


class TupleOfBatches:
    @hookimpl
    def extra_samples(self, batch):
        return (batch, batch)


class Scores:
    @hookimpl(tryfirst=True)
    def predict(self, run, batch):
        return run.model(batch.x).logits


class BareLogits:
    @hookimpl(tryfirst=True)
    def forward(self, run, batch):
        return run.model(batch.x).logits


class OptimizerClass:
    @hookimpl(tryfirst=True)
    def configure_optimizer(self, run):
        return torch.optim.SGD


class ScheduleOnly:
    """An optimizer-like object without param_groups, which schedules and resumes need."""

    def step(self):
        pass

    def zero_grad(self, set_to_none=True):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class NoParamGroups:
    @hookimpl(tryfirst=True)
    def configure_optimizer(self, run):
        return ScheduleOnly()


class TupleData:
    @hookimpl(tryfirst=True)
    def train_data(self, exp):
        return exp.train.x, exp.train.y


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        (BareLogits, r"forward returned a Tensor: the default loss needs a contlearn.models.Output"),
        (OptimizerClass, r"configure_optimizer must return an optimizer \(a torch.optim.Optimizer instance, .*got a type"),
        (NoParamGroups, r"configure_optimizer must return an optimizer \(.*an object with param_groups and step, "
                        r"zero_grad, state_dict, load_state_dict\), got a ScheduleOnly"),
        (TupleData, r"train_data must return the experience's training data \(a TensorData.*\), got a tuple"),
        (PerSampleTerm, r"loss term 'per_sample' has shape \(16,\): a loss term is a scalar"),
        (PerSampleLoss, r"compute_loss must return a scalar loss tensor, got a torch.float32 tensor of shape \(16,\)"),
        (TupleOfBatches, r"extra_samples must return a Batch or None, got a tuple"),
        (Scores, r"predict must return the predicted class of each sample \(an integer tensor of shape \(\d+,\)\), "
                 r"got a torch.float32 tensor of shape \(\d+, 2\)"),
    ],
)
def test_a_hook_that_returns_the_wrong_thing_is_named(quick, plugin, message):
    from contlearn import TrainingError

    cfg = load_config(None, [*quick, "eval.fwt=false", "train.batch_size=16"])
    with pytest.raises(TrainingError, match=message):
        Experiment(cfg, plugins={"wrong": plugin()}).run()


def test_arguments_of_the_wrong_kind_are_named(quick):
    from contlearn import ConfigError, PluginError

    @dataclass
    class Config:
        weight: float = 1.0

    cases = [
        (dict(plugins="replay"), PluginError, r"Experiment\(plugins=...\) must map plugin names to plugin classes or objects.*got str 'replay'"),
        (dict(plugins={3: Scores}), PluginError, r"plugin names are non-empty strings, got 3"),
        (dict(plugins={"my.anchor": Scores}), PluginError, r"the plugin class Scores is given as 'my.anchor', which cannot be its config key"),
        (dict(plugins={"": Scores()}), PluginError, r"plugin names are non-empty strings, got ''"),
        (dict(plugins={"anchor": Config()}), PluginError, r"plugin 'anchor' is a .*Config instance, a config, not a plugin"),
        (dict(plugins={"anchor": len}), PluginError, r"plugin 'anchor' is the function 'len', not a plugin"),
        (dict(stream=[1, 2]), ConfigError, r"stream= must be a contlearn Stream .*got list \[1, 2\]"),
    ]  # fmt: skip
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            Experiment(load_config(None, quick), **kwargs).build()
    with pytest.raises(ConfigError, match=r"overrides must be a list of 'key=value' strings, e.g. \['seed=1', 'out=null'\]; got a mapping"):
        Experiment(None, {"seed": 1, "out": None})


def test_plugin_objects_may_be_dataclasses_and_have_any_name(quick):
    @dataclass
    class Anchor:
        weight: float = 0.5

        @hookimpl
        def loss_terms(self, out):
            return {"anchor": self.weight * out.logits.square().mean()}

    results = Experiment(load_config(None, quick), plugins={"my.anchor [2]": Anchor()}).run()
    assert len(results.accuracy_matrix) == 5 and "my.anchor [2]" in results.given["plugins"]


def test_a_plugin_config_must_be_a_dataclass_and_its_required_fields_set(quick):
    from contlearn import ConfigError, PluginError

    class Plain:
        class Config:
            weight = 1.0

    class Required:
        @dataclass
        class Config:
            weight: float

    with pytest.raises(PluginError, match=r"plugin 'plain': its Config must be a @dataclass \(or attrs\) class"):
        Experiment(load_config(None, quick), plugins={"plain": Plain})
    with pytest.raises(ConfigError, match=r"plugins.required.weight is required \(it has no default\)"):
        Experiment(load_config(None, quick), plugins={"required": Required})
    assert Experiment(load_config(None, quick), ["plugins.required.weight=2"], plugins={"required": Required})

    import attr

    class Attrs:
        @attr.s(auto_attribs=True)
        class Config:
            weight: float = 1.0

        def __init__(self, config):
            self.config = config

    experiment = Experiment(load_config(None, quick), ["plugins.attrs.weight=0.25"], plugins={"attrs": Attrs})
    assert experiment.build().plugins["attrs"].config.weight == 0.25
    with pytest.raises(ConfigError, match=r"unknown config key 'plugins.attrs.wieght'; valid keys here: 'weight'"):
        Experiment(load_config(None, quick), ["plugins.attrs.wieght=0.25"], plugins={"attrs": Attrs})

    from contlearn._config_merge import field_defaults

    @attr.s(auto_attribs=True)
    class Fields:
        need: int
        some: list = attr.Factory(lambda: [1])
        weight: float = 0.5

    assert field_defaults(Fields) == {"need": dataclasses.MISSING, "some": [1], "weight": 0.5}


def test_numpy_scalars_in_a_config_mapping_are_numbers():
    import numpy as np

    from contlearn import ConfigError

    cfg = Experiment({"train": {"lr": np.float64(0.05), "epochs": np.int64(3), "lr_schedule": "multistep", "milestones": np.array([1, 2])}}).config
    assert cfg.train.lr == 0.05 and cfg.train.epochs == 3 and list(cfg.train.milestones) == [1, 2]
    with pytest.raises(ConfigError, match=r"the config's value 'train.lr' is not a config value"):
        Experiment({"train": {"lr": torch.tensor(0.1)}})


def test_an_experiment_runs_once(quick):
    from contlearn import ContlearnError

    experiment = Experiment(load_config(None, [*quick, "scenario.n_experiences=2"]))
    experiment.run()
    with pytest.raises(ContlearnError, match="already run, and its plugin objects keep what they learnt"):
        experiment.run()


def test_a_plugin_object_that_has_trained_is_refused_by_the_next_experiment(quick, tmp_path):
    from contlearn.plugins.replay import Replay

    from contlearn import ConfigError

    replay = Replay(Replay.Config(size=20))
    overrides = [*quick, "scenario.n_experiences=2", "plugins={}"]
    Experiment(None, overrides, plugins={"replay": replay}).run()
    with pytest.raises(ConfigError, match="the plugin object given as 'replay' has trained in another Experiment"):
        Experiment(None, overrides, out_dir=tmp_path / "again", plugins={"replay": replay}).run()
    assert not (tmp_path / "again").exists()  # the directory the failed build made is gone again
    Experiment(None, overrides, plugins={"replay": Replay(Replay.Config(size=20))}).run()


class Damping:
    """A script's own plugin, given to Experiment as a class."""

    @dataclass
    class Config:
        weight: float = 1e-3

    def __init__(self, config: Config):
        self.config = config
        self.steps = 0

    @hookimpl
    def loss_terms(self, out):
        self.steps += 1
        return {"damping": self.config.weight * out.logits.pow(2).mean()}

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def test_a_plugin_class_given_in_python_is_configured_by_name(quick, tmp_path):
    from _crash import SMALL_RUN, CrashAt, SimulatedCrash, assert_same_final_weights, comparable

    from contlearn import ConfigError, PluginError

    default = Experiment(load_config(None, quick), plugins={"damping": Damping})
    assert list(default.config.plugins) == ["finetune", "damping"] and default.config.plugins.damping.weight == 1e-3
    with pytest.raises(ConfigError, match="wieght"):
        Experiment(None, [*quick, "plugins.damping.wieght=1"], plugins={"damping": Damping})
    with pytest.raises(PluginError, match="the plugin class Damping is given as 'ewc', the name of a plugin from builtin"):
        Experiment(None, quick, plugins={"ewc": Damping})

    overrides = [*SMALL_RUN, "plugins.damping.weight=0.5", "checkpoint.every_n_steps=4"]
    whole = Experiment(None, overrides, out_dir=tmp_path / "whole", plugins={"damping": Damping})
    results = whole.run()
    assert "damping:\n    weight: 0.5" in (tmp_path / "whole" / "config.yaml").read_text()
    assert results.given["plugins"] == {"damping": f"{__name__}.Damping"}
    assert whole.run_state.plugins["damping"].steps == 26  # built from the config, one term per step

    out = tmp_path / "run"
    with pytest.raises(SimulatedCrash):
        Experiment(None, overrides, out_dir=out, plugins={"damping": Damping, "crash": CrashAt(14)}).run()
    with pytest.raises(PluginError, match=r"unknown plugin 'damping'.*if the run was given it as a class, give it again: on the command line -p damping=FILE.py:Class"):
        Experiment.resume(out)
    with pytest.raises(ConfigError, match=r"plugin classes \['extra'\] are given, but the run .* has no such plugins"):
        Experiment.resume(out, plugins={"damping": Damping, "extra": Damping})
    Experiment.resume(out, plugins={"damping": Damping}).run()
    assert comparable(out) == comparable(tmp_path / "whole")
    assert_same_final_weights(out, tmp_path / "whole")


def test_an_experiment_whose_build_failed_can_run(quick, tmp_path):
    from contlearn import ConfigError

    (tmp_path / "results.json").write_text("{}")
    experiment = Experiment(load_config(None, quick), out_dir=tmp_path)
    with pytest.raises(ConfigError, match="already holds a finished run"):
        experiment.run()
    (tmp_path / "results.json").unlink()
    experiment.run()
