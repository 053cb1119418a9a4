"""The one way gpubox renders a file from a Jinja2 template (repo files, profile snippet, unit, launch
scripts; the test bench's fixtures too).

Undefined values are errors (StrictUndefined), nothing is HTML-escaped, a block tag's own line break is
dropped (trim_blocks, lstrip_blocks) and the file's final newline is kept. `shquote` quotes a value for
sh (shlex.quote), so no configuration value reaches a shell unquoted.

>>> render_string("x={{ v | shquote }}\\n{% if on %}\\non\\n{% endif %}\\n", v="a b", on=True)
"x='a b'\\non\\n"
"""

from __future__ import annotations

import functools
import shlex
from pathlib import Path
from typing import Any

import jinja2

from . import resources


@functools.lru_cache(maxsize=None)
def environment(directory: str | None = None) -> jinja2.Environment:
    """The environment for one template directory (default: gpubox's templates/)."""
    loader = jinja2.FileSystemLoader(directory or str(resources.TEMPLATES))
    env = jinja2.Environment(loader=loader, undefined=jinja2.StrictUndefined, autoescape=False,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["shquote"] = lambda v: shlex.quote(str(v))
    return env


def render(name: str, directory: str | Path | None = None, **values: Any) -> str:
    """Render `name` from `directory` (default: gpubox's templates/) with `values`."""
    return environment(str(directory) if directory else None).get_template(name).render(**values)


def render_string(text: str, **values: Any) -> str:
    return environment().from_string(text).render(**values)
