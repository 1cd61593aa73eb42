"""Shared set-up for the kernel tests.

Without a GPU the Triton kernels run through Triton's interpreter. Triton reads
TRITON_INTERPRET when it builds a kernel, and contlearn.kernels builds its kernels at
their first launch, from Triton builtins only, so setting it here works even when
another test module imported Triton earlier (torchvision does).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from contlearn.kernels import _dispatch  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """A device on which backend="triton" runs: CUDA, or the CPU through the interpreter."""
    if not _dispatch.triton_available():
        pytest.skip("triton is not importable")
    if request.param == "cpu" and not _dispatch.interpreter_enabled():
        pytest.skip("Triton kernels run on the CPU only with TRITON_INTERPRET=1")
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seeded():
    """Seed every test, restoring the global RNG state afterwards."""
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(0)
        yield


class LaunchCounter:
    """Stands in for a module's TritonKernel and counts its launches."""

    def __init__(self, kernel: _dispatch.TritonKernel):
        self.kernel = kernel
        self.launches = 0

    @property
    def tuned(self) -> bool:
        return self.kernel.tuned

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def count_launches(monkeypatch: pytest.MonkeyPatch):
    """``count_launches(module, "_kernel")`` replaces the kernel with a :class:`LaunchCounter`."""

    def install(module, name: str) -> LaunchCounter:
        counter = LaunchCounter(getattr(module, name))
        monkeypatch.setattr(module, name, counter)
        return counter

    return install
