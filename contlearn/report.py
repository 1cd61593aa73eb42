"""Reports of finished runs: plots of the accuracy matrix and a Markdown summary.

For every run directory :func:`write_report` writes

* ``accuracy_matrix.png``: heatmap of ``R[i][j]`` (rows: after training
  experience i; columns: evaluated on experience j);
* ``accuracy.png``: accuracy over experiences (the average over the experiences
  seen so far, the average over all, and each experience's own curve);
* ``report.md``: headline metrics, the matrix as a table, links to the plots;

and, given several runs, ``comparison.md`` (one table row per run, and one
per experiment run with several seeds: mean ± std) and
``comparison.png`` (their accuracy curves) in ``out_dir`` (default: the first
run's directory). Plots use matplotlib's Agg canvas directly, so no display is
needed and the global pyplot backend is left alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contlearn._report_groups import (
    group_by_experiment,
    group_labels,
    mean_std,
    repeated_seeds,
    scenario_key,
)
from contlearn.errors import ConfigError, ContlearnError
from contlearn.results import write_atomic

MATRIX_PNG = "accuracy_matrix.png"
CURVE_PNG = "accuracy.png"
REPORT_MD = "report.md"
COMPARISON_MD = "comparison.md"
COMPARISON_PNG = "comparison.png"


@dataclass
class FinishedRun:
    """A run directory with a complete ``results.json``; ``label`` names it in
    tables (its folder's name, with parent folders where two runs share it)."""

    path: Path
    results: dict[str, Any]
    label: str = ""

    def __post_init__(self) -> None:
        self.label = self.label or self.path.resolve().name

    @property
    def strategy(self) -> str:
        plugins = list((self.results.get("config") or {}).get("plugins") or {})
        plugins = list(dict.fromkeys([*plugins, *((self.results.get("given") or {}).get("plugins") or {})]))
        if len(plugins) > 1 and "finetune" in plugins:  # finetune adds nothing to others
            plugins.remove("finetune")
        return " + ".join(plugins) or "-"

    @property
    def matrix(self) -> np.ndarray:
        return np.asarray(self.results["accuracy_matrix"], dtype=float)


def load_run(path: str | Path) -> FinishedRun:
    """Read a finished run directory.

    :raises ConfigError: the path is not a directory holding a complete
        ``results.json`` (one row of the accuracy matrix per experience).
    """
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"'{path}' is not a run directory (it does not exist or is not a directory)")
    file = path / "results.json"
    if not file.is_file():
        raise ConfigError(
            f"'{path}' is not a finished run: it has no results.json (written when a run completes)"
        )
    try:
        results = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"'{file}' is not a contlearn results file: {exc}") from None
    matrix = results.get("accuracy_matrix") if isinstance(results, dict) else None
    if not (
        isinstance(matrix, list)
        and all(
            isinstance(row, list) and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in row)
            for row in matrix
        )
    ):
        raise ConfigError(f"'{file}' is not a contlearn results file: it holds no accuracy matrix (a list of rows of numbers)")
    complete = bool(matrix) and all(len(row) == len(matrix[0]) for row in matrix) and len(matrix) == len(matrix[0])
    if not complete:
        raise ConfigError(f"'{path}' is not a finished run: its accuracy matrix is incomplete")
    wrong = next((a for row in matrix for a in row if not 0 <= a <= 1), None)  # NaN fails both comparisons
    if wrong is not None:
        raise ConfigError(f"'{file}' is not a contlearn results file: its accuracy matrix holds {wrong!r:.40}, "
                          f"not an accuracy (a number from 0 to 1)")
    _check_fields(file, results)
    return FinishedRun(path, results)


HEADLINE = ("average_accuracy", "average_incremental_accuracy", "forgetting", "bwt", "fwt")


