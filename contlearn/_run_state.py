"""A run's whole state as a checkpoint holds it: :func:`capture` and :func:`restore`.

:func:`restore` brings a freshly built run to a checkpoint's state, so that the
resumed run is the run that was interrupted: position, metrics, every plugin's
state (or its model surgery), the model's weights, the optimizer inside an
experience, and the random states last (see docs/reliability.md). Before that,
:func:`check_config` refuses a checkpoint written by another experiment.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from contlearn._hook_results import experience_data, experience_optimizer
from contlearn._random_state import own_gpu, own_rng, rng_state, set_rng_state
from contlearn._stream_signature import check_stream, stream_signature
from contlearn.checkpoint import FORMAT, VERSION, CheckpointWarning
from contlearn.config import flatten
from contlearn.errors import CheckpointError, ConfigError, raised_in_a_hook

if TYPE_CHECKING:
    from contlearn.run import Run
    from contlearn.scenarios import Experience

#: Top-level config keys that may differ between a checkpoint and the run resuming it.
MAY_DIFFER = ("out", "device", "threads", "checkpoint")


@dataclass
class Progress:
    """What the loop has measured beyond ``run.accuracy_rows``: the FWT baseline,
    the last confusion matrix and the timings (seconds); ``elapsed`` is the run's
    time before this session (restored) or until now (captured)."""

    timings: dict[str, float] = field(default_factory=lambda: {"train_seconds": 0.0, "eval_seconds": 0.0})
    initial: list[float] | None = None
    confusion: np.ndarray | None = None
    elapsed: float = 0.0


@dataclass
class EpochState:
    """Where a checkpoint inside an experience stands in its epoch: the losses
    of the epoch's steps so far, and ``run.generator``'s state at the epoch's
    start (it drew the epoch's sample order)."""

    losses: list[torch.Tensor]
    terms: dict[str, list[torch.Tensor]]
    generator: torch.Tensor


@dataclass
class Resumed:
    """A run restored inside an experience: the data it trains on, and the epoch
    to continue with ``epoch.losses`` batches of it done."""

    data: Any
    epoch: EpochState


# ------------------------------------------------------------------ compatibility


def _section_saved(saved: dict[str, Any], key: str) -> bool:
    """Whether the section holding ``key`` is in ``saved``: an option added to a
    section the run had, not a plugin (or section) the run did not have."""
    parts = key.split(".")
    depth = 2 if parts[0] == "plugins" else len(parts) - 1  # a plugin's section: plugins.<name>
    node: Any = saved
    for part in parts[:depth]:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def config_differences(
    saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any] | None = None
) -> list[str]:
    """The keys on which two configs (as plain containers) differ, with both
    values; keys of :data:`MAY_DIFFER` are ignored. A key the checkpoint lacks
    whose current value is its default in ``defaults`` is not a difference: it is
    an option added since the checkpoint was written, at the value the old code had."""
    a = {k: v for k, v in flatten(saved).items() if k.split(".")[0] not in MAY_DIFFER}
    b = {k: v for k, v in flatten(current).items() if k.split(".")[0] not in MAY_DIFFER}
    if defaults is not None:
        default = flatten(defaults)
        for k in set(b) - set(a):
            if k in default and default[k] == b[k] and _section_saved(saved, k):
                a[k] = b[k]
    diffs = [
        f"{k}: {a.get(k, '(absent)')!r} in the checkpoint, {b.get(k, '(absent)')!r} now"
        for k in sorted(set(a) | set(b))
        if a.get(k, "(absent)") != b.get(k, "(absent)")
    ]
    order_a, order_b = list(saved.get("plugins") or {}), list(current.get("plugins") or {})
    if sorted(order_a) == sorted(order_b) and order_a != order_b:
        diffs.append(f"plugin order: {order_a} in the checkpoint, {order_b} now")
    return diffs


def check_config(
    saved: dict[str, Any], current: dict[str, Any], source: str, defaults: dict[str, Any] | None = None
) -> None:
    """:raises ConfigError: naming the differences when ``current`` is not the
    experiment that wrote checkpoint ``source`` (see :func:`config_differences`)."""
    diffs = config_differences(saved, current, defaults)
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise ConfigError(f"checkpoint '{source}' was written by a different experiment: {shown}")


