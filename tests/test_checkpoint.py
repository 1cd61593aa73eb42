"""Checkpoint files: what they hold, how they are written, read and refused."""

from __future__ import annotations

import pickle
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from _crash import SMALL_RUN
from omegaconf import OmegaConf

from contlearn import ConfigError, Experiment, hookimpl, load_config
from contlearn import checkpoint as ckpt
from contlearn.errors import CheckpointError

TINY = [
    "device=cpu",
    "scenario.n_experiences=2",
    "scenario.samples_per_class=10",
    "model.hidden=[8]",
    "train.epochs=1",
    "train.batch_size=16",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished run with a checkpoint every 2 steps, all kept."""
    out = tmp_path_factory.mktemp("run")
    Experiment(load_config(None, [*TINY, "checkpoint.every_n_steps=2", "checkpoint.keep_last=100"]), out_dir=out).run()
    return out


def test_names_sort_in_run_order_and_hold_the_position(run_dir):
    paths = ckpt.list_checkpoints(run_dir / "checkpoints")
    # 5 classes x 10 samples per experience in batches of 16: steps 1-4 train
    # experience 0 and 5-8 experience 1; every 2 steps, and after each experience
    assert [p.name for p in paths] == [
        "ckpt-000-000000002.pt",
        "ckpt-000-000000004.pt",
        "ckpt-001-000000004.pt",
        "ckpt-001-000000006.pt",
        "ckpt-001-000000008.pt",
        "ckpt-002-000000008.pt",
    ]
    positions = [ckpt.load(p)["position"] for p in paths]
    assert [(p["completed"], p["inside_experience"], p["batch"], p["global_step"]) for p in positions] == [
        (0, True, 2, 2), (0, True, 4, 4), (1, False, 0, 4), (1, True, 2, 6), (1, True, 4, 8), (2, False, 0, 8)
    ]


def test_contents_load_with_weights_only(run_dir):
    path = ckpt.list_checkpoints(run_dir / "checkpoints")[3]  # after 2 steps of experience 1
    state = torch.load(path, weights_only=True)
    assert state["format"] == ckpt.FORMAT and state["version"] == ckpt.VERSION
    assert set(state["rng"]) == {"python", "numpy", "torch", "cuda", "generator"}
    assert state["rng"]["python"][1][:3] and state["rng"]["numpy"]["keys"].shape == (624,)
    assert state["model"]["head.weight"].shape[0] == 10  # grown for both experiences' classes
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.1
    assert state["plugins"] == {"finetune": {}}
    metrics = state["metrics"]
    assert len(metrics["accuracy_rows"]) == 1 and metrics["initial_accuracy"] is not None
    assert metrics["epoch_losses"].shape == (2,) and metrics["confusion"].shape == (10, 11)  # last column: no class
    assert state["config"]["model"]["hidden"] == [8]


def test_keep_last_deletes_the_oldest(tmp_path):
    Experiment(load_config(None, [*TINY, "checkpoint.every_n_steps=1", "checkpoint.keep_last=2"]), out_dir=tmp_path).run()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [
        "ckpt-001-000000008.pt",
        "ckpt-002-000000008.pt",
    ]


def test_disabled_and_library_runs_write_no_checkpoint(tmp_path, monkeypatch):
    Experiment(load_config(None, [*TINY, "checkpoint.enabled=false"]), out_dir=tmp_path / "a").run()
    assert (tmp_path / "a" / "results.json").is_file() and not (tmp_path / "a" / "checkpoints").exists()
    monkeypatch.chdir(tmp_path / "a")
    Experiment(load_config(None, TINY)).run()  # no out_dir: nothing written anywhere
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [".lock", "config.yaml", "metrics.csv", "results.json"]


def test_a_run_whose_metrics_csv_cannot_be_written_can_be_resumed(tmp_path, monkeypatch):
    from contlearn import ContlearnError
    from contlearn import results as results_module

    real = results_module.write_atomic

    def csv_fails(path, text):
        if path.name == "metrics.csv":
            raise ContlearnError(f"cannot write '{path}': No space left on device")
        real(path, text)

    monkeypatch.setattr(results_module, "write_atomic", csv_fails)
    with pytest.raises(ContlearnError, match="metrics.csv"):
        Experiment(load_config(None, TINY), out_dir=tmp_path).run()
    assert not (tmp_path / "results.json").exists()  # so the run is not taken as finished
    monkeypatch.setattr(results_module, "write_atomic", real)
    Experiment.resume(tmp_path).run()
    assert (tmp_path / "metrics.csv").is_file() and (tmp_path / "results.json").is_file()


def test_write_is_atomic(tmp_path, monkeypatch):
    state = {"format": ckpt.FORMAT, "version": ckpt.VERSION, "position": {"completed": 1, "global_step": 5}, "x": torch.ones(3)}
    first = ckpt.write(tmp_path, state, keep_last=3)

    def torch_save_dies_halfway(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", torch_save_dies_halfway)
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*No space left on device"):
        ckpt.write(tmp_path, {**state, "position": {"completed": 1, "global_step": 9}}, keep_last=3)
    assert list(tmp_path.iterdir()) == [first]


def test_a_run_removes_the_temporary_files_a_killed_writer_left(run_dir, tmp_path):
    unfinished = tmp_path / "run"
    shutil.copytree(run_dir, unfinished)
    (unfinished / "results.json").unlink()  # as if the run had stopped after its last checkpoint
    newest = ckpt.list_checkpoints(unfinished / "checkpoints")[-1]
    stale = unfinished / "checkpoints" / f".{newest.name}.tmp"  # the name write() gives its temporary file
    stale.write_bytes(newest.read_bytes()[:1000])  # the writer was killed halfway
    Experiment.resume(unfinished).run()
    assert not stale.exists()
    assert [p.name for p in (unfinished / "checkpoints").iterdir() if p.name.startswith(".")] == []


def test_keys_other_than_str_or_int_are_refused():
    ckpt.check_plain({"a": {1: torch.zeros(1)}})
    with pytest.raises(CheckpointError, match=r"^checkpoint\.plugins has a key of type tuple; use str or int keys$"):
        ckpt.check_plain({(1, 2): 0}, "checkpoint.plugins")
    with pytest.raises(CheckpointError, match=r"^checkpoint\.a has a key of type float"):
        ckpt.check_plain({"a": {0.5: 1}})


def test_plain_containers_only(tmp_path):
    class Holder:
        def __init__(self, value):
            self.value = value

        def state_dict(self):
            return {"ok": [torch.zeros(2), 1, "a", None], "bad": {"inner": self.value}}

        def load_state_dict(self, state):
            pass

    with pytest.raises(CheckpointError, match=r"checkpoint\.plugins\.holder\.bad\.inner is a numpy\.ndarray"):
        Experiment(load_config(None, TINY), out_dir=tmp_path, plugins={"holder": Holder(np.zeros(2))}).run()
    assert not ckpt.list_checkpoints(tmp_path / "checkpoints")


class _Payload:
    """Pickles to a call of ``Path.touch``: what a malicious checkpoint would do."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_loading_never_executes_code(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "ckpt-001-000000001.pt"
    torch.save({"format": ckpt.FORMAT, "payload": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="truncated or corrupt") as refused:
        ckpt.load(path)
    assert not marker.exists()
    assert "weights_only" not in str(refused.value)  # torch's advice to load unsafely is not repeated
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload does run when unpickled freely
    assert marker.exists()


def test_latest_skips_a_truncated_checkpoint_and_says_so(run_dir, tmp_path):
    for p in ckpt.list_checkpoints(run_dir / "checkpoints")[-2:]:
        (tmp_path / p.name).write_bytes(p.read_bytes())
    newest = ckpt.list_checkpoints(tmp_path)[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    with pytest.warns(ckpt.CheckpointWarning, match=r"'ckpt-002-000000008.pt' is truncated or corrupt .*previous one, 'ckpt-001-000000008.pt'"):
        path, state = ckpt.latest(tmp_path)
    assert path.name == "ckpt-001-000000008.pt" and state["position"]["global_step"] == 8

    path.write_bytes(b"not a zip file")
    with warnings.catch_warnings(), pytest.raises(CheckpointError, match="no readable checkpoint"):
        warnings.simplefilter("ignore")
        ckpt.latest(tmp_path)


def test_latest_names_every_unreadable_checkpoint_it_skips(run_dir, tmp_path):
    for p in ckpt.list_checkpoints(run_dir / "checkpoints")[-3:]:
        (tmp_path / p.name).write_bytes(p.read_bytes())
    *_, older, newest = ckpt.list_checkpoints(tmp_path)
    for p in (older, newest):
        p.write_bytes(p.read_bytes()[:1000])
    with pytest.warns(ckpt.CheckpointWarning) as caught:
        path, _ = ckpt.latest(tmp_path)
    assert path.name == "ckpt-001-000000006.pt"
    messages = [str(w.message) for w in caught if issubclass(w.category, ckpt.CheckpointWarning)]
    assert len(messages) == 2
    assert f"'{newest.name}' is truncated or corrupt" in messages[0]
    assert f"'{older.name}' is truncated or corrupt" in messages[1]
    assert all(m.endswith("using the previous one, 'ckpt-001-000000006.pt'") for m in messages)


def test_a_flipped_bit_in_a_tensor_fails_the_crc_check(run_dir, tmp_path):
    """torch.load does not check the CRC-32 that torch.save writes for every record."""
    import zipfile

    source = ckpt.list_checkpoints(run_dir / "checkpoints")[-1]
    with zipfile.ZipFile(source) as archive:
        record = max(archive.infolist(), key=lambda i: i.file_size if "/data/" in i.filename else -1)
    data = bytearray(source.read_bytes())
    data[record.header_offset + 30 + len(record.filename.encode()) + len(record.extra) + 5] ^= 0x10  # inside its bytes
    path = tmp_path / source.name
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"'{source.name}' is corrupt: its record '{record.filename}' fails its "
                                              r"CRC check"):
        ckpt.load(path)


def test_a_checkpoint_saved_without_crcs_loads(run_dir, tmp_path):
    """torch.serialization.set_crc32_options(False) writes a CRC of 0 for every record."""
    state = ckpt.load(ckpt.list_checkpoints(run_dir / "checkpoints")[-1])
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, tmp_path / "ckpt-002-000000008.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert ckpt.load(tmp_path / "ckpt-002-000000008.pt")["position"] == state["position"]


def test_a_run_whose_config_predates_the_new_run_checks_resumes_and_unlearns(tmp_path, capsys):
    """A saved config is checked as it was when the run started."""
    from contlearn.cli import main
    from contlearn.config import saved_run_config

    class Clip:  # a plugin of one's own that gives infinity a meaning
        @dataclass
        class Config:
            max_norm: float = 1.0

        def __init__(self, config):
            self.config = config

    out = tmp_path / "run"
    older = [*TINY, "name=group/first", "scenario.image_size=8", "train.optimizer=adam", "train.momentum=1.0",
             "model.head=cosine", "model.cosine_scale=-5", "plugins.clip.max_norm=.inf"]  # fmt: skip
    with saved_run_config():  # as older code accepted it
        Experiment(load_config(None, older, plugins={"clip": Clip}), out_dir=out, plugins={"clip": Clip}).run()
    with pytest.raises(ConfigError, match="must be positive"):
        load_config(out / "config.yaml", plugins={"clip": Clip})
    (out / "results.json").unlink()
    ckpt.list_checkpoints(out / "checkpoints")[-1].unlink()
    Experiment.resume(out, plugins={"clip": Clip}).run()
    without_plugin = tmp_path / "run2"
    with saved_run_config():
        Experiment(load_config(None, older[:-1]), out_dir=without_plugin).run()
    (without_plugin / "results.json").unlink()
    ckpt.list_checkpoints(without_plugin / "checkpoints")[-1].unlink()
    assert main(["resume", str(without_plugin), "--quiet"]) == 0, capsys.readouterr().err
    assert main(["unlearn", str(without_plugin), "--classes", "0", "--alpha", "10", "--lam", "1",
                 "--out", str(tmp_path / "u")]) == 0  # fmt: skip


def test_a_checkpoint_that_cannot_be_opened_is_not_called_corrupt(run_dir, monkeypatch):
    """Permissions: the file may be whole, so it is not skipped (and later rotated away)."""
    def refuse(path, mode="r"):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(ckpt, "open", refuse, raising=False)
    with pytest.raises(PermissionError):
        ckpt.latest(run_dir / "checkpoints")


def test_other_files_are_refused(tmp_path):
    torch.save({"model": {}}, tmp_path / "ckpt-000-000000001.pt")
    with pytest.raises(CheckpointError, match="not a contlearn checkpoint"):
        ckpt.load(tmp_path / "ckpt-000-000000001.pt")
    torch.save({"format": ckpt.FORMAT, "version": 99}, tmp_path / "ckpt-000-000000002.pt")
    with pytest.raises(CheckpointError, match="format version 99; this contlearn reads 1"):
        ckpt.load(tmp_path / "ckpt-000-000000002.pt")
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        ckpt.latest(tmp_path / "nothing")


def test_a_checkpoint_with_malformed_sections_is_incomplete(run_dir, tmp_path):
    state = ckpt.load(ckpt.list_checkpoints(run_dir / "checkpoints")[-1])
    state["position"] = {}
    del state["metrics"]["timings"]
    torch.save(state, tmp_path / "ckpt-002-000000008.pt")
    lacks = r"\['position.completed', 'position.inside_experience', 'position.epoch', 'position.step', " \
            r"'position.global_step', 'metrics.timings'\]$"
    with pytest.raises(CheckpointError, match=r"is incomplete: it lacks " + lacks):
        ckpt.load(tmp_path / "ckpt-002-000000008.pt")


def test_a_checkpoint_without_the_epoch_s_generator_state_is_incomplete(run_dir, tmp_path):
    """Needed to draw again the order of an epoch that a checkpoint interrupted."""
    inside = ckpt.list_checkpoints(run_dir / "checkpoints")[3]
    state = ckpt.load(inside)
    assert state["position"]["inside_experience"]
    del state["metrics"]["epoch_generator"]
    torch.save(state, tmp_path / inside.name)
    with pytest.raises(CheckpointError, match=r"is incomplete: it lacks \['metrics.epoch_generator'\]$"):
        ckpt.load(tmp_path / inside.name)


def test_a_checkpoint_with_hand_edited_random_state_or_sections_is_refused_by_name(run_dir, tmp_path):
    state = ckpt.load(ckpt.list_checkpoints(run_dir / "checkpoints")[-1])
    del state["rng"]["numpy"]
    torch.save(state, tmp_path / "ckpt-002-000000008.pt")
    with pytest.raises(CheckpointError, match=r"is incomplete: it lacks \['rng.numpy'\]"):
        ckpt.load(tmp_path / "ckpt-002-000000008.pt")
    state = ckpt.load(ckpt.list_checkpoints(run_dir / "checkpoints")[-1])
    state["plugins"], state["config"] = None, None
    torch.save(state, tmp_path / "ckpt-002-000000009.pt")
    with pytest.raises(CheckpointError, match=r"is malformed: \['config', 'plugins'\] should be mappings"):
        ckpt.load(tmp_path / "ckpt-002-000000009.pt")


@pytest.mark.parametrize("edit, part", [
    (lambda s: s["rng"].update(python=None), "its random states or metrics"),
    (lambda s: s["position"].update(global_step="x"), "its position"),
    (lambda s: s["metrics"].update(accuracy_rows=None), "its position"),
    (lambda s: s["plugins"].update(replay={}), r"plugin contlearn.plugins.replay.\w+'s setup failed on its saved state"),
])  # fmt: skip
def test_a_checkpoint_with_values_of_the_wrong_kind_is_malformed_by_part(tmp_path, edit, part):
    out = tmp_path / "run"
    Experiment(load_config(None, [*TINY, "plugins.replay.size=10"]), out_dir=out).run()
    (out / "results.json").unlink()  # as a run stopped after its last checkpoint
    newest = ckpt.list_checkpoints(out / "checkpoints")[-1]
    state = ckpt.load(newest)
    edit(state)
    torch.save(state, newest)
    with pytest.raises(CheckpointError, match=rf"'{newest.name}'(: | is malformed: ){part}"):
        Experiment.resume(out).run()


def test_a_checkpoint_edited_to_stand_past_the_end_of_the_stream_is_refused(run_dir, tmp_path):
    unfinished = tmp_path / "run"
    shutil.copytree(run_dir, unfinished)
    (unfinished / "results.json").unlink()
    newest = ckpt.list_checkpoints(unfinished / "checkpoints")[-1]
    state = ckpt.load(newest)
    assert state["position"]["completed"] == 2  # every experience of the stream
    state["position"]["inside_experience"] = True  # inside a third, which the stream lacks
    torch.save(state, newest)
    with pytest.raises(CheckpointError, match=rf"^checkpoint '{newest.name}' is past the end of the stream \(2 experiences\)$"):
        Experiment.resume(unfinished).run()


def test_plugin_states_must_match_the_plugins(run_dir, tmp_path):
    class Counter:
        @hookimpl
        def after_step(self):
            pass

        def state_dict(self):
            return {"n": 0}

        def load_state_dict(self, state):
            pass

    unfinished = tmp_path / "run"
    shutil.copytree(run_dir, unfinished)
    (unfinished / "results.json").unlink()  # as if the run had stopped after its last checkpoint
    with (
        pytest.warns(ckpt.CheckpointWarning, match=r"given these plugins in Python: none; this resume has 'counter'"),
        pytest.raises(CheckpointError, match=r"holds plugin states for \['finetune'\].*no state for \['counter'\]"),
    ):
        Experiment.resume(unfinished, plugins={"counter": Counter()}).run()

    # and the converse: a run given a stateful plugin in Python must be given it again
    given = tmp_path / "given"
    Experiment(load_config(None, SMALL_RUN), out_dir=given, plugins={"counter": Counter()}).run()
    (given / "results.json").unlink()
    with (
        pytest.warns(ckpt.CheckpointWarning, match=r"given these plugins in Python: 'counter'"),
        pytest.raises(CheckpointError, match=r"holds plugin states for \['counter', 'finetune'\].*no plugin for \['counter'\]"),
    ):
        Experiment.resume(given).run()


@pytest.mark.parametrize("override, key", [("checkpoint.keep_last=0", "keep_last"), ("checkpoint.every_n_steps=0", "every_n_steps")])
def test_checkpoint_settings_are_validated(override, key):
    with pytest.raises(ConfigError, match=f"checkpoint.{key}"):
        load_config(None, [override])


def test_a_run_written_before_an_option_existed_resumes(run_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    *_, newest = ckpt.list_checkpoints(old / "checkpoints")[:3]
    for later in [*ckpt.list_checkpoints(old / "checkpoints")[3:], old / "results.json"]:
        later.unlink()  # as a run that stopped there left it
    state = ckpt.load(newest)
    del state["config"]["train"]["lr_schedule"], state["config"]["threads"]  # as older code wrote it
    torch.save(state, newest)
    config = OmegaConf.to_container(OmegaConf.load(old / "config.yaml"))
    del config["train"]["lr_schedule"], config["threads"]
    (old / "config.yaml").write_text(OmegaConf.to_yaml(config))
    results = Experiment.resume(old).run()
    assert len(results.accuracy_matrix) == 2

