"""Hook specifications: the whole contract between the run loop and plugins.

Every hook the loop calls is declared here, grouped by the phase of the run in
which it is called. A plugin implements any subset of them with
:data:`contlearn.hookimpl`, and may accept only some of a spec's arguments
(pluggy passes what the implementation names), so specs can grow without
breaking plugins.

How results combine is pluggy's: an ordinary hook returns the list of all
non-``None`` results (last registered first); a ``firstresult`` hook ("produce
the X") stops at the first implementation that returns something other than
``None``. The built-in defaults (the experience's own training data, the
model's forward, cross-entropy, the configured optimizer, argmax prediction)
are implemented by :class:`contlearn.defaults.Defaults`,
registered ``trylast``, so any strategy that returns a value wins over them.

Two active strategies that both implement the same ``firstresult`` hook are an
error unless one of them orders itself with ``tryfirst``/``trylast``: a silent
winner would be the worst kind of bug (see ``contlearn._manager``).

The docstrings below say when contlearn's loop calls each hook. Inside an
Avalanche strategy, :func:`contlearn.interop.avalanche.as_avalanche_plugin`
calls them at the strategy's callbacks instead; docs/avalanche.md lists where,
and where the timing differs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from contlearn.models import Output
    from contlearn.run import OptimizerLike, Run
    from contlearn.scenarios import Batch, Experience, TensorData
    from contlearn.scenarios.loader import LoaderData

PROJECT = "contlearn"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------- run


@hookspec
def setup(run: Run) -> None:
    """Called once, after the model, stream and plugins are built and before the
    first experience (and again after a resume, before training continues).

    :param run: the run being set up.
    :return: nothing; every implementation is called.

    Allocate state that needs the model or the device, open loggers.
    """


@hookspec
def teardown(run: Run) -> None:
    """Called once when the run ends, also when it ends by an error or an
    interruption (then before the error propagates).

    :param run: the finished run; ``run.accuracy_rows`` holds the accuracy
        matrix measured so far.
    :return: nothing; every implementation is called.

    Close files and loggers.
    """


# ------------------------------------------------------------------- experience


@hookspec(firstresult=True)
def train_data(run: Run, exp: Experience) -> TensorData | LoaderData | None:
    """Produce the training data of an experience.

    Called at the start of each training experience, before
    :func:`before_experience`; and again when a run resumes from a checkpoint
    inside the experience, after the plugins' states are restored and without
    :func:`before_experience`. It must therefore return the same data when
    called again from the same state, and leave that state as it was: draw from
    what ``before_experience`` or a restored state fixed, not from a generator
    this call advances.

    :param run: the current run.
    :param exp: the training experience about to start.
    :return: the data to train on, or ``None`` to train on ``exp.train``.
        First non-``None`` result wins.

    Used by strategies that change what an experience trains on, such as
    ``joint`` (all data seen so far) or mixture-based rehearsal.
    """


@hookspec
def before_experience(run: Run, exp: Experience) -> None:
    """Called at the start of each training experience, after the classifier has
    grown to the classes seen so far and before the optimizer is built.

    :param run: the current run; ``run.experience`` is ``exp``.
    :param exp: the training experience about to start.
    :return: nothing; every implementation is called.

    The place for model surgery (new blocks, reprogramming layers, LoRA) and for
    teacher snapshots.
    """


@hookspec(firstresult=True)
def configure_optimizer(run: Run, exp: Experience) -> OptimizerLike | None:
    """Produce the optimizer for an experience.

    Called once per training experience, after :func:`before_experience`; and
    again, after :func:`train_data`, when a run resumes from a checkpoint inside
    the experience (the optimizer's saved state is then loaded into it).

    :param run: the current run.
    :param exp: the training experience about to start.
    :return: an optimizer over the parameters to train. First non-``None`` result
        wins; the default builds ``train.optimizer`` over every parameter that
        requires a gradient.
    """


@hookspec
def after_experience(run: Run, exp: Experience) -> None:
    """Called after the last training epoch of an experience, before it is
    evaluated.

    :param run: the current run.
    :param exp: the experience just trained.
    :return: nothing; every implementation is called.

    Fisher information, buffer updates, herding, prototypes, weight merges.
    """


# ------------------------------------------------------------------------- step


@hookspec
def extra_samples(run: Run, batch: Batch) -> Batch | None:
    """Produce samples to train on together with the current batch.

    Called at every training step, before :func:`forward`.

    :param run: the current run.
    :param batch: the batch drawn from the current experience, augmented;
        ``batch.unaugmented`` is it before the training augmentation (what a
        buffer keeps). When ``batch.raw`` is set, a buffer augments what it
        replays with ``run.experience.train.augment``.
    :return: a :class:`~contlearn.scenarios.Batch` or ``None``. The results of all
        implementations are concatenated to the batch, in hook-call order;
        anything else is a :class:`~contlearn.errors.TrainingError`.

    Replay buffers and rehearsal schedules.
    """


@hookspec(firstresult=True)
def forward(run: Run, batch: Batch) -> Output | None:
    """Produce the model output for a training batch.

    :param run: the current run.
    :param batch: the training batch, extra samples included.
    :return: an :class:`~contlearn.models.Output`; first non-``None`` wins. The
        default is ``run.model(batch.x, batch.t)``.

    Two augmented views and a projection head (PRD) override it.
    """


@hookspec(firstresult=True)
def compute_loss(run: Run, batch: Batch, out: Output) -> torch.Tensor | None:
    """Produce the base loss of a training step.

    :param run: the current run.
    :param batch: the training batch.
    :param out: the output of :func:`forward`.
    :return: a scalar tensor (anything else is a
        :class:`~contlearn.errors.TrainingError`); first non-``None`` wins. The
        default is the cross-entropy of ``out.logits`` against ``batch.y``.
    """


@hookspec
def loss_terms(run: Run, batch: Batch, out: Output) -> dict[str, torch.Tensor] | None:
    """Produce named terms to add to the base loss.

    Called at every training step, after :func:`compute_loss`.

    :param run: the current run.
    :param batch: the training batch.
    :param out: the output of :func:`forward`.
    :return: a mapping from term name to scalar tensor, or ``None``. All terms of
        all implementations are summed into the loss, and each is logged under its
        name (``loss/<name>``); two plugins returning the same name, or a term that
        is not a scalar tensor, is a :class:`~contlearn.errors.TrainingError`. A
        term may be returned at some steps only; it counts as 0 at the others in
        its epoch's logged mean. A term without gradient is added and logged, but
        trains nothing.

    Regularisers (EWC, L2), distillation (LwF, PRD), auxiliary losses (MEMO).
    """


@hookspec
def after_backward(run: Run) -> None:
    """Called after ``loss.backward()`` and before ``optimizer.step()``.

    :param run: the current run; gradients are in the parameters' ``.grad``.
    :return: nothing; every implementation is called.

    Gradient masking, clipping, projection.
    """


@hookspec
def after_step(run: Run) -> None:
    """Called after ``optimizer.step()`` at every training step.

    :param run: the current run; ``run.step`` and ``run.global_step`` count the
        steps done before this one (in the experience, in the run): this step's
        index from 0. Messages number steps from 1.
    :return: nothing; every implementation is called.
    """


# ------------------------------------------------------------------------- eval


@hookspec(firstresult=True)
def predict(run: Run, batch: Batch) -> torch.Tensor | None:
    """Produce class predictions for an evaluation batch.

    Called for every evaluation batch, in ``torch.no_grad`` mode and with the
    model in eval mode.

    :param run: the current run.
    :param batch: the evaluation batch (with task labels, which only
        task-aware strategies may use).
    :return: an integer tensor of predicted classes, one per sample (anything
        else, scores for instance, is a :class:`~contlearn.errors.TrainingError`);
        first non-``None`` wins. The default is the argmax of the model's logits.

    Nearest-mean classifiers, task routing, test-time memories. Under torchrun
    each process predicts its own share of every test set; a plugin whose
    predictions depend on the test samples before them (a test-time memory, its
    own random draws) sets the class attribute ``sequential_evaluation = True``,
    and every process then evaluates all test data, in order.
    """


@hookspec
def after_eval_batch(run: Run, batch: Batch, predictions: torch.Tensor) -> None:
    """Called after each evaluation batch is predicted.

    :param run: the current run.
    :param batch: the evaluation batch.
    :param predictions: what :func:`predict` returned for it.
    :return: nothing; every implementation is called.

    Under torchrun each process sees only its share of the test batches (see
    :func:`predict`); a plugin that counts them sums its counts over the
    processes (``run.dist.all_reduce_``) before it reports them.
    """


# --------------------------------------------------------------------- post-hoc


@hookspec(firstresult=True)
def unlearn(run: Run, request: Any) -> dict[str, Any] | None:
    """Make the trained model forget what a request names.

    Called by :meth:`contlearn.Experiment.unlearn`.

    :param run: the run whose model should forget.
    :param request: what to forget (classes or samples).
    :return: a report (a JSON-serialisable mapping); first non-``None`` wins.
        With no implementation, unlearning is an error.
    """


# ----------------------------------------------------------------------- report


@hookspec
def on_metrics(run: Run, metrics: dict[str, Any]) -> None:
    """Called whenever the loop has metrics to report: once per training epoch
    (``kind: "epoch"``, losses by name), once per evaluation
    (``kind: "eval"``, the accuracy row), and whenever a plugin reports an
    event of its own (e.g. ``kind: "unlearn"`` from SSD's forget events during
    a run; :meth:`Experiment.unlearn` after a run returns its report instead).
    Reporters ignore kinds they do not know.

    :param run: the current run.
    :param metrics: a flat mapping, always with ``kind``, ``experience`` and
        ``epoch`` (``None`` for evaluations).
    :return: nothing; every implementation is called.

    Loggers (JSONL, TensorBoard), progress displays.
    """
