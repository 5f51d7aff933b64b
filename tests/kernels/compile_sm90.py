"""Compile every Triton kernel of tnd_kernels for an H100 (sm_90) target, with no GPU needed.

Run with TRITON_INTERPRET unset. Exit 0: all compiled; 77: this triton cannot compile for
CUDA here (skip); anything else: a kernel failed to compile (the error is printed).
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run compile_sm90.py without TRITON_INTERPRET=1")
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:  # pragma: no cover
    print(f"triton unavailable: {exc}")
    sys.exit(77)

from tnd_kernels import _common, distill, token_logprobs, topk_distill  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
COMMON = {"n_cols": "i32", "inv_t": "fp32", "t_sq": "fp32", "temp": "fp32", "beta": "fp32",
          "log_beta": "fp32", "log_1m_beta": "fp32"}


COMPILED = []


def compile_one(fn, signature, constexprs, num_warps=8):
    COMPILED.append(fn)
    sig = dict(signature)
    sig.update({name: "constexpr" for name in constexprs})
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=TARGET,
                   options={"num_warps": num_warps})


def main() -> None:
    try:
        compile_one(_common._scale_rows_kernel, {"grad_ptr": "*bf16", "grad_row_stride": "i64", "gout_ptr": "*fp32",
                    "gout_stride": "i32", "n_cols": "i32"}, {"BLOCK": 4096})
    except Exception as exc:  # no CUDA backend / ptxas in this triton build
        if "ptxas" in str(exc) or "backend" in str(exc).lower():
            print(f"cannot compile for CUDA here: {exc}")
            sys.exit(77)
        raise
    for dt in ("*bf16", "*fp32", "*fp16"):
        for loss in (0, 1, 2):
            for has_mask, write_grad in ((True, True), (False, False)):
                compile_one(distill._distill_kernel, {
                    "s_ptr": dt, "s_stride": "i64", "t_ptr": dt, "t_stride": "i64", "g_ptr": dt, "g_stride": "i64",
                    "loss_ptr": "*fp32", "mask_ptr": "*u8", "nvalid_ptr": "*fp32", **COMMON,
                }, {"LOSS": loss, "HAS_MASK": has_mask, "MEAN": has_mask, "WRITE_GRAD": write_grad, "BLOCK": 4096})
                for covers_all in (True, False):
                    compile_one(topk_distill._topk_distill_kernel, {
                        "s_ptr": dt, "s_stride": "i64", "tlp_ptr": "*fp32", "tlp_stride": "i64", "idx_ptr": "*i16",
                        "idx_stride": "i64", "sidx_ptr": "*i32", "tail_ptr": "*fp32", "g_ptr": dt, "g_stride": "i64",
                        "scratch_ptr": "*fp32", "loss_ptr": "*fp32", "mask_ptr": "*u8", "nvalid_ptr": "*fp32",
                        "k": "i32", **COMMON,
                    }, {"LOSS": loss, "COVERS_ALL": covers_all, "HAS_MASK": has_mask, "MEAN": False,
                        "WRITE_GRAD": write_grad, "BLOCK": 4096, "BLOCK_K": 64, "SEARCH_STEPS": 7, "RECOUNT_BLOCK": 1024,
                        "EXACT_BELOW": 1e-3})
        compile_one(token_logprobs._token_logprobs_fwd_kernel, {
            "x_ptr": dt, "x_stride": "i64", "tok_ptr": "*i64", "logp_ptr": "*fp32", "ent_ptr": "*fp32",
            "max_ptr": "*fp32", "logz_ptr": "*fp32", "n_cols": "i32", "inv_t": "fp32"}, {"BLOCK": 4096})
        for has_glogp, has_gent in ((True, True), (True, False), (False, True)):
            compile_one(token_logprobs._token_logprobs_bwd_kernel, {
                "x_ptr": dt, "x_stride": "i64", "g_ptr": dt, "g_stride": "i64", "tok_ptr": "*i32",
                "max_ptr": "*fp32", "logz_ptr": "*fp32", "ent_ptr": "*fp32", "glogp_ptr": "*fp32",
                "gent_ptr": "*fp32", "n_cols": "i32", "inv_t": "fp32"},
                {"HAS_GLOGP": has_glogp, "HAS_GENT": has_gent, "BLOCK": 4096})
    print(f"compiled {len(COMPILED)} kernel variants for sm_90 with triton {triton.__version__}")


if __name__ == "__main__":
    main()
