"""The `gpubox` command: Fabric's program (Invoke's `Program` plus -H/-S/-i) with gpubox's collection.

    pipx install gpubox          # or: pip install . from a clone
    gpubox --list
    gpubox plan                  # this machine (an Invoke Context)
    gpubox provision
    gpubox -H box1 provision     # over SSH (a Fabric Connection per host), -S for an ssh config
    gpubox -H a,b,c fleet        # several hosts at once, one report (provision/fleet.py's Executor)

The tasks are provision/tasks.py's, so `gpubox X`, `invoke X` and `fab X` in a clone run the same
bodies. Configuration files are Invoke's layers under the name gpubox: /etc/gpubox.yaml,
~/.gpubox.yaml, or -f FILE, each holding a `gpubox:` mapping; environment variables use the GPUBOX_
prefix plus the key path (GPUBOX_GPUBOX_BUILD_JOBS=8); `--set key=value` on the step tasks.
"""

from __future__ import annotations

from importlib import metadata

import fabric
from fabric.main import Fab

from .fleet import Executor
from .tasks import ns


class Config(fabric.Config):
    """Fabric's config (SSH config files, connect settings) read from gpubox.yaml files and GPUBOX_ variables."""
    prefix = "gpubox"


def _version() -> str:
    try:
        return metadata.version("gpubox")
    except metadata.PackageNotFoundError:   # a clone on PYTHONPATH, not installed
        return "unknown (not installed)"


program = Fab(name="gpubox", binary="gpubox", version=_version(), namespace=ns,
              executor_class=Executor, config_class=Config)


def main() -> None:
    program.run()


if __name__ == "__main__":
    main()
