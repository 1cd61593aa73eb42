"""``contlearn unlearn RUN_DIR``: a new run directory with the forgetting model and its report."""

from __future__ import annotations

import json

import pytest
import torch

from contlearn import checkpoint as ckpt
from contlearn.cli import main

RUN = [
    "train.epochs=2", "eval.fwt=false", "scenario.n_experiences=2", "scenario.samples_per_class=30", "plugins={}",
]  # fmt: skip


def _train(path, *plugins: str) -> None:
    assert main(["run", "split-digits", *RUN, *plugins, "--out", str(path), "--quiet"]) == 0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ssd-run")
    _train(path, "plugins.ssd={}")
    return path


def _newest(directory):
    return ckpt.load(ckpt.list_checkpoints(directory / ckpt.DIRNAME)[-1])


def test_unlearn_writes_a_new_run_dir_with_checkpoint_and_report(run_dir, capsys):
    source = ckpt.list_checkpoints(run_dir / ckpt.DIRNAME)[-1]
    source_bytes = source.read_bytes()
    assert main(["unlearn", str(run_dir), "--classes", "3", "--alpha", "5", "--lam", "1"]) == 0
    out = run_dir / "unlearn-1"
    assert "forget accuracy" in capsys.readouterr().out
    report = json.loads((out / "unlearn.json").read_text())
    for key in (
        "retain_accuracy",
        "forget_accuracy",
        "mia",
        "dampened_fraction",
        "seconds",
        "before",
    ):
        assert key in report
    assert report["classes"] == ["3"] and report["alpha"] == 5.0 and report["fisher_d"] == "cache"
    assert report["dampened_fraction"] > 0
    assert source.read_bytes() == source_bytes  # the original run is not touched
    old, new = _newest(run_dir), _newest(out)
    changed = [k for k in old["model"] if not torch.equal(old["model"][k], new["model"][k])]
    assert changed and new["position"] == old["position"]
    assert (out / "config.yaml").read_text() == (run_dir / "config.yaml").read_text()
    # the new directory is a run directory: it can forget again
    assert main(["unlearn", str(out), "--classes", "5", "--auto", "--target", "0.1"]) == 0
    again = json.loads((out / "unlearn-1" / "unlearn.json").read_text())
    assert again["auto"] and again["trials"] and again["source_checkpoint"].startswith(str(out))


