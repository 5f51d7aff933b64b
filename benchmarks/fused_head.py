"""The fused output head (tnd_kernels.fused_head) against the unfused path, in the same run: a PPO + distillation
mini-batch's loss part, from the last hidden states to the gradients of h and W.

A mini-batch of N tokens: N/2 PPO response tokens (log-probs + entropy at the sampled tokens, PPO's clipped
objective, ent_coef 0 as the default trainer) and N/2 demonstration tokens (top-k + tail distillation, k =
cache.top_k = 128, forward KL). Unfused: logits = h @ W.T for all N, then today's ops. Fused: the two fused-head
ops. Both on the backend the trainer takes for the device (CPU: torch; CUDA: Triton).

CPU (default): each (shape, path) runs in its own process; peak memory is the resident-set high-water mark
(VmHWM, reset just before the loss through /proc/self/clear_refs) above the resident set of the inputs, over
one forward + backward; time is the median of --reps more. -> benchmarks/results/fused-head-cpu.json.

    python benchmarks/fused_head.py                  # the CPU table (about 15 minutes on 2 cores)
    python benchmarks/fused_head.py --smoke          # tiny shapes, results to --out
    python benchmarks/fused_head.py --gpu            # M = 8192, H = 4096, V = 128256 on CUDA, with Liger's fused
                                                     # linear cross-entropy and JSD when liger_kernel imports, and
                                                     # the largest N that fits, fused and unfused (run_gpu.sh)

The GPU mode measures torch.cuda.max_memory_allocated above the inputs and CUDA-event times; on CPU
(--gpu --smoke) it runs the same code at tiny sizes (no Liger, a search capped at --max-tokens) to prove it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tnd_kernels as K  # noqa: E402
from tnd.io import atomic_write_json  # noqa: E402

TOP_K = 128
CPU_SHAPES = [  # (V, H, N): what fits 24 GiB unfused and about 15 minutes on 2 cores
    (32000, 512, 2048),
    (32000, 512, 8192),
    (128256, 512, 2048),
    (128256, 1024, 2048),
]
SMOKE_SHAPES = [(3000, 64, 256), (5000, 32, 128)]


def make_batch(v: int, h: int, n: int, device: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Inputs written in place (no temporary of their size, which would raise the high-water mark before the loss)."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.empty(n, h, device=device, dtype=dtype).normal_(generator=g).requires_grad_()
    weight = torch.empty(v, h, device=device, dtype=dtype).normal_(std=h**-0.5, generator=g).requires_grad_()
    n_ppo = n // 2
    n_demo = n - n_ppo
    tokens = torch.randint(0, v, (n_ppo,), device=device, generator=g)
    old = torch.empty(n_ppo, device=device).normal_(mean=-10.0, generator=g)
    adv = torch.empty(n_ppo, device=device).normal_(generator=g)
    k = min(TOP_K, v - 1)
    # distinct indices per row without an [N, V] draw: a random offset plus a stride prime to V
    offset = torch.randint(0, v, (n_demo, 1), device=device, generator=g)
    idx = (offset + torch.arange(k, device=device) * 7919) % v
    lp = torch.log_softmax(torch.empty(n_demo, k + 1, device=device).normal_(std=2.0, generator=g), -1)
    return {"hidden": hidden, "weight": weight, "tokens": tokens, "old": old, "adv": adv, "n_ppo": n_ppo,
            "tlp": lp[:, :k].contiguous(), "idx": idx, "tail": lp[:, k].contiguous()}


def ppo_rows(logp, ent, old, adv, m):
    """PPO's clipped objective over m tokens as a sum of per-row terms (ent_coef 0, the default)."""
    ratio = torch.exp(logp - old)
    return torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).sum() / m


def loss_unfused(b: dict, backend: str) -> torch.Tensor:
    n_ppo = b["n_ppo"]
    logits = b["hidden"] @ b["weight"].t()
    logp, ent = K.token_logprobs_entropy(logits[:n_ppo], b["tokens"], backend=backend)
    ppo = ppo_rows(logp, ent, b["old"], b["adv"], n_ppo)
    distill = K.topk_distill_loss(logits[n_ppo:], b["tlp"], b["idx"], b["tail"], backend=backend)
    return ppo + distill


