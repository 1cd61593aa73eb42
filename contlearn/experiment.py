"""The run loop: build stream, model and plugins from a config, train each
experience, evaluate on every experience, report.

The loop calls the hooks of :mod:`contlearn.hookspecs` at their phases. It is
written to cost next to nothing over a hand-written PyTorch loop: data stays
on the device and is batched by index; losses are kept as device tensors and
read once per epoch; hooks that no plugin implements are not called, and
``firstresult`` hooks only the defaults answer are called directly.

With a run directory, a checkpoint is written after every experience (and every
``checkpoint.every_n_steps`` steps); :meth:`Experiment.resume` continues a run
from its newest one (:mod:`contlearn.checkpoint`, docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pluggy
import torch
from omegaconf import DictConfig, OmegaConf

from contlearn import _manager
from contlearn import checkpoint as ckpt
from contlearn._registry import PluginRegistry
from contlearn.checkpoint import EpochState, Progress, Resumed
from contlearn.config import (
    load_config,
    merge_config,
    override_keys,
    schema_defaults,
    to_container,
    to_yaml,
)
from contlearn.defaults import Defaults, set_epoch_lr
from contlearn.distributed import DistributedView
from contlearn.errors import (
    ConfigError,
    ContlearnError,
    DataError,
    Interrupted,
    PluginError,
    TrainingError,
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
from contlearn.scenarios import Batch, Experience, Stream, TensorData, build_stream


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


def refuse_existing_run(out_dir: Path) -> None:
    """:raises ConfigError: when ``out_dir`` already holds a run (a checkpoint or
    results): a new run there would overwrite its results, and its newer
    checkpoints would shadow the new run's (and be deleted by them). A directory
    left by a run that stopped before its first checkpoint can be reused."""
    if ckpt.list_checkpoints(out_dir / ckpt.DIRNAME):
        raise ConfigError(
            f"'{out_dir}' already holds a run (checkpoints): continue it with "
            f"'contlearn resume {out_dir}', or give the new run another directory"
        )
    if (out_dir / "results.json").exists():
        raise ConfigError(
            f"'{out_dir}' already holds a finished run (results.json): give the new run another directory"
        )


def _refuse_finished(run_dir: Path, state: dict[str, Any]) -> None:
    """:raises ConfigError: when the run wrote its results after the checkpoint
    it would resume from: there is nothing left to train, and resuming would
    only rewrite them."""
    results = run_dir / "results.json"
    if state["position"]["inside_experience"] or not results.is_file():
        return
    try:
        rows = len(json.loads(results.read_text(encoding="utf-8"))["accuracy_matrix"])
    except (ValueError, KeyError, TypeError):
        return  # unreadable results: resuming writes them again
    if rows == state["position"]["completed"]:
        raise ConfigError(f"'{run_dir}' is finished: its {rows} experiences are trained and its results written")


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; asking for an absent CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was asked for but CUDA is not available; use device=auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}' was asked for but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device '{name}' was asked for but MPS is not available here; use device=auto or cpu")
    return device


class _StepHooks:
    """The hooks of a training or evaluation step, bound once per experience:
    hooks nobody implements become ``None``, ``firstresult`` hooks that only
    the defaults answer call the default directly (no pluggy dispatch)."""

    def __init__(self, pm: pluggy.PluginManager, defaults: Defaults, autocast: bool = False, device_type: str = "cpu"):
        def bind(name: str) -> Callable[..., Any] | None:
            impls = getattr(pm.hook, name).get_hookimpls()
            if not impls:
                return None
            if all(impl.plugin_name == _manager.DEFAULTS_NAME for impl in impls):
                return getattr(defaults, name)
            return getattr(pm.hook, name)

        self.extra_samples = bind("extra_samples")
        self.forward = bind("forward")
        self.compute_loss = bind("compute_loss")
        self.loss_terms = bind("loss_terms")
        self.after_backward = bind("after_backward")
        self.after_step = bind("after_step")
        self.predict = bind("predict")
        self.after_eval_batch = bind("after_eval_batch")
        #: bf16 autocast for forward and loss (``train.amp``); None when off
        self.autocast = torch.autocast(device_type, dtype=torch.bfloat16) if autocast else None

    @classmethod
    def for_run(cls, run: Run, defaults: Defaults) -> _StepHooks:
        return cls(run.pm, defaults, bool(run.config.train.amp), run.device.type)  # type: ignore[attr-defined]


class Experiment:
    """One continual-learning experiment.

    :param config: a config from :func:`~contlearn.load_config`, or a YAML path or
        shipped name to load, or ``None`` for the default experiment.
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
        config: DictConfig | str | Path | None = None,
        overrides: list[str] | tuple[str, ...] = (),
        *,
        out_dir: str | Path | None = None,
        plugins: dict[str, Any] | None = None,
        stream: Stream | None = None,
    ):
        given = dict(plugins or {})
        self.plugin_classes = {name: p for name, p in given.items() if isinstance(p, type)}
        if config is None or isinstance(config, (str, Path)):
            config = load_config(config, overrides, plugins=self.plugin_classes)
        else:  # validated again: the caller may have edited it
            config = merge_config(config, overrides, plugins=self.plugin_classes)
        unset = [name for name in self.plugin_classes if name not in config.plugins]
        if unset:  # a class given is active, with its defaults when the config does not set it
            config = merge_config(config, [f"plugins.{name}={{}}" for name in unset], plugins=self.plugin_classes)
        self.config: DictConfig = config
        out = out_dir if out_dir is not None else config.out
        self.out_dir: Path | None = Path(out) if out is not None else None
        self.extra_plugins = {name: p for name, p in given.items() if name not in self.plugin_classes}
        self.stream = stream
        self.run_state: Run | None = None
        self.results: Results | None = None
        self.defaults = Defaults()
        self._resume_from: tuple[Path, dict[str, Any]] | None = None
        self._stop_requested = False
        self._control: _Control | None = None
        self._started = False

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
        classes = {name: p for name, p in (plugins or {}).items() if isinstance(p, type)}
        try:
            config = load_config(config_file, overrides, plugins=classes)
        except PluginError as exc:
            if not str(exc).startswith("unknown plugin"):
                raise
            raise PluginError(
                f"{exc} (if the run was given it as a class in Python, give it again: "
                f"Experiment.resume(run_dir, plugins={{'name': TheClass}}))"
            ) from None
        new = [name for name in classes if name not in config.plugins]
        if new:
            raise ConfigError(
                f"plugin classes {new} are given, but the run in '{run_dir}' has no such plugins: a resume "
                f"continues the run's own plugins"
            )
        path, state = ckpt.latest(run_dir / ckpt.DIRNAME)
        try:
            defaults = schema_defaults(list(config.plugins), plugins=classes)
            ckpt.check_config(state["config"], to_container(config), path.name, defaults)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (a resume may change only device, threads and checkpoint.*)") from None
        _refuse_finished(run_dir, state)
        experiment = cls(config, out_dir=run_dir, plugins=plugins, stream=stream)
        experiment._resume_from = (path, state)
        return experiment

    def request_stop(self) -> None:
        """Stop after the current training step (or evaluation): write a
        checkpoint if the run has a directory, then raise
        :class:`~contlearn.errors.Interrupted`. Safe to call from a signal handler."""
        self._stop_requested = True
        if self._control is not None:
            self._control.stop = True

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """While active (in the main thread), the first Ctrl-C calls
        :meth:`request_stop`; a second one interrupts at once
        (``KeyboardInterrupt``)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_sigint(signum: int, frame: Any) -> None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            print("\nstopping after the current step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
            self.request_stop()

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    # ------------------------------------------------------------------ build

    def build(self) -> Run:
        """Seed, then build the stream, the model and the plugins; nothing trains yet."""
        cfg = self.config
        dist, device = DistributedView.from_environment(resolve_device(cfg.device))
        if not dist.is_main:
            self.out_dir = None  # process 0 writes the run directory
        if self.out_dir is not None:
            if self._resume_from is None:
                refuse_existing_run(self.out_dir)
            prepare_run_dir(self.out_dir)
        seed_everything(cfg.seed)
        stream = (self.stream if self.stream is not None else build_stream(cfg.scenario, cfg.seed)).to(device)
        model = create_model(cfg.model, stream.input_shape).to(device)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
            _inputs_channels_last(stream)

        _import_what_optimizers_import()
        registry = PluginRegistry.load(given=self.plugin_classes)
        plugins: dict[str, Any] = {}
        for name in cfg.plugins:
            section = cfg.plugins[name]
            value = OmegaConf.to_object(section) if isinstance(section, DictConfig) and len(section) else None
            plugins[name] = registry.create(name, value if value is not None else _default_config(registry, name))
        for name, plugin in self.extra_plugins.items():
            if name in plugins:
                raise ConfigError(f"plugin name '{name}' is both in the config and passed to Experiment")
            plugins[name] = plugin
        pm = _manager.make_plugin_manager()
        _manager.register_plugins(pm, plugins, self.defaults)

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
        progress = Progress()
        ctl = self._control = _Control(self, run, progress, t_start)
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
                given = _class_paths(_given_plugins(self, run))
                progress, resumed = ckpt.restore(run, state, path.name, given)
                compile_model(run)
                ctl.progress = progress
            timings = progress.timings
            for exp in run.stream.experiences[len(run.accuracy_rows) :]:
                t0 = ctl.t_experience = time.perf_counter()
                train_experience(run, exp, _StepHooks.for_run(run, self.defaults), ctl, resumed)
                resumed = None
                t1 = time.perf_counter()
                row, progress.confusion = evaluate(run, _StepHooks.for_run(run, self.defaults))
                timings["train_seconds"] += t1 - t0
                timings["eval_seconds"] += time.perf_counter() - t1
                run.accuracy_rows.append(row)
                run.experience = None
                run.hook.on_metrics(
                    run=run,
                    metrics={
                        "kind": "eval",
                        "experience": exp.index,
                        "epoch": None,
                        "accuracy": row,
                        "average_accuracy": float(np.mean(row)),
                    },
                )
                ctl.end_of_experience(run, exp)
            timings["total_seconds"] = progress.elapsed + time.perf_counter() - t_start
            self.results = self._results(run, progress.initial, progress.confusion, timings)
            if self.out_dir is not None:
                write_results(self.out_dir, self.results)
        finally:
            self._control = None
            run.hook.teardown(run=run)
        return self.results

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
                "plugins": _class_paths(_given_plugins(self, run)),
                "stream": ckpt.stream_signature(run.stream) if self.stream is not None else None,
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


def _given_plugins(experiment: Experiment, run: Run) -> dict[str, type]:
    """The classes of the plugins given to ``experiment`` in Python that take part
    in training: every class given, and every object that implements a hook
    other than ``setup``, ``teardown`` and ``on_metrics`` or has a ``state_dict``
    (displays and loggers are neither)."""
    pm: pluggy.PluginManager = run.pm  # type: ignore[attr-defined]
    given = dict(experiment.plugin_classes)
    for name, plugin in experiment.extra_plugins.items():
        hooks = {c.name for c in pm.get_hookcallers(plugin) or ()}
        if callable(getattr(plugin, "state_dict", None)) or hooks - _OBSERVING_HOOKS:
            given[name] = type(plugin)
    return given


def _class_paths(classes: dict[str, type]) -> dict[str, str]:
    return {name: f"{cls.__module__}.{cls.__qualname__}" for name, cls in classes.items()}


def _how_to_resume(experiment: Experiment, run: Run) -> str:
    """The command that continues this run. ``contlearn resume`` rebuilds only the
    installed plugins (and its own displays and logs): a run given a stream, or
    plugins that take part in training, continues from Python with them."""
    plugins = _given_plugins(experiment, run)
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
        return f"contlearn resume {experiment.out_dir}"
    return f"Experiment.resume({str(experiment.out_dir)!r}, {', '.join(given)}) in Python, with {' and '.join(what)}"


class _Control:
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
        self.every: int | None = cfg.every_n_steps if self.directory is not None else None
        self.keep_last = int(cfg.keep_last)
        self.stop = experiment._stop_requested
        self.out_dir = out
        self.how_to_resume = _how_to_resume(experiment, run)
        self.given_plugins = _class_paths(_given_plugins(experiment, run))
        self.config = to_container(run.config)
        self.progress = progress
        self.t_start = self.t_experience = t_start
        if self.directory is not None:
            ckpt.remove_temporaries(self.directory)

    def due(self, global_step: int) -> bool:
        """Whether the step just done ends with a checkpoint or a stop."""
        return self.stop or (self.every is not None and global_step % self.every == 0)

    def end_of_step(self, run: Run, exp: Experience, epoch: EpochState) -> None:
        where = f"step {run.step} of experience {exp.index} (epoch {run.epoch})"
        path = None
        if self.directory is not None:
            names, values = loss_table(epoch.losses, epoch.terms)
            raise_if_not_finite(run, exp, names, values)
            path = self._save(run, exp, epoch, time.perf_counter() - self.t_experience)
        if self.stop:
            raise Interrupted(self._stopped(f"after {where}", path))

    def end_of_experience(self, run: Run, exp: Experience) -> None:
        path = self._save(run, exp, None, 0.0) if self.directory is not None else None
        if self.stop and exp.index < len(run.stream) - 1:
            raise Interrupted(self._stopped(f"after experience {exp.index} (experiences 0-{len(run.stream) - 1})", path))

    def _save(self, run: Run, exp: Experience, epoch: EpochState | None, train_so_far: float) -> Path:
        assert self.directory is not None
        check_weights(run, exp)
        timings = dict(self.progress.timings)
        timings["train_seconds"] += train_so_far
        now = Progress(timings, self.progress.initial, self.progress.confusion,
                       elapsed=self.progress.elapsed + time.perf_counter() - self.t_start)
        state = ckpt.capture(run, self.config, now, epoch, self.given_plugins)
        return ckpt.write(self.directory, state, self.keep_last)

    def _stopped(self, where: str, path: Path | None) -> str:
        if path is None:
            return f"interrupted {where}; no checkpoint was written (no run directory, or checkpoint.enabled=false)"
        return f"interrupted {where}; state saved in {path}; continue with: {self.how_to_resume}"


# ---------------------------------------------------------------------- training


def train_experience(
    run: Run,
    exp: Experience,
    hooks: _StepHooks,
    ctl: _Control | None = None,
    resumed: Resumed | None = None,
) -> None:
    """Train one experience: grow the head, call the experience hooks, run the
    epochs. ``resumed``: continue where a checkpoint inside it left off (the
    experience hooks have run; the data and optimizer are restored)."""
    cfg = run.config.train
    if resumed is None:
        run.experience, run.epoch, run.step = exp, 0, 0
        run.model.adapt(exp.classes, exp.task)
        data: TensorData = run.hook.train_data(run=run, exp=exp)
        check_training_data(run, exp, data)
        run.hook.before_experience(run=run, exp=exp)
        run.optimizer = run.hook.configure_optimizer(run=run, exp=exp)
    else:
        data = resumed.data
    run.model.train()
    try:
        for epoch in range(run.epoch, cfg.epochs):
            run.epoch = epoch
            set_epoch_lr(run.optimizer, cfg, epoch)
            batches = data.batches(cfg.batch_size, shuffle=True, generator=run.generator)
            if resumed is not None:
                state = resumed.epoch
                batches = _rest_of_epoch(batches, state, run.generator)
                resumed = None
            else:
                state = EpochState([], {}, run.generator.get_state())
            for batch in batches:
                train_step(run, batch, hooks, state.losses, state.terms)
                if ctl is not None and ctl.due(run.global_step):
                    ctl.end_of_step(run, exp, state)
            report_epoch(run, exp, state.losses, state.terms)
    except IndexError as exc:  # cross-entropy's "Target 12 is out of bounds", e.g. from extra samples
        if "out of bounds" not in str(exc):
            raise
        n_out = getattr(run.model.head, "out_features", "?")
        raise DataError(
            f"a training batch of experience {exp.index} has a label outside the head's {n_out} outputs "
            f"({exc}); check the plugin that adds samples"
        ) from None
    run.hook.after_experience(run=run, exp=exp)


def check_training_data(run: Run, exp: Experience, data: Any) -> None:
    """An experience's training data is not empty and its labels fit the head (one host read)."""
    if len(data) == 0:
        raise TrainingError(f"experience {exp.index} has no training samples")
    n_out = getattr(run.model.head, "out_features", None)
    if n_out is not None:
        low, high = (int(v) for v in torch.stack(torch.aminmax(data.y)).cpu())
        if low < 0 or high >= n_out:
            raise DataError(
                f"experience {exp.index} trains on label {low if low < 0 else high}, outside the head's "
                f"{n_out} outputs (labels 0 to {n_out - 1}: the classes seen so far)"
            )


