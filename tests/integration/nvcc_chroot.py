"""Real things the patch step is proven against (no mocks):

- `cuda129_headers()`: the real CUDA 12.9.86 `crt/math_functions.h` and `.hpp`, from the PyPI wheel
  `nvidia-cuda-nvcc-cu12==12.9.86` (downloaded once with pip into $GPUBOX_CACHE/wheels).
- `Trixie`: a Debian trixie chroot (glibc 2.41, g++-14), built once with debootstrap (from the Debian mirror
  of this machine's apt sources, or $GPUBOX_DEBIAN_MIRROR) into $GPUBOX_CACHE/trixie, holding a copy of this
  machine's CUDA 13.0 toolkit. `compile()` runs CUDA 13's nvcc INSIDE the chroot (outside it, nvcc cannot run the chroot's g++: "GLIBC_2.38 not found") on a
  fresh hard-linked copy of the toolkit whose crt/math_functions.h/.hpp are replaced by the headers
  under test: the reproduction recorded in docs/platform.md.

Each `unavailable()` returns the reason a test must skip, or "" when the thing can be had.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("GPUBOX_CACHE") or Path.home() / ".cache" / "gpubox")
WHEEL = "nvidia-cuda-nvcc-cu12==12.9.86"
WHEEL_GLOB = "nvidia_cuda_nvcc_cu12-12.9.86-*.whl"
HEADER_SIZE = 238284
HEADER_SHA256 = "2f2189d1752d862e96122f985484c89e16bd03a485a01e1f114514f738a2ed4f"
CUDA13 = Path(os.environ.get("GPUBOX_CUDA13") or "/usr/local/cuda-13.0")
CRT = "targets/x86_64-linux/include/crt"


def cuda129_headers(cache: Path = CACHE) -> tuple[str, str]:
    """(math_functions.h, math_functions.hpp) text of CUDA 12.9.86, from the cached wheel (pip download
    on first use). Raises RuntimeError with the reason when the wheel cannot be had."""
    wheels = cache / "wheels"
    found = sorted(glob.glob(str(wheels / WHEEL_GLOB)))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([os.environ.get("PYTHON", "python3"), "-m", "pip", "download", "--no-deps", "-q", WHEEL,
                            "-d", str(wheels)], capture_output=True, text=True)
        found = sorted(glob.glob(str(wheels / WHEEL_GLOB)))
        if r.returncode != 0 or not found:
            raise RuntimeError(f"cannot download {WHEEL} into {wheels}: {r.stderr.strip()[-500:]}")
    with zipfile.ZipFile(found[-1]) as z:
        h = z.read("nvidia/cuda_nvcc/include/crt/math_functions.h").decode()
        hpp = z.read("nvidia/cuda_nvcc/include/crt/math_functions.hpp").decode()
    return h, hpp


@dataclass
class Compiled:
    rc: int
    output: str
    ran: str | None = None       # the program's stdout when it was run


class Trixie:
    """The cached Debian trixie chroot with CUDA 13's toolkit in /opt/cuda-13.0."""

    def __init__(self, cache: Path = CACHE):
        self.root = cache / "trixie"

    @staticmethod
    def unavailable() -> str:
        if os.geteuid() != 0:
            return "needs root (chroot, mount)"
        if not (CUDA13 / "bin" / "nvcc").exists():
            return f"no CUDA 13 toolkit at {CUDA13} (set GPUBOX_CUDA13); CI must provide it (pip wheels nvidia-cuda-nvcc etc.)"
        if not (Trixie().root / "usr" / "bin" / "g++-14").exists() and not shutil.which("debootstrap"):
            return "no trixie chroot cached and debootstrap not installed (apt-get install debootstrap)"
        if not shutil.which("unshare") or not shutil.which("chroot"):
            return "needs unshare and chroot (util-linux, coreutils)"
        return ""

    def ensure(self) -> "Trixie":
        """Build the chroot once (debootstrap, a few minutes) and copy CUDA 13 into it once."""
        if not (self.root / "usr" / "bin" / "g++-14").exists():
            partial = self.root.with_name("trixie.partial")
            shutil.rmtree(partial, ignore_errors=True)
            # The mirror this machine's apt uses (GPUBOX_DEBIAN_MIRROR overrides it), not a URL in the code.
            from testbed.sandbox.aptsources import debian_mirror
            r = subprocess.run(["debootstrap", "--variant=minbase", "--include=g++-14,libc6-dev", "trixie",
                                str(partial), debian_mirror()], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"debootstrap trixie failed ({r.returncode}): {r.stdout[-1500:]}{r.stderr[-1500:]}")
            shutil.rmtree(self.root, ignore_errors=True)
            partial.rename(self.root)
        cuda = self.root / "opt" / "cuda-13.0"
        if not (cuda / "bin" / "nvcc").exists():
            tmp = self.root / "opt" / f".cuda-13.0.{uuid.uuid4().hex[:8]}"
            subprocess.run(["cp", "-a", str(CUDA13), str(tmp)], check=True)
            tmp.rename(cuda)
        return self

    def glibc(self) -> str:
        r = subprocess.run(["chroot", str(self.root), "getconf", "GNU_LIBC_VERSION"], capture_output=True, text=True)
        return r.stdout.strip()

    def run(self, script: str, workdir: str) -> subprocess.CompletedProcess:
        """Run a shell script in the chroot (cwd workdir, a path inside it) with /proc mounted in a private
        mount namespace: the mount disappears with the process, nothing leaks onto this machine."""
        inner = f"cd {workdir} && PATH={workdir}/cuda/bin:/usr/bin:/bin && export PATH && {script}"
        outer = f'mount -t proc proc "$1/proc" && exec chroot "$1" sh -c "$2"'
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", outer, "sh",
                               str(self.root), inner], capture_output=True, text=True, timeout=600)

    def compile(self, source: str, header: str, hpp: str, *, run: bool = True, flags: str = "") -> Compiled:
        """nvcc (CUDA 13 front end, g++-14 host compiler, glibc 2.41) on `source` with the given
        crt/math_functions.h/.hpp in place of CUDA 13's; runs the host program when it links."""
        work = Path(tempfile.mkdtemp(prefix="gpubox-nvcc-", dir=self.root / "tmp"))
        try:
            subprocess.run(["cp", "-al", str(self.root / "opt" / "cuda-13.0"), str(work / "cuda")], check=True)
            crt = work / "cuda" / CRT
            for name, text in (("math_functions.h", header), ("math_functions.hpp", hpp)):
                (crt / name).unlink()             # a hard link: never write through it
                (crt / name).write_text(text)
            (work / "t.cu").write_text(source)
            inside = "/" + str(work.relative_to(self.root))
            r = self.run(f"nvcc -ccbin g++-14 {flags} t.cu -o t 2>&1", inside)
            res = Compiled(r.returncode, r.stdout + r.stderr)
            if r.returncode == 0 and run:
                p = self.run("./t", inside)
                res.ran = p.stdout if p.returncode == 0 else f"exit {p.returncode}: {p.stdout}{p.stderr}"
            return res
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def gxx(self, source: str, flags: str = "") -> subprocess.CompletedProcess:
        """g++-14 -fsyntax-only on a C++ source inside the chroot (glibc 2.41 headers)."""
        work = Path(tempfile.mkdtemp(prefix="gpubox-gxx-", dir=self.root / "tmp"))
        try:
            (work / "t.cpp").write_text(source)
            return self.run(f"g++-14 -fsyntax-only {flags} t.cpp 2>&1", "/" + str(work.relative_to(self.root)))
        finally:
            shutil.rmtree(work, ignore_errors=True)


