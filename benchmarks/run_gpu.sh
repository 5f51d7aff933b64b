#!/usr/bin/env bash
# Everything the project measures on a GPU, as one command for a short GPU window (about 8 minutes on one
# H100/H200), most valuable first, each part under its own time limit so that one slow part cannot eat the
# rest; it prints as it goes and keeps a log (benchmarks/results/run_gpu-<time>.log):
#   1. the trainer under FSDP (one process) with bf16 mixed precision, with a checkpoint round trip
#      (CPU tests cannot run FSDP: accelerate's FSDP plugin refuses a machine without an accelerator)
#   2. the kernel tests, compiled (not interpreted), all dtypes
#   3. the kernel sweep (-> benchmarks/results/<gpu-name>.json; extra arguments go to kernel_ops.py,
#      e.g. `benchmarks/run_gpu.sh --ops distill` for a slice, which merges into the same JSON)
#   4. the trainer on the Triton and the torch backends, then the same with bf16 mixed precision
#      (-> results/trainer-backends-<gpu>*.json)
#
#   benchmarks/run_gpu.sh               # on a CUDA machine, from anywhere
#   benchmarks/run_gpu.sh --cpu-smoke   # the whole script on CPU at tiny sizes (Triton interpreter, results
#                                       # to a temporary directory): proves it runs; CI does this
#
# Needs python3 with torch, triton, transformers, accelerate, safetensors and pytest (no dvc, mlflow or
# pydantic). Liger-Kernel is optional: wheels dropped in .whl/ are installed (offline, no deps) into
# /tmp/site for the comparison.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SMOKE=0
if [[ "${1:-}" == "--cpu-smoke" ]]; then SMOKE=1; shift; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
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
  part "kernel tests (interpreted)" 600 "$PY" -m pytest tests/kernels -q -m kernels --confcutdir=tests/kernels \
    -p no:cacheprovider -x -k "float32 or fp32"
  part "kernel sweep" 300 "$PY" benchmarks/kernel_ops.py --smoke --out "$OUT/kernels.json" "$@"
  part "trainer backends" 300 "$PY" benchmarks/trainer_backends.py --smoke --device cpu --out "$OUT/backends.json"
else
  "$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" || exit 1
  part "trainer under FSDP, bf16" 110 "$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 \
    --mixed_precision bf16 --dynamo_backend no --config_file configs/fsdp.yaml \
    benchmarks/trainer_backends.py --mixed-precision bf16 --steps 3 --warmup 1
  # --confcutdir: only tests/kernels/conftest.py (the project-wide conftest needs the full app deps)
  part "kernel tests (compiled)" 90 "$PY" -m pytest tests/kernels -q -m kernels --confcutdir=tests/kernels \
    -p no:cacheprovider
  part "kernel sweep" 200 "$PY" benchmarks/kernel_ops.py "$@"
  part "trainer backends" 60 "$PY" benchmarks/trainer_backends.py
  part "trainer backends, bf16" 60 "$PY" benchmarks/trainer_backends.py --mixed-precision bf16
fi

echo "=== log: $LOG"
if (( ${#FAILED[@]} )); then
  printf '=== FAILED: %s\n' "${FAILED[@]}"
  exit 1
fi
echo "=== all parts passed"
