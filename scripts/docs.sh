#!/usr/bin/env bash
# Builds the documentation site into docs/_build/html, offline, warnings as errors: the
# pages, the API reference (from the packages' __all__) and the example gallery, whose
# scripts all run during the build. Open docs/_build/html/index.html afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  bash scripts/setup.sh
fi
# shellcheck disable=SC1091
. .venv/bin/activate
pip install -q --disable-pip-version-check -c constraints.txt -e ".[docs]"
rm -rf docs/_build docs/gallery
MPLBACKEND=Agg python -m sphinx -W --keep-going -q -b html docs docs/_build/html
echo "docs: docs/_build/html/index.html"
