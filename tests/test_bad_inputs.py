"""The catalogue of bad inputs, through the command line: each one gets one
clear line on stderr and its exit code (2: usage and config, 1: run time,
130: interrupted), never a traceback. docs/reliability.md lists the catalogue."""

from __future__ import annotations

import shlex
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from contlearn import DataError, Experiment, TrainingError, hookimpl, load_config
from contlearn import checkpoint as ckpt
from contlearn.cli import main
from contlearn.experiment import stream_of

TINY = [
    "scenario.n_experiences=2",
    "scenario.samples_per_class=10",
    "model.hidden=[8]",
    "train.epochs=1",
    "eval.fwt=false",
]


def one_error_line(capsys, code: int, argv: list[str]) -> str:
    """Run the command, check its exit code and that stderr is one line, return it."""
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def install_distribution(root: Path, module: str, source: str, dist: str, entry_points: dict[str, str]) -> None:
    """A module and the dist-info that declares its entry points, on ``root``."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[contlearn.plugins]\n{lines}")


@pytest.fixture
def catalogue_plugins(tmp_path, monkeypatch):
    """Installed plugins that misbehave: two claims on each firstresult hook, data
    with labels out of the head's range, an empty experience."""
    source = '''
        import torch
        from contlearn import hookimpl
        from contlearn.scenarios import TensorData

        class PredictA:
            @hookimpl
            def predict(self, run, batch):
                return batch.y

        class ForwardA:
            @hookimpl
            def forward(self, run, batch):
                return run.model(batch.x)

        class ComputeLossA:
            @hookimpl
            def compute_loss(self, out):
                return out.logits.sum()

        PredictB, ForwardB, ComputeLossB = (type(c.__name__[:-1] + "B", (c,), {}) for c in (PredictA, ForwardA, ComputeLossA))

        class BadLabels:
            @hookimpl
            def train_data(self, exp):
                return TensorData(exp.train.x, exp.train.y + 100, exp.train.t)

        class Empty:
            @hookimpl
            def train_data(self, exp):
                return exp.train.subset(torch.zeros(0, dtype=torch.long))

        class Buggy:
            @hookimpl
            def before_experience(self, exp):
                if exp.index == 1:
                    raise RuntimeError("a bug of the plugin")

        class OpensFile:
            @hookimpl
            def after_step(self, run):
                open("/nonexistent/dir/stats.json")
    '''
    names = {f"{hook}_{v}": f"cl_catalogue:{cls}{v.upper()}" for hook, cls in
             (("predict", "Predict"), ("forward", "Forward"), ("compute_loss", "ComputeLoss")) for v in "ab"}
    names |= {"bad_labels": "cl_catalogue:BadLabels", "empty": "cl_catalogue:Empty", "buggy": "cl_catalogue:Buggy",
              "opens_file": "cl_catalogue:OpensFile"}
    install_distribution(tmp_path, "cl_catalogue", source, "cl-catalogue", names)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("cl_catalogue", None)


# ------------------------------------------------------------------ usage and config: exit 2


def test_config_file_that_does_not_exist(capsys):
    err = one_error_line(capsys, 2, ["run", "nowhere/exp.yaml"])
    assert err == "error: config file 'nowhere/exp.yaml' does not exist"


def test_config_name_that_does_not_exist_lists_shipped_names(capsys):
    err = one_error_line(capsys, 2, ["run", "split-digitz"])
    assert "no config file or shipped experiment named 'split-digitz'" in err and "split-digits" in err


def test_unknown_plugin_lists_available_ones(capsys):
    err = one_error_line(capsys, 2, ["run", "plugins.ewk.lam=1"])
    assert "unknown plugin 'ewk'; available plugins:" in err and "'finetune'" in err


@pytest.mark.parametrize("target, message", [
    ("anchor", "--plugin 'anchor': give NAME=path/to/file.py:Class or NAME=package.module:Class"),
    ("anchor=missing.py:Anchor", "--plugin anchor=missing.py:Anchor: no such file missing.py"),
    ("anchor={file}:Ancher", "has no attribute 'Ancher'; the classes it defines: Anchor"),
])
def test_a_plugin_class_the_command_line_cannot_load(target, message, plugin_file, capsys):
    err = one_error_line(capsys, 2, ["run", "-p", target.format(file=plugin_file), "train.epochs=1"])
    assert message in err


