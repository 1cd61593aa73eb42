"""The run loop: build stream, model and plugins from a config, train each
experience, evaluate on every experience, report.

The loop calls the hooks of :mod:`contlearn.hookspecs` at their phases. It is
written to cost next to nothing over a hand-written PyTorch loop: data stays
on the device and is batched by index; losses are kept as device tensors and
read once per epoch; hooks that no plugin implements are not called, and
``firstresult`` hooks only the defaults answer are called directly.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pluggy
import torch
from omegaconf import DictConfig, OmegaConf

from contlearn import _manager
from contlearn._registry import PluginRegistry
from contlearn.config import load_config, parse_overrides, to_container, to_yaml, validate
from contlearn.defaults import Defaults
from contlearn.errors import ConfigError, ContlearnError, DataError, TrainingError
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


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; asking for an absent CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was asked for but CUDA is not available; use device=auto or cpu")
    return device


class _StepHooks:
    """The hooks of a training or evaluation step, bound once per experience:
    hooks nobody implements become ``None``, ``firstresult`` hooks that only
    the defaults answer call the default directly (no pluggy dispatch)."""

    def __init__(self, pm: pluggy.PluginManager, defaults: Defaults):
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


class Experiment:
    """One continual-learning experiment.

    :param config: a config from :func:`~contlearn.load_config`, or a YAML path or
        shipped name to load, or ``None`` for the default experiment.
    :param overrides: ``key=value`` strings applied on top of ``config``.
    :param out_dir: where to write the run directory; default ``config.out``,
        and nothing is written when both are unset.
    :param plugins: plugin objects to register after the configured ones, by
        name (for library use and tests: a plugin need not be installed).

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
    ):
        if config is None or isinstance(config, (str, Path)):
            config = load_config(config, overrides)
        elif overrides:
            config = validate(OmegaConf.merge(config, parse_overrides(overrides)))  # type: ignore[arg-type]
        self.config: DictConfig = config
        out = out_dir if out_dir is not None else config.out
        self.out_dir: Path | None = Path(out) if out is not None else None
        self.extra_plugins = dict(plugins or {})
        self.run_state: Run | None = None
        self.results: Results | None = None
        self.defaults = Defaults()

    # ------------------------------------------------------------------ build

    def build(self) -> Run:
        """Seed, then build the stream, the model and the plugins; nothing trains yet."""
        cfg = self.config
        if self.out_dir is not None:
            prepare_run_dir(self.out_dir)
        seed_everything(cfg.seed)
        device = resolve_device(cfg.device)
        stream = build_stream(cfg.scenario, cfg.seed).to(device)
        model = create_model(cfg.model, stream.input_shape).to(device)

        registry = PluginRegistry.load()
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
        run = Run(cfg, model, stream, device, pm.hook, plugins, generator, out_dir=self.out_dir)
        run.pm = pm  # type: ignore[attr-defined]
        self.run_state = run
        if self.out_dir is not None:
            write_atomic(self.out_dir / "config.yaml", to_yaml(cfg))
        return run

    # -------------------------------------------------------------------- run

    def run(self) -> Results:
        """Train on every experience of the stream and return the results."""
        t_start = time.perf_counter()
        run = self.build()
        pm: pluggy.PluginManager = run.pm  # type: ignore[attr-defined]
        timings = {"train_seconds": 0.0, "eval_seconds": 0.0}
        initial = None
        try:
            run.hook.setup(run=run)
            if self.config.eval.fwt:
                t0 = time.perf_counter()
                initial = evaluate_initial(run)
                timings["eval_seconds"] += time.perf_counter() - t0
            confusion = None
            for exp in run.stream:
                t0 = time.perf_counter()
                train_experience(run, exp, _StepHooks(pm, self.defaults))
                t1 = time.perf_counter()
                row, confusion = evaluate(run, _StepHooks(pm, self.defaults))
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
            timings["total_seconds"] = time.perf_counter() - t_start
            self.results = self._results(run, initial, confusion, timings)
            if self.out_dir is not None:
                write_results(self.out_dir, self.results)
        finally:
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


def _default_config(registry: PluginRegistry, name: str) -> Any:
    cls = registry.get(name).config_class
    return cls() if cls is not None else None


# ---------------------------------------------------------------------- training


def train_experience(run: Run, exp: Experience, hooks: _StepHooks) -> None:
    """Train one experience: grow the head, call the experience hooks, run the epochs."""
    cfg = run.config.train
    run.experience, run.epoch, run.step = exp, 0, 0
    run.model.adapt(exp.classes, exp.task)
    data: TensorData = run.hook.train_data(run=run, exp=exp)
    if len(data) == 0:
        raise TrainingError(f"experience {exp.index} has no training samples")
    n_out = getattr(run.model.head, "out_features", None)
    if n_out is not None and int(data.y.max()) >= n_out:
        raise DataError(
            f"experience {exp.index} has label {int(data.y.max())} but the head has {n_out} outputs"
        )
    run.hook.before_experience(run=run, exp=exp)
    run.optimizer = run.hook.configure_optimizer(run=run, exp=exp)
    run.model.train()
    for epoch in range(cfg.epochs):
        run.epoch = epoch
        losses: list[torch.Tensor] = []
        terms: dict[str, list[torch.Tensor]] = {}
        for batch in data.batches(cfg.batch_size, shuffle=True, generator=run.generator):
            train_step(run, batch, hooks, losses, terms)
        report_epoch(run, exp, losses, terms)
    run.hook.after_experience(run=run, exp=exp)


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
            batch = Batch.cat([batch, *extra])
    out = hooks.forward(run=run, batch=batch)
    loss = hooks.compute_loss(run=run, batch=batch, out=out)
    total = loss
    if hooks.loss_terms is not None:
        seen: set[str] = set()
        for result in hooks.loss_terms(run=run, batch=batch, out=out):
            for name, value in result.items():
                if name in seen:
                    raise TrainingError(f"two plugins return a loss term named '{name}'")
                seen.add(name)
                total = total + value
                terms.setdefault(name, []).append(value.detach())
    optimizer = run.optimizer
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if hooks.after_backward is not None:
        hooks.after_backward(run=run)
    optimizer.step()
    if hooks.after_step is not None:
        hooks.after_step(run=run)
    losses.append(loss.detach())
    run.step += 1
    run.global_step += 1


def report_epoch(run: Run, exp: Experience, losses: list[torch.Tensor], terms: dict[str, list[torch.Tensor]]) -> None:
    """Read the epoch's losses once, stop on a non-finite one, report them."""
    names = ["loss", *terms]
    values = torch.stack([torch.stack(losses), *(torch.stack(v) for v in terms.values())]).float().cpu()
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        bad_step = int((~finite).any(dim=0).nonzero()[0])
        bad_terms = [names[k] for k in range(len(names)) if not finite[k, bad_step]]
        first_step = run.step - values.shape[1] + bad_step
        raise TrainingError(
            f"non-finite loss at step {first_step} (epoch {run.epoch}) of experience {exp.index}: "
            f"{', '.join(bad_terms)} went bad; lower train.lr or check the plugin that adds it"
        )
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
            pred = hooks.predict(run=run, batch=batch)
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
