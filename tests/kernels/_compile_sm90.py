"""Compile contlearn's Triton kernels for sm_90 and print facts about their PTX as JSON.

Run in a fresh process with ``TRITON_INTERPRET=0`` (see test_compile.py): Triton
jits its own helpers at import, in the mode of that moment, so a process that
imported it for the interpreter cannot compile.
"""

from __future__ import annotations

import json

import triton
import triton.language as tl
from contlearn.kernels import accumulate, dampen, per_sample
from triton.backends import backends
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

POINTERS = "*i64"  # the pointer-table operands


def ptx_of(kernel, signature: dict[str, str], constexprs: dict[str, object]) -> str:
    full = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    names = list(full)
    source = ASTSource(
        kernel.build(),
        full,
        constexprs={(names.index(name),): value for name, value in constexprs.items()},
    )
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    return compiled.asm["ptx"]


def facts(ptx: str) -> dict[str, bool]:
    return {"compiled": ".entry" in ptx, "vector_loads": "ld.global.v4" in ptx}


def main() -> None:
    if "nvidia" not in backends:
        print(json.dumps({"skip": "this Triton build has no NVIDIA backend"}))
        return
    out: dict[str, dict[str, bool]] = {}
    tables = ["theta_addrs", "fd_addrs", "ff_addrs", "numels", "block_first", "block_tensor"]
    signature = {**dict.fromkeys(tables, POINTERS), "backup_ptr": "*fp32", "counts_ptr": "*i64"}
    signature.update(alpha="fp32", lam="fp32")
    for restore in (False, True):
        constexprs = dict(THETA=tl.float32, FD=tl.float32, FF=tl.float32, BLOCK=1024)
        constexprs.update(ALIGNED=True, RESTORE=restore)
        ptx = ptx_of(dampen._dampen_kernel, signature, constexprs)
        out[f"dampen restore={restore}"] = facts(ptx)
    tables = ["imp_addrs", "grad_addrs", "numels", "block_first", "block_tensor"]
    signature = {**dict.fromkeys(tables, POINTERS), "scale": "fp32"}
    constexprs = dict(IMP=tl.float32, GRAD=tl.bfloat16, BLOCK=1024, ALIGNED=True)
    out["accumulate"] = facts(ptx_of(accumulate._accumulate_kernel, signature, constexprs))
    signature = {"g_ptr": "*fp32", "out_ptr": "*fp32", "n_g": "i32", "numel": "i64"}
    out["square_sum"] = facts(ptx_of(per_sample._square_sum_kernel, signature, {"BLOCK": 1024}))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
