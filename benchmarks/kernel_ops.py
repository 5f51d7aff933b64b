"""Benchmark the tnd_kernels ops (forward + backward) against torch eager, torch.compile and Liger-Kernel.

GPU sweep (default): N in {4096, 8192, 16384} x V in {32000, 128256}, bfloat16, for
  distill      distill_loss: forward_kl, reverse_kl, jsd (beta 0.5), temperature 2
  topk         topk_distill_loss: k = 64 cached teacher log-probs (+ tail), same losses
  token        token_logprobs_entropy: backward through logp + entropy
and the implementations
  ours          tnd_kernels, backend="triton"
  ours_inplace  the same with inplace=True (gradient written into the student logits)
  eager         tnd_kernels.reference (plain torch, autograd)
  compile       torch.compile of the reference
  liger         Liger-Kernel (distill only, when importable): log_softmax in torch, then
                LigerKLDIVLoss(log_target=True) for forward_kl, LigerJSD(beta=1) for reverse_kl,
                LigerJSD(beta=0.5) for jsd (Liger works on log-probs and omits the T**2 factor;
                the timing covers the whole student-logits -> gradient path)

Each measurement is one forward + backward (`torch.autograd.grad` w.r.t. the student logits, so
no .grad accumulation copy), timed with triton.testing.do_bench (median), and its peak extra
memory is torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus what was
allocated before the call (inputs); it includes the returned [N, V] gradient (0 for inplace).

Achieved bandwidth uses a byte model per op: the bytes the fused design must move (bs, bt =
bytes per student / teacher element, bi = bytes per index, k = top-k):
  distill forward_kl, reverse_kl   N V (2 bs + 2 bt + bs)   two passes over student + teacher, one gradient write
  distill jsd                      N V (3 bs + 3 bt + bs)   log M needs both normalisers first: three passes
  topk                             N V (3 bs) + N k (2 bt + 2 bi + 2 bs + 8) + 4 N
                                   (student read twice, gradient written once; teacher values and indices
                                   read twice, the k student gathers/scatters and a k-float fp32 scratch)
  token                            N V (3 bs) + 16 N   (forward reads logits once; backward reads once, writes once)
The same model is applied to every implementation (so it is a normalised speed), and reported
as a fraction of a plain device-to-device copy (dst.copy_(src) of 2 GiB: 2 x 2 GiB moved)
measured in the same run.

  python benchmarks/kernel_ops.py                     # full GPU sweep -> benchmarks/results/<gpu-name>.json
  python benchmarks/kernel_ops.py --ops distill --n 4096 --v 32000    # a slice (merged into the JSON)
  python benchmarks/kernel_ops.py --smoke             # CPU: tiny sizes, interpreter + torch; labelled smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny sizes, Triton interpreter, no GPU numbers")
    p.add_argument("--ops", default="distill,topk,token")
    p.add_argument("--losses", default="forward_kl,reverse_kl,jsd")
    p.add_argument("--impls", default="ours,ours_inplace,eager,compile,liger")
    p.add_argument("--n", default="4096,8192,16384", help="rows (tokens)")
    p.add_argument("--v", default="32000,128256", help="vocabulary sizes")
    p.add_argument("--k", type=int, default=64, help="teacher top-k for the topk op")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/<gpu-name>.json)")
    p.add_argument("--fresh", action="store_true", help="overwrite the JSON instead of merging into it")
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.smoke and os.environ.get("TRITON_INTERPRET") is None:
    os.environ["TRITON_INTERPRET"] = "1"  # before tnd_kernels builds its kernels
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import tnd_kernels as K  # noqa: E402
from tnd_kernels import reference as R  # noqa: E402

CUDA = torch.cuda.is_available() and not ARGS.smoke
DEVICE = "cuda" if CUDA else "cpu"
BETA = 0.5


# ------------------------------------------------------------------------------------------ timing


def bench_ms(fn) -> float:
    if CUDA:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[1]


def peak_extra_bytes(fn) -> int | None:
    if not CUDA:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


def copy_bandwidth() -> float:
    """Bytes/s of dst.copy_(src) (read + write counted)."""
    nbytes = (2 << 30) if CUDA else (64 << 20)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=DEVICE).fill_(1.0)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3)


# ------------------------------------------------------------------------------------------ inputs


def make_inputs(op: str, n: int, v: int, dtype: torch.dtype, k: int):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    student = (torch.randn(n, v, device=DEVICE, generator=g) * 2).to(dtype)
    if op == "distill":
        teacher = (torch.randn(n, v, device=DEVICE, generator=g) * 2).to(dtype)
        return {"student": student, "teacher": teacher}
    if op == "topk":
        teacher = torch.randn(n, v, device=DEVICE, generator=g) * 2
        lp = torch.log_softmax(teacher / ARGS.temperature, -1)
        vals, idx = lp.topk(k, dim=-1)
        tail = torch.logsumexp(lp.scatter(1, idx, float("-inf")), -1)
        del teacher, lp
        return {"student": student, "vals": vals, "idx": idx.to(torch.int32), "tail": tail}
    tokens = torch.randint(0, v, (n,), device=DEVICE, generator=g)
    return {"student": student, "tokens": tokens}


def byte_model(op: str, loss: str, n: int, v: int, bs: int, k: int) -> tuple[int, str]:
    if op == "distill":
        passes = 3 if loss == "jsd" else 2
        bt = bs  # the sweep uses one dtype for student and teacher
        return n * v * (passes * bs + passes * bt + bs), f"N*V*({passes}*bs + {passes}*bt + bs)"
    if op == "topk":
        bt = bi = 4  # fp32 cached log-probs, int32 indices
        return n * v * 3 * bs + n * k * (2 * bt + 2 * bi + 2 * bs + 8) + 4 * n, "N*V*3*bs + N*k*(2*bt + 2*bi + 2*bs + 8) + 4*N"
    return n * v * 3 * bs + 16 * n, "N*V*3*bs + 16*N"


# ------------------------------------------------------------------------------------------ impls


LIGER_ERROR = None


def liger_module(loss: str):
    global LIGER_ERROR
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
    except Exception as exc:  # not installed, or no GPU build
        LIGER_ERROR = f"{type(exc).__name__}: {exc}"
        return None
    if loss == "forward_kl":
        return LigerKLDIVLoss(reduction="batchmean", log_target=True)
    return LigerJSD(beta=1.0 if loss == "reverse_kl" else BETA)


def build_step(op: str, impl: str, loss: str, inputs: dict):
    """A zero-arg callable doing forward + backward, returning the gradient (None: impl not available)."""
    temp = ARGS.temperature
    s0 = inputs["student"]

    if op == "distill":
        t = inputs["teacher"]
        if impl == "liger":
            mod = liger_module(loss)
            if mod is None or not CUDA:
                return None

            def f(x):
                lq = torch.log_softmax(x / temp, dim=-1)
                with torch.no_grad():
                    lp = torch.log_softmax(t / temp, dim=-1)
                return mod(lq, lp) * temp**2  # T**2 for parity with ours (Liger omits it)

        elif impl in ("ours", "ours_inplace"):

            def f(x):
                return K.distill_loss(x, t, loss, BETA, temp, backend="triton", inplace=impl == "ours_inplace")

        else:

            def f(x):
                return R.distill_loss_ref(x, t, loss, BETA, temp)

    elif op == "topk":
        vals, idx, tail = inputs["vals"], inputs["idx"], inputs["tail"]
        if impl == "liger":
            return None
        if impl in ("ours", "ours_inplace"):

            def f(x):
                return K.topk_distill_loss(x, vals, idx, tail, loss, BETA, temp, backend="triton", inplace=impl == "ours_inplace")

        else:

            def f(x):
                return R.topk_distill_loss_ref(x, vals, idx, tail, loss, BETA, temp)

    else:
        tokens = inputs["tokens"]
        if impl == "liger":
            return None
        if impl in ("ours", "ours_inplace"):

            def f(x):
                lp, h = K.token_logprobs_entropy(x, tokens, temp, backend="triton", inplace=impl == "ours_inplace")
                return lp.sum() + 0.01 * h.sum()

        else:

            def f(x):
                lp, h = R.token_logprobs_entropy_ref(x, tokens, temp)
                return lp.sum() + 0.01 * h.sum()

    if impl == "compile":
        if not CUDA:
            return None
        f = torch.compile(f)

    # inplace variants clobber their input: give them a private copy (re-used across iterations;
    # the gradient values it then holds are as good logits as any for timing)
    x = s0.clone().requires_grad_() if impl == "ours_inplace" else s0.detach().requires_grad_()

    def step():
        out = f(x)
        (grad,) = torch.autograd.grad(out, x)
        return grad

    return step


# ------------------------------------------------------------------------------------------ main


def gpu_name() -> str:
    if CUDA:
        return torch.cuda.get_device_name()
    return f"cpu-{platform.machine()}"


def main() -> None:
    ops = [o for o in ARGS.ops.split(",") if o]
    losses = [x for x in ARGS.losses.split(",") if x]
    impls = [x for x in ARGS.impls.split(",") if x]
    impls.sort(key=lambda i: i != "eager")  # eager first: the speed-up column needs it
    dtype = getattr(torch, ARGS.dtype)
    if ARGS.smoke:
        ns, vs, k = [8], [300], 4
        impls = [i for i in impls if i in ("ours", "ours_inplace", "eager")]
    else:
        if not CUDA:
            sys.exit("no CUDA device: run with --smoke for the CPU smoke test")
        ns, vs, k = [int(x) for x in ARGS.n.split(",")], [int(x) for x in ARGS.v.split(",")], ARGS.k
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    bs = torch.empty((), dtype=dtype).element_size()

    copy_bw = copy_bandwidth()
    print(f"device: {gpu_name()}  dtype: {ARGS.dtype}  copy bandwidth: {copy_bw / 1e9:.1f} GB/s"
          + ("  [SMOKE: CPU, interpreter, numbers meaningless]" if ARGS.smoke else ""))
    header = f"{'op':8s} {'loss':10s} {'N':>6s} {'V':>7s} {'impl':13s} {'ms':>9s} {'xEager':>7s} {'peak GiB':>9s} {'GB/s':>8s} {'%copy':>6s}"
    print(header)
    print("-" * len(header))

    records = []
    for op in ops:
        for loss in (losses if op != "token" else ["-"]):
            for n in ns:
                for v in vs:
                    inputs = make_inputs(op, n, v, dtype, k)
                    nbytes, formula = byte_model(op, loss, n, v, bs, k)
                    eager_ms = None
                    for impl in impls:
                        rec = {"op": op, "loss": loss, "N": n, "V": v, "k": k if op == "topk" else None,
                               "dtype": ARGS.dtype, "impl": impl, "bytes_model": nbytes, "bytes_formula": formula}
                        try:
                            step = build_step(op, impl, loss if loss != "-" else "forward_kl", inputs)
                            if step is None:
                                continue
                            step()  # warm-up / compile
                            rec["peak_extra_bytes"] = peak_extra_bytes(step)
                            rec["ms"] = bench_ms(step)
                        except torch.OutOfMemoryError:
                            rec["error"] = "OOM"
                        except Exception as exc:  # keep the sweep going, record why
                            rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                        finally:
                            if CUDA:
                                torch.cuda.empty_cache()
                        if "ms" in rec:
                            rec["gbps"] = nbytes / (rec["ms"] * 1e-3) / 1e9
                            rec["frac_copy_bw"] = rec["gbps"] * 1e9 / copy_bw
                            if impl == "eager":
                                eager_ms = rec["ms"]
                            peak = rec["peak_extra_bytes"]
                            print(f"{op:8s} {loss:10s} {n:6d} {v:7d} {impl:13s} {rec['ms']:9.3f} "
                                  f"{(eager_ms / rec['ms']) if eager_ms else float('nan'):7.2f} "
                                  f"{(peak / 2**30) if peak is not None else float('nan'):9.3f} "
                                  f"{rec['gbps']:8.1f} {100 * rec['frac_copy_bw']:6.1f}")
                        else:
                            print(f"{op:8s} {loss:10s} {n:6d} {v:7d} {impl:13s} {rec['error']}")
                        records.append(rec)
                    del inputs
    for rec in records:  # speed-up vs eager, once every impl of a config is in
        ref = next((r for r in records if r["impl"] == "eager" and "ms" in r and
                    all(r[key] == rec[key] for key in ("op", "loss", "N", "V"))), None)
        if ref and "ms" in rec:
            rec["speedup_vs_eager"] = ref["ms"] / rec["ms"]

    name = re.sub(r"[^a-z0-9]+", "-", gpu_name().lower()).strip("-")
    out = Path(ARGS.out) if ARGS.out else RESULTS / (f"smoke-{name}.json" if ARGS.smoke else f"{name}.json")
    meta = {
        "smoke": bool(ARGS.smoke),
        "note": ("SMOKE RUN on CPU (Triton interpreter / torch eager, tiny sizes): proves the script runs; "
                 "the numbers are NOT performance measurements") if ARGS.smoke else "measured by benchmarks/kernel_ops.py",
        "device": gpu_name(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "liger_kernel": _liger_version(),
        "liger_import_error": LIGER_ERROR,
        "dtype": ARGS.dtype,
        "temperature": ARGS.temperature,
        "jsd_beta": BETA,
        "copy_bandwidth_bytes_per_s": copy_bw,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if out.exists() and not ARGS.fresh and not ARGS.smoke:
        old = json.loads(out.read_text())
        key = lambda r: (r["op"], r["loss"], r["N"], r["V"], r.get("k"), r["dtype"], r["impl"])  # noqa: E731
        new_keys = {key(r) for r in records}
        records = [r for r in old.get("results", []) if key(r) not in new_keys] + records
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": records}, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def _liger_version():
    try:
        from importlib.metadata import version

        return version("liger-kernel")
    except Exception:
        return None


if __name__ == "__main__":
    main()
