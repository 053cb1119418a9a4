"""Step 2: the CUDA 12.9 toolkit from NVIDIA's repository, without NVIDIA's driver.

Wanted state:

- /etc/yum.repos.d/cuda-<repo_release>.repo (NVIDIA's own file name and repo id, so a copy the user added
  by hand is replaced rather than duplicated) is exactly what templates/cuda.repo.j2 renders: baseurl
  `cuda.repo_baseurl` (the release 12.9 was published for may differ from the host's), gpgcheck/gpgkey,
  and the `exclude=` line that keeps NVIDIA's driver packages out (they conflict with RPM Fusion's);
- the configured package set (`cuda.packages`: nvcc, cudart-devel, cublas-devel, cccl, crt) is installed
  at `cuda.version`, and `<prefix>/bin/nvcc --version` says that release; never `cuda` or `cuda-drivers`,
  and no `nvidia-driver*` (NVIDIA's driver) installed;
- the login-shell profile snippet (templates/gpubox-cuda.sh.j2) exports CUDACXX and puts the CUDA bin dir
  on PATH. The build step uses the paths directly, not the profile.
"""

from __future__ import annotations

import shlex

from .. import dnf, rendering
from ..engine import Change, Check, require_fedora, run_changes
from ..facts import UNKNOWN, Fact
from ..ops import Dnf, WriteFile

NAME = "cuda"
TITLE = "CUDA 12.9 toolkit without NVIDIA's driver"

REPO_DIR = "/etc/yum.repos.d"
# Installed names that mean NVIDIA's driver came in (from the CUDA repo's metapackages).
FORBIDDEN_EXACT = ("cuda", "cuda-drivers")
FORBIDDEN_PREFIX = "nvidia-driver"
NVIDIA_REPO_HOST = "developer.download.nvidia.com/compute/cuda"


def repo_id(cfg: dict) -> str:
    return f"cuda-{cfg['cuda']['repo_release']}-x86_64"


def repo_path(cfg: dict) -> str:
    return f"{REPO_DIR}/cuda-{cfg['cuda']['repo_release']}.repo"


def nvcc_path(cfg: dict) -> str:
    return cfg["cuda"]["prefix"].rstrip("/") + "/bin/nvcc"


def repo_text(cfg: dict) -> str:
    c = cfg["cuda"]
    return rendering.render("cuda.repo.j2", repo_id=repo_id(cfg), release=c["repo_release"], version=c["version"],
                  baseurl=c["repo_baseurl"], gpgcheck=c["repo_gpgcheck"], gpgkey=c.get("repo_gpgkey", ""),
                  exclude=c["exclude"])


def profile_text(cfg: dict) -> str:
    c = cfg["cuda"]
    return rendering.render("gpubox-cuda.sh.j2", version=c["version"], nvcc=nvcc_path(cfg),
                  bindir=c["prefix"].rstrip("/") + "/bin")


# --- facts ------------------------------------------------------------------------------------------

def _files_cmd(cfg: dict) -> str:
    return dnf.files_snippet([repo_path(cfg), cfg["cuda"]["profile_snippet"]])


def _other_repos_cmd(cfg: dict) -> str:
    # Other repo files that point at NVIDIA's CUDA repositories (a second, unguarded copy would let
    # nvidia-driver in again).
    return (f"for f in {REPO_DIR}/*.repo; do [ -r \"$f\" ] || continue; "
            f"if grep -q {shlex.quote(NVIDIA_REPO_HOST)} \"$f\"; then "
            "if grep -Eq '^[[:space:]]*exclude[[:space:]]*=.*nvidia-driver' \"$f\"; then echo \"$f guarded\"; "
            "else echo \"$f unguarded\"; fi; fi; done; true")


def parse_other_repos(out: str, rc: int) -> dict[str, str]:
    d = {}
    for line in out.splitlines():
        path, _, state = line.rpartition(" ")
        if path:
            d[path] = state
    return d


FACTS = [
    Fact("cuda_files", _files_cmd, dnf.parse_files),
    Fact("cuda_repos", _other_repos_cmd, parse_other_repos),
]


# --- decisions --------------------------------------------------------------------------------------

def forbidden_installed(installed: dict[str, str]) -> list[str]:
    return sorted(n for n in installed if n in FORBIDDEN_EXACT or n.startswith(FORBIDDEN_PREFIX))


