"""contlearn strategies inside Avalanche: an Avalanche ``SupervisedPlugin`` that
calls a contlearn plugin's hooks from the strategy's callbacks.

The contlearn hooks receive a real :class:`~contlearn.run.Run` whose fields are
views of the Avalanche strategy: ``run.model`` returns an
:class:`~contlearn.models.Output` (logits, ``features=None``) from the
strategy's model, ``run.optimizer`` / ``run.device`` are the strategy's,
``run.experience`` is the current Avalanche experience as a contlearn
:class:`~contlearn.scenarios.Experience` (data read lazily as tensors), and
``run.stream`` is the benchmark as a contlearn stream. A contlearn model given to
the strategy through ``as_avalanche_model`` is an Avalanche dynamic module that
grows its head before each training experience (:mod:`contlearn.interop._avalanche_model`). The mapping:

===================== ============================================ =====================
contlearn hook        Avalanche callback                           note
===================== ============================================ =====================
setup                 first ``before_training_exp``                before the first experience
before_experience     ``before_training_exp``                      after Avalanche built the optimizer;
                                                                   new parameters are added to it
configure_optimizer   ``before_training_exp``                      replaces ``strategy.optimizer``
extra_samples         ``before_forward``                           concatenated to ``strategy.mbatch``
loss_terms            ``before_backward``                          added to ``strategy.loss``
after_backward        ``after_backward``
after_step            ``after_training_iteration``                 after the optimizer step
after_experience      ``after_training_exp``
after_eval_batch      ``after_eval_iteration``                     predictions: argmax of the logits
on_metrics            ``after_training_epoch``, ``after_eval``     losses; accuracy row
teardown              none: ``adapter.close()``                    Avalanche has no end-of-run callback
unlearn               none: ``adapter.unlearn(**request)``         no post-hoc phase in Avalanche
train_data            cannot be mapped                             PluginError (but: below)
forward               cannot be mapped                             PluginError
compute_loss          cannot be mapped                             PluginError
predict               cannot be mapped                             PluginError
===================== ============================================ =====================

A plugin whose ``produces_train_data`` is false (``powerlaw`` with ``via:
extra_samples``) implements ``train_data`` for its work alone (a draw) and returns
nothing: the adapter calls it at ``before_training_exp``, before ``before_experience``
as the loop does, and refuses data it returns after all.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from contlearn import _manager
from contlearn._hook_results import check_extra_samples, check_loss_terms, duplicate_loss_term
from contlearn.errors import ContlearnError, PluginError
from contlearn.interop._avalanche_model import LogitsModel
from contlearn.interop._avalanche_stream import (
    LazyExperience,
    _loader,
    _unmasked,
    detect_setting,
    experience_classes,
    experience_index,
    experience_task,
    input_shape,
    lazy_stream,
    require_avalanche,
)
from contlearn.models import ContinualModel, Output
from contlearn.run import Run
from contlearn.scenarios import Batch, Stream

#: Hooks an Avalanche strategy cannot honour, and why.
UNSUPPORTED: dict[str, str] = {
    "train_data": "the Avalanche strategy builds its training data itself (strategy.adapted_dataset); "
    "write an Avalanche plugin with before_train_dataset_adaptation instead",
    "forward": "the Avalanche strategy computes the model output itself (strategy.forward)",
    "compute_loss": "the Avalanche strategy computes the base loss with its criterion; add terms with "
    "loss_terms, or give the strategy another criterion",
    "predict": "Avalanche's metrics read the model's logits (strategy.mb_output), not predictions",
}

#: Hooks the adapter calls, in the order the loop would.
MAPPED = (
    "setup",
    "before_experience",
    "configure_optimizer",
    "extra_samples",
    "loss_terms",
    "after_backward",
    "after_step",
    "after_experience",
    "after_eval_batch",
    "on_metrics",
    "teardown",
    "unlearn",
)


class AvalancheModelView(nn.Module):
    """An Avalanche model seen as a contlearn model: ``forward(x, task)`` returns
    ``Output(logits, features=None)``. Parameters are the model's own (prefixed
    ``module.``). ``adapt`` does nothing: Avalanche adapts its dynamic modules.

    ``trained_classes`` lists the class ids trained so far (the adapter sets it
    before each training experience), and the logits are cut to the columns up to
    the largest of them, as a contlearn head has them: Avalanche's
    ``IncrementalClassifier`` also grows on evaluation experiences, with its
    untrained units masked at -1000, and a copy of the model (a teacher) must not
    hand those on as the old model's answer. Where the ids have gaps (a shuffled
    class order kept unrenumbered), masked columns remain below the largest id;
    a teacher's consumer then reads the ``trained_classes`` columns only."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.trained_classes: list[int] | None = None

    @property  # type: ignore[override]
    def training(self) -> bool:
        """The wrapped model's mode: Avalanche switches the model it holds, not this view."""
        return self.module.training

    @training.setter
    def training(self, mode: bool) -> None:
        pass  # nn.Module's __init__ and train() set it; train() also switches the wrapped model

    def forward(self, x: torch.Tensor, task: torch.Tensor | None = None) -> Output:
        if task is None:
            logits = self.module(x)
        else:
            from avalanche.models.utils import avalanche_forward

            logits = avalanche_forward(self.module, x, task)
        width = self.trained_classes[-1] + 1 if self.trained_classes else None
        return Output(logits[:, :width] if width is not None and logits.shape[1] > width else logits)

    @property
    def trained_tasks(self) -> list[int] | None:
        """The task labels trained so far when the model is an Avalanche
        ``MultiTaskModule`` (each task has its own classifier), else ``None``."""
        from avalanche.models import MultiTaskModule

        if isinstance(self.module, MultiTaskModule):
            return sorted(int(t) for t in self.module.known_train_tasks_labels)
        return None

    def task_logits(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Task ``task``'s classifier on every sample of ``x`` (a ``MultiTaskModule``;
        one that implements only ``forward(x, task_labels)``, as ``MTSimpleMLP``
        does, is called with a task label per sample)."""
        from avalanche.models import MultiTaskModule

        module = self.module
        if isinstance(module, MultiTaskModule) and type(module).forward_single_task is not MultiTaskModule.forward_single_task:
            return module.forward_single_task(x, task)
        return self.module(x, torch.full((x.shape[0],), task, dtype=torch.long, device=x.device))

    def adapt(self, classes: Sequence[int], task: int = 0) -> None:
        pass


def model_view(model: nn.Module) -> ContinualModel:
    """What ``run.model`` is for an Avalanche strategy's model: the contlearn model
    a :class:`LogitsModel` wraps, or a view with a contlearn model's interface
    (``forward(x, task) -> Output``, ``adapt``), which plugins use as one."""
    return cast(ContinualModel, model.model if isinstance(model, LogitsModel) else AvalancheModelView(model))


class _AdapterLogic:
    """The callbacks; mixed into a ``SupervisedPlugin`` subclass made on first use,
    so that this module imports without Avalanche."""

    def __init__(self, plugin: Any, name: str, benchmark: Any, transforms: str, seed: int):
        super().__init__()
        self.plugin, self.name = plugin, name
        self.pm = _manager.make_plugin_manager()
        from contlearn.defaults import Defaults

        _manager.register_plugins(self.pm, {name: plugin}, Defaults())
        bad = [h for h in UNSUPPORTED if _manager.implemented(self.pm, h, include_defaults=False)]
        # train_data called for its work alone: the plugin says it returns no data (powerlaw's extra_samples)
        self._prepares_only = "train_data" in bad and getattr(plugin, "produces_train_data", True) is False
        if self._prepares_only:
            bad.remove("train_data")
        if bad:
            reasons = "; ".join(f"{h}: {UNSUPPORTED[h]}" for h in bad)
            raise PluginError(
                f"plugin '{name}' implements {', '.join(bad)}, which an Avalanche strategy cannot call ({reasons})"
            )
        self.implements = {h: _manager.implemented(self.pm, h, include_defaults=False) for h in MAPPED}
        self.benchmark, self.transforms, self.seed = benchmark, transforms, seed
        self.run: Run | None = None
        self._seen: dict[int, LazyExperience] = {}
        self._in_training = False
        self._losses: list[torch.Tensor] = []
        self._terms: dict[str, list[torch.Tensor]] = {}
        self._hits: dict[int, list[int]] = {}

    # ---------------------------------------------------------------- run view

    def _stream(self, strategy: Any) -> Stream | None:
        """The whole stream, when it is known: the benchmark (given, or the one
        Avalanche records for the experience's stream), with its test data; or the
        experience's origin stream, without test data. ``None`` when neither is."""
        if self.benchmark is not None:
            return self._lazy(self.benchmark.train_stream, self.benchmark.test_stream)
        with _unmasked(strategy.experience):
            origin = getattr(strategy.experience, "_origin_stream", None)
        if origin is None:
            return None
        bench = getattr(origin, "benchmark", None)
        if bench is not None and getattr(bench, "train_stream", None) is not None and origin.name == "train":
            return self._lazy(bench.train_stream, getattr(bench, "test_stream", ()))
        return self._lazy(origin, ())

    def _lazy(self, train: Any, test: Any) -> Stream:
        return lazy_stream(list(train), list(test), self.transforms, name="avalanche")

    def _seen_stream(self) -> Stream:
        """The experiences trained so far (no test data)."""
        exps = [self._seen[k] for k in sorted(self._seen)]
        classes = [e.classes for e in exps]
        return Stream(
            list(exps),
            setting=detect_setting([e.task for e in exps], classes),
            n_classes=max(c for cl in classes for c in cl) + 1,
            input_shape=self._input_shape,
            class_names=[],
            name="avalanche",
        )

    def _make_run(self, strategy: Any) -> Run:
        from omegaconf import OmegaConf

        from contlearn.config import ExperimentConfig

        missing = [a for a in ("optimizer", "train_mb_size", "eval_mb_size", "train_epochs", "device")
                   if getattr(strategy, a, None) is None]
        if missing:
            raise PluginError(
                f"contlearn plugin '{self.name}' needs a strategy trained by gradient steps (an optimizer, "
                f"train_mb_size, train_epochs...); {type(strategy).__name__} has no {', '.join(missing)}"
            )
        cfg = OmegaConf.structured(ExperimentConfig(name="avalanche", seed=self.seed))
        cfg.device = str(strategy.device)
        cfg.train.batch_size = int(strategy.train_mb_size)
        cfg.train.eval_batch_size = int(strategy.eval_mb_size)
        cfg.train.epochs = int(strategy.train_epochs)
        group = strategy.optimizer.param_groups[0]
        cfg.train.lr = float(group.get("lr", cfg.train.lr))
        cfg.train.momentum = float(group.get("momentum", 0.0))
        cfg.train.weight_decay = float(group.get("weight_decay", 0.0))
        kind = type(strategy.optimizer).__name__.lower()
        if kind in ("sgd", "adam", "adamw"):
            cfg.train.optimizer = kind
        config = getattr(self.plugin, "config", None)
        if dataclasses.is_dataclass(config):
            cfg.plugins[self.name] = OmegaConf.structured(config)
        self._input_shape = input_shape(strategy.experience, self.transforms)
        self._note_experience(strategy)
        whole = self._stream(strategy)
        self._whole = whole is not None
        run = Run(
            cfg,
            model_view(strategy.model),
            whole if whole is not None else self._seen_stream(),
            torch.device(strategy.device),
            self.pm.hook,
            {self.name: self.plugin},
            torch.Generator().manual_seed(self.seed),
        )
        run.pm = self.pm  # type: ignore[attr-defined]
        self._model_source = strategy.model
        return run

    def _note_experience(self, strategy: Any) -> LazyExperience:
        exp = strategy.experience
        index = experience_index(exp, len(self._seen))
        if index not in self._seen:
            self._seen[index] = LazyExperience(
                index,
                experience_classes(exp),
                experience_task(exp),
                _loader(exp, self.transforms, 1024, f"train experience {index}"),
                _loader(None, self.transforms, 1024, "", self._input_shape),  # test data unknown
            )
        return self._seen[index]

    def _batch(self, strategy: Any) -> Batch:
        mb = strategy.mbatch
        t = mb[2] if len(mb) > 2 else torch.zeros_like(mb[1])
        return Batch(mb[0], mb[1].long(), t.long())

    # ---------------------------------------------------------------- callbacks

    def before_training(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._in_training = True

    def after_training(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._in_training = False

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        run = self.run
        first = run is None
        if run is None:
            run = self.run = self._make_run(strategy)
        seen = self._note_experience(strategy)
        if not self._whole:
            run.stream = self._seen_stream()
        exp = run.stream[seen.index] if self._whole and seen.index < len(run.stream) else seen
        if self._model_source is not strategy.model:
            run.model, self._model_source = model_view(strategy.model), strategy.model
        if isinstance(run.model, AvalancheModelView):
            run.model.trained_classes = sorted({c for e in self._seen.values() for c in e.classes})
        run.device = torch.device(strategy.device)
        for e in run.stream:  # their data on the strategy's device, as contlearn's loop has it
            if isinstance(e, LazyExperience):
                e.device = run.device
        run.experience, run.epoch, run.step = exp, 0, 0
        run.optimizer = strategy.optimizer
        params = [id(p) for p in strategy.model.parameters()]  # before setup, which may add some (adapters)
        if first and self.implements["setup"]:
            self.pm.hook.setup(run=run)
        if self._prepares_only:
            self._prepare_data(run, exp)
        if self.implements["before_experience"]:
            self.pm.hook.before_experience(run=run, exp=exp)
        optimizer = None
        if self.implements["configure_optimizer"]:
            optimizer = self.pm.hook.configure_optimizer(run=run, exp=exp)
        if optimizer is not None:
            strategy.optimizer = optimizer
            if hasattr(strategy, "optimized_param_id"):
                strategy.optimized_param_id = None  # Avalanche re-reads it at the next experience
        elif [id(p) for p in strategy.model.parameters()] != params and hasattr(strategy, "make_optimizer"):
            strategy.make_optimizer()
        run.optimizer = strategy.optimizer

    def _training_run(self) -> Run:
        """The run, in a training callback after the first ``before_training_exp`` (which makes it)."""
        if self.run is None:
            raise ContlearnError(
                f"contlearn plugin '{self.name}': an Avalanche training callback came before before_training_exp"
            )
        return self.run

    def _prepare_data(self, run: Run, exp: Any) -> None:
        """Call the plugin's ``train_data`` for its work (a draw), as the loop does
        before ``before_experience``; data it returns after all are refused."""
        own = self.pm.subset_hook_caller("train_data", remove_plugins=[self.pm.get_plugin(_manager.DEFAULTS_NAME)])
        if own(run=run, exp=exp) is not None:
            raise PluginError(f"plugin '{self.name}' returned training data (train_data) though it says it "
                              f"produces none (produces_train_data is false): {UNSUPPORTED['train_data']}")

    def before_training_epoch(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._training_run().epoch = int(strategy.clock.train_exp_epochs)
        self._losses, self._terms = [], {}

    def before_forward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if not self.implements["extra_samples"]:
            return
        batch = self._batch(strategy)
        extra = [b for b in self.pm.hook.extra_samples(run=self.run, batch=batch) if b is not None]
        if not extra:
            return
        check_extra_samples(extra)
        if len(strategy.mbatch) > 3:
            raise PluginError(
                f"plugin '{self.name}' adds samples (extra_samples) but the strategy's mini-batch has "
                f"{len(strategy.mbatch)} fields; only (x, y) and (x, y, task) batches can be extended"
            )
        full = Batch.cat([batch, *extra])
        strategy.mbatch = [full.x, full.y, full.t][: max(len(strategy.mbatch), 2)]

    def before_backward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if self.implements["on_metrics"]:
            self._losses.append(strategy.loss.detach().reshape(()))
        if not self.implements["loss_terms"]:
            return
        batch = self._batch(strategy)
        out = Output(strategy.mb_output)
        last = getattr(strategy.model, "last_output", None)  # a LogitsModel keeps its model's Output
        if isinstance(last, Output) and last.logits.shape[0] == out.logits.shape[0]:
            out = Output(strategy.mb_output, last.features, last.extras)
        total = None
        seen: set[str] = set()
        for result in self.pm.hook.loss_terms(run=self.run, batch=batch, out=out):
            for name, value in check_loss_terms(result).items():
                if name in seen:
                    raise duplicate_loss_term(name, self.pm.hook.loss_terms)
                seen.add(name)
                total = value if total is None else total + value
                self._terms.setdefault(name, []).append(value.detach().reshape(()))
        if total is not None:
            strategy.loss = strategy.loss + total

    def after_backward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if self.implements["after_backward"]:
            self.pm.hook.after_backward(run=self.run)

    def after_training_iteration(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if self.implements["after_step"]:
            self.pm.hook.after_step(run=self.run)
        run = self._training_run()
        run.step += 1
        run.global_step += 1

    def after_training_epoch(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if not self.implements["on_metrics"] or not self._losses:
            return
        run = self._training_run()
        metrics: dict[str, Any] = {
            "kind": "epoch",
            "experience": run.experience.index if run.experience is not None else None,
            "epoch": run.epoch,
            "loss": float(torch.stack(self._losses).mean()),
        }
        for name, values in self._terms.items():  # a term returned at some steps only counts 0 at the others
            metrics[f"loss/{name}"] = float(torch.stack(values).sum() / len(self._losses))
        self.pm.hook.on_metrics(run=self.run, metrics=metrics)

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if self.implements["after_experience"]:
            run = self._training_run()
            self.pm.hook.after_experience(run=run, exp=run.experience)

    def before_eval(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._hits = {}

    def after_eval_iteration(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if self.run is None:
            return
        batch = self._batch(strategy)
        predictions = strategy.mb_output.argmax(dim=1)
        if self.implements["after_eval_batch"]:
            self.pm.hook.after_eval_batch(run=self.run, batch=batch, predictions=predictions)
        index = experience_index(strategy.experience, 0)
        hits = self._hits.setdefault(index, [0, 0])
        hits[0] += int((predictions == batch.y).sum())
        hits[1] += len(batch)

    def after_eval(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if self.run is None or not self._hits:
            return
        row = [self._hits[k][0] / max(self._hits[k][1], 1) for k in sorted(self._hits)]
        if not self._in_training:
            self.run.accuracy_rows.append(row)
        if self.implements["on_metrics"]:
            metrics = {
                "kind": "eval",
                "experience": self.run.experience.index if self.run.experience is not None else None,
                "epoch": None,
                "accuracy": row,
                "average_accuracy": sum(row) / len(row),
            }
            self.pm.hook.on_metrics(run=self.run, metrics=metrics)

    # ---------------------------------------------------------------- explicit calls

    def close(self) -> None:
        """Call the plugin's ``teardown`` (Avalanche has no end-of-run callback)."""
        if self.run is not None and self.implements["teardown"]:
            self.pm.hook.teardown(run=self.run)

    def unlearn(self, **request: Any) -> dict[str, Any]:
        """Call the plugin's ``unlearn`` hook on the trained model, e.g. ``unlearn(classes=[3])``."""
        if self.run is None:
            raise ContlearnError("nothing to unlearn: the Avalanche strategy has not trained with this plugin")
        report = self.pm.hook.unlearn(run=self.run, request=request) if self.implements["unlearn"] else None
        if report is None:
            raise ContlearnError(f"plugin '{self.name}' does not implement unlearning")
        return report

    def state_dict(self) -> dict[str, Any]:
        return self.plugin.state_dict() if hasattr(self.plugin, "state_dict") else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if hasattr(self.plugin, "load_state_dict"):
            self.plugin.load_state_dict(state)


@functools.cache
def adapter_class() -> type:
    """The adapter as a subclass of Avalanche's ``SupervisedPlugin`` (made once).
    It is reachable as this module's ``ContlearnPluginAdapter``, so that an adapter
    pickles by reference (Avalanche's ``save_checkpoint`` uses dill, which would
    otherwise rebuild a local class without its bases)."""
    from avalanche.core import SupervisedPlugin

    def __init__(self: Any, plugin: Any, name: str, benchmark: Any, transforms: str, seed: int) -> None:
        _AdapterLogic.__init__(self, plugin, name, benchmark, transforms, seed)

    name = "ContlearnPluginAdapter"
    namespace = {"__module__": __name__, "__qualname__": name, "__init__": __init__,
                 "__doc__": "Drives a contlearn plugin from an Avalanche strategy's callbacks."}  # fmt: skip
    return type(name, (_AdapterLogic, SupervisedPlugin), namespace)


def __getattr__(name: str) -> type:
    if name == "ContlearnPluginAdapter":
        return adapter_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def as_avalanche_plugin(
    plugin: Any,
    config: Any = None,
    *,
    name: str | None = None,
    benchmark: Any = None,
    transforms: str = "eval",
    seed: int = 0,
) -> Any:
    """An Avalanche ``SupervisedPlugin`` that drives a contlearn plugin.

    :param plugin: a contlearn plugin object, or the name of a registered plugin
        (``"ewc"``), built with ``config``.
    :param config: for a plugin name: its ``Config`` instance or a mapping of its
        fields (validated like a config file's section); default: the defaults.
    :param name: the plugin's name in the run (``run.plugins``, error messages);
        default: the given name or the class name in lower case.
    :param benchmark: the Avalanche benchmark being trained, for ``run.stream``
        (test data included); default: the benchmark of the experience's stream
        when Avalanche records it, else the experiences seen so far.
    :param transforms: the Avalanche transform group used when a plugin reads an
        experience's data (``exp.train``): ``eval`` (default) or ``train``.
    :param seed: seed of ``run.generator`` and ``run.config.seed``.
    :raises PluginError: a plugin that implements a hook an Avalanche strategy
        cannot call (``train_data``, ``forward``, ``compute_loss``, ``predict``).
    """
    require_avalanche()
    if isinstance(plugin, str):
        from contlearn._registry import PluginRegistry
        from contlearn.config import plugin_config

        registry = PluginRegistry.load()
        cls = registry.get(plugin).config_class
        if config is not None and cls is not None and isinstance(config, cls):
            value = config
        else:
            value = plugin_config(plugin, cls, config)
        name = name or plugin
        plugin = registry.create(plugin, value)
    elif config is not None:
        raise PluginError("config is only used with a plugin name; configure a plugin object when building it")
    default_name = (plugin if isinstance(plugin, type) else type(plugin)).__name__.lower()
    return adapter_class()(plugin, name or default_name, benchmark, transforms, seed)
