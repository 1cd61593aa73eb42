"""The training loop of one experience and the evaluation of the model.

:func:`train_experience` runs the epochs of an experience: each step draws a
batch, adds the plugins' extra samples, computes the loss and its terms, steps
the optimizer, and hands checkpoints and stop requests to the run's control
(:class:`~contlearn.experiment.Experiment` owns it). :func:`evaluate` fills a
row of the accuracy matrix. Losses stay on the device and are read once per
epoch (:func:`report_epoch`) or when a checkpoint is written.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pluggy
import torch

from contlearn import _manager
from contlearn._hook_results import (
    check_extra_samples,
    check_loss_terms,
    describe,
    duplicate_loss_term,
    experience_data,
    experience_optimizer,
)
from contlearn._random_state import rng_state, set_rng_state
from contlearn._run_state import EpochState, Resumed
from contlearn.defaults import (
    Defaults,
    ScheduleWarning,
    plain_schedule,
    set_epoch_lr,
    set_step_lr,
    set_step_schedule_lr,
    unreached_milestones,
    warmup_steps,
)
from contlearn.distributed import DistributedView
from contlearn.errors import ConfigError, DataError, TrainingError
from contlearn.run import OptimizerLike, Run
from contlearn.scenarios import Batch, Experience

if TYPE_CHECKING:
    from contlearn._control import Control

class StepHooks:
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

        def required(name: str) -> Callable[..., Any]:
            hook = bind(name)
            assert hook is not None, f"contlearn's defaults implement {name}"
            return hook

        self.extra_samples = bind("extra_samples")
        self.forward = required("forward")
        self.compute_loss = required("compute_loss")
        self.loss_terms = bind("loss_terms")
        self.after_backward = bind("after_backward")
        self.after_step = bind("after_step")
        self.predict = required("predict")
        self.after_eval_batch = bind("after_eval_batch")
        #: bf16 autocast for forward and loss (``train.amp``); None when off
        self.autocast = torch.autocast(device_type, dtype=torch.bfloat16) if autocast else None
        self._zero: torch.Tensor | None = None

    def zero(self, like: torch.Tensor) -> torch.Tensor:
        """A scalar 0 on ``like``'s device, made once per experience (the value of
        a loss term at a step its plugin did not return it)."""
        if self._zero is None:
            self._zero = torch.zeros((), device=like.device)
        return self._zero

    @classmethod
    def for_run(cls, run: Run, defaults: Defaults) -> StepHooks:
        return cls(run.pm, defaults, bool(run.config.train.amp), run.device.type)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------- training


def train_experience(
    run: Run,
    exp: Experience,
    hooks: StepHooks,
    ctl: Control | None = None,
    resumed: Resumed | None = None,
) -> None:
    """Train one experience: grow the head, call the experience hooks, run the
    epochs. ``resumed``: continue where a checkpoint inside it left off (the
    experience hooks have run; the data and optimizer are restored)."""
    cfg = run.config.train
    if resumed is None:
        run.experience, run.epoch, run.step = exp, 0, 0
        if run.dist.world_size > 1:  # per-share draws of the last experience made them differ
            own = run.device if run.device.type == "cuda" else None  # process 0's GPU state onto this one's
            set_rng_state(run.dist.broadcast_object(rng_state(run.generator, own)), run.generator, own)
        run.model.adapt(exp.classes, exp.task)
        data = experience_data(run, exp)
        run.hook.before_experience(run=run, exp=exp)
        run.optimizer = experience_optimizer(run, exp)
    else:
        data = resumed.data
    run.model.train()
    batch_size = cfg.batch_size
    steps_per_epoch = math.ceil(len(data) / batch_size)
    unreached = unreached_milestones(cfg, steps_per_epoch)
    if unreached and resumed is None:
        unit = cfg.lr_schedule_unit
        warnings.warn(
            f"train.milestones {unreached} are at or past the end of experience {exp.index} "
            f"({cfg.epochs * steps_per_epoch if unit == 'step' else cfg.epochs} {unit}s): they never apply "
            f"(milestones count {unit}s, train.lr_schedule_unit)",
            ScheduleWarning,
            stacklevel=2,
        )
    warmup = warmup_steps(cfg, steps_per_epoch) if cfg.warmup else 0
    by_step = cfg.lr_schedule_unit == "step" and (cfg.lr_schedule != "none" or warmup > 0)
    schedule = plain_schedule(cfg)  # read at every step: plain attributes, not the config's
    try:
        for epoch in range(run.epoch, cfg.epochs):
            run.epoch = epoch
            if not by_step:
                set_epoch_lr(_optimizer(run), schedule, epoch)
            batches = data.batches(batch_size, shuffle=True, generator=run.generator)
            if resumed is not None:
                state = resumed.epoch
                batches = _rest_of_epoch(batches, state, run.generator)
                resumed = None
            else:
                state = EpochState([], {}, run.generator.get_state())
            for batch in batches:
                if by_step:
                    set_step_schedule_lr(_optimizer(run), schedule, run.step, cfg.epochs * steps_per_epoch, warmup)
                elif warmup:
                    set_step_lr(_optimizer(run), schedule, epoch, run.step, warmup)
                train_step(run, batch, hooks, state.losses, state.terms)
                if ctl is not None and ctl.due(run.global_step):
                    ctl.end_of_step(run, exp, state)
            report_epoch(run, exp, state.losses, state.terms)
            if ctl is not None and ctl.vote():  # several processes stop together
                ctl.end_of_step(run, exp, state)
    except IndexError as exc:  # cross-entropy's "Target 12 is out of bounds", e.g. from extra samples
        if "out of bounds" not in str(exc):
            raise
        n_out = getattr(run.model.head, "out_features", "?")
        raise DataError(
            f"a training batch of experience {exp.index} has a label outside the head's {n_out} outputs "
            f"({exc}); check the plugin that adds samples"
        ) from None
    run.hook.after_experience(run=run, exp=exp)


def _optimizer(run: Run) -> OptimizerLike:
    """The optimizer of the experience being trained (set before its first step)."""
    if run.optimizer is None:
        raise TrainingError("run.optimizer is None while training: a plugin removed it")
    return run.optimizer


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
    run: Run, batch: Batch, hooks: StepHooks, terms: dict[str, list[torch.Tensor]], steps_done: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The base loss and the total with every plugin's terms, appended to
    ``terms`` (which holds ``steps_done`` values per name: a term that a plugin
    returns at some steps only is 0 at the others)."""
    out = hooks.forward(run=run, batch=batch)
    loss = hooks.compute_loss(run=run, batch=batch, out=out)
    if not isinstance(loss, torch.Tensor) or loss.dim():
        raise TrainingError(f"compute_loss must return a scalar loss tensor, got {describe(loss)}")
    total = loss
    if hooks.loss_terms is not None:
        seen: set[str] = set()
        for result in hooks.loss_terms(run=run, batch=batch, out=out):
            for name, value in check_loss_terms(result).items():
                if name in seen:
                    raise duplicate_loss_term(name, hooks.loss_terms)
                seen.add(name)
                total = total + value
                if name not in terms:
                    terms[name] = [hooks.zero(value)] * steps_done
                terms[name].append(value.detach())
        for name in terms.keys() - seen:  # a term not returned at this step
            terms[name].append(hooks.zero(loss))
    return loss, total


