"""Diagonal Fisher information (Kirkpatrick et al., 2017, EWC), as SSD and EWC use it.

The public entry points, gathered from the modules that implement them:

- :func:`accumulate_` / :func:`accumulate_reference_` (:mod:`.accumulate`): add
  ``scale * g**2`` to a list of importance tensors in one launch;
- :func:`per_sample_linear`, :func:`per_sample_linear_bias` and their references
  (:mod:`.per_sample`): exact sums of squared per-sample gradients of a Linear layer;
- :func:`empirical_fisher` (:mod:`.empirical`): the diagonal Fisher of a model over
  batches, from batch gradients or per-sample gradients; :func:`fisher_sums`, its
  sums and divisors (which add up over shares of the batches).
"""

from __future__ import annotations

from .accumulate import accumulate_, accumulate_reference_
from .empirical import FisherMode, empirical_fisher, fisher_sums
from .per_sample import (
    per_sample_linear,
    per_sample_linear_bias,
    per_sample_linear_bias_reference,
    per_sample_linear_reference,
)

__all__ = [
    "FisherMode",
    "accumulate_",
    "accumulate_reference_",
    "empirical_fisher",
    "fisher_sums",
    "per_sample_linear",
    "per_sample_linear_bias",
    "per_sample_linear_bias_reference",
    "per_sample_linear_reference",
]