def test_unlearn_a_run_trained_without_ssd_computes_f_d(tmp_path):
    _train(tmp_path, "plugins.finetune={}")
    assert (
        main(
            [
                "unlearn",
                str(tmp_path),
                "--samples",
                "0",
                "1",
                "2",
                "--experience",
                "1",
                "--out",
                str(tmp_path / "u"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "u" / "unlearn.json").read_text())
    assert report["fisher_d"].startswith("computed") and report["samples"] == [0, 1, 2]
    assert set(_newest(tmp_path / "u")["plugins"]) == {"finetune"}


def test_the_reference_sample_setting_recomputes_f_d_in_data_order(run_dir, capsys):
    """The reference's random-sample experiments: F_D in the data's order, batches of 128."""
    out = run_dir / "samples"
    args = ["--samples", "0", "1", "2", "--batch-size", "128", "--fisher-d-order", "data", "--out", str(out)]
    assert main(["unlearn", str(run_dir), *args]) == 0
    report = json.loads((out / "unlearn.json").read_text())
    assert report["batch_size"] == 128 and report["fisher_d_order"] == "data"
    assert report["fisher_d"] == "computed (the cache holds batch importance with batch size 64 in class order)"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--classes", "42"], "unknown class '42'"),
        (["--classes", "3", "--auto", "--alpha", "2"], "not both"),
        (["--classes", "3", "--target", "0.1"], "--target needs --auto"),
        (["--samples", "100000"], "outside"),
        (["--classes", "3", "--lam", "-1"], "lam"),
        (["--classes", "3", "--lam", "inf"], "lam must be a finite number at least 0.0 and at most 3.403e+38 (fp32's largest), got inf"),
        (["--classes", *map(str, range(10))], "forgetting every class learnt so far (10) leaves nothing to retain"),
        (["--classes", "3", "--batch-size", "0"], "batch_size must be an integer >= 1, got 0"),
    ],
)
def test_bad_requests_exit_with_one_line_and_write_nothing(run_dir, args, needle, capsys):
    before = sorted(p.name for p in run_dir.iterdir())
    assert main(["unlearn", str(run_dir), *args, "--out", str(run_dir / "bad")]) == 2  # a request that cannot be
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_not_a_run_dir_and_out_equal_to_run_dir(run_dir, tmp_path, capsys):
    assert main(["unlearn", str(tmp_path), "--classes", "3"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["unlearn", str(run_dir), "--classes", "3", "--out", str(run_dir)]) == 2
    assert "new directory" in capsys.readouterr().err
    assert main(["unlearn", str(run_dir), "--classes", "3", "--out="]) == 2  # was the current directory
    assert capsys.readouterr().err.strip() == "error: --out is empty: give the directory to write the unlearnt run to"


def test_out_that_holds_another_run_is_refused(run_dir, tmp_path, capsys):
    other = tmp_path / "other"
    _train(other, "plugins.ssd={}")
    before = sorted(p.name for p in (other / ckpt.DIRNAME).iterdir())
    assert main(["unlearn", str(run_dir), "--classes", "3", "--out", str(other)]) == 2
    assert "already holds a finished run (results.json)" in capsys.readouterr().err
    assert sorted(p.name for p in (other / ckpt.DIRNAME).iterdir()) == before


def test_resume_continues_a_copy_that_unlearned_mid_stream_and_refuses_a_finished_one(run_dir, tmp_path, capsys):
    import shutil

    finished = tmp_path / "finished"
    assert main(["unlearn", str(run_dir), "--classes", "3", "--out", str(finished)]) == 0
    assert main(["resume", str(finished), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "nothing left to train" in err and err.count("\n") == 1
    assert not (finished / "results.json").exists()

    midway = tmp_path / "midway"  # the run as it stood after its first experience
    shutil.copytree(run_dir, midway, ignore=shutil.ignore_patterns("unlearn-*", "results.json"))
    for path in ckpt.list_checkpoints(midway / ckpt.DIRNAME):
        if ckpt.load(path)["position"]["completed"] > 1:
            path.unlink()
    copy = tmp_path / "midway-unlearned"
    assert main(["unlearn", str(midway), "--classes", "3", "--out", str(copy)]) == 0
    assert main(["resume", str(copy), "--quiet"]) == 0
    assert len(json.loads((copy / "results.json").read_text())["accuracy_matrix"]) == 2


@pytest.mark.parametrize("fails", ["report", "checkpoint"])
def test_an_unlearning_interrupted_while_written_leaves_no_resumable_copy(run_dir, tmp_path, monkeypatch, capsys, fails):
    """Ctrl-C (or a full disk) while the copy is written: it never holds a model
    without the report that says it unlearned, so a resume cannot take it for
    the run (and write results measured before the unlearning)."""
    from contlearn.plugins import _unlearn_run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    if fails == "checkpoint":
        monkeypatch.setattr(ckpt, "write", interrupted)
    else:
        real = _unlearn_run.write_atomic
        monkeypatch.setattr(_unlearn_run, "write_atomic",
                            lambda path, text: interrupted() if path.name == "unlearn.json" else real(path, text))
    copy = tmp_path / "copy"
    assert main(["unlearn", str(run_dir), "--classes", "3", "--out", str(copy)]) == 130
    assert not ckpt.list_checkpoints(copy / ckpt.DIRNAME) and not (copy / "unlearn.json").exists()
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["resume", str(copy), "--quiet"]) != 0 and "no checkpoint" in capsys.readouterr().err
    assert main(["unlearn", str(run_dir), "--classes", "3", "--out", str(copy)]) == 0  # the directory is reused
    assert ckpt.list_checkpoints(copy / ckpt.DIRNAME) and (copy / "unlearn.json").is_file()


def test_unlearn_runs_where_it_is_told_and_takes_no_other_override(run_dir, tmp_path, capsys):
    import shutil

    gpu_run = tmp_path / "gpu-run"  # as a run trained with device=cuda left it
    shutil.copytree(run_dir, gpu_run, ignore=shutil.ignore_patterns("unlearn-*"))
    config = gpu_run / "config.yaml"
    config.write_text(config.read_text().replace("device: auto", "device: cuda"))
    newest = ckpt.list_checkpoints(gpu_run / ckpt.DIRNAME)[-1]
    state = ckpt.load(newest)
    state["config"]["device"] = "cuda"
    torch.save(state, newest)
    if not torch.cuda.is_available():
        assert main(["unlearn", str(gpu_run), "--classes", "3", "--out", str(tmp_path / "a")]) == 2
        err = capsys.readouterr().err
        assert "CUDA is not available; unlearn elsewhere with --device cpu" in err and err.count("\n") == 1
    assert main(["unlearn", str(gpu_run), "--classes", "3", "--device", "cpu", "--threads", "1",
                 "--out", str(tmp_path / "b")]) == 0
    from contlearn.plugins._unlearn_run import unlearn_run_dir

    with pytest.raises(Exception, match="takes only device= and threads= overrides"):
        unlearn_run_dir(gpu_run, {"classes": ["3"]}, tmp_path / "c", overrides=["train.lr=1"])


def test_a_finished_run_whose_newest_checkpoint_is_unreadable_is_not_unlearnt_from_an_older_one(run_dir, tmp_path, capsys):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged, ignore=shutil.ignore_patterns("unlearn-*"))
    newest = ckpt.list_checkpoints(damaged / ckpt.DIRNAME)[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    assert main(["unlearn", str(damaged), "--classes", "3", "--out", str(tmp_path / "copy")]) == 1
    err = capsys.readouterr().err
    assert "finished its 2 experiences, but its newest readable checkpoint" in err
    assert not (tmp_path / "copy").exists()


def test_a_run_ssd_cannot_act_on_is_refused_with_advice_that_fits(tmp_path, capsys):
    """contlearn unlearn adds SSD itself: 'drop one of the two plugins' was advice
    the user could not follow."""
    run = tmp_path / "prd"
    assert main(["run", "split-digits-prd", "scenario.samples_per_class=20", "scenario.n_experiences=2",
                 "train.epochs=1", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["unlearn", str(run), "--classes", "0"]) == 2
    err = capsys.readouterr().err
    assert "plugin 'prd' makes them without gradient" in err and err.strip().endswith("; SSD cannot unlearn this run")
    assert not (run / "unlearn-1").exists()