def check_model(model: torch.nn.Module, saved: dict[str, torch.Tensor], source: str) -> None:
    """:raises CheckpointError: naming the parameters the model and the
    checkpoint disagree on (missing, unexpected, other shape)."""
    own = model.state_dict()
    problems = [f"'{k}' missing from the checkpoint" for k in own if k not in saved]
    problems += [f"'{k}' not in the model" for k in saved if k not in own]
    problems += [
        f"'{k}' is {list(saved[k].shape)} in the checkpoint but {list(own[k].shape)} in the model"
        for k in own
        if k in saved and saved[k].shape != own[k].shape
    ]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise CheckpointError(
            f"checkpoint '{source}' does not fit the model: {shown}. A plugin that changes the model "
            f"must rebuild the change in restore(run, state) (docs/reliability.md)"
        )


# ------------------------------------------------------------------- capture, restore


def _plugin_states(run: Run) -> dict[str, Any]:
    return {name: p.state_dict() for name, p in run.plugins.items() if callable(getattr(p, "state_dict", None))}


def capture(
    run: Run,
    config: dict[str, Any],
    progress: Progress,
    epoch: EpochState | None = None,
    given_plugins: dict[str, str] | None = None,
    process_rngs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The checkpoint of ``run`` now: between experiences (``epoch`` is ``None``)
    or after a step inside one. ``process_rngs``: several processes' random
    states (:func:`rng_state` of each, in rank order), kept so that each process
    resumes with its own. ``given_plugins``: the plugins given to the run
    in Python that take part in training, name -> class, which a resume should
    be given again."""
    completed = len(run.accuracy_rows)
    inside = epoch is not None
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": config,
        "position": {
            "completed": completed,
            "inside_experience": inside,
            "epoch": run.epoch if inside else 0,
            "batch": len(epoch.losses) if epoch is not None else 0,
            "step": run.step if inside else 0,
            "global_step": run.global_step,
        },
        "stream": stream_signature(run.stream),
        "given_plugins": dict(given_plugins or {}),
        "threads": torch.get_num_threads(),  # the CPU's order of summation depends on it
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict() if inside and run.optimizer is not None else None,
        "plugins": _plugin_states(run),
        "rng": process_rngs[0] if process_rngs else rng_state(run.generator, own_gpu(run)),
        "rng_processes": list(process_rngs) if process_rngs is not None and len(process_rngs) > 1 else None,
        "metrics": {
            "accuracy_rows": [list(r) for r in run.accuracy_rows],
            "initial_accuracy": progress.initial,
            "confusion": None if progress.confusion is None else torch.from_numpy(np.asarray(progress.confusion)),
            "timings": dict(progress.timings),
            "elapsed": progress.elapsed,
            "epoch_losses": torch.stack(epoch.losses).cpu() if epoch is not None and epoch.losses else None,
            "epoch_terms": {k: torch.stack(v).cpu() for k, v in epoch.terms.items()} if epoch is not None else {},
            "epoch_generator": epoch.generator if epoch is not None else None,
        },
    }


def _warn_given_plugins(saved: dict[str, str], given: dict[str, str], source: str) -> None:
    """Warn when a resume is not given the plugins (names and classes) the run was
    given in Python: one that only watched (a profiler, a stop at some step) may
    be left out, one that trained changes what the rest of the run learns."""
    if saved == given:
        return

    def listed(plugins: dict[str, str]) -> str:
        return ", ".join(f"{n!r} ({c})" for n, c in plugins.items()) or "none"

    warnings.warn(
        f"checkpoint '{source}' was written by a run given these plugins in Python: {listed(saved)}; this "
        f"resume has {listed(given)}. A plugin that only watched may be left out; one that trained must be "
        f"given again (Experiment.resume(run_dir, plugins={{...}})), or the results will differ",
        CheckpointWarning,
        stacklevel=5,  # the caller of Experiment.run
    )


def _warn_other_threads(saved: Any, run: Run, source: str) -> None:
    """Warn when a run on the CPU resumes on another number of threads than the
    checkpoint's: its sums then run in another order, and the rest of the run is
    not bitwise the uninterrupted run's (checkpoints written before this record
    lack the number)."""
    threads = torch.get_num_threads()
    if not isinstance(saved, int) or saved == threads or run.device.type != "cpu" or not run.dist.is_main:
        return
    warnings.warn(
        f"checkpoint '{source}' was written by a run on {saved} CPU thread{'s' if saved != 1 else ''} and this "
        f"resume runs on {threads}: sums run in another order, so the rest of the run will not be bitwise the "
        f"uninterrupted run's (resume with threads={saved} for that)",
        CheckpointWarning,
        stacklevel=5,  # the caller of Experiment.run
    )


def restore(
    run: Run, state: dict[str, Any], source: str, given_plugins: dict[str, str] | None = None
) -> tuple[Progress, Resumed | None]:
    """Bring a freshly built run to the checkpoint's state, calling ``setup``.

    Order: position and metrics; the head grown for every experience started;
    each plugin's ``restore(run, state)`` (when it has one: model surgery) or
    ``load_state_dict(state)``; the model's weights (checked against its
    structure); the ``setup`` hook; inside an experience, ``train_data`` and
    ``configure_optimizer`` again and the optimizer's state; the random states
    last, so that nothing above shifts them.
    """
    pos, metrics = state["position"], state["metrics"]
    with _fits(source, "its position"):
        completed, inside = int(pos["completed"]), bool(pos["inside_experience"])
        global_step, epoch, step = int(pos["global_step"]), int(pos["epoch"]), int(pos["step"])
        accuracy_rows = [[float(a) for a in row] for row in metrics["accuracy_rows"]]
    stream = run.stream
    if isinstance(state.get("stream"), dict):  # checkpoints written before these checks lack them
        check_stream(state["stream"], stream, source)
    if "given_plugins" in state:
        _warn_given_plugins(state["given_plugins"], dict(given_plugins or {}), source)
    _warn_other_threads(state.get("threads"), run, source)
    if completed + inside > len(stream):
        raise CheckpointError(f"checkpoint '{source}' is past the end of the stream ({len(stream)} experiences)")
    run.accuracy_rows = accuracy_rows
    run.global_step = global_step
    current: Experience | None = stream[completed] if inside else None
    for exp in stream.experiences[: completed + inside]:
        run.model.adapt(exp.classes, exp.task)
    run.experience = current
    run.epoch, run.step = epoch, step

    saved = state["plugins"]
    own = {name for name, p in run.plugins.items() if callable(getattr(p, "state_dict", None))}
    if set(saved) != own:
        missing, extra = sorted(own - set(saved)), sorted(set(saved) - own)
        raise CheckpointError(
            f"checkpoint '{source}' holds plugin states for {sorted(saved)} but this run has {sorted(own)}"
            + (f" (no state for {missing})" if missing else "")
            + (f" (no plugin for {extra})" if extra else "")
        )
    for name, plugin_state in saved.items():  # tensors on the CPU: plugins move them (generator states stay)
        plugin = run.plugins[name]
        with _fits(source, f"the state of plugin '{name}' (written by another version of it?)"):
            if callable(getattr(plugin, "restore", None)):
                plugin.restore(run, plugin_state)
            else:
                plugin.load_state_dict(plugin_state)

    check_model(run.model, state["model"], source)
    run.model.load_state_dict(state["model"])
    try:  # plugins apply states that need the run's device here
        run.hook.setup(run=run)
    except _MALFORMED as exc:
        where = raised_in_a_hook(exc)
        plugin = "a plugin's setup" if where is None else f"plugin {where[0]}'s setup"
        raise CheckpointError(f"cannot resume from checkpoint '{source}': {plugin} failed on its saved "
                              f"state (written by another version of it?): {type(exc).__name__}: {exc}") from exc

    resumed = None
    if current is not None:
        data = experience_data(run, current)
        run.optimizer = experience_optimizer(run, current)
        if state["optimizer"] is not None:
            run.optimizer.load_state_dict(state["optimizer"])
        losses = metrics["epoch_losses"]
        resumed = Resumed(
            data,
            EpochState(
                list(losses.to(run.device).unbind()) if losses is not None else [],
                {k: list(v.to(run.device).unbind()) for k, v in metrics["epoch_terms"].items()},
                metrics["epoch_generator"],
            ),
        )
    with _fits(source, "its random states or metrics"):
        set_rng_state(own_rng(state, run, source), run.generator, own_gpu(run))
        confusion = metrics["confusion"]
        progress = Progress(
            timings=dict(metrics["timings"]),
            initial=metrics["initial_accuracy"],
            confusion=None if confusion is None else confusion.numpy(),
            elapsed=float(metrics["elapsed"]),
        )
    return progress, resumed


#: What reading a value of the wrong type or shape raises.
_MALFORMED = (TypeError, ValueError, KeyError, IndexError, AttributeError)


@contextlib.contextmanager
def _fits(source: str, what: str) -> Iterator[None]:
    """A value of the wrong type or shape in a checkpoint (edited by hand, or by
    another version) as a :class:`CheckpointError` naming the part it is in."""
    try:
        yield
    except _MALFORMED as exc:
        raise CheckpointError(f"checkpoint '{source}' is malformed: {what} does not fit this run "
                              f"({type(exc).__name__}: {exc})") from exc