def _check_fields(file: Path, results: dict[str, Any]) -> None:
    """:raises ConfigError: a field the report reads has the wrong type (the
    headline metrics must be numbers or null, the sections mappings)."""
    for key in ("config", "timings", "given"):
        if results.get(key) is not None and not isinstance(results[key], dict):
            raise ConfigError(f"'{file}' is not a contlearn results file: '{key}' is not a mapping")
    for where, key in (("config", "scenario"), ("config", "model"), ("config", "train"), ("config", "plugins"),
                       ("given", "plugins")):
        section = (results.get(where) or {}).get(key)
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"'{file}' is not a contlearn results file: '{where}.{key}' is not a mapping")
    for key in HEADLINE:
        value = results.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        ):
            raise ConfigError(f"'{file}' is not a contlearn results file: '{key}' is not a finite number ({value!r})")
    seed = results.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"'{file}' is not a contlearn results file: 'seed' is not an integer ({seed!r:.40})")
    seconds = (results.get("timings") or {}).get("total_seconds")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))):
        raise ConfigError(f"'{file}' is not a contlearn results file: 'timings.total_seconds' is not a number")


def label_runs(runs: list[FinishedRun]) -> None:
    """Give runs that share a folder name labels with as many parent folders as
    tell them apart (``a/seed0`` and ``b/seed0``)."""
    parts = [run.path.resolve().parts for run in runs]
    repeated = next((run.path for run, p in zip(runs, parts, strict=True) if parts.count(p) > 1), None)
    if repeated is not None:
        raise ConfigError(f"run directory '{repeated}' is given twice")
    depth = [1] * len(runs)
    while True:
        labels = ["/".join(p[-d:]) for p, d in zip(parts, depth, strict=True)]
        clash = {label for label in labels if labels.count(label) > 1}
        grow = [k for k, label in enumerate(labels) if label in clash and depth[k] < len(parts[k])]
        if not grow:
            break
        for k in grow:
            depth[k] += 1
    for run, label in zip(runs, labels, strict=True):
        run.label = label


# -------------------------------------------------------------------- numbers


