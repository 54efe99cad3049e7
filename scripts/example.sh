#!/usr/bin/env bash
# The main job: set up, then compare Adam, K-FAC and Thermodynamic K-FAC on real
# Fashion-MNIST images (MLP 784-512-512-10, batch 512, 240 steps; about a minute of
# training on 2 cores), print the table and the path of the plot.
# Extra arguments go to `thermokfac compare` (e.g. --steps 600, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
thermokfac compare --data fashion-mnist --model mlp --width 512 --depth 2 \
  --batch-size 512 --steps 240 --eval-every 30 --optimizer sgd --lr 0.1 --damping 0.01 \
  --baseline adam --baseline-lr 1e-3 --out runs/main --overwrite "$@"