def train_step(
    run: Run,
    batch: Batch,
    hooks: StepHooks,
    losses: list[torch.Tensor],
    terms: dict[str, list[torch.Tensor]],
) -> None:
    """One optimisation step; losses are appended as device tensors, never read here."""
    if hooks.extra_samples is not None:
        extra = hooks.extra_samples(run=run, batch=batch)
        if extra:
            check_extra_samples(extra)
            batch = Batch.cat([batch, *extra])
    run.batch_size = len(batch)
    if run.dist.world_size > 1:  # this process's share of the global batch (contlearn.distributed)
        rows, weight = run.dist.share(len(batch))
        batch = Batch(batch.x[rows], batch.y[rows], batch.t[rows])
    try:
        if hooks.autocast is None:
            loss, total = _forward_and_losses(run, batch, hooks, terms, len(losses))
        else:
            with hooks.autocast:
                loss, total = _forward_and_losses(run, batch, hooks, terms, len(losses))
    except ValueError as exc:
        if len(batch) == 1 and "more than 1 value per channel" in str(exc):  # torch's BatchNorm
            index = run.experience.index if run.experience is not None else "?"
            where = f"step {run.step + 1} of experience {index} (epoch {run.epoch})"
            why = "which BatchNorm cannot normalise in training (one value per channel)"
            if run.dist.world_size > 1:
                raise ConfigError(
                    f"{where} gives this process a share of one sample, {why}; with {run.dist.world_size} "
                    f"processes every batch needs at least {2 * run.dist.world_size} samples (train.batch_size="
                    f"{run.config.train.batch_size}, and the last batch of an epoch)"
                ) from None
            size = run.config.train.batch_size
            if size == 1:
                raise ConfigError(f"{where} has a batch of one sample, {why}; train.batch_size=1 makes every batch "
                                  "one sample: use at least 2, or a model without BatchNorm") from None
            raise ConfigError(
                f"{where} has a batch of one sample, {why}; the last batch of an epoch holds what is left after "
                f"full batches of train.batch_size={size}: choose a batch size that does not leave one sample"
            ) from None
        raise
    optimizer = _optimizer(run)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if run.dist.world_size > 1:
        run.dist.sum_gradients_((p for group in optimizer.param_groups for p in group["params"]), weight)
    if hooks.after_backward is not None:
        hooks.after_backward(run=run)
    optimizer.step()
    if run.dist.world_size > 1:
        run.dist.broadcast_buffers_(run.model)
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
    if dist is None or dist.world_size == 1:
        names = list(terms)
    else:  # a term one process's share never gave is 0 there; every process sums the rows in one order
        gathered = dist.gather_object(list(terms))
        names = dist.broadcast_object(sorted({n for own in gathered for n in own}) if gathered is not None else None)
    steps = torch.stack(losses)
    rows = [torch.stack(terms[n]) if n in terms else steps.new_zeros(len(losses)) for n in names]
    values = torch.stack([steps, *rows]).float()
    if dist is not None and dist.world_size > 1:
        values = dist.all_reduce_(values) / dist.world_size
    return ["loss", *names], values.cpu()


