"""The one way gpubox runs its own Python on the target: a few provision modules' sources, compressed, on
python3's command line, executed in order into one namespace, then one function called with the string
arguments that follow.

    host.run(remote.argv([ggufhead], "print_summaries", *paths))
    fact snippet: remote.snippet([fetch], "inspect", args_json, models_dir, lock_path)

Why the command line: Invoke and Fabric feed a command's stdin one byte per 10 ms poll, so 30 KB of code
on stdin takes minutes; an argument of a few KB (Linux allows 128 KiB each) costs nothing. Stdin stays free
for a secret (the models step's token). The modules sent must import only the standard library at their
top (the target's python3 has no gpubox); one module may use the names an earlier one defined, since all
share one namespace (`__name__` is "gpubox_remote", so their `if __name__ == "__main__"` blocks do not run).
"""

from __future__ import annotations

import base64
import functools
import json
import shlex
import zlib
from pathlib import Path
from types import ModuleType
from typing import Sequence

BOOT = ("import sys,json,zlib,base64\n"
        "g={'__name__':'gpubox_remote'}\n"
        "for i,s in enumerate(json.loads(zlib.decompress(base64.b64decode(sys.argv[1])))):\n"
        " exec(compile(s,'<gpubox %d>'%i,'exec'),g)\n"
        "sys.exit(g[sys.argv[2]](*sys.argv[3:]) or 0)")


@functools.lru_cache(maxsize=None)
def _pack(files: tuple[str, ...]) -> str:
    sources = [Path(f).read_text() for f in files]
    return base64.b64encode(zlib.compress(json.dumps(sources).encode(), 9)).decode()


def pack(modules: Sequence[ModuleType]) -> str:
    """The modules' sources, in order, as one compressed argument."""
    return _pack(tuple(m.__file__ for m in modules))


def argv(modules: Sequence[ModuleType], entry: str, *args: str) -> list[str]:
    """python3 -c BOOT <modules> <entry> <args...>: runs entry(*args) on the target; its return is the exit status."""
    return ["python3", "-c", BOOT, pack(modules), entry, *[str(a) for a in args]]


def snippet(modules: Sequence[ModuleType], entry: str, *args: str) -> str:
    """The same as one shell-quoted command, for a fact script."""
    return shlex.join(argv(modules, entry, *args))