def seen_average(R: np.ndarray) -> np.ndarray:
    """Mean accuracy over the experiences trained so far, after each experience."""
    return np.array([R[i, : i + 1].mean() for i in range(R.shape[0])])


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _cell(text: object) -> str:
    """``text`` as one Markdown table cell (a run directory may be named ``a|b``)."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def comparison_table(runs: list[FinishedRun]) -> str:
    """A Markdown table with one row per run: its headline metrics and time."""
    lines = [
        "| run | strategy | seed | final avg acc | avg incremental acc | forgetting | BWT | FWT | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        r = run.results
        seconds = (r.get("timings") or {}).get("total_seconds")
        lines.append(
            f"| {_cell(run.label)} | {_cell(run.strategy)} | {r.get('seed', 'n/a')} | {_fmt(r.get('average_accuracy'))} | "
            f"{_fmt(r.get('average_incremental_accuracy'))} | {_fmt(r.get('forgetting'))} | "
            f"{_fmt(r.get('bwt'), True)} | {_fmt(r.get('fwt'), True)} | "
            f"{'n/a' if seconds is None else f'{seconds:.1f}'} |"
        )
    return "\n".join(lines) + "\n"


def seeds_table(groups: list[list[FinishedRun]]) -> str:
    """A Markdown table with one row per experiment: its headline metrics as
    mean ± sample standard deviation over its runs (seeds)."""
    lines = [
        "| strategy | runs | seeds | final avg acc | avg incremental acc | forgetting | BWT | FWT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for group, label in zip(groups, group_labels(groups), strict=True):
        seeds = ", ".join(str(run.results.get("seed", "n/a")) for run in group)
        cells = [mean_std([run.results.get(key) for run in group], signed=key in ("bwt", "fwt")) for key in HEADLINE]
        lines.append(f"| {_cell(label)} | {len(group)} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_markdown(runs: list[FinishedRun]) -> str:
    """What ``comparison.md`` holds (and ``contlearn report`` prints): one row per
    run; where an experiment was run with several seeds, one row per experiment
    (mean ± std); and a note when the runs are not on one scenario."""
    text = comparison_table(runs)
    groups = group_by_experiment(runs)
    if any(len(group) > 1 for group in groups):
        text += "\nOver seeds (mean ± sample standard deviation, n - 1):\n\n" + seeds_table(groups)
        for group, label in zip(groups, group_labels(groups), strict=True):
            if seeds := repeated_seeds(group):
                text += (f"\nNote: {label} has several runs of seed {', '.join(map(str, seeds))} (a copied or "
                         f"rerun directory): its mean ± std counts the same run more than once.\n")
    scenarios = {key for key in map(scenario_key, (run.results for run in runs)) if key is not None}
    if len(scenarios) > 1:
        text += (f"\nNote: these runs are on {len(scenarios)} different scenarios (the config's `scenario`, or "
                 f"the stream given in Python): their numbers are not comparable across scenarios.\n")
    return text + _fwt_note(runs)


def _fwt_note(runs: list[FinishedRun]) -> str:
    """A note under a table whose FWT says nothing: no run predicted any test
    sample of an experience before training it (a growing head, a task's head
    made when the task is trained), so FWT is minus the untrained model's
    accuracy, the same for every method of a seed (docs/metrics.md)."""
    if not runs or any(run.results.get("fwt") is None for run in runs):
        return ""
    if any(run.matrix[j - 1, j] != 0 for run in runs for j in range(1, run.matrix.shape[1])):
        return ""
    return ("\nNote: FWT here is minus the untrained model's accuracy, the same for every method: no run got any "
            "test sample of an experience right before training it (a head that grows with the classes or "
            "tasks has no outputs for them yet).\n")


def matrix_table(R: np.ndarray) -> str:
    """The accuracy matrix as a Markdown table."""
    n = R.shape[1]
    lines = ["| after \\ on | " + " | ".join(f"exp {j}" for j in range(n)) + " |", "|---" * (n + 1) + "|"]
    for i, row in enumerate(R):
        lines.append(f"| exp {i} | " + " | ".join(f"{a:.3f}" for a in row) + " |")
    return "\n".join(lines) + "\n"


def _scenario(results: dict[str, Any], scenario: dict[str, Any]) -> str:
    if (results.get("given") or {}).get("stream") is not None:
        return "a stream given in Python"
    return f"{scenario.get('source')}, {scenario.get('setting')}-incremental"


def run_markdown(run: FinishedRun) -> str:
    """``report.md`` of one run."""
    r = run.results
    cfg = r.get("config") or {}
    scenario = cfg.get("scenario") or {}
    model = cfg.get("model") or {}
    train = cfg.get("train") or {}
    return (
        f"# {r.get('name', run.label)} ({run.label})\n\n"
        f"Strategy: {run.strategy}. Seed {r.get('seed')}. Scenario: {_scenario(r, scenario)}, "
        f"{run.matrix.shape[0]} experiences. "
        f"Model: {model.get('backbone')}. Training: {train.get('epochs')} epochs per experience, "
        f"{train.get('optimizer')} lr {train.get('lr')}, batch {train.get('batch_size')}.\n\n"
        + comparison_table([run])
        + _fwt_note([run])
        + "\n## Accuracy matrix\n\nRow i: after training experience i; column j: test data of experience j.\n\n"
        + matrix_table(run.matrix)
        + f"\n![accuracy matrix]({MATRIX_PNG})\n\n![accuracy over experiences]({CURVE_PNG})\n"
    )


# ---------------------------------------------------------------------- plots


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


#: experiences up to which plots size themselves by them, label each and (the
#: heatmap) annotate each cell; longer streams get a figure of that size
LABELLED_EXPERIENCES = 20


def plot_matrix(R: np.ndarray, title: str, path: Path) -> None:
    """Heatmap of the accuracy matrix, each cell annotated (up to
    :data:`LABELLED_EXPERIENCES` experiences; the figure's size stops growing there)."""
    n_rows, n_cols = R.shape
    fig = _figure(1.2 + 0.75 * min(n_cols, LABELLED_EXPERIENCES), 1.0 + 0.6 * min(n_rows, LABELLED_EXPERIENCES))
    ax = fig.add_subplot()
    image = ax.imshow(R, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
    if max(n_rows, n_cols) <= LABELLED_EXPERIENCES:
        for i in range(n_rows):
            for j in range(n_cols):
                ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if R[i, j] > 0.6 else "white")
    _experience_ticks(ax.xaxis, np.arange(n_cols))
    _experience_ticks(ax.yaxis, np.arange(n_rows))
    ax.set_xlabel("evaluated on experience")
    ax.set_ylabel("after training experience")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="accuracy")
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    try:
        fig.savefig(path)
    except OSError as exc:
        raise ContlearnError(f"cannot write '{path}': {exc.strerror or exc}") from None


