"""The documentation site's sources: every committed result is cited on a Results page
and every committed figure is shown somewhere; every relative link of the README and
of the pages points at a file that exists (and an anchor that exists, for the pages);
the API page lists every public name. ``bash scripts/docs.sh`` builds the site with
warnings as errors (run by ``.ci/run``)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
RESULTS_PAGES = [p for p in PAGES if p.name.startswith("results-")]


def _api_pages():
    """``docs/api_pages.py``, the module that writes the API page."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("api_pages", DOCS / "api_pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _outside_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def test_every_result_is_cited_and_every_figure_shown():
    cited = "".join(p.read_text() for p in RESULTS_PAGES)
    shown = "".join(p.read_text() for p in PAGES)
    folders = [d for d in (ROOT / "results").iterdir() if d.is_dir()]
    assert folders
    missing = [d.name for d in folders if f"results/{d.name}" not in cited]
    assert not missing, f"results folders cited on no Results page: {missing}"
    jsons = list((ROOT / "benchmarks" / "results").glob("*.json"))
    missing = [j.name for j in jsons if j.name not in cited]
    assert not missing, f"benchmark results cited on no Results page: {missing}"
    tracked = subprocess.run(["git", "ls-files", "results", "benchmarks/results"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    figures = [f for f in tracked if f.endswith(".png")]
    assert figures
    hidden = [f for f in figures if f"](../{f})" not in shown]
    assert not hidden, f"committed figures shown on no page: {hidden}"


def _slug(title: str) -> str:
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,4} (.+)$",
                                                    _outside_code(page.read_text()), re.M)}


def test_relative_links_resolve():
    broken = []
    for page in [ROOT / "README.md", *PAGES]:
        for target in re.findall(r"\]\(([^)\s]+)\)", _outside_code(page.read_text())):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            if page.parent == DOCS and path.startswith("gallery/"):  # built from examples/
                path = str(Path("..") / "examples" / Path(path).name.replace("index.rst",
                                                                            "README.rst"))
            if page.parent == DOCS and path.startswith("_figures/"):  # drawn at each build
                drawn = f"def {Path(path).stem}(path: Path)" in (DOCS / "figures.py").read_text()
                if not drawn:
                    broken.append(f"{page.name}: {target} (docs/figures.py draws no such "
                                  "figure)")
                continue
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md" and file.parent == DOCS \
                    and anchor not in _anchors(file):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_the_api_page_lists_every_public_name(tmp_path):
    api = _api_pages()
    import importlib

    page = tmp_path / "api.rst"
    api.write_api_page(page)
    text = page.read_text()
    listed = api.public_names()
    for package in api.PACKAGES:
        module = importlib.import_module(package)
        for name in module.__all__:
            owner = next(p for p, names in listed.items()
                         if any(getattr(importlib.import_module(p), n) is getattr(module, name)
                                for n in names))
            assert re.search(rf":: {re.escape(owner)}\.\w+\n", text)
            assert any(f":: {owner}.{n}\n" in text for n in listed[owner]
                       if getattr(importlib.import_module(owner), n) is getattr(module, name))


def _documented_on_a_base(cls: type, attr: str) -> bool:
    """Whether ``attr`` overrides a method of a base class whose docstring has Args
    (the override's own docstring then says only what differs)."""
    return any("Args:" in (getattr(base.__dict__.get(attr), "__doc__", None) or "")
               for base in cls.__mro__[1:] if attr in base.__dict__)


def _raises(function: object) -> bool:
    """Whether ``function``'s own body raises an exception it names (a ``raise X``
    outside nested functions; a bare re-raise does not count)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError):
        return False
    body = tree.body[0]
    stack = list(ast.iter_child_nodes(body))
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.Raise) and node.exc is not None:
            return True
        stack.extend(ast.iter_child_nodes(node))
    return False


def _docstring_gaps(package: str) -> list[str]:
    """Public names of ``package`` (and their public methods) whose docstring is missing,
    lacks ``Args:`` although the callable takes arguments, or lacks ``Raises:`` although
    its body raises (a constructor's go in its class docstring; an override of a base
    method whose docstring has Args is documented there)."""
    import importlib
    import inspect

    public_names = _api_pages().public_names
    gaps: list[str] = []

    def check(qualname: str, obj: object) -> None:
        doc = inspect.getdoc(obj)
        if not doc or not doc.strip():
            gaps.append(f"{qualname}: no docstring")
            return
        if isinstance(obj, type):
            init = obj.__dict__.get("__init__")
            init_doc = (inspect.getdoc(init) or "") if init is not None else ""
            if init is not None and _raises(init) and "Raises:" not in doc + init_doc:
                gaps.append(f"{qualname}: its constructor raises, no Raises section")
            return
        if not callable(obj):
            return
        try:
            parameters = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            return
        if [p for p in parameters if p not in ("self", "cls")] and "Args:" not in doc:
            gaps.append(f"{qualname}: no Args section")
        if _raises(obj) and "Raises:" not in doc:
            gaps.append(f"{qualname}: raises, no Raises section")

    module = importlib.import_module(package)
    for name in public_names()[package]:
        obj = getattr(module, name)
        check(f"{package}.{name}", obj)
        if isinstance(obj, type):
            for attr, member in vars(obj).items():
                if attr.startswith("_"):
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isfunction(member):
                    if _documented_on_a_base(obj, attr):
                        continue  # an override: its arguments are the base's
                    check(f"{package}.{name}.{attr}", member)
                elif isinstance(member, property) and not (member.__doc__ or "").strip() \
                        and not any((getattr(base.__dict__.get(attr), "__doc__", None) or "")
                                    .strip() for base in obj.__mro__[1:]):
                    gaps.append(f"{package}.{name}.{attr}: no docstring")
    return gaps


def test_the_public_api_is_documented():
    """Every public name of the packages on the API page and their public methods: a
    docstring, with an Args section where they take arguments."""
    PACKAGES = _api_pages().PACKAGES
    gaps = [gap for package in PACKAGES for gap in _docstring_gaps(package)]
    assert not gaps, gaps