def host_nvcc_unavailable() -> str:
    if not (CUDA13 / "bin" / "nvcc").exists():
        return f"no CUDA 13 toolkit at {CUDA13}"
    if not shutil.which("g++"):
        return "no g++ on this machine"
    return ""


def compile_on_this_machine(source: str, header: str, hpp: str) -> Compiled:
    """The same compile with this machine's own g++ and glibc (Debian 12: glibc 2.36), no chroot."""
    work = Path(tempfile.mkdtemp(prefix="gpubox-nvcc-host-"))
    try:
        shutil.copytree(CUDA13, work / "cuda", symlinks=True, copy_function=os.link
                        if os.stat(CUDA13).st_dev == os.stat(work).st_dev else shutil.copy2)
        crt = work / "cuda" / CRT
        for name, text in (("math_functions.h", header), ("math_functions.hpp", hpp)):
            (crt / name).unlink()
            (crt / name).write_text(text)
        (work / "t.cu").write_text(source)
        env = dict(os.environ, PATH=f"{work}/cuda/bin:{os.environ.get('PATH', '')}")
        r = subprocess.run(["nvcc", "t.cu", "-o", "t"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        res = Compiled(r.returncode, r.stdout + r.stderr)
        if r.returncode == 0:
            p = subprocess.run(["./t"], cwd=work, capture_output=True, text=True)
            res.ran = p.stdout if p.returncode == 0 else f"exit {p.returncode}"
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)
