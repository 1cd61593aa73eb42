"""Run directories: which ones a new run may use, and which runs have nothing left to resume.

A new run never writes into a directory that holds another run's results or
checkpoints (it would overwrite the one and be shadowed by the other); a resume
refuses a run that is finished. Both say what to do instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from contlearn import checkpoint as ckpt
from contlearn.errors import ConfigError, command


def refuse_existing_run(out_dir: Path) -> None:
    """:raises ConfigError: when ``out_dir`` already holds a run (a checkpoint or
    results): a new run there would overwrite its results, and its newer
    checkpoints would shadow the new run's (and be deleted by them). A directory
    left by a run that stopped before its first checkpoint can be reused."""
    if (out_dir / "results.json").exists():  # checked first: a finished run keeps its checkpoints
        raise ConfigError(
            f"'{out_dir}' already holds a finished run (results.json): give the new run another directory"
        )
    if ckpt.list_checkpoints(out_dir / ckpt.DIRNAME):
        copy = (out_dir / "unlearn.json").exists()
        raise ConfigError(
            f"'{out_dir}' already holds a {'model that unlearned' if copy else 'run'} (checkpoints): give the new "
            f"run another directory, or continue that one{' if experiences are left' if copy else ''} with: "
            f"{command('contlearn', 'resume', out_dir)}"
        )


def refuse_finished(run_dir: Path, state: dict[str, Any]) -> None:
    """:raises ConfigError: when the run has written its results (for every
    experience of its stream), whichever checkpoint it would resume from (an
    older one, when the newest is unreadable or a session wrote none): there is
    nothing left to train, and resuming would only rewrite them."""
    results = run_dir / "results.json"
    position = state["position"]
    n_experiences = len((state.get("stream") or {}).get("experiences") or ())
    if not results.is_file():
        at_end = not position["inside_experience"] and position["completed"] == n_experiences
        if at_end and (run_dir / "unlearn.json").is_file():
            raise ConfigError(
                f"'{run_dir}' holds a model that unlearned after its last experience: there is nothing left to "
                f"train, and its accuracy matrix predates the unlearning (unlearn.json has what it measured after)"
            )
        return
    rows = results_rows(run_dir)
    if rows is None:
        return  # unreadable results: resuming writes them again
    if n_experiences:
        finished = rows == n_experiences
    else:  # a checkpoint without its stream's description: it must be the last one
        finished = not position["inside_experience"] and rows == position["completed"]
    if finished:
        raise ConfigError(f"'{run_dir}' is finished: its {rows} experiences are trained and its results written "
                          f"(if its report is missing: {command('contlearn', 'report', run_dir)})")


def results_rows(run_dir: Path) -> int | None:
    """The number of rows (experiences trained) of ``run_dir``'s results, ``None``
    without a readable ``results.json``."""
    try:
        return len(json.loads((run_dir / "results.json").read_text(encoding="utf-8"))["accuracy_matrix"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
