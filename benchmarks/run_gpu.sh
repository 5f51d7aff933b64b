#!/usr/bin/env bash
# On a CUDA machine, from anywhere: the trainer under FSDP with bf16, the kernel tests compiled on the GPU,
# the whole kernel benchmark sweep (-> benchmarks/results/<gpu-name>.json), then the trainer on both backends. Extra arguments go to kernel_ops.py,
# e.g. `benchmarks/run_gpu.sh --ops distill` for a slice (slices merge into the same JSON).
# Needs python3 with torch + triton + pytest; Liger-Kernel is optional: a wheel dropped in
# .whl/ is installed (offline, no deps) into /tmp/site for the comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
unset TRITON_INTERPRET  # compiled kernels, not the interpreter
"$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
# First, what CPU tests cannot run (accelerate's FSDP plugin refuses a machine without an accelerator):
# the trainer under FSDP (one process) with bf16 mixed precision (-> results/trainer-backends-<gpu>-fsdp-bf16.json)
"$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
  --config_file configs/fsdp.yaml benchmarks/trainer_backends.py --mixed-precision bf16 --steps 3 --warmup 1 \
  || echo "FSDP trainer run FAILED (continuing with the rest)"
# --confcutdir: only tests/kernels/conftest.py (the project-wide conftest needs the full app deps)
"$PY" -m pytest tests/kernels -q -m kernels --confcutdir=tests/kernels -p no:cacheprovider
"$PY" benchmarks/kernel_ops.py "$@"
# a few trainer steps with the Triton kernels and with the torch backend (-> results/trainer-backends-<gpu>.json),
# then the same with bf16 mixed precision (-> results/trainer-backends-<gpu>-no-bf16.json)
"$PY" benchmarks/trainer_backends.py
"$PY" benchmarks/trainer_backends.py --mixed-precision bf16
