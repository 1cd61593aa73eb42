"""An experiment: build stream, model and plugins from a config, train each
experience (:mod:`contlearn._loop`), evaluate on every experience, report.

The loop calls the hooks of :mod:`contlearn.hookspecs` at their phases. It is
written to cost next to nothing over a hand-written PyTorch loop: data stays
on the device and is batched by index; losses are kept as device tensors and
read once per epoch; hooks that no plugin implements are not called, and
``firstresult`` hooks only the defaults answer are called directly.

With a run directory, a checkpoint is written after every experience (and every
``checkpoint.every_n_steps`` steps); :meth:`Experiment.resume` continues a run
from its newest one (:mod:`contlearn.checkpoint`, :mod:`contlearn._run_state`,
docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import random
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pluggy
import torch
from omegaconf import DictConfig, OmegaConf

from contlearn import _manager
from contlearn import _run_state as run_state
from contlearn import checkpoint as ckpt
from contlearn._control import Control, class_paths
from contlearn._environment import environment_rank, environment_world_size
from contlearn._loop import (
    StepHooks,
    evaluate,
    evaluate_initial,
    train_experience,
)
from contlearn._registry import PluginRegistry, classes_given_again, given_plugins
from contlearn._run_dir import refuse_existing_run, refuse_finished
from contlearn._run_lock import RunLock, hold, refuse_if_in_use
from contlearn._run_state import Progress, Resumed
from contlearn._stream_signature import stream_signature
from contlearn.config import (
    load_config,
    merge_config,
    override_keys,
    override_list,
    saved_run_config,
    schema_defaults,
    to_container,
    to_yaml,
)
from contlearn.defaults import Defaults
from contlearn.distributed import DistributedView
from contlearn.errors import (
    ConfigError,
    ContlearnError,
    DataError,
)
from contlearn.metrics import per_class_accuracy, summary
from contlearn.models import create_model
from contlearn.results import (
    Results,
    format_summary,
    prepare_run_dir,
    versions,
    write_atomic,
    write_results,
)
from contlearn.run import Run
from contlearn.scenarios import Stream, TensorData, build_stream

#: Plugin objects an Experiment has trained with, by id, weakly held: one given to
#: another Experiment would carry what it learnt into that run.
_TRAINED_PLUGINS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run with ``torch.set_num_threads(n)`` and restore the previous count after
    (``n`` None: leave torch's choice). On a shared CPU, fewer threads than cores
    avoids oversubscription: with one core busy elsewhere, the default 2-core run
    trained 7x slower on 2 threads than on 1 (docs/performance.md)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(name: str, instead: str = "use device=auto or cpu") -> torch.device:
    """``auto`` is CUDA when present, else the CPU; asking for an absent device is
    an error, whose advice is ``instead`` (what the command at hand takes)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was asked for but CUDA is not available; {instead}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}' was asked for but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device '{name}' was asked for but MPS is not available here; {instead}")
    return device


def _check_stream(stream: Any) -> None:
    if stream is not None and not isinstance(stream, Stream):
        raise ConfigError(
            f"stream= must be a contlearn Stream (Stream.from_tensors(x, y, ...), or "
            f"contlearn.interop.avalanche.stream_from_avalanche(benchmark)), got {type(stream).__name__} {stream!r:.60}"
        )


