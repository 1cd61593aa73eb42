"""Supervised contrastive loss (Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020).

For ``N = V * B`` anchors (every view of every sample), with ``P(i)`` the other
anchors of the same class and ``A(i)`` all anchors but ``i``:

    L = (tau / tau_base) * mean_i [ -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / tau) / sum_{a in A(i)} exp(z_i.z_a / tau) ) ]

(their eq. 2, "L_out", with the ``tau / tau_base`` scale of their code, which
PRD's reference code keeps). Without labels it is SimCLR's loss: the only
positives are the other views of the same sample.
"""

from __future__ import annotations

from typing import Any

import torch

from contlearn.errors import TrainingError


def supcon_over_processes(
    z: torch.Tensor,
    labels: torch.Tensor,
    dist: Any,
    n: int,
    temperature: float = 0.1,
    base_temperature: float = 0.07,
) -> torch.Tensor:
    """Several processes (torchrun): :func:`supcon_loss` of the whole global batch
    of ``n`` samples, from this process's share ``z``, ``labels``.

    Every process contrasts the gathered batch (its own rows keep their
    gradients, the others' are constants), so value and summed gradient are
    the one-process ones (:meth:`~contlearn.distributed.DistributedView.whole_batch_loss`)."""
    whole = supcon_loss(dist.gather_rows(z, n), dist.gather_rows(labels, n), temperature, base_temperature)
    return dist.whole_batch_loss(whole, n, len(z))


def supcon_loss(
    z: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 0.1,
    base_temperature: float = 0.07,
) -> torch.Tensor:
    """The supervised contrastive loss of ``z`` ``[B, V, D]`` (``V`` views of ``B``
    samples, L2-normalised along ``D``) with class ``labels`` ``[B]``.

    :raises TrainingError: when ``z`` does not have three dimensions or the
        labels do not match its batch size.
    """
    if z.dim() != 3:
        raise TrainingError(f"supcon_loss needs projections [batch, views, dim], got shape {tuple(z.shape)}")
    b, v, _ = z.shape
    if labels is not None and labels.shape[0] != b:
        raise TrainingError(f"supcon_loss got {labels.shape[0]} labels for {b} samples")
    anchors = z.transpose(0, 1).reshape(v * b, -1).float()  # view-major: view 0 of every sample, then view 1...
    ids = (labels if labels is not None else torch.arange(b, device=z.device)).repeat(v)
    logits = anchors @ anchors.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = ~torch.eye(v * b, dtype=torch.bool, device=z.device)
    positive = (ids[:, None] == ids[None, :]) & not_self
    log_denominator = torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True)
    log_prob = logits - log_denominator
    mean_log_prob_pos = (log_prob * positive).sum(dim=1) / positive.sum(dim=1).clamp_min(1)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()
