#!/usr/bin/env bash
# Builds the sdist and the wheel, checks them (twine), installs the wheel (not editable)
# into a fresh virtual environment and runs, from outside the source tree, the README's
# quick start, `thermokfac --version`, `thermokfac --help` and a short `train` — so a
# missing package-data file or an import that works only from the source tree fails.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. .venv/bin/activate
pip install -q --disable-pip-version-check -c constraints.txt -e ".[release]"
rm -rf dist
python -m build --no-isolation --sdist --wheel --outdir dist . > /dev/null
twine check --strict dist/*
version=$(python -c "import thermokfac; print(thermokfac.__version__)")
wheel="dist/thermokfac-${version}-py3-none-any.whl"
test -f "$wheel"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
"$work/venv/bin/pip" install -q --disable-pip-version-check -c constraints.txt "$wheel[cli]"
# the README's first Python block: its quick start
python - "$work/quickstart.py" <<'PY'
import re, sys
text = open("README.md").read()
open(sys.argv[1], "w").write(re.search(r"```python\n(.*?)```", text, re.S).group(1))
PY
cd "$work"
"$work/venv/bin/python" -c "import thermokfac, sys; assert 'site-packages' in thermokfac.__file__, thermokfac.__file__; sys.exit(thermokfac.__version__ != '$version')"
"$work/venv/bin/python" quickstart.py
"$work/venv/bin/thermokfac" --version
"$work/venv/bin/thermokfac" --help > /dev/null
"$work/venv/bin/thermokfac" train --data digits --width 16 --steps 3 --eval-every 3 \
    --batch-size 32 --no-progress --out "$work/run" > /dev/null
test -f "$work/run/training.png"
echo "wheel_check: $wheel installs and runs from a fresh environment"