class Experiment:
    """One continual-learning experiment.

    :param config: a config from :func:`~contlearn.load_config`, a mapping of its
        sections (``{"train": {"lr": 0.1}}``), a YAML path or shipped name to
        load, or ``None`` for the default experiment.
    :param overrides: ``key=value`` strings applied on top of ``config``.
    :param out_dir: where to write the run directory; default ``config.out``,
        and nothing is written when both are unset.
    :param plugins: plugins a script gives by name (they need not be installed):
        a plugin *class* becomes one of the configured plugins, active and
        configured by ``plugins.<name>`` in the config or overrides (recorded in
        ``config.yaml``); a plugin *object* is registered as it is, after the
        configured ones.
    :param stream: a stream to train on instead of the one ``config.scenario``
        describes (e.g. from :func:`contlearn.interop.avalanche.stream_from_avalanche`).

    >>> results = Experiment("split-digits", ["train.epochs=1"]).run()  # doctest: +SKIP
    >>> results.accuracy_matrix[-1]  # doctest: +SKIP
    """

    def __init__(
        self,
        config: DictConfig | dict[str, Any] | str | Path | None = None,
        overrides: list[str] | tuple[str, ...] = (),
        *,
        out_dir: str | Path | None = None,
        plugins: dict[str, Any] | None = None,
        stream: Stream | None = None,
    ):
        given = given_plugins(plugins, "Experiment(plugins=...)")
        _check_stream(stream)
        self.plugin_classes = {name: p for name, p in given.items() if isinstance(p, type)}
        if self.plugin_classes:  # a class given is active: an empty section keeps what the config sets
            overrides = [*override_list(overrides), *(f"plugins.{name}={{}}" for name in self.plugin_classes)]
        if config is None or isinstance(config, (str, Path)):
            config = load_config(config, overrides, plugins=self.plugin_classes)
        else:  # validated again: the caller may have edited it
            config = merge_config(config, overrides, plugins=self.plugin_classes)
        self.config: DictConfig = config
        out = out_dir if out_dir is not None else config.out
        self.out_dir: Path | None = Path(out) if out is not None else None
        self._has_run_dir = self.out_dir is not None  # on every process (build() clears out_dir but on process 0)
        self.extra_plugins = {name: p for name, p in given.items() if name not in self.plugin_classes}
        self.stream = stream
        self.run_state: Run | None = None
        self.results: Results | None = None
        self.defaults = Defaults()
        self._resume_from: tuple[Path, dict[str, Any]] | None = None
        self._stop_requested = False
        self._control: Control | None = None
        self._started = False
        self._lock: RunLock | None = None  # the run directory's, while this process builds and runs in it
        #: the plugins given in Python that take part in training, by name (set by :meth:`build`)
        self.given_plugins: dict[str, type] = {}

    @classmethod
    def resume(
        cls,
        run_dir: str | Path,
        overrides: list[str] | tuple[str, ...] = (),
        *,
        plugins: dict[str, Any] | None = None,
        stream: Stream | None = None,
    ) -> Experiment:
        """The experiment of the run directory ``run_dir``, set to continue from
        its newest readable checkpoint when :meth:`run` is called.

        The config is ``run_dir/config.yaml`` with ``overrides``; only ``device``,
        ``threads`` and ``checkpoint.*`` may differ from the checkpoint's (the run
        continues in ``run_dir``, so ``out`` cannot be overridden). A newer
        checkpoint that cannot be read is skipped with a
        :class:`~contlearn.checkpoint.CheckpointWarning`. ``plugins`` and
        ``stream`` are those the run was started with, if any.

        :raises ConfigError: not a run directory, or a config that differs.
        :raises CheckpointError: no readable checkpoint.
        """
        run_dir = Path(run_dir)
        config_file = run_dir / "config.yaml"
        if not config_file.is_file():
            raise ConfigError(f"'{run_dir}' is not a run directory: it has no config.yaml")
        if "out" in override_keys(overrides):
            raise ConfigError(f"a run resumes in its own directory '{run_dir}': 'out' cannot be overridden")
        classes = {n: p for n, p in given_plugins(plugins, "Experiment.resume(plugins=...)").items() if isinstance(p, type)}
        _check_stream(stream)
        with saved_run_config(), classes_given_again("Experiment.resume(run_dir, plugins={plugins})"):
            config = load_config(config_file, overrides, plugins=classes)  # checked as it was when the run started
        new = [name for name in classes if name not in config.plugins]
        if new:
            raise ConfigError(
                f"plugin classes {new} are given, but the run in '{run_dir}' has no such plugins: a resume "
                f"continues the run's own plugins"
            )
        if environment_rank() == 0:  # process 0 alone holds the lock; its peers checking it raced with each other
            refuse_if_in_use(run_dir, "a resume")  # before its checkpoints are read
        path, state = ckpt.latest(run_dir / ckpt.DIRNAME)
        try:
            defaults = schema_defaults(list(config.plugins), plugins=classes)
            run_state.check_config(state["config"], to_container(config), path.name, defaults)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (a resume may change only device, threads and checkpoint.*)") from None
        refuse_finished(run_dir, state)
        with saved_run_config():
            experiment = cls(config, out_dir=run_dir, plugins=plugins, stream=stream)
        experiment._resume_from = (path, state)
        return experiment

    def request_stop(self) -> None:
        """Stop after the current training step (or evaluation): write a
        checkpoint if the run has a directory, then raise
        :class:`~contlearn.errors.Interrupted`. Under torchrun the processes agree
        on it at the end of the epoch or at the next periodic checkpoint, and stop
        there. Safe to call from a signal handler."""
        self._stop_requested = True
        if self._control is not None:
            self._control.stop = True

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """While active (in the main thread), the first Ctrl-C or SIGTERM (what
        a scheduler sends before it kills a job) calls :meth:`request_stop`; a
        second one of the same signal acts at once (Ctrl-C: ``KeyboardInterrupt``;
        SIGTERM: the process ends), except a SIGTERM under torchrun, which a
        scheduler and torchrun both send to each process (torchrun kills them
        after its ``--shutdown_timeout``)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        when, process = "after the current step", ""
        if environment_world_size() > 1:  # the processes agree on it there
            when = "at the end of the epoch or the next periodic checkpoint (checkpoint.every_n_steps)"
            process = f"[rank {environment_rank()}] "
        names = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
        at_once: dict[signal.Signals, Callable[[int, FrameType | None], Any] | signal.Handlers] = {
            signal.SIGINT: signal.default_int_handler,
            signal.SIGTERM: signal.SIG_DFL,
        }

        def on_signal(signum: int, frame: Any) -> None:
            sig = signal.Signals(signum)
            again = f"{names[sig]} again to stop at once"
            if process and sig == signal.SIGTERM:  # this handler stays: the next SIGTERM is the same request
                if self._stop_requested:
                    return
                again = "torchrun kills the processes after its --shutdown_timeout"
            else:
                signal.signal(sig, at_once[sig])
            print(f"\n{process}{names[sig]}: stopping {when} ({again})", file=sys.stderr, flush=True)
            self.request_stop()

        previous = {signum: signal.signal(signum, on_signal) for signum in names}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    # ------------------------------------------------------------------ build

    def build(self) -> Run:
        """Seed, then build the stream, the model and the plugins; nothing trains yet.
        A run directory this call creates is removed again if the build fails
        before anything is written in it."""
        dist, device = DistributedView.from_environment(resolve_device(self.config.device))
        if not dist.is_main:
            self.out_dir = None  # process 0 writes the run directory
        created = self.out_dir if self.out_dir is not None and not self.out_dir.exists() else None
        try:
            if self.out_dir is not None:
                prepare_run_dir(self.out_dir)
                if self._lock is None:  # an earlier build() of this experiment may hold it already
                    self._lock = hold(self.out_dir, "a resume" if self._resume_from is not None else "a run")
                if self._resume_from is None:
                    refuse_existing_run(self.out_dir)
            return self._build(dist, device)
        except BaseException:
            if created is not None:
                with contextlib.suppress(OSError):  # not empty (another process's lock), or gone: left as it is
                    if self._lock is not None:
                        self._lock.path.unlink()
                    created.rmdir()
            self._release_lock()
            raise

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _build(self, dist: DistributedView, device: torch.device) -> Run:
        cfg = self.config
        seed_everything(cfg.seed)
        stream = (self.stream if self.stream is not None else build_stream(cfg.scenario, cfg.seed)).to(device)
        untestable = [exp.index for exp in stream if len(exp.test) == 0]
        if untestable:
            raise DataError(
                f"experience {untestable[0]} has no test samples: every experience needs test data, "
                f"since each is evaluated after every experience (an empty one would count as accuracy 0)"
            )
        model = create_model(cfg.model, stream.input_shape).to(device)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
            _inputs_channels_last(stream)

        _import_what_optimizers_import()
        registry = PluginRegistry.load(given=self.plugin_classes, requested=list(cfg.plugins))
        plugins: dict[str, Any] = {}
        for name in cfg.plugins:
            section = cfg.plugins[name]
            value = OmegaConf.to_object(section) if isinstance(section, DictConfig) and len(section) else None
            plugins[name] = registry.create(name, value if value is not None else _default_config(registry, name))
        for name, plugin in self.extra_plugins.items():
            if name in plugins:
                raise ConfigError(f"plugin name '{name}' is both in the config and passed to Experiment")
            if self._resume_from is None and _TRAINED_PLUGINS.get(id(plugin)) is plugin:
                raise ConfigError(
                    f"the plugin object given as '{name}' has trained in another Experiment and keeps what it "
                    f"learnt there: give every Experiment new plugin objects (or the class, "
                    f"plugins={{'{name}': {type(plugin).__name__}}})"
                )
            plugins[name] = plugin
        pm = _manager.make_plugin_manager()
        _manager.register_plugins(pm, plugins, self.defaults)
        self.given_plugins = _given_plugins(self, pm)

        generator = torch.Generator().manual_seed(cfg.seed)
        run = Run(cfg, model, stream, device, pm.hook, plugins, generator, out_dir=self.out_dir, dist=dist)
        run.pm = pm  # type: ignore[attr-defined]
        self.run_state = run
        if self.out_dir is not None:
            write_atomic(self.out_dir / "config.yaml", to_yaml(cfg))
        return run

    # -------------------------------------------------------------------- run

    def run(self) -> Results:
        """Train on every experience of the stream (from the checkpoint, after
        :meth:`resume`) and return the results."""
        with cpu_threads(self.config.threads):
            return self._run()

    def _run(self) -> Results:
        if self._started:
            raise ContlearnError(
                "this Experiment has already run, and its plugin objects keep what they learnt: make a new "
                "Experiment (with new plugin objects) for another run, or Experiment.resume(run_dir) to "
                "continue a stopped one"
            )
        t_start = time.perf_counter()
        run = self.build()
        self._started = True  # from here on, plugins learn
        for plugin in self.extra_plugins.values():
            with contextlib.suppress(TypeError):  # an object without weak references is not tracked
                _TRAINED_PLUGINS[id(plugin)] = plugin
        progress = Progress()
        ctl = self._control = Control(self, run, progress, t_start)
        resumed: Resumed | None = None
        try:
            if self._resume_from is None:
                run.hook.setup(run=run)
                compile_model(run)
                if self.config.eval.fwt:
                    t0 = time.perf_counter()
                    progress.initial = evaluate_initial(run)
                    progress.timings["eval_seconds"] += time.perf_counter() - t0
            else:
                path, state = self._resume_from
                progress, resumed = run_state.restore(run, state, path.name, class_paths(self.given_plugins))
                compile_model(run)
                ctl.progress = progress
            timings = progress.timings
            for exp in run.stream.experiences[len(run.accuracy_rows) :]:
                t0 = ctl.t_experience = time.perf_counter()
                hooks = StepHooks.for_run(run, self.defaults)
                train_experience(run, exp, hooks, ctl, resumed)
                resumed = None
                t1 = time.perf_counter()
                row, progress.confusion = evaluate(run, hooks)
                timings["train_seconds"] += t1 - t0
                timings["eval_seconds"] += time.perf_counter() - t1
                run.accuracy_rows.append(row)
                run.experience = None
                metrics = {"kind": "eval", "experience": exp.index, "epoch": None, "accuracy": row,
                           "average_accuracy": float(np.mean(row))}
                try:
                    run.hook.on_metrics(run=run, metrics=metrics)
                except Exception:  # a logger that failed (a full disk) costs neither the experience nor the results
                    with contextlib.suppress(ContlearnError):
                        ctl.save_experience(run, exp)
                        if len(run.accuracy_rows) == len(run.stream):
                            self._finish(run, progress, t_start)
                    raise
                ctl.end_of_experience(run, exp)
            results = self._finish(run, progress, t_start)
        finally:
            self._control = None
            try:
                run.hook.teardown(run=run)
            finally:
                self._release_lock()
        return results

    def _finish(self, run: Run, progress: Progress, t_start: float) -> Results:
        """The results of the run, trained on every experience, kept and written."""
        progress.timings["total_seconds"] = progress.elapsed + time.perf_counter() - t_start
        results = self.results = self._results(run, progress.initial, progress.confusion, progress.timings)
        if self.out_dir is not None:
            write_results(self.out_dir, results)
        return results

    def _results(self, run: Run, initial, confusion, timings) -> Results:
        R = run.accuracy_rows
        return Results(
            name=str(self.config.name),
            seed=int(self.config.seed),
            accuracy_matrix=R,
            initial_accuracy=initial,
            per_class_accuracy=per_class_accuracy(confusion) if confusion is not None else [],
            class_names=run.stream.class_names,
            timings=timings,
            versions=versions(),
            config=to_container(self.config),
            given={
                "plugins": class_paths(self.given_plugins),
                "stream": stream_signature(run.stream) if self.stream is not None else None,
            },
            **summary(R, initial),  # type: ignore[arg-type]
        )

    def unlearn(self, **request: Any) -> dict[str, Any]:
        """Ask the strategies to make the trained model forget, e.g.
        ``unlearn(classes=[3])``; returns the report of the ``unlearn`` hook."""
        run = self.run_state
        if run is None or not run.accuracy_rows:
            raise ContlearnError("nothing to unlearn: the experiment has not been trained")
        report = run.hook.unlearn(run=run, request=request)
        if report is None:
            raise ContlearnError("no active plugin implements unlearning (add one, e.g. plugins.ssd)")
        return report

    def summary_text(self) -> str:
        """The table printed at the end of a run."""
        if self.results is None:
            raise ContlearnError("the experiment has not run yet")
        return format_summary(self.results)


def _import_what_optimizers_import() -> None:
    """torch.optim imports ``torch._dynamo`` when a process makes its first
    optimizer, which takes seconds; importing it while the run is built keeps
    that out of the first experience's training time (``timings``)."""
    with contextlib.suppress(ImportError):  # a torch built without it: nothing to move
        import torch._dynamo  # noqa: F401


