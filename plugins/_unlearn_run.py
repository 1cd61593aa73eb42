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

import json
from pathlib import Path
from typing import Any

from contlearn import _run_state as run_state
from contlearn import checkpoint as ckpt
from contlearn.config import load_config, saved_run_config, schema_defaults, to_container, to_yaml
from contlearn.errors import CheckpointError, ConfigError
from contlearn.reporting import fmt
from contlearn.results import prepare_run_dir, write_atomic

REPORT = "unlearn.json"


def _default_out(run_dir: Path) -> Path:
    k = 1
    while (run_dir / f"unlearn-{k}").exists():
        k += 1
    return run_dir / f"unlearn-{k}"


def unlearn_run_dir(
    run_dir: str | Path,
    request: dict[str, Any],
    out: str | Path | None = None,
    ssd_config: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], Path]:
    """Make the model of ``run_dir``'s newest checkpoint forget what ``request`` names.

    :param request: keys of :meth:`contlearn.Experiment.unlearn` (``classes``,
        ``samples``, ``alpha``, ``lam``, ``auto``, ``target``, ``recompute`` ...).
    :param out: the new run directory (default ``run_dir/unlearn-<k>``, the first free k).
    :param ssd_config: fields of the SSD plugin to use when the run has none.
    :return: the report (also in ``out/unlearn.json``) and ``out``.
    :raises ConfigError: not a run directory, ``out`` is ``run_dir``, a bad request.
    :raises CheckpointError: no usable checkpoint, or one inside an experience.
    """
    from contlearn._environment import environment_world_size
    from contlearn._run_dir import refuse_existing_run
    from contlearn.experiment import Experiment, cpu_threads

    if environment_world_size() > 1:
        raise ConfigError("unlearning runs in one process: start 'contlearn unlearn' without torchrun")
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"'{run_dir}' is not a run directory: it has no config.yaml")
    out_dir = Path(out) if out is not None else _default_out(run_dir)
    if out_dir.resolve() == run_dir.resolve():
        raise ConfigError(
            f"--out must be a new directory, not the run directory '{run_dir}' (its checkpoint is kept)"
        )
    with saved_run_config():  # the run directory's config must not make the rebuild write there
        config = load_config(config_file, ["out=null"])
    if not ckpt.list_checkpoints(run_dir / ckpt.DIRNAME):
        raise CheckpointError(
            f"no checkpoint in '{run_dir / ckpt.DIRNAME}': nothing to unlearn from (checkpoint.enabled was off?)"
        )
    path, state = ckpt.latest(run_dir / ckpt.DIRNAME)
    run_state.check_config(state["config"], to_container(config), path.name, schema_defaults(list(config.plugins)))
    pos = state["position"]
    if pos["inside_experience"]:
        raise CheckpointError(
            f"the newest checkpoint '{path.name}' is inside experience {pos['completed']}; unlearning needs a model "
            f"between experiences: finish the run with 'contlearn resume {run_dir}' first"
        )

    refuse_existing_run(out_dir)
    with saved_run_config():
        experiment = Experiment(config)
    with cpu_threads(config.threads):
        return _unlearn(experiment, state, path, run_dir, out_dir, request, ssd_config), out_dir


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
            run.pm.register(plugin, name="ssd")  # type: ignore[attr-defined]
            plugin.setup(run)
        report = experiment.unlearn(**request)
        new_state = run_state.capture(run, to_container(config), progress)
        prepare_run_dir(out_dir)
        write_atomic(out_dir / "config.yaml", to_yaml(config))
        written = ckpt.write(out_dir / ckpt.DIRNAME, new_state, int(config.checkpoint.keep_last))
        report = {
            **report,
            "run_dir": str(run_dir),
            "source_checkpoint": str(path),
            "checkpoint": str(written),
        }
        write_atomic(out_dir / REPORT, json.dumps(report, indent=2) + "\n")
    finally:
        run.hook.teardown(run=run)
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
        f"alpha {report['alpha']:g}, lambda {report['lam']:g}"
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
