"""What the experience hooks return, checked where the loop and a resume receive it.

``train_data`` and ``configure_optimizer`` are asked once per experience, by the
loop and again by :func:`contlearn._run_state.restore` on a resume inside an
experience; both paths get the same checks and the same messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from contlearn.errors import DataError, TrainingError

if TYPE_CHECKING:
    from contlearn.run import OptimizerLike, Run
    from contlearn.scenarios import Experience, TensorData
    from contlearn.scenarios.loader import LoaderData

#: what the loop, schedules, resumes and distributed runs use of an optimizer
_OPTIMIZER_METHODS = ("step", "zero_grad", "state_dict", "load_state_dict")


def describe(value: Any) -> str:
    """What a hook returned, for an error message."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return "None" if value is None else f"a {type(value).__name__}"


def check_loss_terms(result: Any) -> dict[str, torch.Tensor]:
    """One plugin's ``loss_terms`` result, checked: a dict of scalar tensors.

    :raises TrainingError: another type, a term that is no tensor or not a scalar."""
    if not isinstance(result, dict):
        raise TrainingError(f"loss_terms must return a dict of named loss tensors or None, got {type(result).__name__}")
    for name, value in result.items():
        if not isinstance(value, torch.Tensor):
            raise TrainingError(f"loss term '{name}' is a {type(value).__name__}, not a tensor: it would carry no gradient")
        if value.dim():
            raise TrainingError(
                f"loss term '{name}' has shape {tuple(value.shape)}: a loss term is a scalar (reduce it, e.g. with .mean())"
            )
    return result


def check_extra_samples(extra: list[Any]) -> None:
    """:raises TrainingError: an ``extra_samples`` result (``None`` results left
    out) that is no :class:`~contlearn.scenarios.Batch`."""
    from contlearn.scenarios import Batch

    wrong = next((b for b in extra if not isinstance(b, Batch)), None)
    if wrong is not None:
        raise TrainingError(f"extra_samples must return a Batch or None, got {describe(wrong)}")


def duplicate_loss_term(name: str, loss_terms: Any) -> TrainingError:
    """The error for two plugins returning a loss term of the same name; pluggy
    drops the ``None`` results, so the message lists every plugin implementing
    ``loss_terms`` (``loss_terms`` is the hook caller)."""
    owners = [impl.plugin_name for impl in loss_terms.get_hookimpls() if not (impl.wrapper or impl.hookwrapper)]
    return TrainingError(
        f"two plugins return a loss term named '{name}' (plugins with loss_terms: {', '.join(owners)}); "
        f"the terms are summed into the loss and logged by name, so each plugin must give its own names"
    )


def experience_data(run: Run, exp: Experience) -> TensorData | LoaderData:
    """The training data of ``exp`` (``train_data`` hook), checked."""
    data = run.hook.train_data(run=run, exp=exp)
    check_training_data(run, exp, data)
    return data


def experience_optimizer(run: Run, exp: Experience) -> OptimizerLike:
    """The optimizer of ``exp`` (``configure_optimizer`` hook), checked: a
    ``torch.optim.Optimizer`` instance, or an object with what the loop uses of one."""
    optimizer = run.hook.configure_optimizer(run=run, exp=exp)
    if isinstance(optimizer, type) or not (
        all(callable(getattr(optimizer, m, None)) for m in _OPTIMIZER_METHODS)
        and isinstance(getattr(optimizer, "param_groups", None), list)
    ):
        raise TrainingError(
            f"configure_optimizer must return an optimizer (a torch.optim.Optimizer instance, or an object with "
            f"param_groups and {', '.join(_OPTIMIZER_METHODS)}), got {describe(optimizer)}"
        )
    return optimizer


def check_training_data(run: Run, exp: Experience, data: Any) -> None:
    """An experience's training data is not empty and its labels fit the head (one host read)."""
    if not (hasattr(data, "batches") and isinstance(getattr(data, "y", None), torch.Tensor)):
        raise TrainingError(
            f"train_data must return the experience's training data (a TensorData, e.g. "
            f"TensorData.concat([exp.train, more])), got {describe(data)}"
        )
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
