"""The kernels compile for a Hopper GPU (sm_90) even where none is present.

The interpreter runs the kernels' logic on the CPU but never compiles them, so an
error only the compiler sees (a scan it cannot lower, a type it rejects) would
otherwise surface on the first GPU. ``triton.compile`` for an explicit target needs
no driver. The full-block loads of the multi-tensor kernels must come out as
128-bit vector loads: that is what lets them run at the copy's bandwidth.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from contlearn.kernels import _dispatch

SCRIPT = Path(__file__).with_name("_compile_sm90.py")


@pytest.fixture(scope="module")
def ptx_facts() -> dict:
    if not _dispatch.triton_available():
        pytest.skip("triton is not importable")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    facts = json.loads(result.stdout.splitlines()[-1])
    if "skip" in facts:
        pytest.skip(facts["skip"])
    return facts


@pytest.mark.parametrize("restore", [False, True], ids=["dampen", "restore"])
def test_dampen_compiles_with_vector_loads(ptx_facts: dict, restore: bool) -> None:
    facts = ptx_facts[f"dampen restore={restore}"]
    assert facts == {"compiled": True, "vector_loads": True}


def test_accumulate_compiles_with_vector_loads(ptx_facts: dict) -> None:
    assert ptx_facts["accumulate"] == {"compiled": True, "vector_loads": True}


def test_square_sum_compiles(ptx_facts: dict) -> None:
    assert ptx_facts["square_sum"]["compiled"]
