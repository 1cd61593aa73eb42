"""Loading, merging and validating experiment configs."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from contlearn import ConfigError, PluginError, load_config
from contlearn.config import shipped_configs


def test_default_experiment_loads_with_documented_keys():
    cfg = load_config()
    for key in (
        "name", "seed", "device", "scenario.source", "scenario.n_experiences", "scenario.class_order",
        "model.backbone", "train.epochs", "train.batch_size", "train.optimizer", "train.lr",
    ):
        assert OmegaConf.select(cfg, key, default="MISSING") != "MISSING", key
    assert cfg.scenario.source == "digits" and cfg.scenario.n_experiences == 5
    assert list(cfg.plugins) == ["finetune"]


def test_overrides_apply_last_and_convert_types():
    cfg = load_config("split-digits", ["train.lr=0.5", "seed=3", "scenario.class_order=[9,8,7,6,5,4,3,2,1,0]"])
    assert cfg.train.lr == 0.5 and cfg.seed == 3 and list(cfg.scenario.class_order)[0] == 9


def test_a_plugins_override_replaces_the_list_of_the_file_and_of_earlier_overrides():
    assert list(load_config("split-digits-ewc", ["plugins={}", "plugins.lwf={}"]).plugins) == ["lwf"]
    cfg = load_config("split-digits", ["plugins.ewc={}", "train.lr=0.5", "plugins={}", "plugins.lwf.alpha=2"])
    assert list(cfg.plugins) == ["lwf"] and cfg.plugins.lwf.alpha == 2 and cfg.train.lr == 0.5
    assert list(load_config("split-digits", ["plugins.ewc={}", "plugins={l2: {}}"]).plugins) == ["l2"]
    assert list(load_config("split-digits", ["plugins[ewc]={}", "plugins={}", "plugins.lwf={}"]).plugins) == ["lwf"]


def test_yaml_file_with_base(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: split-digits\nname: mine\ntrain:\n  epochs: 2\n")
    cfg = load_config(str(path))
    assert cfg.name == "mine" and cfg.train.epochs == 2 and cfg.train.batch_size == 32


def test_a_base_is_found_beside_its_file_or_shipped_never_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "split-digits").write_text("train: {epochs: 777}\n")  # e.g. an old run's output, or a stray file
    assert load_config("task-digits").train.epochs == 20  # split-digits's, the shipped base
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "near.yaml").write_text("train: {epochs: 3}\n")
    (tmp_path / "sub" / "exp.yaml").write_text("base: near.yaml\n")
    assert load_config("sub/exp.yaml").train.epochs == 3
    (tmp_path / "sub" / "lost.yaml").write_text("base: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"base config file '.*gone.yaml' does not exist"):
        load_config("sub/lost.yaml")
    (tmp_path / "sub" / "odd.yaml").write_text("base: nosuch\n")
    with pytest.raises(ConfigError, match="base 'nosuch' is neither a file beside its config nor a shipped experiment"):
        load_config("sub/odd.yaml")


def test_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.epochz=3"])
    msg = str(err.value)
    assert "train.epochz" in msg and "'epochs'" in msg and "'batch_size'" in msg
    assert err.value.exit_code == 2


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match="unknown config key 'foo'.*'scenario'"):
        load_config(None, ["foo=1"])


def test_a_yaml_mapping_without_a_space_after_the_colon_gets_a_hint():
    with pytest.raises(ConfigError, match=r"'plugins.ewc.lam:5'.*\(in YAML, a ':' in a mapping needs a space after it: \{lam: 5\}, not "):
        load_config(None, ["plugins.ewc={lam:5}"])
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train={epochz:1}"])  # not a key of the section with a space either: no hint
    assert "space" not in str(err.value)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs=many"])


@pytest.mark.parametrize("override, key", [("model.hidden=64", "model.hidden"),
                                           ("plugins.dmn.alpha_grid=3", "plugins.dmn.alpha_grid"),
                                           ("plugins.ssd.forget=[{after: 1, classes: 7}]", "plugins.ssd.forget[0].classes")])
def test_a_plain_value_for_a_list_says_to_put_it_in_brackets(override, key):
    value = override.split("=")[1].removeprefix("[{after: 1, classes: ").removesuffix("}]")
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == f"wrong value for '{key}': expected a list in brackets, e.g. {key}=[{value}], got {value}"
    with pytest.raises(ConfigError, match=r"model.hidden=\[64\], got 64"):
        load_config({"model": {"hidden": 64}})  # a mapping (or a file) says the same


@pytest.mark.parametrize("override, key", [("model.hidden={a: 1}", "model.hidden"),
                                           ("plugins.dmn.alpha_grid={a: 1}", "plugins.dmn.alpha_grid")])
def test_a_mapping_for_a_list_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == f"wrong value for '{key}': expected a list in brackets, e.g. {key}=[1,2]"


def test_a_list_for_a_plugin_section_of_the_file_names_the_key():
    with pytest.raises(ConfigError) as err:
        load_config("split-digits", ["plugins.finetune=[1]"])  # the file gives plugins.finetune: {}
    assert str(err.value) == "wrong value for 'plugins.finetune': expected a mapping, e.g. plugins.finetune.KEY=VALUE"


def test_unknown_plugin_lists_available_ones():
    with pytest.raises(PluginError, match="unknown plugin 'ewk'.*'finetune'") as err:
        load_config(None, ["plugins.ewk.lam=1"])
    assert err.value.exit_code == 2


def test_plugin_without_fields_rejects_fields():
    with pytest.raises(ConfigError, match="finetune"):
        load_config(None, ["plugins.finetune.lr=1"])


def test_missing_file_and_unknown_name():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nowhere/exp.yaml")
    with pytest.raises(ConfigError, match="shipped experiments: .*split-digits"):
        load_config("no-such-experiment")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("device=tpu", "device"),
        ("train.optimizer=lbfgs", "train.optimizer"),
        ("train.epochs=0", "train.epochs"),
        ("train.lr=-1", "train.lr"),
        ("threads=0", "threads"),
        ("threads=100000", r"'threads' must be from 1 to 4096 \(or null\), got 100000"),  # was a segfault
        ("scenario.setting=online", "scenario.setting"),
    ],
)
def test_values_out_of_range(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_invalid_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot read config") as info:
        load_config(str(path))
    assert str(info.value) == f"cannot read config '{path}': line 2, column 1: did not find expected ',' or ']'"
    path.write_text("plugins:\n  ewc: {}\n  ewc: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"cannot read config '{path}': line 3, column 3: found duplicate key ewc"
    path.write_text("just a string\n")  # OmegaConf makes it a key
    with pytest.raises(ConfigError, match="must be a mapping of keys to values"):
        load_config(str(path))


def test_a_plugins_own_nan_default_and_an_unbounded_memory_limit_pass():
    import math
    from dataclasses import dataclass

    class Margin:
        @dataclass
        class Config:
            margin: float = math.nan  # "choose it from the data": the plugin's own meaning

    cfg = load_config("split-digits", ["plugins.margin={}", "scenario.memory_limit_gb=inf"], plugins={"margin": Margin})
    assert math.isnan(cfg.plugins.margin.margin) and cfg.scenario.memory_limit_gb == math.inf
    with pytest.raises(ConfigError, match="'plugins.margin.margin' must be a finite number, got nan"):
        load_config("split-digits", ["plugins.margin.margin=nan"], plugins={"margin": Margin})  # set by the user


@pytest.mark.parametrize(
    "override, key",
    [("train.lr=nan", "train.lr"), ("train.weight_decay=nan", "train.weight_decay"), ("train.gamma=inf", "train.gamma"),
     ("model.cosine_scale=nan", "model.cosine_scale"), ("scenario.memory_limit_gb=-inf", "scenario.memory_limit_gb"),
     ("plugins.ewc.lam=nan", "plugins.ewc.lam")],
)
def test_a_number_that_is_not_finite_is_named(override, key):
    with pytest.raises(ConfigError, match=f"^'?{key}'? must be a (non-negative )?finite number, got "):
        load_config("split-digits", [override])  # a plugin's own check may come first


@pytest.mark.parametrize("override", ["train.lr=1e39", "train.weight_decay=-1e39", "model.cosine_scale=1e39",
                                      "plugins.prd.prototype_lr=1e39"])
def test_a_number_beyond_float32_is_refused(override):
    """The run computes in float32, where these are infinities (a traceback in
    the optimizer's step, or an infinite scale, before)."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"'{key}' must be a finite number of size at most 3.403e\+38 \(fp32's"):
        load_config("split-digits", [override])
    assert load_config("split-digits", ["scenario.memory_limit_gb=1e39"]).scenario.memory_limit_gb == 1e39


def test_a_gamma_that_takes_the_rate_beyond_float32_is_refused():
    multistep = ["train.lr_schedule=multistep", "train.milestones=[1,2]"]
    with pytest.raises(ConfigError, match=r"'train.gamma' 1e\+20 raises train.lr 0.1 past fp32's largest number"):
        load_config("split-digits", [*multistep, "train.gamma=1e20"])
    assert load_config("split-digits", [*multistep, "train.gamma=1e18"]).train.gamma == 1e18


@pytest.mark.parametrize("override", ["plugins.powerlaw.budget_fraction=inf", "plugins.memo.alpha_aux=inf",
                                      "plugins.prd.temperature=inf", "plugins.dmn.beta=-inf"])
def test_an_infinity_a_user_gives_a_plugin_is_refused_too(override):
    with pytest.raises(ConfigError, match=f"'{override.split('=')[0]}' must be a finite number, got -?inf"):
        load_config("split-digits", [override])


@pytest.mark.parametrize("override, message", [
    ("model.hidden=[[8]]", r"wrong value for 'model.hidden\[0\]': expected int, got \[8\]"),
    ("scenario.class_order=[[0,1],2]", r"'scenario.class_order\[0\]': expected int, got \[0, 1\]"),
    ("plugins.prd.views=[[hflip]]", r"'plugins.prd.views\[0\]': expected str, got \['hflip'\]"),
    ("plugins.ssd.forget=[{after: 0, classes: [[1]]}]", r"'plugins.ssd.forget\[0\].classes\[0\]': expected"),
])  # fmt: skip
def test_a_list_inside_a_list_of_plain_values_is_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("split-digits", [override])


@pytest.mark.parametrize("overrides, key", [
    (["scenario.path=/data/mine.npz"], "scenario.path"),  # would train on the digits, unseen
    (["scenario.root=/data"], "scenario.root"),
    (["scenario.image_size=8"], "scenario.image_size"),
    (["scenario.factory=nc_benchmark"], "scenario.factory"),
    (["scenario.identity_first=true"], "scenario.identity_first"),
    (["scenario.source=avalanche", "scenario.factory=nc_benchmark", "scenario.n_experiences=3"],
     "scenario.n_experiences does not apply to scenario.source=avalanche"),
])  # fmt: skip
def test_a_data_setting_nothing_reads_is_refused(overrides, key):
    with pytest.raises(ConfigError, match=f"^'?{key}"):
        load_config("split-digits", overrides)


@pytest.mark.parametrize("source, overrides, key", [
    ("split-cifar10", ["train.optimizer=adamw"], "train.momentum"),  # the shipped file sets momentum
    ("split-digits", ["train.min_lr=0.01"], "train.min_lr"),
    ("split-digits", ["train.gamma=0.5"], "train.gamma"),
    ("split-digits", ["train.compile_mode=max-autotune"], "train.compile_mode"),
    ("split-digits", ["checkpoint.enabled=false", "checkpoint.every_n_steps=5"], "checkpoint.every_n_steps"),
])  # fmt: skip
def test_a_training_setting_nothing_reads_is_said_not_refused(source, overrides, key):
    from contlearn.config import ConfigWarning

    with pytest.warns(ConfigWarning, match=f"^'{key}' is set .* but only .* reads it: it is not used"):
        load_config(source, overrides)


def test_joint_training_beside_another_strategy_is_said(recwarn):
    from contlearn.config import ConfigWarning

    with pytest.warns(ConfigWarning, match=r"^plugins.joint trains on all the data .* with 'replay' and 'ewc' beside"):
        load_config("split-digits", ["plugins.joint={}", "plugins.replay={}", "plugins.ewc={}"])
    recwarn.clear()
    load_config("split-digits", ["plugins.joint={}"])  # beside split-digits' finetune, which adds nothing
    load_config("split-digits-replay", [])
    assert not [w for w in recwarn if issubclass(w.category, ConfigWarning)]


def test_two_rehearsal_strategies_are_said_to_hold_two_memories(recwarn):
    from contlearn.config import ConfigWarning

    with pytest.warns(ConfigWarning, match=r"^plugins 'memo' and 'replay' each rehearse .* holds 2 memories"):
        load_config("split-digits-memo", ["plugins.replay={}"])
    recwarn.clear()
    load_config("split-digits-memo", ["plugins.lwf={}"])
    load_config("split-digits-powerlaw", [])
    assert not [w for w in recwarn if issubclass(w.category, ConfigWarning)]

    class OwnMemory:  # a plugin of one's own says so by the attribute
        keeps_rehearsal_memory = True

    with pytest.warns(ConfigWarning, match=r"^plugins 'replay' and 'mine' each rehearse"):
        load_config("split-digits-replay", ["plugins.mine={}"], plugins={"mine": OwnMemory})


def test_a_data_source_of_ones_own_may_read_any_scenario_key(monkeypatch):
    from contlearn.scenarios import sources

    monkeypatch.setitem(sources.SOURCES, "mine", lambda cfg, seed: sources.digits(cfg.test_fraction, seed))
    load_config(None, ["scenario.source=mine", "scenario.path=mine.pt", "scenario.image_size=8"])


def test_settings_read_by_the_sources_in_use_pass():
    load_config(None, ["scenario.source=npz", "scenario.path=x.npz"])
    load_config(None, ["scenario.source=cifar10", "scenario.root=/data"])
    load_config(None, ["scenario.setting=domain", "scenario.domains=[mnist, 'npz:a.npz']", "scenario.root=/data"])
    load_config(None, ["scenario.source=avalanche", "scenario.factory=nc_benchmark",
                       "scenario.args={dataset: npz}", "scenario.path=x.npz"])  # fmt: skip


@pytest.mark.parametrize("override, message", [
    ("name=../../elsewhere", "'name' names the run"), ("name=' '", "'name' names the run"),
    ("out=''", "'out' is empty"), ("model.cosine_scale=0", "'model.cosine_scale' must be positive"),
    ("train.momentum=1", "'train.momentum' must be below 1"),
])  # fmt: skip
def test_names_paths_and_ranges(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("split-digits", [override])


def test_every_shipped_config_loads():
    names = shipped_configs()
    assert "split-digits" in names
    for name in names:
        load_config(name)


def test_a_section_given_a_value_and_a_directory_given_as_config(tmp_path):
    with pytest.raises(ConfigError, match=r"'train' is a section: set its keys \(train.KEY=VALUE\), not a value"):
        load_config(None, ["train=5"])
    with pytest.raises(ConfigError, match="is a directory, not a YAML file"):
        load_config(tmp_path)


def test_a_config_given_as_a_mapping_loads_like_a_file(tmp_path):
    from_dict = load_config({"base": "split-digits", "train": {"epochs": 2}, "plugins": {"ewc": {"lam": 3}}}, ["seed=4"])
    (tmp_path / "x.yaml").write_text("base: split-digits\ntrain: {epochs: 2}\nplugins: {ewc: {lam: 3}}\n")
    from_file = load_config(tmp_path / "x.yaml", ["seed=4"])
    assert OmegaConf.to_container(from_dict) == OmegaConf.to_container(from_file)
    assert list(from_dict.plugins) == ["ewc"] and from_dict.scenario.n_experiences == 5  # the base's scenario
    assert load_config(from_dict, ["seed=5"]).seed == 5
    with pytest.raises(ConfigError, match="no config file or shipped experiment named 'nowhere'"):
        load_config({"base": "nowhere"})
    with pytest.raises(ConfigError, match="unknown config key 'train.epochz'"):
        load_config({"train": {"epochz": 1}})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model:\n  hidden: {a: 1}\n", "wrong value for 'model.hidden': expected a list in brackets, e.g. model.hidden=[1,2]"),
        ("model: [1]\n", "wrong value for 'model': expected a mapping, e.g. model.KEY=VALUE"),
    ],
)
def test_a_file_over_a_base_with_a_list_for_a_mapping_names_the_key(tmp_path, text, message):
    path = tmp_path / "exp.yaml"
    path.write_text("base: split-digits\n" + text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == message


@pytest.mark.parametrize("overrides, message", [
    (["train..lr=1"], r"the key 'train..lr' has an empty part between its dots"),
    (["model.hidden=[8]", "model.hidden[1]=3"], r"cannot combine the overrides of 'model.hidden' and 'model.hidden\[1\]'"),
    (["train.lr=0.1", "train=[1]"], r"cannot combine the overrides of 'train' and 'train.lr'"),
])  # fmt: skip
def test_overrides_that_do_not_go_together_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("split-digits", overrides)


@pytest.mark.parametrize("override, key", [("train.amp=2", "train.amp"), ("checkpoint.enabled=-1", "checkpoint.enabled"),
                                           ("plugins.dmn.flip=3", "plugins.dmn.flip")])
def test_a_number_for_a_boolean_is_refused_but_0_and_1(override, key):
    with pytest.raises(ConfigError, match=rf"wrong value for '{key}': expected true or false, got -?\d"):
        load_config("split-digits", [override])
    assert load_config("split-digits", ["train.amp=1", "eval.fwt=0"]).train.amp is True


def test_a_plugin_config_s_own_check_is_a_config_error():
    """A Config whose __post_init__ raises ValueError was a traceback (exit 1)."""
    from dataclasses import dataclass

    class Picky:
        @dataclass
        class Config:
            mode: str = "a"

            def __post_init__(self):
                if self.mode not in ("a", "b"):
                    raise ValueError(f"mode must be a or b, got {self.mode!r}")

        def __init__(self, config):
            self.config = config

    with pytest.raises(ConfigError, match=r"^plugins.picky: ValueError: mode must be a or b, got 'c'$"):
        load_config("split-digits", ["plugins.picky.mode=c"], plugins={"picky": Picky})


@pytest.mark.parametrize("override", ["plugins.replay=${train}", "plugins.ssd=${scenario}"])
def test_a_plugin_section_given_another_section_is_one_message(override):
    """OmegaConf's error has no message there (None): it was a TypeError traceback."""
    with pytest.raises(ConfigError, match=r"^wrong value for 'plugins\.(replay|ssd)': a section takes its own fields, "
                                          r"not another section \(got the fields of a (Train|Scenario)Config\)$"):
        load_config("split-digits", [override])


def test_a_file_in_the_working_directory_is_read_before_a_shipped_experiment_of_its_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "split-digits").write_text("name: mine\ntrain:\n  epochs: 2\n")
    cfg = load_config("split-digits")
    assert cfg.name == "mine" and cfg.train.epochs == 2


