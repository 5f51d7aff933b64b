#!/usr/bin/env bash
# Everything the project measures on a GPU, as one command for a short GPU window (about 9 minutes on one
# H100/H200 before part 6 was added; the parts' limits add up to 16), most valuable first, each part under its own
# time limit so that one slow part cannot eat the rest; it prints as it goes and keeps a log
# (benchmarks/results/run_gpu-<time>.log):
#   1. the whole pipeline under params/gpu_small.yaml (32k-row vocabulary, GPT-2-small-shaped teacher), each
#      stage in its own process with tracking off: its wall time and peak GPU memory
#      (benchmarks/gpu_pipeline.py -> benchmarks/results/gpu-pipeline-<gpu>.json; sized for 5 minutes)
#   2. the trainer under FSDP (one process) with bf16 mixed precision, with a checkpoint round trip
#      (CPU tests cannot run FSDP: accelerate's FSDP plugin refuses a machine without an accelerator)
#   3. the kernel tests, compiled (not interpreted), all dtypes
#   4. the kernel sweep (-> benchmarks/results/<gpu-name>.json; extra arguments go to kernel_ops.py,
#      e.g. `benchmarks/run_gpu.sh --ops distill` for a slice, which merges into the same JSON)
#   5. the trainer on the Triton and the torch backends, then the same with bf16 mixed precision
#      (-> results/trainer-backends-<gpu>*.json)
#   6. the fused output head (benchmarks/fused_head.py --gpu): M = 8192, H = 4096, V = 128,256 in bf16, fused vs
#      unfused vs Liger's fused linear cross-entropy and JSD (when liger_kernel imports), and the largest batch
#      that fits, fused and unfused (-> results/fused-head-gpu.json)
#
#   benchmarks/run_gpu.sh               # on a CUDA machine, from anywhere
#   benchmarks/run_gpu.sh --cpu-smoke   # the whole script on CPU at tiny sizes (Triton interpreter, results
#                                       # to a temporary directory): proves it runs; CI does this
#
# Needs python3 with torch, triton, transformers, accelerate, safetensors, tokenizers, pyyaml, matplotlib and
# pytest (no dvc, mlflow or datasets: the stages run without them with tracking off). pydantic (the params schema)
# is not on the GPU image: its wheels, and Liger-Kernel's for the comparison (optional), are carried in .whl/
# (gitignored) and installed from there, offline and without deps, into /tmp/site. Fetch them once, on a machine
# with a package index, for the GPU image's CPython 3.12 (pip resolves pydantic's dependencies: pydantic_core,
# annotated_types, typing_inspection, typing_extensions; one version of each):
#
#   python3 -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl pydantic
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl liger-kernel
#
# --cpu-smoke uses the python it is given as it is (.whl/ holds wheels for the GPU image's python, not this one's).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SMOKE=0
if [[ "${1:-}" == "--cpu-smoke" ]]; then SMOKE=1; shift; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if (( ! SMOKE )) && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

if (( SMOKE )); then
  export TRITON_INTERPRET=1
  OUT=$(mktemp -d /tmp/run_gpu-smoke.XXXXXX)
  LOG="$OUT/run_gpu.log"
else
  unset TRITON_INTERPRET  # compiled kernels, not the interpreter
  OUT=benchmarks/results
  LOG="$OUT/run_gpu-$(date -u +%Y%m%dT%H%M%SZ).log"
fi
mkdir -p "$OUT"
exec > >(tee -a "$LOG") 2>&1
FAILED=()

part() {  # part <name> <seconds> <command...>: run one part under a time limit, note a failure, go on
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  (( rc == 124 || rc == 137 )) && echo "=== $name: TIMED OUT after ${limit}s"
  (( rc != 0 )) && FAILED+=("$name (exit $rc)")
  echo "=== $name: exit $rc in $((SECONDS - start))s"
}

if (( SMOKE )); then
  "$PY" -c "import torch, triton; print('cpu smoke:', torch.__version__, triton.__version__)"
  echo "=== trainer under FSDP: skipped (accelerate refuses FSDP without an accelerator)"
  part "pipeline, gpu_small shrunk" 300 "$PY" benchmarks/gpu_pipeline.py --smoke --out "$OUT/pipeline.json"
  part "kernel tests (interpreted)" 600 "$PY" -m pytest tests/kernels -q -m kernels --confcutdir=tests/kernels \
    -p no:cacheprovider -x -k "float32 or fp32"
  part "kernel sweep" 300 "$PY" benchmarks/kernel_ops.py --smoke --out "$OUT/kernels.json" "$@"
  part "trainer backends" 300 "$PY" benchmarks/trainer_backends.py --smoke --device cpu --out "$OUT/backends.json"
  part "fused head (GPU code, tiny)" 120 "$PY" benchmarks/fused_head.py --gpu --smoke --out "$OUT/fused-head.json"
else
  "$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" || exit 1
  part "pipeline, gpu_small" 330 "$PY" benchmarks/gpu_pipeline.py
  part "trainer under FSDP, bf16" 110 "$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 \
    --mixed_precision bf16 --dynamo_backend no --config_file configs/fsdp.yaml \
    benchmarks/trainer_backends.py --mixed-precision bf16 --steps 3 --warmup 1
  # --confcutdir: only tests/kernels/conftest.py (the project-wide conftest needs the full app deps)
  part "kernel tests (compiled)" 90 "$PY" -m pytest tests/kernels -q -m kernels --confcutdir=tests/kernels \
    -p no:cacheprovider
  part "kernel sweep" 200 "$PY" benchmarks/kernel_ops.py "$@"
  part "trainer backends" 60 "$PY" benchmarks/trainer_backends.py
  part "trainer backends, bf16" 60 "$PY" benchmarks/trainer_backends.py --mixed-precision bf16
  part "fused head vs Liger" 120 "$PY" benchmarks/fused_head.py --gpu
fi

echo "=== log: $LOG"
if (( ${#FAILED[@]} )); then
  printf '=== FAILED: %s\n' "${FAILED[@]}"
  exit 1
fi
echo "=== all parts passed"
