#!/usr/bin/env bash
# The test command: set up, lint, run the default suite (everything not marked slow).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the slow tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check src tests benchmarks examples docs
mypy  # the files and settings of [tool.mypy] in pyproject.toml
if [ "$#" -eq 0 ]; then
  set -- -m "not slow"
fi
python -m pytest "$@"
