"""Session fixtures shared by unit and integration tests.

`llama_bin`: a CPU build of llama-server and llama-fit-params on THIS host, made by gpubox's own build step
through an Invoke Context (the same code path as `invoke build` on the GPU box), from the llama.cpp source
that the sandbox mirrors (llama-cpp-python 0.3.36's vendored copy, from PyPI). Cached under
${GPUBOX_CACHE:-~/.cache/gpubox}/llama-host with ccache: the first build takes about 25 minutes on 2 cores,
later sessions reuse it (a no-change `build` takes about a second). GPUBOX_LLAMA_BIN=DIR uses a build of
your own instead.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

# Tests talk to loopback and their own namespaces only. Without this, a fact gathered on this host (the
# models step asks the Hub for file sizes) would try huggingface.co; tests that need a Hub start their own
# local server and set HF_ENDPOINT to it. Port 9 (discard) refuses at once.
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

BUILD_TARGETS = "[llama-server, llama-fit-params]"


@pytest.fixture(scope="session")
def llama_bin() -> Path:
    own = os.environ.get("GPUBOX_LLAMA_BIN")
    if own:
        if not (Path(own) / "llama-server").exists():
            pytest.fail(f"GPUBOX_LLAMA_BIN={own} has no llama-server")
        return Path(own)
    from invoke import Config, Context

    from provision import runs, tasks
    from testbed.sandbox import gitmirror
    from testbed.sandbox.paths import Paths, cache_root

    p = Paths.default()
    gitmirror.ensure(p, log=lambda *a: None)
    mirror = str(p.git / gitmirror.NAME)
    sha = (p.git / ".llama.cpp.recipe").read_text().split()[1]
    root = cache_root() / "llama-host"
    root.mkdir(parents=True, exist_ok=True)
    cfg = Config(overrides={"run": {"in_stream": False}})
    cfg.load_collection(tasks.ns.configuration())
    # Several pytest sessions on one machine share this build: one ninja at a time in the build directory.
    with open(root.parent / "llama-host.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        runs.run_steps(Context(cfg), ["build"], sets=[
            "build.cuda=false", f"build.repo_url={mirror}", f"build.sha={sha}", "build.profile=current",
            f"build.src_dir={root}/src", f"build.build_dir={root}/build", f"build.ccache_dir={root}/ccache",
            f"build.targets={BUILD_TARGETS}", f"report_dir={root}/reports"])
    return root / "build" / "bin"
