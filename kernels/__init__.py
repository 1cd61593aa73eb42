"""Triton kernels for contlearn's hot operations, each beside its pure-torch reference.

Public modules: :mod:`contlearn.kernels.fisher` (diagonal Fisher information:
``accumulate_``, ``per_sample_linear``, ``empirical_fisher``) and
:mod:`contlearn.kernels.dampen` (SSD's select-and-dampen). The ops live in
``accumulate``, ``per_sample``, ``empirical`` and ``dampen``; ``_dispatch`` chooses
between Triton and the references. Importing any of them does not import Triton.
"""