@pytest.mark.parametrize(
    "override, key, valid",
    [
        ("train.epochz=1", "train.epochz", "'epochs'"),
        ("trian.epochs=1", "trian", "'train'"),
        ("checkpoint.every_n_step=5", "checkpoint.every_n_step", "'every_n_steps'"),
    ],
)
def test_unknown_or_mistyped_key_lists_valid_keys(override, key, valid, capsys):
    err = one_error_line(capsys, 2, ["run", override])
    assert f"unknown config key '{key}'; valid keys here:" in err and valid in err


def test_wrongly_typed_value_names_the_key(capsys):
    assert "wrong value for 'train.epochs'" in one_error_line(capsys, 2, ["run", "train.epochs=many"])


@pytest.mark.parametrize("hook", ["predict", "forward", "compute_loss"])
def test_two_plugins_claiming_a_firstresult_hook(hook, catalogue_plugins, capsys):
    err = one_error_line(capsys, 2, ["run", *TINY, f"plugins.{hook}_a={{}}", f"plugins.{hook}_b={{}}"])
    assert f"plugins '{hook}_a' and '{hook}_b' both implement the firstresult hook '{hook}'" in err


@pytest.mark.parametrize("plugin, error, hook", [("buggy", "RuntimeError", "before_experience"),
                                                 ("opens_file", "FileNotFoundError", "after_step")])
def test_a_bug_in_a_plugin_s_hook_names_the_plugin_and_the_hook(plugin, error, hook, catalogue_plugins, tmp_path,
                                                               capsys):
    """A plugin's bug: its traceback, then one line naming it (an OSError of its
    own was reported as a file of the user's, without plugin or traceback)."""
    out = tmp_path / "run"
    assert main(["run", *TINY, f"plugins.{plugin}={{}}", "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err
    # checkpoints: experience 0's, before the bug in experience 1; none before the first step
    kept = f"; the run's checkpoints are kept: once it is fixed, continue with: contlearn resume {out}"
    assert err.splitlines()[-1] == (
        f"error: plugin cl_catalogue.{plugin.title().replace('_', '')} raised {error} in its hook '{hook}' (above)"
        + (kept if plugin == "buggy" else "")
    )
    assert bool(ckpt.list_checkpoints(out / "checkpoints")) == (plugin == "buggy")


@pytest.mark.parametrize(
    "module, argv, message",
    [
        ("timm", ["run", "model.backbone=timm:resnet18"],
         "error: backbone 'timm:resnet18' needs the 'timm' package (import of timm halted; None in sys.modules); "
         "install it with: pip install 'contlearn[timm]'"),
        ("open_clip", ["run", "digits-dmn"], "error: a CLIP model needs the 'open_clip_torch' package"),
        ("torch.utils.tensorboard", ["run", "--tensorboard"], "error: the TensorBoard logger needs the 'tensorboard' package"),
        ("avalanche", ["run", "scenario.source=avalanche", "scenario.factory=nc_benchmark"],
         "error: Avalanche interop needs the 'avalanche-lib' package"),
    ],
)
def test_a_missing_optional_package_names_its_extra(module, argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    err = one_error_line(capsys, 2, [*argv, "--out", str(tmp_path / "run")])
    assert err.startswith(message) and "pip install 'contlearn[" in err, err
    assert not (tmp_path / "run" / "results.json").exists()


def test_the_advice_to_continue_after_a_bug_names_the_p_plugins_again(catalogue_plugins, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *TINY, "-p", "mine=cl_catalogue:Buggy", "--out", str(out), "--quiet"]) == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.endswith(f"continue with: contlearn resume {out} -p mine=cl_catalogue:Buggy"), last


def test_npz_source_without_a_path(capsys):
    assert "needs scenario.path" in one_error_line(capsys, 2, ["run", "scenario.source=npz"])


def test_an_empty_out_is_refused_not_taken_for_the_default(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert one_error_line(capsys, 2, ["run", "--out", ""]) == "error: --out is empty: give the run directory"
    assert "--out is empty" in one_error_line(capsys, 2, ["report", str(tmp_path), str(tmp_path), "--out="])
    assert list(tmp_path.iterdir()) == []


def test_resume_of_a_directory_that_is_no_run(tmp_path, capsys):
    assert "is not a run directory" in one_error_line(capsys, 2, ["resume", str(tmp_path)])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=[1", "cannot parse override 'train.epochs=[1'"),
        ("train.lr='0.1", "cannot parse override 'train.lr='0.1'"),
        ("plugins={joint:{}}", "needs a space after it"),
        ("plugins=[replay]", "'plugins' in the overrides must be a mapping of plugin names to their fields"),
        ("train.epochs=${oops}", "cannot resolve an interpolation in 'train.epochs'"),
        ("train.momentum=-1", "'train.momentum' must be at least 0"),
        ("model.hidden=[0]", "'model.hidden' widths must be at least 1"),
        ("device=cuda:abc", "'device' must be auto, cpu, cuda, cuda:N or mps"),
        ("seed=-1", "'seed' must be in [0, 2**32)"),
        ("plugins.replay=${train}", "wrong value for 'plugins.replay': a section takes its own fields, not another"),
    ],
)
def test_overrides_that_do_not_parse_or_are_out_of_range(override, message, capsys):
    assert message in one_error_line(capsys, 2, ["show-config", "split-digits", override])


def test_a_plugin_list_instead_of_a_mapping_in_a_file(tmp_path, capsys):
    (tmp_path / "exp.yaml").write_text("plugins: [replay, ewc]\n")
    err = one_error_line(capsys, 2, ["show-config", str(tmp_path / "exp.yaml")])
    assert "'plugins' in config" in err and "must be a mapping" in err


def test_a_new_run_in_a_directory_that_holds_a_run_is_refused(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "my run")  # checkpoints without results: a run that stopped
    err = one_error_line(capsys, 2, ["run", *TINY, "--out", str(run), "--quiet"])
    assert err == (  # the command quoted, to be pasted as it is
        f"error: '{run}' already holds a run (checkpoints): give the new run another directory, or continue "
        f"that one with: contlearn resume {shlex.quote(str(run))}"
    )
    assert shlex.quote(str(run)) != str(run)
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == [
        p.name for p in ckpt.list_checkpoints(finished_run / "checkpoints")
    ]
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "results.json").write_text('{"kept": true}')
    err = one_error_line(capsys, 2, ["run", *TINY, "--out", str(finished), "--quiet"])
    assert "already holds a finished run (results.json)" in err
    # a finished run keeps its checkpoints, but 'contlearn resume' would refuse it: no such advice
    err = one_error_line(capsys, 2, ["run", *TINY, "--out", str(finished_run), "--quiet"])
    assert err == f"error: '{finished_run}' already holds a finished run (results.json): give the new run another directory"
    assert (finished / "results.json").read_text() == '{"kept": true}'


def test_a_directory_left_by_a_run_that_failed_before_its_first_checkpoint_can_be_reused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *TINY, "train.lr=1e30", "--out", str(out), "--quiet"]) == 1  # fails at its first step
    capsys.readouterr()
    assert (out / "config.yaml").is_file() and not ckpt.list_checkpoints(out / "checkpoints")
    assert main(["run", *TINY, "--out", str(out), "--quiet"]) == 0
    assert (out / "results.json").is_file()


