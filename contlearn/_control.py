"""What a run does at step and experience boundaries: checkpoints and stop requests.

:class:`Control` writes the periodic and end-of-experience checkpoints and turns
a stop request (Ctrl-C, SIGTERM, :meth:`Experiment.request_stop`) into an
:class:`~contlearn.errors.Interrupted` at the next boundary, with a checkpoint
and the command that continues the run. Under torchrun the processes agree on a
stop first (:meth:`Control.vote`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from contlearn import _run_state as run_state
from contlearn import checkpoint as ckpt
from contlearn._loop import check_weights, loss_table, raise_if_not_finite
from contlearn._random_state import own_gpu, rng_state
from contlearn._registry import plugin_options
from contlearn._run_state import EpochState, Progress
from contlearn.config import to_container
from contlearn.errors import Interrupted, command

if TYPE_CHECKING:
    from contlearn.experiment import Experiment
    from contlearn.run import Run
    from contlearn.scenarios import Experience


def class_paths(classes: dict[str, type]) -> dict[str, str]:
    return {name: f"{cls.__module__}.{cls.__qualname__}" for name, cls in classes.items()}


def how_to_resume(experiment: Experiment) -> str:
    """The command that continues this run. ``contlearn resume`` rebuilds the
    installed plugins (and its own displays and logs), and the classes ``-p``
    names: a run given a stream, or other plugins that take part in training,
    continues from Python with them."""
    plugins = experiment.given_plugins
    given, what = [], []
    if plugins:
        entries = [f"{n!r}: {cls.__name__}" if n in experiment.plugin_classes else f"{n!r}: {cls.__name__}(...)"
                   for n, cls in plugins.items()]
        given.append(f"plugins={{{', '.join(entries)}}}")
        what.append("the same plugins (new objects)" if len(entries) > len(experiment.plugin_classes) else "the same plugins")
    if experiment.stream is not None:
        given.append("stream=...")
        what.append("the same stream")
    if not given:
        return command("contlearn", "resume", experiment.out_dir)
    again = plugin_options(plugins) if experiment.stream is None and set(plugins) <= set(experiment.plugin_classes) else None
    if again is not None:  # classes the command line named with -p: it names them again
        return command("contlearn", "resume", experiment.out_dir, *again)
    return f"Experiment.resume({str(experiment.out_dir)!r}, {', '.join(given)}) in Python, with {' and '.join(what)}"


class Control:
    """Checkpoints and stop requests at step and experience boundaries.

    Checkpoints go to ``out_dir/checkpoints`` when the run has a directory and
    ``checkpoint.enabled``; inside experiences every ``checkpoint.every_n_steps``
    global steps, and at the step where a stop was requested. Nothing is read
    from the device except when a checkpoint is written.
    """

    def __init__(self, experiment: Experiment, run: Run, progress: Progress, t_start: float):
        cfg = run.config.checkpoint
        out = experiment.out_dir
        self.directory = out / ckpt.DIRNAME if out is not None and cfg.enabled else None
        # Every process takes part in a checkpoint (its random state goes to process 0, which writes).
        self.saving = experiment._has_run_dir and bool(cfg.enabled)
        self.every: int | None = cfg.every_n_steps if self.saving else None
        self.keep_last = int(cfg.keep_last)
        self.stop = experiment._stop_requested  # asked of this process (a signal, request_stop)
        self.agreed = False  # several processes: a stop that all of them agreed on (vote)
        # the global step and path of the last step checkpoint (no path on processes other than 0)
        self.saved: tuple[int, Path | None] | None = None
        self.dist, self.device = run.dist, run.device
        self.out_dir = out
        self.how_to_resume = how_to_resume(experiment)
        self.given_plugins = class_paths(experiment.given_plugins)
        self.config = to_container(run.config)
        self.progress = progress
        self.t_start = self.t_experience = t_start
        if self.directory is not None:
            ckpt.remove_temporaries(self.directory)

    @property
    def stopping(self) -> bool:
        """Whether the run stops at the next boundary: when asked, on one process;
        when all processes agreed on it (:meth:`vote`), on several."""
        return self.stop if self.dist.world_size == 1 else self.agreed

    def due(self, global_step: int) -> bool:
        """Whether the step just done ends with a checkpoint or a stop."""
        return self.stopping or (self.every is not None and global_step % self.every == 0)

    def vote(self) -> bool:
        """Several processes: whether any of them was asked to stop, agreed by all
        of them at the end of every epoch and at every periodic checkpoint (a
        one-number all-reduce; every process must call it). Each process's signal
        arrives at its own step, so a stop waits for the next of these. False on
        one process."""
        if self.dist.world_size == 1:
            return False
        flag = torch.tensor([1.0 if self.stop else 0.0], device=self.device)  # NCCL needs the GPU
        self.agreed = self.dist.all_reduce_(flag).item() > 0
        return self.agreed

    def end_of_step(self, run: Run, exp: Experience, epoch: EpochState) -> None:
        where = f"step {run.step} of experience {exp.index} (epoch {run.epoch})"
        path = None
        if self.saving and self.saved is not None and self.saved[0] == run.global_step:
            path = self.saved[1]  # a periodic checkpoint of this step, before the processes' vote
        elif self.saving:
            # every process checks the losses (averaged over them: what the checkpoint keeps) and raises together
            names, values = loss_table(epoch.losses, epoch.terms, self.dist)
            raise_if_not_finite(run, exp, names, values)
            if self.dist.world_size > 1:
                terms = {name: list(v.unbind()) for name, v in zip(names[1:], values[1:], strict=True)}
                epoch = EpochState(list(values[0].unbind()), terms, epoch.generator)
            path = self._save(run, exp, epoch, time.perf_counter() - self.t_experience)
            self.saved = (run.global_step, path)
            if not self.agreed:  # a checkpoint is a collective already: the processes agree on a stop there too
                self.vote()
        if self.stopping:
            raise Interrupted(self._stopped(f"after {where}", path))

    def save_experience(self, run: Run, exp: Experience) -> Path | None:
        """The checkpoint after experience ``exp`` (none without a run directory)."""
        return self._save(run, exp, None, 0.0) if self.saving else None

    def end_of_experience(self, run: Run, exp: Experience) -> None:
        path = self.save_experience(run, exp)
        if self.stopping and exp.index < len(run.stream) - 1:
            raise Interrupted(self._stopped(f"after experience {exp.index} (experiences 0-{len(run.stream) - 1})", path))

    def _save(self, run: Run, exp: Experience, epoch: EpochState | None, train_so_far: float) -> Path | None:
        """Write a checkpoint (process 0; a collective on several processes, which
        gathers their random states). Returns its path, ``None`` on the others."""
        check_weights(run, exp)  # on every process (the weights are the same): they raise together
        processes = None
        if self.dist.world_size > 1:
            processes = self.dist.gather_object(rng_state(run.generator, own_gpu(run)))
        if self.directory is None:
            return None
        timings = dict(self.progress.timings)
        timings["train_seconds"] += train_so_far
        now = Progress(timings, self.progress.initial, self.progress.confusion,
                       elapsed=self.progress.elapsed + time.perf_counter() - self.t_start)
        state = run_state.capture(run, self.config, now, epoch, self.given_plugins, processes)
        return ckpt.write(self.directory, state, self.keep_last)

    def _stopped(self, where: str, path: Path | None) -> str:
        if not self.dist.is_main:
            return f"interrupted {where}, with process 0 (which writes the checkpoint)"
        if path is None:
            return f"interrupted {where}; no checkpoint was written (no run directory, or checkpoint.enabled=false)"
        return f"interrupted {where}; state saved in {path}; continue with: {self.how_to_resume}"
