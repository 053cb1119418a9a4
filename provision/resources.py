"""Where gpubox's data files live: the templates, the patch rules and the testinfra verify suite.

A clone keeps them as top-level directories of the repository (`templates/`, `patches/`, `tests/verify/`),
where they are read, reviewed and edited. A wheel (`pip install .`, `pipx install gpubox`) maps the same
directories into the package as `provision/templates`, `provision/patches` and `provision/verify`
(pyproject.toml, `[tool.setuptools] package-dir`), so the installed tool needs no clone. No symlinks,
no copies in the repository: one directory each, found in whichever of the two places it is.

>>> sorted(LAYOUT)
['patches', 'templates', 'verify']
>>> (path("templates") / "cuda.repo.j2").is_file(), (path("patches") / "README.md").is_file()
(True, True)
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent

# name -> (directory inside the installed package, directory in a clone relative to the repository root)
LAYOUT = {
    "templates": ("templates", "templates"),
    "patches": ("patches", "patches"),
    "verify": ("verify", "tests/verify"),
}


def path(name: str) -> Path:
    """The directory of one data set: inside the package when installed from a wheel, else in the clone."""
    inside, in_clone = LAYOUT[name]
    installed = PACKAGE / inside
    if installed.is_dir():
        return installed
    return PACKAGE.parent / in_clone


TEMPLATES = path("templates")
PATCHES = path("patches")
VERIFY = path("verify")