def test_flatten_keeps_an_empty_mapping_as_a_value():
    from contlearn.config import flatten

    assert flatten({"plugins": {}, "train": {"lr": 0.1, "milestones": []}}) == {
        "plugins": {}, "train.lr": 0.1, "train.milestones": []}


@pytest.mark.parametrize("overrides, message", [
    (["seed=4294967296"], r"^'seed' must be in \[0, 2\*\*32\), got 4294967296$"),  # docs/scenarios.md
    (["scenario.transform=rotate", "scenario.identity_first=true"],
     r"^'scenario.identity_first' is set \(True\) but only scenario.transform=permute reads it"),
    (["train.lr=1", "train.lr_schedule=multistep", "train.milestones=[1,2]", "train.gamma=2e19"],  # 4e38 at the last
     r"^'train.gamma' 2e\+19 raises train.lr 1.0 past fp32's largest number \(3.403e\+38\)"),
    (["train.lr=0"], r"^'train.lr' must be positive, got 0.0$"),  # docs/configuration.md, each
    (["train.lr_schedule=multistep", "train.milestones=[2,2]"], r"^'train.milestones' must be increasing epochs"),
    (["train.lr_schedule=cosine", "train.min_lr=0.1"], r"^'train.min_lr' must be in \[0, train.lr\), got 0.1$"),
    (["scenario.test_fraction=1"], r"^'scenario.test_fraction' must be in \(0, 1\), got 1.0$"),
    (["scenario.domains=[digits]"], r"^'scenario.domains' is set \(\['digits'\]\) but only scenario.setting=domain reads it"),
    (["scenario.domains=[mnist]", "scenario.root=/data"],  # domains are read only with setting=domain
     r"^'scenario.root' is set \('/data'\) but only a torchvision source \(mnist, cifar10...\) reads it"),
])  # fmt: skip
def test_values_just_past_a_documented_bound_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("split-digits", overrides)
    load_config("split-digits", ["seed=4294967295", "train.lr=1", "train.lr_schedule=multistep",
                                 "train.milestones=[1,2]", "train.gamma=1.8e19"])  # fmt: skip
