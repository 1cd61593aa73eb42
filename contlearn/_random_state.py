"""The random states a checkpoint holds, and which of them a process resumes with.

Python's, NumPy's, torch's (CPU and CUDA) and the run's own generator: set back
last on a resume, so that the resumed run draws what the interrupted one would
have drawn. Under torchrun each process keeps its own (see docs/reliability.md).
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch

from contlearn.checkpoint import CheckpointWarning


def rng_state(generator: torch.Generator, own_gpu: torch.device | None = None) -> dict[str, Any]:
    """Python's, NumPy's, torch's (CPU and, once initialised, CUDA) and ``generator``'s state.

    ``own_gpu``: the one GPU this process draws on (one process per GPU under
    torchrun): its state alone is kept, under ``cuda_own``, so that another
    process sets it on its own GPU, not on the same index."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    cuda_ready = torch.cuda.is_available() and torch.cuda.is_initialized()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if cuda_ready and own_gpu is None else [],
        "generator": generator.get_state(),
    }
    if own_gpu is not None and own_gpu.type == "cuda":
        state["cuda_own"] = torch.cuda.get_rng_state(own_gpu)
    return state


def own_rng(state: dict[str, Any], run: Any, source: str) -> dict[str, Any]:
    """The random states this process resumes with: its own when the checkpoint
    was written by as many processes, else process 0's (with a warning when the
    run had several: their draws per share then differ from the run's)."""
    saved = state.get("rng_processes")
    world = run.dist.world_size
    if not saved:
        return state["rng"]
    if len(saved) == world:
        return saved[run.dist.rank]
    if run.dist.is_main:
        warnings.warn(
            f"checkpoint '{source}' was written by {len(saved)} processes and this resume has {world}: every "
            f"process starts from process 0's random state, so random draws made per share of a batch "
            f"(dropout, augmented views), if the run makes any, differ from the run's",
            CheckpointWarning,
            stacklevel=5,  # the caller of Experiment.run
        )
    return state["rng"]


def own_gpu(run: Any) -> torch.device | None:
    """The GPU of this process when several processes each draw on their own."""
    return run.device if run.dist.world_size > 1 and run.device.type == "cuda" else None


def set_rng_state(state: dict[str, Any], generator: torch.Generator, own_gpu: torch.device | None = None) -> None:
    """Inverse of :func:`rng_state`; a ``cuda_own`` state goes to ``own_gpu`` (this
    process's GPU), when there is one."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda_own") is not None and own_gpu is not None and own_gpu.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_own"].cpu(), own_gpu)
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    generator.set_state(state["generator"].cpu())
