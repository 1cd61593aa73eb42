"""Backend selection, lazy Triton loading and the interpreter switch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from contlearn.kernels import _dispatch, accumulate, dampen, fisher, per_sample


def test_interpreter_takes_effect_without_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: kernels are compiled, not interpreted")
    assert _dispatch.interpreter_enabled()
    kernel = accumulate._accumulate_kernel.build()
    assert type(kernel).__name__ == "InterpretedFunction"


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        fisher.accumulate_([torch.zeros(3)], [torch.ones(3)], backend="cuda")


def test_auto_runs_the_reference_on_cpu(count_launches) -> None:
    counter = count_launches(accumulate, "_accumulate_kernel")
    imp = torch.zeros(5)
    fisher.accumulate_([imp], [torch.full((5,), 2.0)])
    assert counter.launches == 0
    assert torch.equal(imp, torch.full((5,), 4.0))


def test_triton_on_cpu_without_interpreter_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dampen.dampen_(
            [torch.ones(3)], [torch.ones(3)], [torch.ones(3)], 1.0, 1.0, backend="triton"
        )


def test_triton_without_triton_raises_and_auto_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        _dispatch, "_load_triton", lambda: (None, "ImportError: No module named 'triton'")
    )
    a, d = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    with pytest.raises(RuntimeError, match="triton is not importable"):
        per_sample.per_sample_linear(a, d, backend="triton")
    torch.testing.assert_close(
        per_sample.per_sample_linear(a, d), per_sample.per_sample_linear_reference(a, d)
    )


def test_mixed_devices_are_rejected_for_triton() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    with pytest.raises(RuntimeError, match="one device"):
        _dispatch.resolve_backend("op", "triton", [torch.zeros(1), torch.zeros(1, device="cuda")])


def test_modules_import_without_triton_and_fall_back() -> None:
    script = textwrap.dedent(
        """
        import sys
        import torch
        from contlearn.kernels import dampen, fisher, per_sample
        assert "triton" not in sys.modules, "importing contlearn.kernels imported triton"
        sys.modules["triton"] = None  # from here on `import triton` raises ImportError
        imp = torch.zeros(3)
        fisher.accumulate_([imp], [torch.ones(3)])
        assert imp.tolist() == [1.0, 1.0, 1.0]
        try:
            dampen.dampen_([torch.ones(2)], [torch.ones(2)], [torch.ones(2)], 1.0, 1.0, backend="triton")
        except RuntimeError as exc:
            assert "not importable" in str(exc), exc
        else:
            raise AssertionError("backend='triton' ran without triton")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_launch_table_maps_blocks_to_tensors() -> None:
    xs, ys = [torch.zeros(5), torch.zeros(3000)], [torch.zeros(5), torch.zeros(3000)]
    table = _dispatch.launch_table([xs, ys], 1024)
    assert table.block_tensor.tolist() == [0, 1, 1, 1]
    assert table.block_first.tolist() == [0, 1] and table.numels.tolist() == [5, 3000]
    assert table.addrs[0].tolist() == [t.data_ptr() for t in xs]
    assert table.addrs[1].tolist() == [t.data_ptr() for t in ys]
    assert table.n_blocks == 4


def test_launch_table_alignment_flag() -> None:
    """ALIGNED adds tl.multiple_of(ptr, 16): wrong on an offset view (misaligned vector loads on a GPU)."""
    x = torch.zeros(64)
    assert _dispatch.launch_table([[x]], 1024).aligned
    assert not _dispatch.launch_table([[x[1:]]], 1024).aligned
    assert not _dispatch.launch_table([[x], [x[3:]]], 1024).aligned
