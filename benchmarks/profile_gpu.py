"""Where the tnd_kernels ops spend their time on one GPU (issue 17), as one command for a short GPU window.

Parts, in this order (`--parts` picks some; each prints as it goes, and the JSON is rewritten after each one):

  static   Every kernel compiled for sm_90 exactly as the wrappers launch it at the benchmark shapes (bf16,
           T = 2, JSD beta 0.5, top-k k = 64): registers a thread, local memory (spills), shared memory,
           programs per multiprocessor that the registers allow, and, per pass over the vocabulary (a loop of
           the SASS), instructions and MUFU (exp2 / lg2) operations per element. With the bytes each pass
           moves, three floors per pass at N = 16384, V = 128256: bytes / copy bandwidth, instructions / issue
           rate (4 warp instructions a cycle per multiprocessor), MUFU ops / MUFU rate (16 a cycle). Needs no
           GPU (it runs in the CPU smoke), only Triton's bundled ptxas, cuobjdump and nvdisasm.
  bench    (CUDA) Per op and shape: parity with the torch reference (first shape), do_bench time of forward +
           backward, GB/s by the byte model of kernel_ops.py as % of a copy measured in the same run, the
           device time of each kernel of a step (torch.profiler) and what the step spends outside them, and the
           figures committed before this profile's kernel changes (results/nvidia-h200.json); then a sweep of
           BLOCK x num_warps at two shapes.
  ncu      (CUDA; Firecracker, where ncu reads the counters) the same kernels under
           `ncu --clock-control none`: DRAM throughput and bytes, achieved and theoretical occupancy, registers,
           L1 / L2 hit rates, local-memory (spill) traffic, issue slots busy, MUFU pipe use, stalls on memory
           (long scoreboard) and on barriers. One line and a skip where ncu cannot (gVisor: LibraryNotLoaded).
  trainer  CustomPPOTrainer steps under bf16 autocast, on the triton, the torch, then the triton backend again
           (a first-run effect would show as a faster second triton run): median step time, update time (the
           step outside sampling and scoring, as trainer_backends.py), then one step under torch.profiler with
           its top CUDA kernels and CPU ops; the Triton compilations during the timed steps (a recompilation
           per shape shows here) and the dtypes of the tensors that reach each kernel (an fp32 upcast shows).

    python benchmarks/profile_gpu.py                                  # CUDA, ~4 min -> results/profile-<gpu>.json
    python benchmarks/profile_gpu.py --parts bench,ncu                # some parts
    python benchmarks/profile_gpu.py --cpu-smoke --out /tmp/p.json    # CPU: each part that can run, tiny sizes

The static floors take the copy bandwidth of the committed H200 run (4261 GB/s; the static part runs before the
bench part measures one) and, without a GPU, an H200's 132 multiprocessors at 1980 MHz (its clock under load, as
nvidia-smi read it); on a GPU, that GPU's multiprocessor count and maximum SM clock.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import functools
import glob
import importlib.util
import inspect
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BASELINE = RESULTS / "nvidia-h200.json"  # kernel_ops.py's run on an H200, before this profile's kernel changes
PARTS = ("static", "bench", "ncu", "trainer")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="every part that can run on CPU, at tiny sizes")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--out", default=None, help="JSON path (default: results/profile-<gpu>.json)")
    p.add_argument("--child", choices=("static", "ncu"), help=argparse.SUPPRESS)  # run_static, ncu_part
    return p.parse_args(argv)


ARGS = parse_args()
SMOKE = ARGS.cpu_smoke
if SMOKE and ARGS.child != "static":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before tnd_kernels builds its kernels
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch

from tnd_kernels import _common, distill, reference, token_logprobs, topk_distill

CUDA = torch.cuda.is_available() and not SMOKE
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16
TEMPERATURE, BETA = 2.0, 0.5
TOPK = 4 if SMOKE else 64
OPS = ("distill forward_kl", "distill jsd", "topk forward_kl", "token")  # forward KL: the control (82-89%)
SHAPES = [(8, 300)] if SMOKE else [(n, v) for n in (4096, 8192, 16384) for v in (32000, 128256)]
SWEEP_SHAPES = [(8, 300)] if SMOKE else [(4096, 32000), (16384, 128256)]
SWEEP = [(256, 4), (1024, 4)] if SMOKE else [(1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (4096, 16),
                                              (8192, 8), (8192, 16)]
REFERENCE_SHAPE = (16384, 128256)  # where the static floors are evaluated (the headline shape of docs/results.md)
H200 = SimpleNamespace(sms=132, clock_hz=1.98e9, copy_bytes_s=4261e9)  # until a GPU run measures its own
BUDGET_S = {"bench": 80, "ncu": 60, "trainer": 80}  # a part stops starting new work past its budget


# ----------------------------------------------------------------------------------------- launches


KERNEL_SITES = [(distill, "_distill_kernel"), (topk_distill, "_topk_distill_kernel"),
                (token_logprobs, "_token_logprobs_fwd_kernel"), (token_logprobs, "_token_logprobs_bwd_kernel"),
                (_common, "_scale_rows_kernel")]
LAUNCH_OPTIONS = ("num_warps", "num_stages")
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
                torch.int32: "i32", torch.int16: "i16", torch.uint8: "u8", torch.bool: "i1"}


class Launch:
    """One kernel launch, as Triton's JIT specialises it (triton.runtime.jit): a tensor is a pointer to its dtype,
    pointers aligned to 16 bytes and integers divisible by 16 get tt.divisibility 16, an integer equal to 1
    becomes a constant, a float is fp32; the wrappers pass every constexpr by keyword. No tensor is kept."""

    def __init__(self, fn, args: tuple, kwargs: dict):
        self.fn, self.name = fn, fn.fn.__name__
        names = list(inspect.signature(fn.fn).parameters)
        values = dict(zip(names, args), **kwargs)
        self.signature, self.constexprs, self.attrs = {}, {}, {}
        for i, name in enumerate(names):
            value = values[name]
            aligned = False
            if name in kwargs or value is None or (type(value) is int and value == 1):
                self.signature[name], self.constexprs[name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                self.signature[name], aligned = "*" + TRITON_TYPES[value.dtype], value.data_ptr() % 16 == 0
            elif isinstance(value, int):
                self.signature[name], aligned = ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0
            else:
                self.signature[name] = "fp32"
            if aligned:
                self.attrs[(i,)] = [["tt.divisibility", 16]]
        self.options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
        # what Triton compiles one binary per: a launch with a key not seen before compiles
        self.key = (self.name, tuple(self.signature.items()), tuple(sorted(self.attrs)),
                    tuple(self.constexprs.items()), tuple(self.options.items()))
        self.dtypes = " ".join(f"{n}={str(a.dtype).removeprefix('torch.')}" for n, a in zip(names, args)
                               if isinstance(a, torch.Tensor) and a.is_floating_point() and a.numel() > 1)


class LaunchLog:
    """While active, every tnd_kernels kernel is replaced in its module by a recorder of its launches, which
    also runs them when `run` is set (else nothing reaches a device)."""

    def __init__(self, run: bool):
        self.run, self.launches, self._saved = run, [], []

    def __enter__(self):
        for module, name in KERNEL_SITES:
            fn = getattr(module, name)
            self._saved.append((module, name, fn))
            setattr(module, name, _Recorder(fn, self))
        return self

    def __exit__(self, *exc):
        for module, name, fn in self._saved:
            setattr(module, name, fn)
        self._saved = []


class _Recorder:
    def __init__(self, fn, log: LaunchLog):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.launches.append(Launch(self.fn, args, kwargs))
            return self.fn[grid](*args, **kwargs) if self.log.run else None

        return launch


def forward_backward(op: str, inputs: dict, student: torch.Tensor):
    """One forward + backward of `op` through its autograd Function (the public functions also check that a
    CPU tensor has the interpreter; the static part calls them on CPU tensors with nothing launched)."""
    family, _, loss = op.partition(" ")
    if family == "distill":
        out = distill.DistillLossFunction.apply(student, inputs["teacher"], loss, BETA, TEMPERATURE, None,
                                                "batchmean", False, True)
    elif family == "topk":
        out = topk_distill.TopkDistillLossFunction.apply(student, inputs["vals"], inputs["idx"], inputs["tail"],
                                                         loss, BETA, TEMPERATURE, None, "batchmean", False, True)
    else:
        logp, ent = token_logprobs.TokenLogprobsEntropyFunction.apply(student, inputs["tokens"], TEMPERATURE, False)
        out = logp.sum() + 0.01 * ent.sum()
    return out.detach(), torch.autograd.grad(out, student)[0]


def make_inputs(op: str, n: int, v: int, device=DEVICE) -> dict:
    """bf16 student (and teacher) logits ~ N(0, 2), a top-k teacher cache (fp32 log-probs at T, int32
    indices, the tail's log-mass), or sampled tokens: the inputs of benchmarks/kernel_ops.py."""
    gen = torch.Generator(device=device).manual_seed(n + v)
    inputs = {"student": (2 * torch.randn(n, v, device=device, generator=gen)).to(DTYPE)}
    if op.startswith("distill"):
        inputs["teacher"] = (2 * torch.randn(n, v, device=device, generator=gen)).to(DTYPE)
    elif op.startswith("topk"):
        teacher_lp = torch.log_softmax(2 * torch.randn(n, v, device=device, generator=gen) / TEMPERATURE, -1)
        inputs["vals"], idx = teacher_lp.topk(TOPK, dim=-1)
        inputs["idx"] = idx.to(torch.int32)
        inputs["tail"] = torch.logsumexp(teacher_lp.scatter(1, idx, float("-inf")), -1)
    else:
        inputs["tokens"] = torch.randint(0, v, (n,), device=device, generator=gen)
    return inputs


def model_bytes(op: str, n: int, v: int, bs: int = 2) -> int:
    """kernel_ops.py's byte model (the bytes the fused design moves), so % copy compares with the baseline."""
    passes = pass_bytes(op, bs)
    extra = {"topk": n * TOPK * (2 * 4 + 2 * 4 + 2 * bs + 8) + 4 * n, "token": 16 * n}.get(op.split()[0], 0)
    return n * v * sum(sum(kernel) for kernel in passes) + extra


def pass_bytes(op: str, bs: int = 2) -> list[list[int]]:
    """Bytes per vocabulary element of each pass, per kernel of the op (student and teacher both bs bytes)."""
    if op.startswith("distill"):
        read_passes = 3 if op.endswith("jsd") else 2  # the JSD's log M needs both normalisers first
        return [[2 * bs] * (read_passes - 1) + [3 * bs]]  # ... and the last pass writes the gradient
    if op.startswith("topk"):
        return [[bs, 2 * bs]]  # student log-sum-exp; gradient (the k gathers / scatters are the extra term)
    return [[bs], [2 * bs]]  # token: forward reads once; backward reads once, writes once


# ----------------------------------------------------------------------------------------- static


def tool(name: str) -> str | None:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else shutil.which(name)


def sass_loops(sass: str) -> list[dict]:
    """The loops of a kernel's SASS (a branch back to an earlier label), with their instruction mix. `dense`:
    an innermost loop with the kernel's widest global load, i.e. a pass over the vocabulary (the gathers,
    scatters and the tail recount load narrower)."""
    labels, instrs = {}, []
    for line in sass.splitlines():
        if m := re.match(r"\s*(\.L_x_\d+):", line):
            labels[m.group(1)] = len(instrs)
        elif m := re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", line):
            instrs.append((m.group(1), m.group(2)))
    spans = []
    for i, (opcode, operands) in enumerate(instrs):
        target = re.search(r"\((\.L_x_\d+)\)", operands) if opcode.startswith("BRA") else None
        if target and labels.get(target.group(1), i + 1) <= i:
            spans.append((labels[target.group(1)], i))
    loops = []
    for start, end in spans:
        body = instrs[start:end + 1]
        ops = Counter(op.split(".")[0] for op, _ in body)
        loads = [int(m.group(1)) if (m := re.search(r"\.(64|128)\b", op)) else 32 for op, _ in body
                 if op.startswith("LDG")]
        nested = any(s > start and e < end for s, e in spans)
        loops.append({"instructions": len(body), "mufu": ops["MUFU"], "ldg": ops["LDG"], "stg": ops["STG"],
                      "bar": ops["BAR"], "widest_load_bits": max(loads, default=0), "load_bytes": sum(loads) // 8,
                      "nested": nested})
    widest = max((lp["widest_load_bits"] for lp in loops), default=0)
    for lp in loops:
        lp["dense"] = widest > 32 and lp["widest_load_bits"] == widest and not lp["nested"]
    return loops


def compile_report(launch: Launch) -> dict:
    """Compile one launch for sm_90 as the JIT would and read the resource usage and loops off the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = triton.compile(ASTSource(fn=launch.fn, signature=launch.signature, constexprs=launch.constexprs,
                                      attrs=launch.attrs), target=GPUTarget("cuda", 90, 32), options=launch.options)
    constexprs, warps = launch.constexprs, launch.options["num_warps"]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    regs, stack, shared, local = (int(x) for x in re.search(
        r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage).groups())
    regs_per_warp = -(-regs * 32 // 256) * 256  # allocated per warp in units of 256
    programs = min(65536 // (regs_per_warp * warps), 64 // warps, 32, 233472 // (shared + 1024))
    loops = sass_loops(sass)
    first = next((lp for lp in loops if lp["dense"]), None)
    return {"kernel": launch.name, "constexprs": {k: v for k, v in constexprs.items() if v is not None},
            "num_warps": warps, "registers": regs, "stack_bytes": stack, "local_bytes": local,
            "shared_bytes": shared, "programs_per_sm": programs,
            "elements_per_thread": constexprs["BLOCK"] // (32 * warps), "loops": loops,
            # what one multiprocessor has in flight in the first pass: the loads sit at the top of the loop, and
            # the block-wide reductions after them keep a program from issuing the next iteration's early
            "load_kib_in_flight_per_sm": programs * first["load_bytes"] * 32 * warps / 1024 if first else None}


def floors(report: dict, bytes_per_pass: list[int], gpu) -> list[dict]:
    """Per dense pass: bytes, instructions and MUFU ops per element, and the time each needs per element."""
    dense = [lp for lp in report["loops"] if lp["dense"]]
    if len(dense) != len(bytes_per_pass):
        return []  # the loop structure is not the pass model's: no floors rather than wrong ones
    issue_s = 1 / (gpu.sms * 4 * 32 * gpu.clock_hz)  # a warp instruction a cycle per scheduler, 4 per SM
    mufu_s = 1 / (gpu.sms * 16 * gpu.clock_hz)  # MUFU: 16 results a cycle per SM on sm_90
    per = report["elements_per_thread"]
    out = []
    for lp, nbytes in zip(dense, bytes_per_pass):
        instr, mufu = lp["instructions"] / per, lp["mufu"] / per
        floor = {"bytes": nbytes / gpu.copy_bytes_s, "issue": instr * issue_s, "mufu": mufu * mufu_s}
        out.append({"bytes": nbytes, "instructions": round(instr, 1), "mufu": round(mufu, 2), "floors_s": floor,
                    "bound_by": max(floor, key=floor.get)})
    return out


def static_part(result: dict, gpu) -> None:
    ops = ("distill jsd", "topk forward_kl") if SMOKE else (
        "distill forward_kl", "distill reverse_kl", "distill jsd", "topk forward_kl", "topk jsd", "token")
    baseline = baseline_ms()
    n, v = REFERENCE_SHAPE
    print(f"kernels compiled for sm_90 as launched at V = 32000 and 128256, bf16 (floors per element at N = {n}, "
          f"V = {v}: copy {gpu.copy_bytes_s / 1e9:.0f} GB/s, {gpu.sms} SMs at {gpu.clock_hz / 1e9:.2f} GHz)")
    print(f"{'op':20s} {'kernel':27s} {'regs':>4s} {'local':>5s} {'prog/SM':>7s} {'KB in flight/SM':>15s}  "
          "per pass: instr/elem, MUFU/elem, bound (B = bytes, I = issue, M = MUFU)")
    reports = {}
    for op in ops:
        result[op] = {"kernels": []}
        launches = []
        for vocab in (32000, 128256):
            inputs = make_inputs(op, 2, vocab, device="cpu")
            with LaunchLog(run=False) as log:
                forward_backward(op, inputs, inputs["student"].clone().requires_grad_())
            launches += [la for la in log.launches if la.name != "_scale_rows_kernel"]
        bound_s = 0.0
        kernel_passes = pass_bytes(op)
        for launch in {la.key: la for la in launches}.values():
            if launch.key not in reports:
                reports[launch.key] = compile_report(launch)
            report = dict(reports[launch.key])
            which = 1 if launch.name == "_token_logprobs_bwd_kernel" else 0
            report["passes"] = floors(report, kernel_passes[which], gpu)
            passes = " | ".join(f"{p['instructions']:5.1f} {p['mufu']:4.1f} {p['bound_by'][0].upper()}"
                                for p in report["passes"]) or "loops differ from the pass model: " + str(
                [lp["instructions"] for lp in report["loops"]])
            print(f"{op:20s} {launch.name:27s} {report['registers']:4d} {report['local_bytes']:5d} "
                  f"{report['programs_per_sm']:7d} {report['load_kib_in_flight_per_sm'] or 0:15.0f}  {passes}")
            bound_s += sum(max(p["floors_s"].values()) for p in report["passes"])
            result[op]["kernels"].append(report)
        if bound_s:
            ms = bound_s * n * v * 1e3
            result[op]["bound_ms"] = ms
            result[op]["bound_pct_copy"] = 100 * model_bytes(op, n, v) / gpu.copy_bytes_s / (ms * 1e-3)
            before = baseline.get((op, n, v))
            print(f"{'':20s} -> bound {ms:.2f} ms = {result[op]['bound_pct_copy']:.0f}% of copy"
                  + (f"; measured before this profile's changes: {before:.2f} ms "
                     f"({100 * model_bytes(op, n, v) / H200.copy_bytes_s / (before * 1e-3):.0f}% of copy)"
                     if before else ""))


def baseline_ms() -> dict:
    """(op, N, V) -> ms of `ours` in the committed H200 run (kernel_ops.py, before this profile's changes)."""
    if not BASELINE.exists():
        return {}
    out = {}
    for r in json.loads(BASELINE.read_text())["results"]:
        if r["impl"] == "ours" and "ms" in r:
            out[("token" if r["op"] == "token" else f"{r['op']} {r['loss']}", r["N"], r["V"])] = r["ms"]
    return out


def run_static(result: dict, gpu) -> None:
    """The kernels must be compiled, not interpreted: in the CPU smoke run (interpreter on), a child does it."""
    if not _common.INTERPRET:
        static_part(result, gpu)
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "static.json"
        cmd = [sys.executable, __file__, "--child", "static", "--out", str(out)] + (["--cpu-smoke"] if SMOKE else [])
        rc = subprocess.run(cmd, env=env, check=False).returncode
        if rc == 77:
            result["skipped"] = "this triton cannot compile for CUDA here"
        elif rc != 0:
            raise RuntimeError(f"static part failed in its child process (exit {rc})")
        else:
            result.update(json.loads(out.read_text()))


# ----------------------------------------------------------------------------------------- bench


def bench_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median ms by do_bench; on CPU (the smoke run, where the figure means nothing) one call after a warm-up."""
    fn()
    if not CUDA:
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def cases(shapes, deadline: float, what: str):
    """(N, V, op, inputs, student logits requiring grad) for each shape and op, until the part's deadline."""
    for n, v in shapes:
        for op in OPS:
            if time.monotonic() > deadline:
                print(f"-- over the part's budget: {what} from {op} at N = {n}, V = {v} on skipped")
                return
            inputs = make_inputs(op, n, v)
            yield n, v, op, inputs, inputs["student"].detach().requires_grad_()
            del inputs
            if CUDA:
                torch.cuda.empty_cache()


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy, read + write counted (kernel_ops.py's measure)."""
    src = torch.empty(1 << 30, dtype=DTYPE, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def kernel_device_ms(step, repeats: int = 5) -> dict[str, float]:
    """Device time per kernel name over one step (mean of `repeats`), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
    return {e.key: e.self_device_time_total / 1e3 / repeats for e in prof.key_averages()
            if e.self_device_time_total > 0}


def parity(op: str, inputs: dict) -> dict[str, float]:
    """Loss |out - ref| / |ref| and gradient max |g - ref| / max |ref| against the torch reference, which
    computes in fp32 on the same bf16 inputs."""
    x = inputs["student"].detach().requires_grad_()
    family, _, loss = op.partition(" ")
    if family == "distill":
        out = reference.distill_loss_ref(x, inputs["teacher"], loss, BETA, TEMPERATURE)
    elif family == "topk":
        out = reference.topk_distill_loss_ref(x, inputs["vals"], inputs["idx"], inputs["tail"], loss, BETA, TEMPERATURE)
    else:
        logp, ent = reference.token_logprobs_entropy_ref(x, inputs["tokens"], TEMPERATURE)
        out = logp.sum() + 0.01 * ent.sum()
    want = torch.autograd.grad(out, x)[0].float()
    got_out, got = forward_backward(op, inputs, inputs["student"].detach().requires_grad_())
    return {"loss": float((got_out - out.detach()).abs() / out.detach().abs()),
            "grad": float((got.float() - want).abs().max() / want.abs().max())}


@contextlib.contextmanager
def launch_config(block: int, warps: int):
    """Every wrapper picks BLOCK = min(next_pow2(V), MAX_BLOCK) and num_warps(BLOCK): pin both."""
    saved = _common.MAX_BLOCK, _common.num_warps
    _common.MAX_BLOCK, _common.num_warps = block, (lambda _block: warps)
    try:
        yield
    finally:
        _common.MAX_BLOCK, _common.num_warps = saved


def bench_part(result: dict, deadline: float) -> None:
    copy_bw = copy_bandwidth() if CUDA else None
    result["copy_bandwidth_bytes_per_s"] = copy_bw
    if copy_bw:
        print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s (committed run: {H200.copy_bytes_s / 1e9:.0f})")
    baseline = baseline_ms()
    print(f"{'op':20s} {'N':>6s} {'V':>7s} {'ms':>8s} {'%copy':>6s} {'before':>7s} {'kernels ms':>10s} "
          f"{'kern %copy':>10s} {'outside':>8s}  parity with the reference (relative)")
    rows = result.setdefault("shapes", [])
    for n, v, op, inputs, x in cases(SHAPES, deadline, "the shapes"):
        step = functools.partial(forward_backward, op, inputs, x)
        row = {"op": op, "N": n, "V": v, "bytes_model": model_bytes(op, n, v)}
        if (n, v) == SHAPES[0]:
            row["parity_rel_err"] = parity(op, inputs)
        row["ms"] = bench_ms(step)
        row["baseline_ms"] = baseline.get((op, n, v))
        line = f"{op:20s} {n:6d} {v:7d} {row['ms']:8.3f}"
        if CUDA:
            row["pct_copy"] = 100 * row["bytes_model"] / copy_bw / (row["ms"] * 1e-3)
            kernels = kernel_device_ms(step)
            ours = sum(t for k, t in kernels.items() if k.startswith("_") and k.endswith("_kernel"))
            row["kernel_device_ms"] = kernels
            row["outside_ms"] = row["ms"] - sum(kernels.values())  # glue kernels' time is in `kernels`
            line += (f" {row['pct_copy']:6.1f} {row['baseline_ms'] or float('nan'):7.3f} {ours:10.3f}"
                     f" {100 * row['bytes_model'] / copy_bw / (ours * 1e-3):10.1f} {row['outside_ms']:8.3f}")
        if "parity_rel_err" in row:  # bf16 gradients are rounded to bf16; the losses are fp32 on both sides
            err = row["parity_rel_err"]
            line += (f"  loss {err['loss']:.0e} grad {err['grad']:.0e}"
                     + (" FAIL" if err["loss"] > 1e-3 or err["grad"] > 2e-2 else ""))
        print(line)
        rows.append(row)
    sweep_part(result.setdefault("sweep", []), copy_bw, deadline)


def sweep_part(rows: list, copy_bw: float | None, deadline: float) -> None:
    print("sweep: % of copy (ms on CPU) by BLOCK x num_warps; the wrappers' choice is BLOCK 4096, 8 warps")
    print(f"{'op':20s} {'N':>6s} {'V':>7s} " + " ".join(f"{b:>5d}x{w:<2d}" for b, w in SWEEP))
    for n, v, op, inputs, x in cases(SWEEP_SHAPES, deadline, "the sweep"):
        cells = []
        for block, warps in SWEEP:
            with launch_config(block, warps):
                ms = bench_ms(functools.partial(forward_backward, op, inputs, x), warmup=5, rep=30)
            rows.append({"op": op, "N": n, "V": v, "block": block, "num_warps": warps, "ms": ms})
            cells.append(100 * model_bytes(op, n, v) / copy_bw / (ms * 1e-3) if copy_bw else ms)
        print(f"{op:20s} {n:6d} {v:7d} " + " ".join(f"{c:8.1f}" for c in cells))


# ----------------------------------------------------------------------------------------- ncu


NCU_SHAPE = (4096, 32000)
NCU_METRICS = {  # column label -> metric
    "time": "gpu__time_duration.sum",
    "DRAM % peak": "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "DRAM read": "dram__bytes_read.sum",
    "DRAM write": "dram__bytes_write.sum",
    "occupancy %": "sm__warps_active.avg.pct_of_peak_sustained_active",  # achieved
    "theoretical %": "sm__maximum_warps_per_active_cycle_pct",
    "registers": "launch__registers_per_thread",
    "L1 hit %": "l1tex__t_sector_hit_rate.pct",
    "L2 hit %": "lts__t_sector_hit_rate.pct",
    "local read": "l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum",  # spills read back
    "local write": "l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum",  # spills written
    "issue busy %": "sm__inst_issued.avg.pct_of_peak_sustained_active",
    "MUFU pipe %": "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active",  # exp2 / lg2
    "stall memory": "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
    "stall barrier": "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",
}
# if this ncu refuses one of the others
NCU_CORE = {k: NCU_METRICS[k] for k in ("time", "DRAM % peak", "DRAM read", "occupancy %", "registers", "L2 hit %")}
NCU_KERNELS = r"regex:^_(distill|topk_distill|token_logprobs_fwd|token_logprobs_bwd)_kernel$"


def ncu_binary() -> str | None:
    found = shutil.which("ncu") or next(iter(sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"), reverse=True)), None)
    return found or (shutil.which("ncu", path="/usr/local/cuda/bin"))


def ncu_child() -> None:
    """Under ncu: every op once to compile, then once inside the profiled range (ncu --profile-from-start off)."""
    n, v = NCU_SHAPE
    steps = []
    for op in OPS:
        inputs = make_inputs(op, n, v)
        x = inputs["student"].detach().requires_grad_()
        forward_backward(op, inputs, x)
        steps.append((op, inputs, x))
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for op, inputs, x in steps:
        forward_backward(op, inputs, x)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def ncu_part(result: dict, deadline: float) -> None:
    ncu = ncu_binary()
    if not CUDA or ncu is None:
        result["skipped"] = "no CUDA device" if not CUDA else "ncu not found"
        print(f"ncu: skipped ({result['skipped']})")
        return
    order = ["distill forward_kl", "distill jsd", "topk forward_kl", "token forward", "token backward"]
    for metrics in (NCU_METRICS, NCU_CORE):
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "ncu.csv"
            cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--target-processes", "all",
                   "--kernel-name", NCU_KERNELS, "--metrics", ",".join(metrics.values()), "--csv", "--page", "raw",
                   "--print-units", "base", "--log-file", str(log), sys.executable, __file__, "--child", "ncu"]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                      timeout=max(10.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                result["skipped"] = "timed out"
                print("ncu: skipped (over the part's budget)")
                return
            text = (log.read_text() if log.exists() else "") + proc.stdout + proc.stderr
        rows = parse_ncu_csv(text)
        if rows:
            break
        problem = next((ln.strip() for ln in text.splitlines() if "LibraryNotLoaded" in ln or "ERR_" in ln
                        or "rror" in ln), f"exit {proc.returncode}, no kernels profiled")[:500]
        result.setdefault("errors", []).append(problem)
        if metrics is NCU_CORE or "LibraryNotLoaded" in text or "ERR_NVGPUCTRPERM" in text:  # no counters here
            result["skipped"] = problem
            print(f"ncu: skipped: {problem}")
            return
        print(f"ncu: {problem}; retrying with the core metrics")
    result["shape"] = {"N": NCU_SHAPE[0], "V": NCU_SHAPE[1]}
    result["kernels"] = [{"op": op, "kernel": row["Kernel Name"], **{label: row.get(metric) for label, metric
                                                                      in metrics.items()}}
                         for op, row in zip(order, rows)]
    print(f"ncu at N = {NCU_SHAPE[0]}, V = {NCU_SHAPE[1]}, {len(rows)} kernels (bytes, ns; also in the JSON)")
    print(f"{'op':18s} " + " ".join(f"{label:>13s}" for label in metrics))
    for kernel in result["kernels"]:
        print(f"{kernel['op']:18s} " + " ".join(f"{(kernel[label] or '-').split()[0]:>13.13s}" for label in metrics))


def parse_ncu_csv(text: str) -> list[dict]:
    """Rows of `ncu --csv --page raw`: a header line starting with "ID", a units line, one line per kernel;
    each value with its unit after a space."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"ID"')), None)
    if start is None:
        return []
    header, units, *rows = csv.reader(io.StringIO("\n".join(ln for ln in lines[start:] if ln.startswith('"'))))
    return [{name: f"{value} {unit}".strip() for name, value, unit in zip(header, row, units)}
            for row in rows if len(row) == len(header)]


# ----------------------------------------------------------------------------------------- trainer


def compiled_binaries() -> int | None:
    """Binaries in Triton's JIT caches of the tnd_kernels kernels (None when interpreted: nothing compiles)."""
    total = 0
    for module, name in KERNEL_SITES:
        caches = getattr(getattr(module, name), "device_caches", None)
        if caches is None:
            return None
        total += sum(len(entry[0]) for entry in caches.values())
    return total


def add_time(obj, method: str, spent: list) -> None:
    """Wrap obj.method so each call appends its wall seconds (device synchronised) to `spent`."""
    inner = getattr(obj, method)

    def timed(*args, **kwargs):
        sync()
        t = time.perf_counter()
        out = inner(*args, **kwargs)
        sync()
        spent.append(time.perf_counter() - t)
        return out

    setattr(obj, method, timed)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


@contextlib.contextmanager
def op_inputs(counter: Counter):
    """Count the public ops' calls by (op, dtype of the logits, backend) while active: the dtype both backends
    are handed, where the launches show only what reaches the Triton kernels."""
    import tnd_kernels

    saved = {name: getattr(tnd_kernels, name) for name in ("distill_loss", "topk_distill_loss", "token_logprobs_entropy")}

    def counting(name, fn):
        def call(logits, *args, **kwargs):
            counter[f"{name}({str(logits.dtype).removeprefix('torch.')}, backend={kwargs.get('backend')})"] += 1
            return fn(logits, *args, **kwargs)

        return call

    for name, fn in saved.items():
        setattr(tnd_kernels, name, counting(name, fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(tnd_kernels, name, fn)


def top_ops(prof, attr: str, limit: int = 8) -> list[dict]:
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    return [{"name": e.key, "ms": getattr(e, attr) / 1e3, "calls": e.count} for e in events[:limit]
            if getattr(e, attr) > 0]


def trainer_part(result: dict, deadline: float) -> None:
    import trainer_backends
    from torch.profiler import ProfilerActivity, profile

    from tnd.config import CustomPPOConfig, load_params
    from tnd.trainers import CustomPPOTrainer

    warmup, timed_steps = (1, 1) if SMOKE else (2, 4)
    params = load_params(ROOT / "params.yaml")
    torch.manual_seed(params.seed)
    build_args = SimpleNamespace(smoke=SMOKE, demos=16 if SMOKE else 128, teacher_steps=5 if SMOKE else 100,
                                 mixed_precision="bf16")
    t0 = time.perf_counter()
    tokenizer, teacher, student, reward, cache, prompts = trainer_backends.build(
        params.model_dump(), build_args, torch.device(DEVICE))
    print(f"models, tokenizer and {len(cache)} cached demonstrations built in {time.perf_counter() - t0:.0f} s; "
          f"bf16 autocast; {warmup} warm-up + {timed_steps} timed steps + 1 profiled step per run")
    overrides = {"batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 1, "max_new_tokens": 4,
                 "demo_batch_size": 4} if SMOKE else {}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    runs = result.setdefault("runs", [])
    for backend in ("triton", "torch", "triton"):
        if time.monotonic() > deadline:
            print(f"-- over the part's budget: the {backend} run and the rest skipped")
            return
        config = CustomPPOConfig.from_params(params, kernel_backend=backend, mixed_precision="bf16", **overrides)
        torch.manual_seed(params.seed)
        trainer = CustomPPOTrainer(teacher, copy.deepcopy(student), reward, config, train_dataset=prompts,
                                   demonstrations=cache, tokenizer=tokenizer)
        outside: list[float] = []
        add_time(trainer, "_sample", outside)
        add_time(trainer, "compute_scores", outside)
        with LaunchLog(run=True) as warm:
            for _ in range(warmup):
                trainer.step(trainer.next_prompts())
        binaries = compiled_binaries()
        step_s, update_s, calls = [], [], Counter()
        with LaunchLog(run=True) as log, op_inputs(calls):
            for _ in range(timed_steps):
                outside.clear()
                sync()
                t = time.perf_counter()
                trainer.step(trainer.next_prompts())
                sync()
                step_s.append(time.perf_counter() - t)
                update_s.append(step_s[-1] - sum(outside))
        compiled = None if binaries is None else compiled_binaries() - binaries
        with profile(activities=activities) as prof:
            trainer.step(trainer.next_prompts())
            sync()
        keys = Counter(launch.key for launch in log.launches)
        new_keys = set(keys) - {launch.key for launch in warm.launches}  # each one a compilation
        run = {"backend": backend, "step_s_median": statistics.median(step_s),
               "update_s_median": statistics.median(update_s), "step_s": step_s, "update_s": update_s,
               "triton_compilations_in_timed_steps": compiled,
               "kernel_launches": dict(Counter(launch.name for launch in log.launches)),
               "specialisations": len(keys), "specialisations_new_in_timed_steps": len(new_keys),
               "op_calls": dict(calls),
               "dtypes_at_kernels": dict(Counter(f"{la.name}: {la.dtypes}" for la in log.launches)),
               "top_cuda": top_ops(prof, "self_device_time_total") if CUDA else [],
               "top_cpu": top_ops(prof, "self_cpu_time_total")}
        runs.append(run)
        print(f"\n[{backend}] step {run['step_s_median'] * 1e3:.0f} ms, update {run['update_s_median'] * 1e3:.0f} ms "
              f"(median of {timed_steps}); Triton compilations during the timed steps: "
              f"{'n/a (interpreter)' if compiled is None else compiled}; {len(log.launches)} kernel launches in "
              f"{len(keys)} specialisations, {len(new_keys)} of them not seen in the warm-up")
        for what, count in list(run["op_calls"].items()) + list(run["dtypes_at_kernels"].items()):
            print(f"  {count:5d} x {what}")
        for title, rows in (("CUDA kernels (self device time)", run["top_cuda"]), ("CPU ops (self CPU time)",
                                                                                  run["top_cpu"])):
            if rows:
                print(f"  top {title}, one step:")
                for r in rows:
                    print(f"    {r['ms']:9.3f} ms {r['calls']:6d} x  {r['name'][:90]}")
        del trainer
    if len(runs) < 2:
        return
    ratios = [f"{run['backend']} {run['update_s_median'] / runs[1]['update_s_median']:.2f}" for run in runs]
    print(f"\nupdate time / torch's, in run order: {', '.join(ratios)}; Triton compilations in the timed steps: "
          + ", ".join(str(run["triton_compilations_in_timed_steps"]) for run in runs if run["backend"] == "triton"))


# ----------------------------------------------------------------------------------------- main


def gpu_name() -> str:
    return torch.cuda.get_device_name() if CUDA else "cpu"


def gpu_constants():
    """SM count and SM clock of this GPU (nvidia-smi's maximum), the H200's where there is none."""
    if not CUDA:
        return H200
    clock = H200.clock_hz
    with contextlib.suppress(Exception):
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        clock = float(out.split()[0]) * 1e6
    return SimpleNamespace(sms=torch.cuda.get_device_properties(0).multi_processor_count, clock_hz=clock,
                           copy_bytes_s=H200.copy_bytes_s)


def main() -> None:
    if ARGS.child == "ncu":
        ncu_child()
        return
    gpu = gpu_constants()
    if ARGS.child == "static":
        result: dict = {}
        if importlib.util.find_spec("triton.backends.nvidia") is None:
            sys.exit(77)
        static_part(result, gpu)
        Path(ARGS.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
        return
    if not CUDA and not SMOKE:
        sys.exit("no CUDA device: run with --cpu-smoke for the CPU smoke test")
    parts = [p for p in ARGS.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        sys.exit(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    name = re.sub(r"[^a-z0-9]+", "-", gpu_name().lower()).strip("-")
    out = Path(ARGS.out) if ARGS.out else (Path(tempfile.gettempdir()) / "profile-smoke.json" if SMOKE
                                           else RESULTS / f"profile-{name}.json")
    record = {"meta": {"device": gpu_name(), "smoke": SMOKE, "torch": torch.__version__, "triton": triton_version(),
                       "sms": gpu.sms, "clock_hz": gpu.clock_hz, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "note": ("SMOKE RUN on CPU (interpreter, tiny sizes): proves the script runs; no "
                                "performance figures") if SMOKE else "measured by benchmarks/profile_gpu.py"}}
    print(f"device: {gpu_name()}  torch {torch.__version__}  triton {triton_version()}"
          + ("  [SMOKE: CPU, interpreter, numbers meaningless]" if SMOKE else ""))
    for part in PARTS:
        if part not in parts:
            continue
        print(f"\n=== {part} {time.strftime('%H:%M:%S')}")
        t = time.monotonic()
        record[part] = {}
        deadline = t + BUDGET_S.get(part, 0)
        try:
            if part == "static":
                run_static(record[part], gpu)
            elif part == "bench":
                bench_part(record[part], deadline)
            elif part == "ncu":
                ncu_part(record[part], deadline)
            else:
                trainer_part(record[part], deadline)
        except Exception as exc:  # noqa: BLE001 - one part's failure must not cost the others their GPU minutes
            record[part]["error"] = f"{type(exc).__name__}: {exc}"
            print(f"=== {part} FAILED: {record[part]['error'][:500]}")
        record[part]["seconds"] = time.monotonic() - t
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1, default=str) + "\n")
        print(f"=== {part}: {record[part]['seconds']:.0f} s")
    print(f"wrote {out}")
    if any("error" in record[p] for p in parts):
        sys.exit(1)


def triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
