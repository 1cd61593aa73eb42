"""Triton kernels for contlearn's hot operations, each beside its pure-torch reference.

Modules: :mod:`contlearn.kernels.fisher` (Fisher information) and
:mod:`contlearn.kernels.dampen` (SSD's select-and-dampen).
"""