def test_options_may_come_before_overrides(tmp_path, capsys):
    assert main(["run", TINY[0], "--quiet", *TINY[1:], "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "results.json").is_file()
    assert "unrecognized arguments: --loud" in one_error_line(capsys, 2, ["run", *TINY, "--loud"])


# --------------------------------------------------------------------- run time: exit 1


def test_missing_dataset_path(tmp_path, capsys):
    missing = tmp_path / "digits.npz"
    err = one_error_line(capsys, 1, ["run", "scenario.source=npz", f"scenario.path={missing}", "--out", str(tmp_path / "run")])
    assert err == f"error: npz file '{missing}' does not exist (scenario.path)"


def test_one_hot_labels_in_an_npz_file(tmp_path, capsys):
    path = tmp_path / "onehot.npz"
    np.savez(path, x=np.zeros((40, 4), dtype=np.float32), y=np.eye(4)[np.arange(40) % 4])
    err = one_error_line(capsys, 1, ["run", "scenario.source=npz", f"scenario.path={path}", "--out", str(tmp_path / "run")])
    assert err == ("error: labels y have shape (40, 4): a label is one class per sample, y of shape (N,) "
                   "(for one-hot or soft targets, give their argmax)")


@pytest.mark.parametrize("overrides, message", [
    (["scenario.setting=task", "model.head=multi"], "the dmn plugin classifies among all the classes seen"),
    (["scenario.source=npz", "scenario.n_experiences=2"], "the dmn plugin's CLIP needs image inputs [1 or 3, H, W]"),
])
def test_dmn_on_task_labels_or_data_that_are_not_images(overrides, message, tmp_path, capsys):
    pytest.importorskip("open_clip")
    path = tmp_path / "vectors.npz"
    np.savez(path, x=np.zeros((40, 4), dtype=np.float32), y=np.arange(40) % 4)
    extra = [f"scenario.path={path}"] if "scenario.source=npz" in overrides else []
    tiny_clip = ["plugins.dmn.clip=contlearn-tiny-clip", "plugins.dmn.pretrained=null"]
    err = one_error_line(capsys, 2, ["run", "digits-dmn", *tiny_clip, *overrides, *extra, "--out", str(tmp_path / "run")])
    assert err.startswith(f"error: {message}")


def test_labels_outside_the_head(catalogue_plugins, tmp_path, capsys):
    err = one_error_line(capsys, 1, ["run", *TINY, "plugins.bad_labels={}", "--out", str(tmp_path), "--quiet"])
    assert "experience 0 trains on label 104, outside the head's 5 outputs (labels 0 to 4" in err


def test_empty_experience(catalogue_plugins, tmp_path, capsys):
    err = one_error_line(capsys, 1, ["run", *TINY, "plugins.empty={}", "--out", str(tmp_path), "--quiet"])
    assert err == "error: experience 0 has no training samples"


def test_an_experience_without_test_data_is_refused_before_training():
    cfg = load_config(None, [*TINY])
    stream = stream_of(cfg)
    stream[1].test = stream[1].test.subset(range(0))
    with pytest.raises(DataError, match="experience 1 has no test samples: every experience needs test data"):
        Experiment(cfg, stream=stream).run()


def test_output_directory_that_cannot_be_written_is_found_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = one_error_line(capsys, 1, ["run", *TINY, "--out", str(blocker / "run")])
    assert err.startswith(f"error: cannot write to the output directory '{blocker / 'run'}'")
    assert capsys.readouterr().out == ""  # no progress: nothing was trained


def test_a_checkpoint_that_cannot_be_written_says_why_and_leaves_no_temporary(tmp_path, monkeypatch, capsys):
    def disk_full(obj, f):  # what torch.save raises when the disk fills up under it
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    err = one_error_line(capsys, 1, ["run", *TINY, "--out", str(tmp_path), "--quiet"])
    assert err.startswith(f"error: cannot write checkpoint '{tmp_path / 'checkpoints' / 'ckpt-001-'}")
    assert "the write failed ([enforce fail at inline_container.cc:672]" in err and "MiB free on its disk" in err
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_a_result_file_that_cannot_be_written_says_why(tmp_path, monkeypatch, capsys):
    import errno
    import os

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    err = one_error_line(capsys, 1, ["run", *TINY, "checkpoint.enabled=false", "--out", str(tmp_path), "--quiet"])
    assert err == f"error: cannot write '{tmp_path / 'config.yaml'}': No space left on device"
    assert not list(tmp_path.glob(".*.tmp"))


def test_non_finite_loss_names_step_experience_and_term(tmp_path, capsys):
    err = one_error_line(capsys, 1, ["run", *TINY, "train.lr=1e30", "--out", str(tmp_path), "--quiet"])
    assert err.endswith("non-finite loss at step 2 (epoch 0) of experience 0: loss went bad; lower train.lr")
    assert not ckpt.list_checkpoints(tmp_path / "checkpoints")


def test_a_non_finite_loss_in_a_later_epoch_names_its_step_counted_from_the_experience_s_start(tmp_path):
    class GoesBad:
        @hookimpl
        def loss_terms(self, run, out):
            bad = run.epoch == 1 and run.step == 6  # steps done so far: the 7th step of the experience
            return {"boom": out.logits.sum() * 0 + (float("nan") if bad else 0.0)}

    # 4 steps per epoch (about 50 samples in batches of 16): step 7 is the 3rd of epoch 1
    cfg = load_config(None, [*TINY, "train.epochs=2", "train.batch_size=16"])
    with pytest.raises(TrainingError, match=r"^non-finite loss at step 7 \(epoch 1\) of experience 0: boom went bad; "
                                            r"lower train.lr or check the plugin that adds boom$"):
        Experiment(cfg, out_dir=tmp_path, plugins={"bad": GoesBad()}).run()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    assert main(["run", *TINY, "checkpoint.every_n_steps=2", "--out", str(out), "--quiet"]) == 0
    return out


def copy_run(src: Path, dst: Path) -> Path:
    (dst / "checkpoints").mkdir(parents=True)
    (dst / "config.yaml").write_bytes((src / "config.yaml").read_bytes())
    for p in ckpt.list_checkpoints(src / "checkpoints"):
        (dst / "checkpoints" / p.name).write_bytes(p.read_bytes())
    return dst


def test_truncated_checkpoint_is_skipped_and_the_user_told(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    newest = ckpt.list_checkpoints(run / "checkpoints")[-1]
    newest.write_bytes(newest.read_bytes()[:500])
    assert main(["resume", str(run), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: checkpoint '{newest.name}' is truncated or corrupt")
    assert "using the previous one, 'ckpt-" in err
    assert (run / "results.json").read_text().count('"accuracy_matrix"') == 1
    assert ckpt.load(newest)  # rewritten whole by the resumed run


def test_no_readable_checkpoint(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    for p in ckpt.list_checkpoints(run / "checkpoints"):
        p.write_bytes(b"\x00" * 64)
    assert main(["resume", str(run)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("error: no readable checkpoint in") and "Traceback" not in "".join(lines)
    assert all(line.startswith("warning: ") for line in lines[:-1])


# ----------------------------------------------------------------------------- warnings


def test_broken_third_party_plugin_warns_with_its_distribution_and_the_rest_loads(tmp_path, monkeypatch, capsys):
    install_distribution(tmp_path, "cl_cat_broken", "raise ImportError('needs libfoo')\n", "cl-broken", {"broken": "cl_cat_broken:Plugin"})
    install_distribution(tmp_path, "cl_cat_fine", '''
        class Fine:
            """Does nothing."""
    ''', "cl-fine", {"fine": "cl_cat_fine:Fine"})
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert main(["run", *TINY, "plugins.fine={}", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    finally:
        sys.modules.pop("cl_cat_fine", None)
    err = capsys.readouterr().err
    assert err.startswith("warning: plugin 'broken' (cl_cat_broken:Plugin, from cl-broken 1.0) failed to load")
    assert "needs libfoo" in err and "Traceback" not in err and all(line.startswith("warning: ") for line in err.splitlines())
    assert err.count("failed to load") == 1, err  # once, though the config and the run both load the plugins
    assert (tmp_path / "run" / "results.json").is_file()


def test_a_batch_of_one_sample_through_batchnorm_says_which_step_and_why(tmp_path, capsys):
    """cnn-bn with four pooling stages leaves 1x1 maps on 8x8 digits, and the
    batch size is chosen to leave a last batch of one."""
    overrides = ["device=cpu", "scenario.n_experiences=1", "scenario.samples_per_class=4", "model.backbone=cnn-bn",
                 "model.hidden=[4,4,4,4]", "train.epochs=1", "eval.fwt=false"]
    cfg = load_config("split-digits", overrides)
    n = len(stream_of(cfg)[0].train)
    batch_size = next(b for b in range(2, n) if n % b == 1)
    code = main(["run", "split-digits", *overrides, f"train.batch_size={batch_size}", "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip().startswith(f"error: step {n // batch_size + 1} of experience 0 (epoch 0) has a batch of one sample")
    assert f"train.batch_size={batch_size}" in err and "Traceback" not in err


def test_a_batch_size_of_one_through_batchnorm_is_named_as_the_cause(tmp_path, capsys):
    overrides = ["device=cpu", "scenario.n_experiences=1", "scenario.samples_per_class=2", "model.backbone=cnn-bn",
                 "model.hidden=[4,4,4,4]", "train.epochs=1", "eval.fwt=false", "train.batch_size=1"]
    code = main(["run", "split-digits", *overrides, "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip().startswith("error: step 1 of experience 0 (epoch 0) has a batch of one sample")
    assert "train.batch_size=1 makes every batch one sample: use at least 2" in err and "Traceback" not in err


def test_a_resume_on_another_number_of_threads_is_one_warning(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    newest = ckpt.list_checkpoints(run / "checkpoints")[-1]
    newest.unlink()  # the run is unfinished from the one before
    saved = ckpt.load(ckpt.list_checkpoints(run / "checkpoints")[-1])["threads"]
    other = 1 if saved != 1 else 2
    assert main(["resume", str(run), f"threads={other}", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: checkpoint 'ckpt-")
    assert f"a run on {saved} CPU thread" in err and f"resume runs on {other}: " in err
