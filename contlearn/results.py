"""What a run leaves behind: the run directory, ``results.json``,
``metrics.csv``, ``config.yaml``, and the table printed at the end."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from contlearn.errors import ConfigError, ContlearnError


@dataclass
class Results:
    """The measurements of a run, as ``results.json`` holds them."""

    name: str
    seed: int
    accuracy_matrix: list[list[float]]
    average_accuracy: float
    average_incremental_accuracy: float
    forgetting: float
    bwt: float
    fwt: float | None
    initial_accuracy: list[float] | None
    per_class_accuracy: list[float | None]
    class_names: list[str]
    timings: dict[str, float]
    versions: dict[str, str]
    config: dict[str, Any]
    extras: dict[str, Any] = field(default_factory=dict)
    #: what the run was given in Python: ``plugins`` (name -> class of each plugin
    #: class given, and of each plugin object that trains or keeps state) and ``stream``
    #: (each experience's classes, task and sample counts, when a stream
    #: replaced ``config.scenario``; else None)
    given: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def load(cls, run_dir: str | Path) -> Results:
        """The results of a finished run directory (its ``results.json``).

        :raises ConfigError: not a finished run (see :func:`contlearn.report.load_run`).
        """
        from contlearn.report import load_run

        data = load_run(run_dir).results
        known = {f.name for f in fields(cls)}
        missing = sorted(f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING and f.name not in data)
        if missing:
            raise ConfigError(f"'{run_dir}' holds results without {missing}: not written by this version of contlearn")
        return cls(**{k: v for k, v in data.items() if k in known})


def versions() -> dict[str, str]:
    """Versions of Python and the libraries a result depends on."""
    import numpy
    import torch

    from contlearn import __version__

    return {
        "contlearn": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }


def default_run_dir(name: str, root: str | Path = "runs") -> Path:
    """``runs/<name>-<timestamp>``, made unique if it exists."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{name}-{stamp}"
    path, k = base, 1
    while path.exists():
        path, k = Path(f"{base}-{k}"), k + 1
    return path


def make_writable_dir(path: Path) -> None:
    """Create ``path`` and write (and remove) a file in it.

    :raises OSError: it cannot be made or written (no permission, a full disk)."""
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
        pass


def prepare_run_dir(path: str | Path) -> Path:
    """Create the run directory and check that it can be written, before training."""
    path = Path(path)
    try:
        make_writable_dir(path)
    except OSError as exc:
        raise ContlearnError(f"cannot write to the output directory '{path}': {exc.strerror or exc}") from None
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that it is either the old or the whole new content.

    :raises ContlearnError: when it cannot be written (a full disk, no permission);
        the old content is then left as it was.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ContlearnError(f"cannot write '{path}': {exc.strerror or exc}") from None


def write_results(run_dir: Path, results: Results) -> None:
    """``metrics.csv`` (one row per matrix entry), then ``results.json``: the
    latter marks the run finished (resume refuses it), so it is written last."""
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["trained_experience", "eval_experience", "accuracy"])
    for i, row in enumerate(results.accuracy_matrix):
        for j, acc in enumerate(row):
            writer.writerow([i, j, f"{acc:.6f}"])
    write_atomic(run_dir / "metrics.csv", table.getvalue())
    write_atomic(run_dir / "results.json", json.dumps(results.to_dict(), indent=2) + "\n")


def format_matrix(matrix: list[list[float]]) -> str:
    """The accuracy matrix as a small text table, rows = after training experience i."""
    n = len(matrix[0]) if matrix else 0
    lines = ["after exp | " + " ".join(f"exp{j:<3d}" for j in range(n))]
    lines.append("-" * len(lines[0]))
    for i, row in enumerate(matrix):
        lines.append(f"{i:>9d} | " + " ".join(f"{acc:6.3f}" for acc in row))
    return "\n".join(lines)


def format_summary(results: Results) -> str:
    """Matrix and headline metrics, as printed at the end of a run."""

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:+.4f}" if v < 0 else f"{v:.4f}"

    rows = [
        ("average accuracy", fmt(results.average_accuracy)),
        ("avg incremental accuracy", fmt(results.average_incremental_accuracy)),
        ("forgetting", fmt(results.forgetting)),
        ("BWT", fmt(results.bwt)),
        ("FWT", fmt(results.fwt)),
        ("train seconds", f"{results.timings['train_seconds']:.2f}"),
        ("total seconds", f"{results.timings['total_seconds']:.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    table = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
    return f"Accuracy matrix (row i: after training experience i)\n{format_matrix(results.accuracy_matrix)}\n\n{table}"
