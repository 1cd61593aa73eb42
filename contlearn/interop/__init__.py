"""Interoperability with other continual-learning libraries: :mod:`contlearn.interop.avalanche`."""