def plot_curve(R: np.ndarray, title: str, path: Path) -> None:
    """Accuracy after each experience: seen-so-far and overall averages, and per experience."""
    x = np.arange(1, R.shape[0] + 1)
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    for j in range(R.shape[1]):
        ax.plot(x[j:], R[j:, j], color="0.7", linewidth=0.8, label="each experience" if j == 0 else None)
    ax.plot(x, seen_average(R), marker="o", label="average over experiences seen")
    ax.plot(x, R.mean(axis=1), marker="s", linestyle="--", label="average over all experiences")
    _decorate(ax, x, title)
    _save(fig, path)


def plot_comparison(runs: list[FinishedRun], path: Path) -> None:
    """The seen-so-far average accuracy of several runs on one plot."""
    fig = _figure(6.5, 4.0)
    ax = fig.add_subplot()
    longest = max(run.matrix.shape[0] for run in runs)
    for run in runs:
        R = run.matrix
        ax.plot(np.arange(1, R.shape[0] + 1), seen_average(R), marker="o", label=f"{run.label} ({run.strategy})")
    _decorate(ax, np.arange(1, longest + 1), "average accuracy over experiences seen")
    _save(fig, path)


def _experience_ticks(axis: Any, positions: np.ndarray) -> None:
    """A tick per experience, or on a long stream a few at whole numbers."""
    if len(positions) <= LABELLED_EXPERIENCES:
        axis.set_ticks(positions)
    else:
        from matplotlib.ticker import MaxNLocator

        axis.set_major_locator(MaxNLocator(nbins=10, integer=True))


def _decorate(ax: Any, x: np.ndarray, title: str) -> None:
    _experience_ticks(ax.xaxis, x)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("experiences trained")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


# ---------------------------------------------------------------------- files


def write_run_report(run: FinishedRun) -> list[Path]:
    """The plots and ``report.md`` of one run, in its directory."""
    title = f"{run.results.get('name', run.label)}: {run.strategy}"
    paths = [run.path / MATRIX_PNG, run.path / CURVE_PNG, run.path / REPORT_MD]
    plot_matrix(run.matrix, title, paths[0])
    plot_curve(run.matrix, title, paths[1])
    write_atomic(paths[2], run_markdown(run))
    return paths


def load_runs(run_dirs: str | Path | list[str | Path]) -> list[FinishedRun]:
    """Every run directory (one, or a list) loaded, checked and labelled."""
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise ConfigError("name at least one run directory to report on")
    runs = [load_run(p) for p in run_dirs]
    label_runs(runs)
    return runs


def write_report(run_dirs: str | Path | list[str | Path], out_dir: str | Path | None = None) -> list[Path]:
    """Report every run directory (one, or a list); with several, compare them in
    ``out_dir`` (default: the first run's directory). Every directory is checked
    before anything is written. Returns the files written."""
    return write_runs_report(load_runs(run_dirs), out_dir)


def write_runs_report(runs: list[FinishedRun], out_dir: str | Path | None = None) -> list[Path]:
    """:func:`write_report` of runs already loaded by :func:`load_runs`."""
    if len(runs) == 1 and out_dir is not None:
        raise ConfigError("--out names where several runs are compared; one run's report is written in its own directory")
    out = Path(out_dir) if out_dir is not None else runs[0].path
    if len(runs) > 1:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out '{out}' is a file: the comparison is written into a directory (give another path)")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # the system refuses (permissions, a full disk): a failure at run time
            raise ContlearnError(f"cannot write the comparison to '{out}': {exc.strerror or exc}") from None
    written: list[Path] = []
    for run in runs:
        written += write_run_report(run)
    if len(runs) > 1:
        write_atomic(out / COMPARISON_MD, "# Comparison\n\n" + comparison_markdown(runs) + f"\n![comparison]({COMPARISON_PNG})\n")
        plot_comparison(runs, out / COMPARISON_PNG)
        written += [out / COMPARISON_MD, out / COMPARISON_PNG]
    return written
