#!/usr/bin/env bash
# The checks that need a CUDA device, in one run (about 5 minutes on one H100/H200):
#   1. the CUDA tests: K-FAC on the GPU against the CPU, every thermodynamic-solver mode
#      on the GPU, and the NCCL path (one rank per GPU) against one process;
#   2. the Fig. 2 profile (`thermokfac profile --device cuda`), 10 steps per point.
# Needs a python3 with a CUDA build of torch, tqdm, matplotlib and pytest; the package
# is taken from src/. Results go to $OUT (default results/gpu): env.txt, pytest.txt,
# profile.txt and profile/ (profile.json, profile.png).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-results/gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
[ -n "${SKIP_TESTS:-}" ] || timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="-ra" \
  tests/test_gpu.py tests/test_thermo_devices.py 2>&1 | tee "$out/pytest.txt"
timeout 360 python3 -c "from thermokfac.cli import main; main()" profile --device cuda \
  --repeats 10 --widths 64 128 256 512 1024 2048 4096 --depth 50 --mlp-batch 512 \
  --embds 64 128 256 512 1024 --vocabs 1000 2000 4000 8000 16000 32000 \
  --out "$out/profile" --no-progress 2>&1 | tee "$out/profile.txt"