def raise_if_not_finite(run: Run, exp: Experience, names: list[str], values: torch.Tensor) -> None:
    """:raises TrainingError: naming the first step with a non-finite loss and its bad terms."""
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        bad_step = int((~finite).any(dim=0).nonzero()[0])
        bad_terms = [names[k] for k in range(len(names)) if not finite[k, bad_step]]
        first_step = run.step - values.shape[1] + bad_step + 1  # numbered from 1, as in the stop messages
        added = [name for name in bad_terms if name != "loss"]  # "loss" is the model's own, not a plugin's term
        advice = "lower train.lr" + (f" or check the plugin that adds {', '.join(added)}" if added else "")
        raise TrainingError(
            f"non-finite loss at step {first_step} (epoch {run.epoch}) of experience {exp.index}: "
            f"{', '.join(bad_terms)} went bad; {advice}"
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


def sharded_evaluation(run: Run) -> bool:
    """Whether each process of a torchrun run evaluates only its share of the
    test data: yes unless a plugin sets ``sequential_evaluation = True``."""
    if run.dist.world_size == 1:
        return False
    return not any(getattr(plugin, "sequential_evaluation", False) for plugin in run.plugins.values())


def eval_share(run: Run, data: Any, sharded: bool) -> Any:
    """This process's contiguous share of ``data`` when evaluation is sharded."""
    return data.subset(run.dist.part(len(data))) if sharded else data


def _summed_over_processes(run: Run, sharded: bool, *counts: torch.Tensor) -> list[torch.Tensor]:
    """Integer counts summed over the processes (one all-reduce) when sharded."""
    return run.dist.summed(counts) if sharded else list(counts)


def _accuracies(run: Run, hits: torch.Tensor) -> list[float]:
    """Each experience's hits over its test size (every experience has test data:
    the run refuses one without when it is built)."""
    sizes = torch.tensor([len(exp.test) for exp in run.stream], dtype=torch.double)
    return (hits.double().cpu() / sizes).tolist()


@torch.no_grad()
def evaluate(run: Run, hooks: StepHooks) -> tuple[list[float], np.ndarray]:
    """Accuracy on every experience's test data, and the confusion matrix over
    all test data: ``[true class][predicted class]``, with a last column for
    predictions that are no class of the stream (a strategy's own "none of
    these", or a bug), which count as wrong. Both are counted on the device and
    read back once, at the end. Under torchrun each process predicts its share
    of every test set (:func:`sharded_evaluation`) and the counts are summed."""
    model = run.model
    was_training = model.training
    model.eval()
    n_classes = run.stream.n_classes
    columns = n_classes + 1  # the last: a prediction that is no class of the stream
    # int32 counts: index_add_ of int64 is missing on some backends (Apple's MPS before torch 2.9)
    confusion = torch.zeros(n_classes * columns, dtype=torch.int32, device=run.device)
    correct = []
    batch_size = run.config.train.eval_batch_size
    sharded = sharded_evaluation(run)
    for exp in run.stream:
        hits = torch.zeros((), dtype=torch.long, device=run.device)
        for batch in eval_share(run, exp.test, sharded).batches(batch_size):
            if hooks.autocast is None:
                pred = hooks.predict(run=run, batch=batch)
            else:
                with hooks.autocast:
                    pred = hooks.predict(run=run, batch=batch)
            if not isinstance(pred, torch.Tensor) or pred.shape != batch.y.shape or pred.is_floating_point():
                raise TrainingError(
                    f"predict must return the predicted class of each sample (an integer tensor of shape "
                    f"{tuple(batch.y.shape)}), got {describe(pred)}"
                )
            if hooks.after_eval_batch is not None:
                hooks.after_eval_batch(run=run, batch=batch, predictions=pred)
            hits += (pred == batch.y).sum()
            column = torch.where((pred >= 0) & (pred < n_classes), pred, n_classes)
            # index_add_, not bincount: bincount reads its input's range back to the host on CUDA
            confusion.index_add_(0, batch.y * columns + column, torch.ones_like(column, dtype=torch.int32))
        correct.append(hits)
    model.train(was_training)
    hits_per_exp, confusion = _summed_over_processes(run, sharded, torch.stack(correct), confusion.long())
    return _accuracies(run, hits_per_exp), confusion.view(n_classes, columns).cpu().numpy()


@torch.no_grad()
def evaluate_initial(run: Run) -> list[float]:
    """Accuracy of the untrained model on each experience, with its head grown to
    every class of the stream (a copy; the run's model and RNG are untouched).
    This is the baseline ``b`` of forward transfer."""
    # The copy's new head rows draw from the generator of its device: fork that one too.
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        model = copy.deepcopy(run.model)
        for exp in run.stream:
            model.adapt(exp.classes, exp.task)
        model.eval()
        row = []
        sharded = run.dist.world_size > 1  # the model alone predicts: no plugin state to keep in step
        for exp in run.stream:
            hits = torch.zeros((), dtype=torch.long, device=run.device)
            for batch in eval_share(run, exp.test, sharded).batches(run.config.train.eval_batch_size):
                hits += (model(batch.x, batch.t).logits.argmax(1) == batch.y).sum()
            row.append(hits)
    (hits_per_exp,) = _summed_over_processes(run, sharded, torch.stack(row))
    return _accuracies(run, hits_per_exp)
