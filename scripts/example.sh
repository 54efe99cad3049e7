#!/usr/bin/env bash
# The main job: set up, then train on real handwritten digits with Adam vs K-FAC and
# print a comparison table. Extra arguments go to examples/digits_compare.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python examples/digits_compare.py "$@"
