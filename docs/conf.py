"""Sphinx configuration of the thermokfac documentation (built offline by
``bash scripts/docs.sh``, warnings as errors)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from api_pages import write_api_page  # noqa: E402
from figures import draw  # noqa: E402

import thermokfac  # noqa: E402

project = "thermokfac"
author = "The thermokfac contributors"
copyright = "2026, The thermokfac contributors"
release = version = thermokfac.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_*.md", "gallery/*.ipynb", "gallery/*.py",
                    "gallery/*.zip", "gallery/*.json"]
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # Attributes: as a field list (dataclass fields are members too)

html_theme = "furo"
html_title = f"thermokfac {version}"
html_static_path: list[str] = []
html_favicon = "favicon.svg"

sphinx_gallery_conf = {
    "examples_dirs": str(HERE.parent / "examples"),
    "gallery_dirs": str(HERE / "gallery"),
    "filename_pattern": r"\.py$",          # every example runs at every build
    "abort_on_example_error": True,
    "download_all_examples": False,
    "image_scrapers": ("matplotlib",),
    "plot_gallery": "True",
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
}

write_api_page(HERE / "api.rst")
draw(HERE / "_figures")  # the Explanations page's figures, from the library itself