def loss_fused(b: dict, backend: str) -> torch.Tensor:
    """The same losses in one pass over the head: the PPO rows and the demonstration rows share it."""
    n_ppo, n = b["n_ppo"], b["hidden"].shape[0]

    def ppo(logits, rows):
        logp, ent = K.token_logprobs_entropy(logits, b["tokens"][rows], backend=backend)
        return ppo_rows(logp, ent, b["old"][rows], b["adv"][rows], n_ppo)

    def distill(logits, rows):
        part = K.topk_distill_loss(logits, b["tlp"][rows], b["idx"][rows], b["tail"][rows], reduction="sum",
                                   backend=backend)
        return part / (n - n_ppo)

    (loss,) = K.fused_head_loss(b["hidden"], b["weight"], K.split_rows((0, n_ppo, ppo), (n_ppo, n, distill)))
    return loss


PATHS = {"fused": loss_fused, "unfused": loss_unfused}


def step(b: dict, path: str, backend: str) -> float:
    b["hidden"].grad = b["weight"].grad = None
    loss = PATHS[path](b, backend)
    loss.backward()
    return loss.item()


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def cpu_case(v: int, h: int, n: int, path: str, reps: int) -> dict:
    """One (shape, path) in this process: peak RSS above the inputs over one step, then the median time of reps."""
    torch.manual_seed(0)
    b = make_batch(v, h, n, "cpu")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the high-water mark from here on
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    loss = step(b, path, "torch")
    first = time.perf_counter() - start
    peak = _status_kib("VmHWM") - base
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step(b, path, "torch")
        times.append(time.perf_counter() - start)
    return {"loss": loss, "peak_bytes": peak * 1024, "first_s": first, "time_s": statistics.median(times),
            "times_s": times, "grad_w_norm": b["weight"].grad.norm().item()}


def run_cpu(shapes, reps: int, out: Path) -> None:
    records = []
    for v, h, n in shapes:
        raw = {}
        for path in ("unfused", "fused"):
            cmd = [sys.executable, __file__, "--case", json.dumps([v, h, n, path, reps])]
            result = subprocess.run(cmd, capture_output=True, text=True, check=True)
            raw[path] = json.loads(result.stdout.strip().splitlines()[-1])
        f, u = raw["fused"], raw["unfused"]
        rec = {
            "vocab": v, "hidden": h, "tokens": n,
            "peak_memory_ratio": f["peak_bytes"] / u["peak_bytes"],
            "time_ratio": f["time_s"] / u["time_s"],
            "fused_peak_mib": f["peak_bytes"] / 2**20, "unfused_peak_mib": u["peak_bytes"] / 2**20,
            "fused_time_s": f["time_s"], "unfused_time_s": u["time_s"],
            "fused_times_s": f["times_s"], "unfused_times_s": u["times_s"],
            "loss_rel_diff": abs(f["loss"] - u["loss"]) / max(abs(u["loss"]), 1e-12),
            "grad_w_norm_rel_diff": abs(f["grad_w_norm"] - u["grad_w_norm"]) / max(u["grad_w_norm"], 1e-12),
            "unfused_logits_mib": n * v * 4 / 2**20,
        }
        records.append(rec)
        print(f"V={v:>6} H={h:>4} N={n:>4}: peak {rec['fused_peak_mib']:8.0f} / {rec['unfused_peak_mib']:8.0f} MiB "
              f"= {rec['peak_memory_ratio']:.3f}   time {rec['fused_time_s']:6.2f} / {rec['unfused_time_s']:6.2f} s "
              f"= {rec['time_ratio']:.2f}   loss rel diff {rec['loss_rel_diff']:.1e}", flush=True)
    atomic_write_json(out, {"meta": machine(reps), "records": records})
    print(f"wrote {out}")


def machine(reps: int) -> dict:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "tnd_kernels", "benchmarks/fused_head.py"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"commit": commit, "kernels_dirty": bool(dirty), "cpu": cpu, "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "reps": reps, "workload": f"N/2 PPO tokens (clipped objective, ent_coef 0) + N/2 top-{TOP_K} distillation "
            "tokens, fp32, backend torch; peak = VmHWM above the inputs over one forward + backward",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


