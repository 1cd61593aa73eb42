"""Unlearning in a finished run directory (``contlearn unlearn RUN_DIR``).

The run is rebuilt from ``RUN_DIR/config.yaml`` and its newest checkpoint
(:mod:`contlearn.checkpoint`, as :meth:`Experiment.resume` does), the request goes
through :meth:`Experiment.unlearn` to the ``unlearn`` hook, and the model that
forgot is written as a new run directory, by default ``RUN_DIR/unlearn-<k>``:
``config.yaml`` (the run's), ``checkpoints/`` (the checkpoint with the new weights;
``contlearn unlearn`` and ``contlearn resume`` accept the directory) and
``unlearn.json`` (the report). The original run directory is not changed.

A run trained without ``plugins.ssd`` is given one for the request, built from the
command line's settings; it has no cached F_D, so F_D is computed from the
training data, and it is not part of the new checkpoint (whose config stays the
run's).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from contlearn import _run_state as run_state
from contlearn import checkpoint as ckpt
from contlearn._registry import classes_given_again
from contlearn._run_dir import refuse_existing_run, results_rows
from contlearn._run_lock import LOCK_NAME, holding
from contlearn.config import load_config, saved_run_config, schema_defaults, to_container, to_yaml
from contlearn.errors import CheckpointError, ConfigError, ContlearnError, command
from contlearn.reporting import fmt
from contlearn.results import prepare_run_dir, write_atomic

REPORT = "unlearn.json"


def _default_out(run_dir: Path) -> Path:
    """The first free ``run_dir/unlearn-<k>``, created here, so that two
    unlearnings at once never take the same one."""
    k = 1
    while True:
        out = run_dir / f"unlearn-{k}"
        try:
            out.mkdir()
        except FileExistsError:
            k += 1
            continue
        except OSError as exc:
            raise ContlearnError(f"cannot write to the output directory '{out}': {exc.strerror or exc}") from None
        return out


def unlearn_run_dir(
    run_dir: str | Path,
    request: dict[str, Any],
    out: str | Path | None = None,
    ssd_config: dict[str, Any] | None = None,
    overrides: Sequence[str] = (),
    plugins: Mapping[str, type] | None = None,
) -> tuple[dict[str, Any], Path]:
    """Make the model of ``run_dir``'s newest checkpoint forget what ``request`` names.

    :param request: keys of :meth:`contlearn.Experiment.unlearn` (``classes``,
        ``samples``, ``alpha``, ``lam``, ``auto``, ``target``, ``recompute`` ...).
    :param out: the new run directory (default ``run_dir/unlearn-<k>``, the first free k).
    :param ssd_config: fields of the SSD plugin to use when the run has none.
    :param overrides: ``device=...``, ``threads=...``: where this unlearning runs
        (a run trained on a GPU, unlearnt on a machine without one).
    :param plugins: the plugin classes the run was given by name (``-p``, or
        ``Experiment(plugins=...)``), which its model is rebuilt with.
    :return: the report (also in ``out/unlearn.json``) and ``out``.
    :raises ConfigError: not a run directory, ``out`` is ``run_dir``, a newest
        checkpoint inside an experience (finish the run first), an override other
        than ``device``/``threads``, an absent device, a bad request.
    :raises CheckpointError: no usable checkpoint, or a finished run whose newest
        readable checkpoint is older than its results.
    """
    from contlearn._environment import environment_world_size

    if environment_world_size() > 1:
        raise ConfigError("unlearning runs in one process: start 'contlearn unlearn' without torchrun")
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"'{run_dir}' is not a run directory: it has no config.yaml")
    if out is not None and Path(out).resolve() == run_dir.resolve():
        raise ConfigError(
            f"--out must be a new directory, not the run directory '{run_dir}' (its checkpoint is kept)"
        )
    with holding(run_dir, "an unlearning from its checkpoint"):  # no run or resume rotates it meanwhile
        out_dir = Path(out) if out is not None else _default_out(run_dir)
        try:
            return _unlearn_locked(run_dir, out_dir, request, ssd_config, overrides, dict(plugins or {}))
        except BaseException:
            if out is None:  # the directory made for it, if nothing was written there
                with contextlib.suppress(OSError):
                    (out_dir / LOCK_NAME).unlink(missing_ok=True)
                    out_dir.rmdir()
            raise


def _unlearn_locked(
    run_dir: Path,
    out_dir: Path,
    request: dict[str, Any],
    ssd_config: dict[str, Any] | None,
    overrides: Sequence[str],
    classes: dict[str, type],
) -> tuple[dict[str, Any], Path]:
    from contlearn.experiment import Experiment, cpu_threads, resolve_device

    config_file = run_dir / "config.yaml"
    with saved_run_config(), classes_given_again("unlearn_run_dir(run_dir, ..., plugins={plugins})"):
        # the run directory's config must not make the rebuild write there
        config = load_config(config_file, [*_where_it_runs(overrides), "out=null"], plugins=classes)
    if not ckpt.list_checkpoints(run_dir / ckpt.DIRNAME):
        raise CheckpointError(
            f"no checkpoint in '{run_dir / ckpt.DIRNAME}': nothing to unlearn from (checkpoint.enabled was off?)"
        )
    path, state = ckpt.latest(run_dir / ckpt.DIRNAME)
    defaults = schema_defaults(list(config.plugins), plugins=classes)
    run_state.check_config(state["config"], to_container(config), path.name, defaults)
    pos = state["position"]
    _refuse_an_older_model(run_dir, path, pos)
    if pos["inside_experience"]:
        raise ConfigError(
            f"the newest checkpoint '{path.name}' is inside experience {pos['completed']}; unlearning needs a model "
            f"between experiences: finish the run first with: {command('contlearn', 'resume', run_dir)}"
        )

    refuse_existing_run(out_dir)
    resolve_device(config.device, instead="unlearn elsewhere with --device cpu (or auto)")
    with saved_run_config():
        experiment = Experiment(config, plugins=classes)
    with cpu_threads(config.threads):
        return _unlearn(experiment, state, path, run_dir, out_dir, request, ssd_config), out_dir


def _where_it_runs(overrides: Sequence[str]) -> list[str]:
    """The overrides an unlearning takes: where it runs, never what the run was."""
    for override in overrides:
        if override.split("=", 1)[0].strip() not in ("device", "threads"):
            raise ConfigError(
                f"contlearn unlearn takes only device= and threads= overrides (where it runs), got {override!r}"
            )
    return list(overrides)


def _refuse_an_older_model(run_dir: Path, path: Path, position: dict[str, Any]) -> None:
    """:raises CheckpointError: the run finished, but its newest readable
    checkpoint is older (the newer ones are unreadable): unlearning it would not
    unlearn the model the run's results describe."""
    rows = results_rows(run_dir)
    if rows is None:
        return  # no results (a stopped run) or unreadable ones: the newest readable checkpoint is the run's state
    if position["inside_experience"] or int(position["completed"]) < rows:
        raise CheckpointError(
            f"'{run_dir}' finished its {rows} experiences, but its newest readable checkpoint '{path.name}' is "
            f"from before the end (the newer ones are unreadable): unlearning it would not unlearn the model its "
            f"results describe"
        )