def _files(facts: dict) -> dict[str, str]:
    f = facts.get("cuda_files")
    return f if isinstance(f, dict) else {}


def nvcc_package(cfg: dict) -> str | None:
    return next((p for p in cfg["cuda"]["packages"] if p.startswith("cuda-nvcc")), None)


def check(facts: dict, cfg: dict) -> Check:
    c = cfg["cuda"]
    ver = str(c["version"])
    pk = dnf.installed(facts)
    fl = dnf.flavour_of(facts)
    files = _files(facts)
    changes: list[Change] = []
    warnings: list[str] = []

    # The repo file first, with its exclude line, so no later transaction can see nvidia-driver.
    rpath = repo_path(cfg)
    want_repo = repo_text(cfg)
    have_repo = files.get(rpath)
    if have_repo != want_repo:
        why = "missing" if have_repo is None else (
            "no exclude= line keeping NVIDIA's driver out" if "exclude=" not in have_repo
            else "differs from gpubox's configuration (baseurl, gpg or exclude list)")
        changes.append(Change(f"write {rpath} (repo {repo_id(cfg)}, exclude={','.join(c['exclude'])})", why,
                              [WriteFile(rpath, want_repo, root=True, source="templates/cuda.repo.j2")]))

    bad = forbidden_installed(pk)
    if bad:
        changes.append(Change("remove " + ", ".join(f"{n} {pk[n]}" for n in bad),
                              "NVIDIA's driver (pulled by `cuda`/`cuda-drivers`) conflicts with RPM Fusion's driver",
                              [Dnf(dnf.remove(bad, flavour=fl), NAME, "removing NVIDIA's driver packages")]))

    missing = [p for p in c["packages"] if p not in pk]
    wrong = [p for p in c["packages"] if p in pk and not pk[p].startswith(ver + ".") and pk[p] != ver]
    if missing:
        changes.append(Change("install " + ", ".join(missing), f"not installed (the CUDA {ver} set llama.cpp needs)",
                              [Dnf(dnf.install(missing, flavour=fl), NAME, f"installing the CUDA {ver} packages")]))
    if wrong:
        warnings.append(f"installed at a version other than {ver}: " + ", ".join(f"{p} {pk[p]}" for p in wrong))

    nv = facts.get("nvcc") if isinstance(facts.get("nvcc"), dict) else {}
    want_nvcc = nvcc_path(cfg)
    nvcc_ok = nv.get("path") == want_nvcc and nv.get("version") == ver
    pkg = nvcc_package(cfg)
    if not missing and not nvcc_ok and pkg:
        changes.append(Change(f"reinstall {pkg}",
                              f"{want_nvcc} " + ("is missing" if nv.get("path") != want_nvcc
                                                 else f"reports release {nv.get('version')}, not {ver}"),
                              [Dnf([dnf.binary(fl), "-y", "reinstall", pkg], NAME, "reinstalling nvcc")]))
    elif not missing and not nvcc_ok:
        warnings.append(f"{want_nvcc} is not release {ver} and cuda.packages names no cuda-nvcc package to reinstall")

    snippet = c["profile_snippet"]
    if files.get(snippet) != profile_text(cfg):
        changes.append(Change(f"write {snippet}", "missing" if snippet not in files else "differs from the template",
                              [WriteFile(snippet, profile_text(cfg), root=True, source="templates/gpubox-cuda.sh.j2")]))

    others = facts.get("cuda_repos") if isinstance(facts.get("cuda_repos"), dict) else {}
    for path, state in sorted(others.items()):
        if path != rpath and state == "unguarded":
            warnings.append(f"{path} also points at NVIDIA's CUDA repository without an exclude= line for "
                            "nvidia-driver: a later `dnf install cuda` could pull NVIDIA's driver; remove it or add "
                            "the exclude line")

    info = {"repo": rpath, "nvcc": nv.get("path", UNKNOWN), "nvcc_version": nv.get("version", UNKNOWN),
            "packages": {p: pk.get(p) for p in c["packages"]}}
    return Check(not changes, changes, warnings=warnings, info=info)


# --- apply ------------------------------------------------------------------------------------------

def apply(host, facts: dict, cfg: dict, chk: Check):
    require_fedora(facts, NAME)
    return run_changes(host, chk)