# --- GPU -------------------------------------------------------------------------------------------------------


def _liger():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD
    except Exception:  # noqa: BLE001 - optional: any import failure means no comparison
        return None
    return LigerFusedLinearCrossEntropyLoss(), LigerFusedLinearJSD()


def _gpu_time(fn, device: str, reps: int) -> tuple[float, int]:
    """(median ms, peak bytes above the memory in use before the first call) of fn()."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    fn()
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else 0
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), peak


def _fits(v, h, n, path, device, dtype) -> bool:
    try:
        b = make_batch(v, h, n, device, dtype)
        step(b, path, "auto")
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        b = None
        if device == "cuda":
            torch.cuda.empty_cache()


def largest_batch(v, h, path, device, dtype, start: int, cap: int) -> int:
    """The largest N (a power-of-two multiple of `start`, at most `cap`) whose step fits."""
    n, best = start, 0
    while n <= cap and _fits(v, h, n, path, device, dtype):
        best, n = n, n * 2
    return best


def run_gpu(v: int, h: int, n: int, reps: int, cap: int, out: Path) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    b = make_batch(v, h, n, device, dtype)
    rec = {"vocab": v, "hidden": h, "tokens": n, "dtype": str(dtype), "device": device,
           "gpu": torch.cuda.get_device_name() if device == "cuda" else None}
    for path in ("unfused", "fused"):
        ms, peak = _gpu_time(lambda: step(b, path, "auto"), device, reps)
        rec[f"{path}_ms"], rec[f"{path}_peak_mib"] = ms, peak / 2**20
    rec["time_ratio"] = rec["fused_ms"] / rec["unfused_ms"]
    rec["peak_memory_ratio"] = rec["fused_peak_mib"] / rec["unfused_peak_mib"] if rec["unfused_peak_mib"] else None
    liger = _liger()
    if liger is not None:
        ce, jsd = liger
        x, w = b["hidden"], b["weight"]
        targets = torch.randint(0, v, (n,), device=device)
        teacher_x = torch.randn_like(x)
        teacher_w = torch.randn_like(w)

        def liger_ce():
            x.grad = w.grad = None
            ce(w, x, targets).backward()

        def liger_jsd():
            x.grad = w.grad = None
            jsd(x, w, teacher_x, teacher_w).backward()

        for name, fn in (("liger_fused_linear_ce", liger_ce), ("liger_fused_linear_jsd", liger_jsd)):
            ms, peak = _gpu_time(fn, device, reps)
            rec[f"{name}_ms"], rec[f"{name}_peak_mib"] = ms, peak / 2**20
        rec["fused_over_liger_ce"] = rec["fused_ms"] / rec["liger_fused_linear_ce_ms"]
    b = None
    start = max(64, n // 64)
    for path in ("unfused", "fused"):
        rec[f"{path}_largest_tokens"] = largest_batch(v, h, path, device, dtype, start, cap)
    print(json.dumps(rec, indent=1))
    atomic_write_json(out, {"meta": machine(reps), "records": [rec]})
    print(f"wrote {out}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU mode) or tiny sizes (--gpu on CPU)")
    p.add_argument("--gpu", action="store_true", help="the GPU comparison (M=8192, H=4096, V=128256)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (CPU: 2, GPU: 10; smoke: 1)")
    p.add_argument("--max-tokens", type=int, default=None, help="--gpu: the largest N the search tries (default 2**20)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--case", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.case:
        v, h, n, path, reps = json.loads(args.case)
        print(json.dumps(cpu_case(v, h, n, path, reps)))
        return
    if args.gpu:
        v, h, n = (1000, 32, 128) if args.smoke else (128256, 4096, 8192)
        out = args.out or ROOT / "benchmarks/results/fused-head-gpu.json"
        run_gpu(v, h, n, args.reps or (1 if args.smoke else 10), args.max_tokens or (512 if args.smoke else 2**20), out)
        return
    out = args.out or ROOT / "benchmarks/results/fused-head-cpu.json"
    run_cpu(SMOKE_SHAPES if args.smoke else CPU_SHAPES, args.reps or (1 if args.smoke else 2), out)


if __name__ == "__main__":
    main()