def compile_model(run: Run) -> None:
    """``train.compile``: compile the model once the plugins' ``setup`` has shaped it
    (surgery included), in place, so parameter names and checkpoints are unchanged.
    A model may say what to compile (``compile_parts(mode)``, e.g. MEMO's network,
    which compiles each block it adds); otherwise the backbone, whose shapes do not
    change, while the growing head stays eager and never forces a recompile."""
    cfg = run.config.train
    if not cfg.compile:
        return
    compile_parts = getattr(run.model, "compile_parts", None)
    if callable(compile_parts):
        compile_parts(cfg.compile_mode)
    else:
        run.model.backbone.compile(mode=cfg.compile_mode)


def _inputs_channels_last(stream: Stream) -> None:
    """Store 4-d in-memory inputs in channels-last format, once."""
    for exp in stream:
        for data in (exp.train, exp.test, exp.val):
            if isinstance(data, TensorData) and data.x.dim() == 4:
                data.x = data.x.contiguous(memory_format=torch.channels_last)


def _default_config(registry: PluginRegistry, name: str) -> Any:
    cls = registry.get(name).config_class
    return cls() if cls is not None else None


_OBSERVING_HOOKS = frozenset({"setup", "teardown", "on_metrics"})


def _given_plugins(experiment: Experiment, pm: pluggy.PluginManager) -> dict[str, type]:
    """The classes of the plugins given to ``experiment`` in Python that take part
    in training: every class given, and every object that implements a hook
    other than ``setup``, ``teardown`` and ``on_metrics`` or has a ``state_dict``
    (displays and loggers are neither)."""
    given = dict(experiment.plugin_classes)
    for name, plugin in experiment.extra_plugins.items():
        hooks = {c.name for c in pm.get_hookcallers(plugin) or ()}
        if callable(getattr(plugin, "state_dict", None)) or hooks - _OBSERVING_HOOKS:
            given[name] = type(plugin)
    return given


def stream_of(config: DictConfig) -> Stream:
    """The stream a config describes (for inspection, without building a run)."""
    seed_everything(config.seed)
    return build_stream(config.scenario, config.seed)
