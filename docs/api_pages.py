"""The API reference page (``api.rst``), written at each build from the packages' ``__all__`` (so it
lists every public name and cannot fall behind): ``thermokfac`` first, then each
subpackage's names that the top level does not re-export."""

from __future__ import annotations

import importlib
from pathlib import Path

#: The public packages, in the order of the page.
PACKAGES = ("thermokfac", "thermokfac.optim", "thermokfac.kfac", "thermokfac.solvers",
            "thermokfac.distributed")


def public_names() -> dict[str, list[str]]:
    """Each package's public names, each name under the first package that has it."""
    seen: set[int] = set()
    names: dict[str, list[str]] = {}
    for package in PACKAGES:
        module = importlib.import_module(package)
        names[package] = []
        for name in module.__all__:
            obj = getattr(module, name)
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            names[package].append(name)
    return names


def write_api_page(path: Path) -> None:
    """Write the API reference (reStructuredText, which autodoc's output needs) to
    ``path``."""
    title = "API reference"
    parts = [title, "=" * len(title), "",
             "Every public name of the packages below, with its docstring (shapes, units,",
             "errors raised and the paper's equation it implements). A name appears once,",
             "under the first package that exports it.", ""]
    for package, names in public_names().items():
        if not names:
            continue
        heading = f"``{package}``"
        parts += [heading, "-" * len(heading), ""]
        for name in names:
            obj = getattr(importlib.import_module(package), name)
            kind = ("autoclass" if isinstance(obj, type) else
                    "autofunction" if callable(obj) else "autodata")
            parts += [f".. {kind}:: {package}.{name}", ""]
    path.write_text("\n".join(parts))
