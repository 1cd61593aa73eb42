"""Reports of finished runs: files, tables, and clear errors for other paths."""

from __future__ import annotations

import json

import pytest

from contlearn import ConfigError, Experiment, Results, load_config
from contlearn.cli import main
from contlearn.report import load_run, write_report

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Two finished runs (finetune, replay) of two experiences."""
    root = tmp_path_factory.mktemp("runs")
    dirs = []
    for name, plugin in (("ft", "plugins.finetune={}"), ("rp", "plugins.replay={}")):
        out = root / name
        cfg = load_config(None, ["train.epochs=1", "scenario.n_experiences=2", "plugins={}", plugin])
        Experiment(cfg, out_dir=out).run()
        dirs.append(out)
    return dirs


def test_report_files_of_a_finished_run(finished):
    assert write_report(str(finished[0])) == write_report([finished[0]])  # one directory, or a list
    loaded = Results.load(finished[0])
    assert loaded.to_dict() == json.loads((finished[0] / "results.json").read_text())
    written = write_report([finished[0]])
    names = sorted(p.name for p in written)
    assert names == ["accuracy.png", "accuracy_matrix.png", "report.md"]
    for p in written:
        if p.suffix == ".png":
            assert p.read_bytes().startswith(PNG) and p.stat().st_size > 2000
    text = (finished[0] / "report.md").read_text()
    results = json.loads((finished[0] / "results.json").read_text())
    assert f"{results['average_accuracy']:.3f}" in text
    assert f"{results['accuracy_matrix'][1][0]:.3f}" in text
    assert "![accuracy matrix](accuracy_matrix.png)" in text


def test_comparison_of_several_runs(finished, tmp_path):
    written = write_report(finished, tmp_path)
    assert {p.name for p in written} >= {"comparison.md", "comparison.png"}
    table = (tmp_path / "comparison.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ft") or line.startswith("| rp")]
    assert len(rows) == 2 and "| replay | 0 |" in rows[1] and "| finetune | 0 |" in rows[0]
    assert "Over seeds" not in table and "different scenarios" not in table  # one run per experiment, one scenario


def test_cli_report_prints_the_table(finished, capsys):
    assert main(["report", *map(str, finished)]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "| run | strategy | seed | final avg acc" in out


def _copy_run(source, target, change):
    target.mkdir(parents=True)
    data = json.loads((source / "results.json").read_text())
    change(data)
    (target / "results.json").write_text(json.dumps(data))
    return target


def test_runs_of_one_experiment_over_seeds_are_summarised_as_mean_and_sample_std(finished, tmp_path, capsys):
    import statistics

    ft, rp = finished
    seeds = [ft, _copy_run(ft, tmp_path / "ft1", lambda d: d.update(seed=1, average_accuracy=0.5))]
    fast = _copy_run(rp, tmp_path / "rp_fast", lambda d: d["config"]["train"].update(lr=0.5))
    def elsewhere_and_otherwise(d):  # where and how it ran, and how it loaded its data: the same experiment
        d.update(seed=2)
        d["config"].update(device="cpu", threads=1, out="elsewhere", name="other")
        d["config"]["scenario"].update(num_workers=0, storage="loader")
        d["config"]["train"].update(eval_batch_size=7)

    elsewhere = _copy_run(ft, tmp_path / "ft_cpu", elsewhere_and_otherwise)
    assert main(["report", *map(str, [*seeds, rp, fast, elsewhere]), "--out", str(tmp_path / "cmp")]) == 0
    text = capsys.readouterr().out
    assert text.count("Over seeds (mean ± sample standard deviation, n - 1)") == 1
    accuracies = [json.loads((d / "results.json").read_text())["average_accuracy"] for d in [*seeds, elsewhere]]
    mean, std = statistics.mean(accuracies), statistics.stdev(accuracies)
    assert f"| finetune | 3 | 0, 1, 2 | {mean:.3f} ± {std:.3f} |" in text
    bwt = [json.loads((d / "results.json").read_text())["bwt"] for d in [*seeds, elsewhere]]
    assert f" | {statistics.mean(bwt):+.3f} ± {statistics.stdev(bwt):.3f} | " in text  # BWT and FWT with their sign
    lr = json.loads((rp / "results.json").read_text())["config"]["train"]["lr"]
    assert f"| replay (train.lr={lr}) | 1 | 0 |" in text and "| replay (train.lr=0.5) | 1 | 0 |" in text
    assert "different scenarios" not in text and "several runs of seed" not in text
    assert (tmp_path / "cmp" / "comparison.md").read_text().count("| finetune | 3 |") == 1


def test_finetune_beside_another_strategy_is_the_same_experiment_and_a_repeated_seed_is_noted(finished, tmp_path, capsys):
    ft, rp = finished
    # the README's `contlearn run split-digits plugins.replay.size=200` keeps split-digits' finetune
    with_finetune = _copy_run(rp, tmp_path / "rp1", lambda d: d.update(seed=1) or d["config"]["plugins"].update(finetune={}))
    rerun = _copy_run(ft, tmp_path / "ft_again", lambda d: None)
    assert main(["report", *map(str, [ft, rp, with_finetune, rerun]), "--out", str(tmp_path / "cmp")]) == 0
    text = capsys.readouterr().out
    assert "| replay | 2 | 0, 1 |" in text and "| finetune | 2 | 0, 0 |" in text
    assert "Note: finetune has several runs of seed 0 (a copied or rerun directory)" in text
    assert "Note: replay has" not in text
    older = _copy_run(rp, tmp_path / "older", lambda d: d["config"]["train"].pop("momentum"))  # a key it lacks
    assert main(["report", str(rp), str(with_finetune), str(older), "--out", str(tmp_path / "cmp")]) == 0
    momentum = json.loads((rp / "results.json").read_text())["config"]["train"]["momentum"]
    text = capsys.readouterr().out
    assert f"| replay (train.momentum={momentum}) | 2 |" in text and "| replay (without train.momentum) | 1 |" in text


def test_a_table_whose_fwt_says_nothing_has_a_note(finished, tmp_path, capsys):
    ft, rp = finished
    assert json.loads((ft / "results.json").read_text())["accuracy_matrix"][0][1] == 0  # a growing head
    assert main(["report", str(ft), str(rp), "--out", str(tmp_path / "cmp")]) == 0
    assert "Note: FWT here is minus the untrained model's accuracy" in capsys.readouterr().out
    assert "Note: FWT here" in (ft / "report.md").read_text()

    def predicted_early(d):
        d["accuracy_matrix"][0][1] = 0.25

    domain = _copy_run(rp, tmp_path / "early", predicted_early)
    assert main(["report", str(ft), str(domain), "--out", str(tmp_path / "cmp")]) == 0
    assert "Note: FWT" not in capsys.readouterr().out
    no_fwt = _copy_run(ft, tmp_path / "no_fwt", lambda d: d.update(fwt=None))
    assert main(["report", str(no_fwt)]) == 0 and "Note: FWT" not in (no_fwt / "report.md").read_text()


def test_a_run_named_with_a_pipe_keeps_the_table_whole(finished, tmp_path, capsys):
    ft, rp = finished
    pipe = _copy_run(rp, tmp_path / "pipe|run", lambda d: None)
    assert main(["report", str(ft), str(pipe), "--out", str(tmp_path / "cmp")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    cells = [len(line.replace("\\|", "").split("|")) for line in rows]
    assert len(set(cells)) == 1 and any(line.startswith("| pipe\\|run |") for line in rows)


def test_runs_on_different_scenarios_are_flagged(finished, tmp_path, capsys):
    ft, rp = finished
    task = _copy_run(rp, tmp_path / "task", lambda d: d["config"]["scenario"].update(setting="task"))
    assert main(["report", str(ft), str(task), "--out", str(tmp_path / "cmp")]) == 0
    assert "Note: these runs are on 2 different scenarios" in capsys.readouterr().out


def test_cli_run_writes_report_and_event_log(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "train.epochs=1", "scenario.n_experiences=2", "eval.fwt=false", "--out", str(out), "--quiet"]) == 0
    for name in ("accuracy_matrix.png", "accuracy.png", "report.md", "events.jsonl"):
        assert (out / name).is_file(), name
    assert json.loads((out / "results.json").read_text())["given"] == {"plugins": {}, "stream": None}  # displays and logs


def test_a_library_run_records_the_plugin_objects_and_stream_it_was_given(tmp_path):
    from contlearn.scenarios import build_stream

    from contlearn import hookimpl
    from contlearn.loggers import JSONLLogger

    class Damping:
        @hookimpl
        def loss_terms(self, out):
            return {"damping": 1e-3 * out.logits.pow(2).mean()}

    cfg = load_config(None, ["train.epochs=1", "scenario.n_experiences=2", "plugins={}", "plugins.replay={}"])
    stream = build_stream(load_config(None, ["scenario.n_experiences=2"]).scenario, 3)
    plugins = {"damping": Damping(), "log": JSONLLogger(tmp_path / "events.jsonl")}
    results = Experiment(cfg, out_dir=tmp_path / "run", plugins=plugins, stream=stream).run()
    assert results.given["plugins"] == {"damping": f"{__name__}.test_a_library_run_records_the_plugin_objects_and_stream_it_was_given.<locals>.Damping"}
    assert [row[0] for row in results.given["stream"]["experiences"]] == [exp.classes for exp in stream]
    write_report([tmp_path / "run"])
    text = (tmp_path / "run" / "report.md").read_text()
    assert "Strategy: replay + damping." in text and "Scenario: a stream given in Python, 2 experiences." in text


def test_not_a_finished_run_is_one_clear_error(tmp_path, finished, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "is not a run directory" in err and err.count("\n") == 1 and "Traceback" not in err

    assert main(["report", str(tmp_path)]) == 2
    assert "is not a finished run" in capsys.readouterr().err

    partial = tmp_path / "partial"
    partial.mkdir()
    data = json.loads((finished[0] / "results.json").read_text())
    data["accuracy_matrix"] = data["accuracy_matrix"][:1]
    (partial / "results.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="incomplete"):
        load_run(partial)
    edited = json.dumps({**data, "accuracy_matrix": [[0.5]], "config": {**data["config"], "plugins": 3}})
    nan_bwt = json.dumps({**data, "accuracy_matrix": [[0.5]], "bwt": float("nan")})  # JSON's NaN, by hand
    for text in ("{not json", '{"accuracy_matrix": "x"}', "[1, 2]", '{"accuracy_matrix": [[0.5, "a"]]}', edited, nan_bwt):
        (partial / "results.json").write_text(text)
        assert main(["report", str(partial)]) == 2
        err = capsys.readouterr().err
        assert "not a contlearn results file" in err and err.count("\n") == 1


def test_a_run_directory_that_cannot_be_written_is_one_clear_error(finished, monkeypatch, capsys):
    from matplotlib.figure import Figure

    def read_only(self, path, *args, **kwargs):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(Figure, "savefig", read_only)
    assert main(["report", str(finished[0])]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: cannot write '{finished[0]}") and "Read-only" in err


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.pop("average_accuracy"), None),  # missing: shown as n/a
        (lambda d: d.update(average_accuracy="0.5"), "average_accuracy"),
        (lambda d: d.update(forgetting=True), "forgetting"),
        (lambda d: d.update(config="split-digits"), "config"),
        (lambda d: d["config"].update(scenario="digits"), "config.scenario"),
        (lambda d: d.update(timings=[1.0]), "timings"),
        (lambda d: d.update(timings={"total_seconds": "slow"}), "timings.total_seconds"),
        (lambda d: d.update(seed="0|1"), "seed"),
    ],
)
def test_wrong_fields_are_one_clear_error_before_anything_is_written(tmp_path, finished, capsys, change, field):
    bad = tmp_path / "bad"
    bad.mkdir()
    data = json.loads((finished[0] / "results.json").read_text())
    change(data)
    (bad / "results.json").write_text(json.dumps(data))
    if field is None:
        assert main(["report", str(bad)]) == 0
        assert "| bad | finetune | 0 | n/a |" in capsys.readouterr().out
        return
    assert main(["report", str(bad), str(finished[0]), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert f"'{field}' is not a" in err and err.count("\n") == 1
    assert sorted(p.name for p in bad.iterdir()) == ["results.json"] and not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("entry", ["1" + "0" * 400, "NaN", "Infinity", "-0.5", "1.5"])
def test_an_accuracy_matrix_entry_that_is_no_accuracy_is_one_clear_error(tmp_path, finished, capsys, entry):
    bad = tmp_path / "bad"
    bad.mkdir()
    text = (finished[0] / "results.json").read_text()
    data = json.loads(text)
    data["accuracy_matrix"][-1][0] = 0.123456789
    (bad / "results.json").write_text(json.dumps(data).replace("0.123456789", entry, 1))
    assert main(["report", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "its accuracy matrix holds" in err and "not an accuracy (a number from 0 to 1)" in err and err.count("\n") == 1


def test_runs_sharing_a_folder_name_are_told_apart(tmp_path, finished, capsys):
    import shutil

    for parent in ("a", "b"):
        shutil.copytree(finished[0], tmp_path / parent / "seed0")
    assert main(["report", str(tmp_path / "a" / "seed0"), str(tmp_path / "b" / "seed0"), "--out", str(tmp_path)]) == 0
    table = (tmp_path / "comparison.md").read_text()
    assert "| a/seed0 |" in table and "| b/seed0 |" in table
    assert "| a/seed0 |" in capsys.readouterr().out


def test_a_relative_dot_is_named_by_its_folder(finished, monkeypatch, capsys):
    monkeypatch.chdir(finished[0])
    assert main(["report", "."]) == 0
    assert f"| {finished[0].name} |" in capsys.readouterr().out
    assert (finished[0] / "report.md").read_text().startswith(f"# split-digits ({finished[0].name})")


def test_out_with_one_run_is_refused(finished, tmp_path, capsys):
    assert main(["report", str(finished[0]), "--out", str(tmp_path / "cmp")]) == 2
    assert "--out" in capsys.readouterr().err and not (tmp_path / "cmp").exists()


def test_out_naming_a_file_is_refused_and_a_directory_the_system_refuses_is_a_failure(finished, tmp_path, capsys,
                                                                                      monkeypatch):
    (tmp_path / "taken").write_text("mine")
    assert main(["report", *map(str, finished), "--out", str(tmp_path / "taken")]) == 2
    assert capsys.readouterr().err == f"error: --out '{tmp_path / 'taken'}' is a file: the comparison is written into a directory (give another path)\n"
    assert (tmp_path / "taken").read_text() == "mine"

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("pathlib.Path.mkdir", refuse)
    assert main(["report", *map(str, finished), "--out", str(tmp_path / "cmp")]) == 1
    assert capsys.readouterr().err == f"error: cannot write the comparison to '{tmp_path / 'cmp'}': Permission denied\n"


def test_a_run_given_twice_is_refused(finished, capsys):
    run = finished[0]
    assert main(["report", str(run), str(run)]) == 2
    assert capsys.readouterr().err == f"error: run directory '{run}' is given twice\n"  # its rows were both '//...'


def test_the_plots_of_a_long_stream_keep_the_size_of_twenty_experiences(tmp_path):
    """The heatmap grew with the square of the stream (1.9 GB of memory at 100 experiences)."""
    import struct

    import numpy as np

    from contlearn.report import plot_curve, plot_matrix

    def pixels(path):
        width, height = struct.unpack(">II", path.read_bytes()[16:24])  # the PNG's IHDR
        return width, height

    rng = np.random.default_rng(0)
    sizes = {}
    for n in (20, 300):
        R = np.tril(rng.uniform(size=(n, n)))
        plot_matrix(R, "long", tmp_path / f"m{n}.png")
        plot_curve(R, "long", tmp_path / f"c{n}.png")
        sizes[n] = pixels(tmp_path / f"m{n}.png"), pixels(tmp_path / f"c{n}.png")
    assert sizes[300] == sizes[20]
    assert sizes[20][0][0] <= 1800 and sizes[20][0][1] <= 1400


# An accuracy matrix whose cells, and whose headline metrics, all differ (and one cell is exactly 1.0).
DISTINCT = [[1.0, 0.2, 0.1], [0.7, 0.9, 0.3], [0.4, 0.6, 0.8]]


def _distinct_run(finished, target):
    from contlearn import metrics

    def change(d):
        d.update(accuracy_matrix=DISTINCT, **metrics.summary(DISTINCT, initial=[0.1, 0.15, 0.05]))

    return _copy_run(finished[0], target, change)


def test_each_headline_metric_and_matrix_cell_is_reported_in_its_own_column(finished, tmp_path):
    from contlearn import metrics

    expected = {"average_accuracy": 0.6, "average_incremental_accuracy": 0.8, "forgetting": 0.45, "bwt": -0.45,
                "fwt": 0.15}
    assert metrics.summary(DISTINCT, initial=[0.1, 0.15, 0.05]) == pytest.approx(expected)  # by hand
    run = _distinct_run(finished, tmp_path / "distinct")
    assert load_run(run).matrix.tolist() == DISTINCT  # an accuracy of 1.0 is an accuracy
    write_report([run])
    lines = (run / "report.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| run |"))
    row = next(line for line in lines if line.startswith("| distinct |"))
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")], strict=True))
    assert [cells[k] for k in ("final avg acc", "avg incremental acc", "forgetting", "BWT", "FWT")] == [
        "0.600", "0.800", "0.450", "-0.450", "+0.150"]
    assert lines[lines.index("| after \\ on | exp 0 | exp 1 | exp 2 |") + 2:][:3] == [
        "| exp 0 | 1.000 | 0.200 | 0.100 |", "| exp 1 | 0.700 | 0.900 | 0.300 |", "| exp 2 | 0.400 | 0.600 | 0.800 |"]


def test_the_curves_plot_each_experience_from_when_it_is_trained_and_the_two_averages(finished, tmp_path,
                                                                                       monkeypatch):
    import numpy as np

    from contlearn import report

    figures = {}
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.update({path.name: fig}))
    R = np.array(DISTINCT)
    assert report.seen_average(R).tolist() == pytest.approx([1.0, 0.8, 0.6])  # experiences trained so far only
    write_report([_distinct_run(finished, tmp_path / "distinct")])
    assert figures["accuracy_matrix.png"].axes[0].get_images()[0].get_array().tolist() == DISTINCT
    lines = [(line.get_xdata().tolist(), line.get_ydata().tolist()) for line in figures["accuracy.png"].axes[0].get_lines()]
    assert lines == [
        ([1, 2, 3], [1.0, 0.7, 0.4]), ([2, 3], [0.9, 0.6]), ([3], [0.8]),  # each experience, once trained
        ([1, 2, 3], pytest.approx([1.0, 0.8, 0.6])),  # average over the experiences seen
        ([1, 2, 3], pytest.approx([13 / 30, 19 / 30, 0.6])),  # average over all
    ]


def test_several_runs_are_compared_in_the_first_run_directory_by_default(finished, tmp_path):
    first, second = _distinct_run(finished, tmp_path / "a"), _copy_run(finished[1], tmp_path / "b", lambda d: None)
    written = write_report([first, second])
    assert first / "comparison.md" in written and (first / "comparison.png").is_file()
    assert not (second / "comparison.md").exists() and not (second / "comparison.png").exists()


def test_a_ragged_accuracy_matrix_is_incomplete(finished, tmp_path):
    ragged = _copy_run(finished[0], tmp_path / "ragged", lambda d: d.update(accuracy_matrix=[[0.5, 0.5], [0.5]]))
    with pytest.raises(ConfigError, match="its accuracy matrix is incomplete"):
        load_run(ragged)
