"""Result files (contlearn.results): metrics.csv's rows, run directory names,
writes that are either the old or the whole new content."""

from __future__ import annotations

import csv
import errno
import json
import os
from datetime import datetime

import pytest

from contlearn import results as results_module
from contlearn.errors import ConfigError, ContlearnError
from contlearn.results import Results, default_run_dir, write_results


def two_experience_results() -> Results:
    matrix = [[0.5, 0.0], [0.25, 0.75]]  # not symmetric: a swap of the two indices shows
    return Results(name="r", seed=0, accuracy_matrix=matrix, average_accuracy=0.5, average_incremental_accuracy=0.5,
                   forgetting=0.25, bwt=-0.25, fwt=None, initial_accuracy=None, per_class_accuracy=[],
                   class_names=[], timings={}, versions={}, config={})  # fmt: skip


def test_metrics_csv_has_one_row_per_matrix_entry_trained_then_evaluated(tmp_path):
    write_results(tmp_path, two_experience_results())
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["trained_experience", "eval_experience", "accuracy"], ["0", "0", "0.500000"],
                    ["0", "1", "0.000000"], ["1", "0", "0.250000"], ["1", "1", "0.750000"]]  # fmt: skip


def test_run_directories_started_in_the_same_second_get_numbered_names(tmp_path, monkeypatch):
    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(results_module, "datetime", Frozen)
    base = tmp_path / "exp-20260102-030405"
    names = []
    for _ in range(3):
        path = default_run_dir("exp", tmp_path)
        path.mkdir()
        names.append(path)
    assert names == [base, tmp_path / f"{base.name}-1", tmp_path / f"{base.name}-2"]


def test_a_result_file_that_cannot_be_written_keeps_its_old_content(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text("old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(ContlearnError, match="No space left on device"):
        results_module.write_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_results_of_a_newer_version_load_without_its_new_fields_and_older_ones_are_refused(tmp_path):
    write_results(tmp_path, two_experience_results())
    file = tmp_path / "results.json"
    data = json.loads(file.read_text())
    file.write_text(json.dumps({**data, "written_by_a_later_version": 1}))
    assert Results.load(tmp_path) == two_experience_results()
    del data["forgetting"], data["bwt"]
    file.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"holds results without \['bwt', 'forgetting'\]: not written by this version"):
        Results.load(tmp_path)