def _unlearn(
    experiment: Any,
    state: dict[str, Any],
    path: Path,
    run_dir: Path,
    out_dir: Path,
    request: dict[str, Any],
    ssd_config: dict[str, Any] | None,
) -> dict[str, Any]:
    from contlearn.plugins.ssd import SSD

    config = experiment.config
    run = experiment.build()
    progress, _ = run_state.restore(run, state, path.name)
    try:
        if "ssd" not in run.plugins:
            plugin = SSD(SSD.Config(**(ssd_config or {})))
            plugin.refusal_advice = "SSD cannot unlearn this run"  # the user did not list it
            run.pm.register(plugin, name="ssd")  # type: ignore[attr-defined]
            plugin.setup(run)
        report = experiment.unlearn(**request)
        new_state = run_state.capture(run, to_container(config), progress)
        prepare_run_dir(out_dir)
        with holding(out_dir, "an unlearning"):
            refuse_existing_run(out_dir)  # again, now that no other process may write there
            return _write_copy(out_dir, config, new_state, report, run_dir, path)
    finally:
        run.hook.teardown(run=run)


def _write_copy(
    out_dir: Path, config: Any, new_state: dict[str, Any], report: dict[str, Any], run_dir: Path, path: Path
) -> dict[str, Any]:
    """The unlearnt run (its config, its report, then its checkpoint) and the report."""
    write_atomic(out_dir / "config.yaml", to_yaml(config))
    position = new_state["position"]
    checkpoint = out_dir / ckpt.DIRNAME / ckpt.checkpoint_name(position["completed"], position["global_step"])
    report = {**report, "run_dir": str(run_dir), "source_checkpoint": str(path), "checkpoint": str(checkpoint)}
    # The report first: a copy with a checkpoint is always known for one that unlearned (a resume must
    # not take it for the run and write results measured before the unlearning).
    write_atomic(out_dir / REPORT, json.dumps(report, indent=2) + "\n")
    try:
        ckpt.write(out_dir / ckpt.DIRNAME, new_state, int(config.checkpoint.keep_last))
    except BaseException:  # a full disk, Ctrl-C: no model, so no report of one
        (out_dir / REPORT).unlink(missing_ok=True)
        raise
    return report


def summary(report: dict[str, Any]) -> str:
    """A few lines on what a report says."""
    before = report.get("before") or {}
    what = (
        f"classes {', '.join(report['classes'])}"
        if "classes" in report
        else f"{report['forget_samples']} samples"
    )
    lines = [
        f"forgot {what} in {report['seconds']:.3f} s (F_D: {report['fisher_d']}); "
        + ("no dampening needed" if report["alpha"] is None
           else f"alpha {report['alpha']:g}, lambda {report['lam']:g}")
        + (
            f" (auto, target {report['target']:g} for the forget train accuracy"
            f"{'' if report['target_reached'] else ', NOT reached'})"
            if report["auto"]
            else ""
        )
        + f"; {100 * report['dampened_fraction']:.2f}% of the parameters dampened",
    ]
    for key, label in (
        ("forget_accuracy", "forget accuracy"),
        ("forget_train_accuracy", "forget train acc"),
        ("retain_accuracy", "retain accuracy"),
        ("mia", "MIA"),
    ):
        lines.append(f"  {label:16s} {fmt(before.get(key))} -> {fmt(report.get(key))}")
    return "\n".join(lines)