def _rest_of_epoch(batches: Iterator[Batch], state: EpochState, generator: torch.Generator) -> Iterator[Batch]:
    """The batches of an epoch that a checkpoint interrupted: the order is drawn
    again from the generator's state at the epoch's start, the batches done are
    skipped, and the generator is set back to the checkpoint's state."""
    now = generator.get_state()
    generator.set_state(state.generator)
    with torch.random.fork_rng(devices=[]):
        for _ in range(len(state.losses)):
            next(batches)
    generator.set_state(now)
    return batches


def _forward_and_losses(
    run: Run, batch: Batch, hooks: _StepHooks, terms: dict[str, list[torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The base loss and the total with every plugin's terms (appended to ``terms``)."""
    out = hooks.forward(run=run, batch=batch)
    loss = hooks.compute_loss(run=run, batch=batch, out=out)
    if not isinstance(loss, torch.Tensor) or loss.dim():
        raise TrainingError(f"compute_loss must return a scalar loss tensor, got {_describe(loss)}")
    total = loss
    if hooks.loss_terms is not None:
        seen: set[str] = set()
        for result in hooks.loss_terms(run=run, batch=batch, out=out):
            if not isinstance(result, dict):
                raise TrainingError(f"loss_terms must return a dict of named loss tensors or None, got {type(result).__name__}")
            for name, value in result.items():
                if not isinstance(value, torch.Tensor):
                    raise TrainingError(
                        f"loss term '{name}' is a {type(value).__name__}, not a tensor: it would carry no gradient"
                    )
                if value.dim():
                    raise TrainingError(
                        f"loss term '{name}' has shape {tuple(value.shape)}: a loss term is a scalar (reduce it, "
                        f"e.g. with .mean())"
                    )
                if name in seen:
                    raise TrainingError(f"two plugins return a loss term named '{name}'")
                seen.add(name)
                total = total + value
                terms.setdefault(name, []).append(value.detach())
    return loss, total


def _describe(value: Any) -> str:
    """What a hook returned, for an error message."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return "None" if value is None else f"a {type(value).__name__}"


def train_step(
    run: Run,
    batch: Batch,
    hooks: _StepHooks,
    losses: list[torch.Tensor],
    terms: dict[str, list[torch.Tensor]],
) -> None:
    """One optimisation step; losses are appended as device tensors, never read here."""
    if hooks.extra_samples is not None:
        extra = hooks.extra_samples(run=run, batch=batch)
        if extra:
            wrong = next((b for b in extra if not isinstance(b, Batch)), None)
            if wrong is not None:
                raise TrainingError(f"extra_samples must return a Batch or None, got {_describe(wrong)}")
            batch = Batch.cat([batch, *extra])
    if run.dist.world_size > 1:  # this process's share of the global batch (contlearn.distributed)
        rows, weight = run.dist.share(len(batch))
        batch = Batch(batch.x[rows], batch.y[rows], batch.t[rows])
    if hooks.autocast is None:
        loss, total = _forward_and_losses(run, batch, hooks, terms)
    else:
        with hooks.autocast:
            loss, total = _forward_and_losses(run, batch, hooks, terms)
    optimizer = run.optimizer
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if run.dist.world_size > 1:
        run.dist.sum_gradients_((p for group in optimizer.param_groups for p in group["params"]), weight)
    if hooks.after_backward is not None:
        hooks.after_backward(run=run)
    optimizer.step()
    if hooks.after_step is not None:
        hooks.after_step(run=run)
    losses.append(loss.detach())
    run.step += 1
    run.global_step += 1


def loss_table(
    losses: list[torch.Tensor], terms: dict[str, list[torch.Tensor]], dist: DistributedView | None = None
) -> tuple[list[str], torch.Tensor]:
    """The names and the [terms, steps] values of an epoch's losses so far, read
    once; with ``dist``, averaged over the processes (a collective: every process
    must call it)."""
    names = ["loss", *terms]
    values = torch.stack([torch.stack(losses), *(torch.stack(v) for v in terms.values())]).float()
    if dist is not None and dist.world_size > 1:
        values = dist.all_reduce_(values) / dist.world_size
    return names, values.cpu()


def raise_if_not_finite(run: Run, exp: Experience, names: list[str], values: torch.Tensor) -> None:
    """:raises TrainingError: naming the first step with a non-finite loss and its bad terms."""
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        bad_step = int((~finite).any(dim=0).nonzero()[0])
        bad_terms = [names[k] for k in range(len(names)) if not finite[k, bad_step]]
        first_step = run.step - values.shape[1] + bad_step + 1  # numbered from 1, as in the stop messages
        raise TrainingError(
            f"non-finite loss at step {first_step} (epoch {run.epoch}) of experience {exp.index}: "
            f"{', '.join(bad_terms)} went bad; lower train.lr or check the plugin that adds it"
        )


def check_weights(run: Run, exp: Experience) -> None:
    """:raises TrainingError: when a model tensor holds a non-finite value (one host read)."""
    tensors = [(k, v) for k, v in run.model.state_dict().items() if v.is_floating_point() and v.numel()]
    if not tensors:
        return
    finite = torch.stack([torch.isfinite(v).all() for _, v in tensors]).cpu().tolist()
    bad = [k for (k, _), ok in zip(tensors, finite, strict=True) if not ok]
    if bad:
        raise TrainingError(
            f"non-finite weights ({', '.join(bad[:3])}) after step {run.step} of experience {exp.index}; "
            f"no checkpoint is written for it: lower train.lr or check the plugins"
        )


def report_epoch(run: Run, exp: Experience, losses: list[torch.Tensor], terms: dict[str, list[torch.Tensor]]) -> None:
    """Read the epoch's losses once (averaged over the processes of a
    distributed run), stop on a non-finite one, report them."""
    names, values = loss_table(losses, terms, run.dist)
    raise_if_not_finite(run, exp, names, values)
    means = values.mean(dim=1).tolist()
    metrics: dict[str, Any] = {"kind": "epoch", "experience": exp.index, "epoch": run.epoch, "loss": means[0]}
    for name, value in zip(names[1:], means[1:], strict=True):
        metrics[f"loss/{name}"] = value
    run.hook.on_metrics(run=run, metrics=metrics)


# -------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(run: Run, hooks: _StepHooks) -> tuple[list[float], np.ndarray]:
    """Accuracy on every experience's test data (one host read), and the
    confusion matrix over all test data."""
    model = run.model
    was_training = model.training
    model.eval()
    n_classes = run.stream.n_classes
    confusion = torch.zeros(n_classes * n_classes, dtype=torch.long, device=run.device)
    correct, counts = [], []
    batch_size = run.config.train.eval_batch_size
    for exp in run.stream:
        hits = torch.zeros((), dtype=torch.long, device=run.device)
        for batch in exp.test.batches(batch_size):
            if hooks.autocast is None:
                pred = hooks.predict(run=run, batch=batch)
            else:
                with hooks.autocast:
                    pred = hooks.predict(run=run, batch=batch)
            if not isinstance(pred, torch.Tensor) or pred.shape != batch.y.shape or pred.is_floating_point():
                raise TrainingError(
                    f"predict must return the predicted class of each sample (an integer tensor of shape "
                    f"{tuple(batch.y.shape)}), got {_describe(pred)}"
                )
            if hooks.after_eval_batch is not None:
                hooks.after_eval_batch(run=run, batch=batch, predictions=pred)
            hits += (pred == batch.y).sum()
            confusion += torch.bincount(batch.y * n_classes + pred.clamp(0, n_classes - 1), minlength=n_classes**2)
        correct.append(hits)
        counts.append(max(len(exp.test), 1))
    model.train(was_training)
    row = (torch.stack(correct).double().cpu() / torch.tensor(counts, dtype=torch.double)).tolist()
    return row, confusion.view(n_classes, n_classes).cpu().numpy()


@torch.no_grad()
def evaluate_initial(run: Run) -> list[float]:
    """Accuracy of the untrained model on each experience, with its head grown to
    every class of the stream (a copy; the run's model and RNG are untouched).
    This is the baseline ``b`` of forward transfer."""
    with torch.random.fork_rng(devices=[]):
        model = copy.deepcopy(run.model)
        for exp in run.stream:
            model.adapt(exp.classes, exp.task)
        model.eval()
        row = []
        for exp in run.stream:
            hits = torch.zeros((), dtype=torch.long, device=run.device)
            for batch in exp.test.batches(run.config.train.eval_batch_size):
                hits += (model(batch.x, batch.t).logits.argmax(1) == batch.y).sum()
            row.append(hits)
    counts = torch.tensor([max(len(e.test), 1) for e in run.stream], dtype=torch.double)
    return (torch.stack(row).double().cpu() / counts).tolist()


def stream_of(config: DictConfig) -> Stream:
    """The stream a config describes (for inspection, without building a run)."""
    seed_everything(config.seed)
    return build_stream(config.scenario, config.seed)
