"""Run a benchmark's independent runs in worker processes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

Job = TypeVar("Job")


def map_runs(run: Callable[[Job], Any], jobs: Sequence[Job], workers: int) -> list[Any]:
    """``run`` over ``jobs`` in ``workers`` processes (in this one when ``workers <= 1``),
    results in the order of the jobs."""
    if workers <= 1:
        return [run(job) for job in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(run, jobs))
