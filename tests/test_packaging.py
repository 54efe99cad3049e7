"""The package a user installs: the wheel holds the package only (no results,
checkpoints, data or tests) and stays small; the version is single-sourced from the
package metadata and shown by ``thermokfac --version``; the citation files agree with it.
``scripts/wheel_check.sh`` (run by ``.ci/run``) installs the wheel into a fresh
environment and runs it."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import thermokfac

ROOT = Path(__file__).resolve().parents[1]
#: The largest wheel accepted (bytes, compressed): the package alone is ~0.3 MB.
MAX_WHEEL_BYTES = 2_000_000


def _pyproject_version() -> str:
    return re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(),
                     re.M).group(1)


def test_the_wheel_holds_the_package_only_and_stays_small(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                           "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("thermokfac-*.whl")
    assert wheel.name == f"thermokfac-{_pyproject_version()}-py3-none-any.whl"
    assert wheel.stat().st_size < MAX_WHEEL_BYTES, wheel.stat().st_size
    names = zipfile.ZipFile(wheel).namelist()
    info = f"thermokfac-{_pyproject_version()}.dist-info/"
    strays = [n for n in names if not (n.startswith("thermokfac/") or n.startswith(info))]
    assert not strays, strays
    assert "thermokfac/py.typed" in names and "thermokfac/cli.py" in names
    forbidden = re.compile(r"\.(pt|png|csv|json|gz|npz|pkl|dcp)$|/tests?/|/results/")
    assert not [n for n in names if forbidden.search(n)]
    sources = {str(p.relative_to(ROOT / "src")) for p in (ROOT / "src/thermokfac").rglob("*.py")}
    assert sources <= set(names), sorted(sources - set(names))  # every module shipped


def test_the_version_is_single_sourced():
    assert thermokfac.__version__ == metadata.version("thermokfac") == _pyproject_version()
    done = subprocess.run([sys.executable, "-m", "thermokfac.cli", "--version"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"thermokfac {_pyproject_version()}"
    cff = (ROOT / "CITATION.cff").read_text()
    assert f"\nversion: {_pyproject_version()}\n" in cff
    assert f"## [{_pyproject_version()}]" in (ROOT / "CHANGELOG.md").read_text()
    assert f"version = {{{_pyproject_version()}}}" in (ROOT / "README.md").read_text()
