"""Sphinx configuration of fastbn's documentation site.

Build it with ``scripts/build_docs.sh``, in an environment where fastbn is
installed (the API pages are generated from the compiled package's
docstrings) and ``docs/requirements.txt`` too. The home page and
Getting started include sections of README.md, so the README and the site
say the same thing.
"""

import fastbn

project = "fastbn"
author = "the fastbn developers"
copyright = "2026, the fastbn developers"
release = version = fastbn.__version__

extensions = [
    "myst_parser",
    "numpydoc",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "requirements.txt"]
templates_path = ["_templates"]
highlight_language = "none"  # unmarked code blocks are shell commands or output

autosummary_generate = True
numpydoc_show_class_members = False  # the class template lists the members
myst_heading_anchors = 2

html_theme = "pydata_sphinx_theme"
html_title = f"fastbn {release}"
# The wide tables get the whole width: no sidebars on their pages.
WIDE_PAGES = ["benchmarks", "hostile_inputs"]
html_theme_options = {
    "navigation_with_keys": False,
    "secondary_sidebar_items": {page: [] for page in WIDE_PAGES},
}
html_sidebars = {page: [] for page in WIDE_PAGES}

# README.md links to pages by their place in the repository; on this site
# they are pages (paths from the source folder, so any page may include
# the README).
README_LINKS = {
    "](docs/getting-started.md)": "](/getting-started.md)",
    "](docs/hostile_inputs.md)": "](/hostile_inputs.md)",
}


def _readme_links(app, relative_path, parent_docname, content):
    if relative_path.name == "README.md":
        for old, new in README_LINKS.items():
            content[0] = content[0].replace(old, new)


def setup(app):
    app.connect("include-read", _readme_links)
