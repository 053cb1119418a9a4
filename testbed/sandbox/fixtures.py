"""The sandbox's fixture RPM repositories and the real downloads they carry.

Packages are described in testbed/templates/packages.yaml.j2 and built one spec each from
testbed/templates/rpm/package.spec.j2 with the host's rpmbuild, then indexed with createrepo_c into
``<cache>/sandbox/repos/{fedora,rpmfusion,updates,cuda}``. `cuda-crt-12-9` ships the REAL CUDA 12.9.86
`crt/math_functions.h` and `.hpp` from the PyPI wheel nvidia-cuda-nvcc-cu12==12.9.86 (`pip download`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jinja2
import yaml

from .paths import REPO_MOUNT, REPOS, TEMPLATES, Paths

CRT_WHEEL = "nvidia-cuda-nvcc-cu12==12.9.86"
CRT_MEMBERS = ("nvidia/cuda_nvcc/include/crt/math_functions.h", "nvidia/cuda_nvcc/include/crt/math_functions.hpp")
HF_REQUIREMENT = "huggingface_hub==2.4.0"


class FixtureError(Exception):
    pass


def _env() -> jinja2.Environment:
    import shlex
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    env.filters["q"] = lambda v: shlex.quote(str(v))
    return env


def render(template: str, **values) -> str:
    return _env().get_template(template).render(**values)


def kernel_version_release(kver: str) -> tuple[str, str]:
    """`uname -r` -> (Version, Release) for the kernel-devel fixture. Fedora's `6.14.5-300.fc42.x86_64`
    maps exactly (`rpm -q kernel-devel-$(uname -r)` works); other kernels keep the numeric part as
    Version and the rest, with '-' replaced by '_', as Release. Either way the package
    Provides `kernel-devel-uname-r = $(uname -r)` exactly and ships /usr/src/kernels/$(uname -r)/.

    >>> kernel_version_release("6.14.5-300.fc42.x86_64")
    ('6.14.5', '300.fc42.x86_64')
    >>> kernel_version_release("6.18.44-fc-v782")
    ('6.18.44', 'fc_v782')
    """
    m = re.match(r"^([0-9][0-9.]*[0-9])[-+_.]?(.*)$", kver)
    if not m:
        return "0", re.sub(r"[^A-Za-z0-9._+]", "_", kver) or "0"
    ver, rest = m.group(1), m.group(2)
    rel = re.sub(r"[^A-Za-z0-9._+~]", "_", rest) or "0"
    return ver, rel


def pip_download(requirement: str, dest: Path, *, python_version: str | None = None, deps: bool = True,
                 log=print) -> list[Path]:
    """`pip download` into dest (PyPI or the configured index); returns the wheels for requirement."""
    dest.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "-d", str(dest),
            "--only-binary=:all:"]
    if python_version:
        argv += ["--python-version", python_version, "--implementation", "cp", "--abi", f"cp{python_version.replace('.', '')}",
                 "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
                 "--platform", "manylinux_2_17_x86_64", "--platform", "any"]
    if not deps:
        argv.append("--no-deps")
    # The controller's pip constraints pin the controller's own packages; they do not apply to the target.
    env = dict(os.environ, PIP_CONSTRAINT="")
    argv.append(requirement)
    log("sandbox: " + " ".join(argv[2:]))
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise FixtureError(f"pip download {requirement} failed (exit {r.returncode}): {r.stderr.strip()[-800:]}\n"
                           "fix: PyPI must be reachable from this machine once; the result is cached in " + str(dest))
    return sorted(dest.glob("*.whl"))


def crt_headers(p: Paths, log=print) -> Path:
    """The real CUDA 12.9.86 crt headers, extracted from the PyPI wheel (downloaded once, cached)."""
    out = p.wheels / "crt-12.9.86"
    if all((out / Path(m).name).is_file() for m in CRT_MEMBERS):
        return out
    wdir = p.wheels / "nvcc"
    cached = [w for w in wdir.glob("nvidia_cuda_nvcc_cu12-12.9.86-*.whl")] if wdir.exists() else []
    shared = list((p.root.parent / "wheels").glob("nvidia_cuda_nvcc_cu12-12.9.86-*.whl"))
    wheels = cached or shared or [w for w in pip_download(CRT_WHEEL, wdir, deps=False, log=log)
                                  if w.name.startswith("nvidia_cuda_nvcc_cu12-12.9.86")]
    if not wheels:
        raise FixtureError(f"no wheel for {CRT_WHEEL} in {wdir}")
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as z:
        for m in CRT_MEMBERS:
            (out / Path(m).name).write_bytes(z.read(m))
    return out


def host_inputs(p: Paths, base_info: dict, log=print) -> dict:
    """The values packages.yaml.j2 is rendered with."""
    kver = platform.release()
    kv, kr = kernel_version_release(kver)
    return {
        "kver": kver, "kdev_version": kv, "kdev_release": kr,
        "gcc15_version": base_info["gcc_default"], "gcc14_version": base_info["gcc14"],
        "kmod_version": base_info["kmod"], "dnf5_version": base_info["dnf5"], "hf_version": HF_REQUIREMENT.split("==")[1],
        "crt_dir": str(crt_headers(p, log)), "repo_root": REPO_MOUNT,
    }


def catalogue(values: dict) -> list[dict]:
    pkgs = yaml.safe_load(render("packages.yaml.j2", **values))
    names = set()
    for pk in pkgs:
        key = (pk["name"], pk["version"])
        if key in names:
            raise FixtureError(f"packages.yaml.j2: {pk['name']} {pk['version']} listed twice")
        names.add(key)
        if pk["repo"] not in REPOS:
            raise FixtureError(f"packages.yaml.j2: {pk['name']}: unknown repo {pk['repo']!r}")
    return pkgs


def recipe_hash(values: dict) -> str:
    h = hashlib.sha256()
    for f in sorted(TEMPLATES.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(TEMPLATES)).encode() + b"\0" + f.read_bytes())
    for f in sorted(Path(values["crt_dir"]).iterdir()):
        h.update(f.name.encode() + hashlib.sha256(f.read_bytes()).digest())
    h.update(json.dumps({k: v for k, v in values.items() if k != "crt_dir"}, sort_keys=True).encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def _stage(pk: dict, root: Path, values: dict) -> None:
    for f in pk.get("files") or []:
        if f.get("ghost"):
            continue
        dst = root / f["path"].lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if "link" in f:
            os.symlink(f["link"], dst)
            continue
        if "text" in f:
            dst.write_text(f["text"])
        elif "template" in f:
            dst.write_text(render(f["template"], **{**values, **(f.get("vars") or {})}))
        elif "src" in f:
            shutil.copyfile(f["src"], dst)
        else:
            raise FixtureError(f"{pk['name']}: file {f['path']} has no text, template, src or link")
        os.chmod(dst, int(str(f.get("mode", "0644")), 8))
    for d in pk.get("dirs") or []:
        (root / d.lstrip("/")).mkdir(parents=True, exist_ok=True)


def _rpmbuild(pk: dict, work: Path, rpmdir: Path, values: dict) -> Path:
    top = work / f"{pk['name']}-{pk['version']}"
    src = top / "SOURCES"
    (src / "root").mkdir(parents=True)
    _stage(pk, src / "root", values)
    spec = top / f"{pk['name']}.spec"
    spec.write_text(render("rpm/package.spec.j2", p=pk))
    argv = ["rpmbuild", "-bb", "--quiet",
            "--define", f"_topdir {top}", "--define", f"_sourcedir {src}", "--define", f"_rpmdir {rpmdir}",
            "--define", f"_builddir {top}/BUILD", "--define", f"_buildrootdir {top}/BUILDROOT",
            "--define", "_binary_payload w1.gzdio", "--define", "_build_id_links none",
            "--define", "_rpmfilename %{NAME}-%{VERSION}-%{RELEASE}.%{ARCH}.rpm",
            "--define", "__spec_install_post %{nil}", "--define", "_dbpath /nonexistent-gpubox-rpmdb",
            # `uname -r` of a non-Fedora kernel may hold two hyphens (6.18.44-fc-v782): let the exact
            # `kernel-devel-uname-r = $(uname -r)` Provide through, as akmods and the driver step ask for it.
            "--define", "_wrong_version_format_terminate_build 0",
            str(spec)]
    r = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, HOME=str(work)))
    if r.returncode != 0:
        raise FixtureError(f"rpmbuild {pk['name']}-{pk['version']} failed (exit {r.returncode}):\n{r.stderr[-1500:]}\n"
                           f"spec: {spec}")
    arch = pk.get("arch", "x86_64")
    return rpmdir / f"{pk['name']}-{pk['version']}-{pk['release']}.{arch}.rpm"


def build_repos(p: Paths, values: dict, log=print) -> list[dict]:
    """Build every fixture package and index the four repositories (into repos.new, then swap)."""
    pkgs = catalogue(values)
    new = p.repos.with_name("repos.new")
    shutil.rmtree(new, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix="gpubox-rpmbuild-"))
    try:
        for r in REPOS:
            (new / r).mkdir(parents=True)

        def one(pk):
            return _rpmbuild(pk, work, new / pk["repo"], values)

        with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as ex:
            built = list(ex.map(one, pkgs))
        for f in built:
            if not f.exists():
                raise FixtureError(f"rpmbuild did not write {f}")
        for r in REPOS:
            res = subprocess.run(["createrepo_c", "--quiet", "--no-database", "--simple-md-filenames", str(new / r)],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                raise FixtureError(f"createrepo_c {r} failed: {res.stderr[-800:]}")
        shutil.rmtree(p.repos, ignore_errors=True)
        new.rename(p.repos)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"sandbox: built {len(pkgs)} fixture packages into {p.repos}")
    return pkgs


def hf_wheels(p: Paths, python_version: str, log=print) -> list[Path]:
    """huggingface_hub and its dependencies as wheels for the target's python3 (downloaded once)."""
    dest = p.wheels / f"hf-py{python_version}"
    stamp = dest / ".complete"
    if stamp.exists() and stamp.read_text().strip() == HF_REQUIREMENT:
        return sorted(dest.glob("*.whl"))
    shutil.rmtree(dest, ignore_errors=True)
    wheels = pip_download(HF_REQUIREMENT, dest, python_version=python_version, log=log)
    stamp.write_text(HF_REQUIREMENT + "\n")
    return wheels


def install_wheels(wheels: list[Path], site: Path, bindir: Path) -> list[str]:
    """Install wheels by unpacking them (the target has no pip and no network): purelib/platlib into
    site, console scripts into bindir. Returns the distribution names."""
    site.mkdir(parents=True, exist_ok=True)
    bindir.mkdir(parents=True, exist_ok=True)
    names = []
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            for info in z.infolist():
                name = info.filename
                parts = name.split("/")
                if len(parts) > 2 and parts[0].endswith(".data") and parts[1] in ("purelib", "platlib"):
                    target = site / "/".join(parts[2:])
                elif len(parts) > 2 and parts[0].endswith(".data") and parts[1] == "scripts":
                    target = bindir / "/".join(parts[2:])
                elif parts[0].endswith(".data"):
                    continue
                else:
                    target = site / name
                if name.endswith("/"):
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(info))
                mode = (info.external_attr >> 16) & 0o777
                os.chmod(target, mode if mode else 0o644)
            dist = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
            names.append(w.name.split("-")[0])
            for ep in dist:
                text = z.read(ep).decode()
                section = None
                for line in text.splitlines():
                    line = line.strip()
                    if line.startswith("["):
                        section = line.strip("[]")
                    elif section == "console_scripts" and "=" in line:
                        cmd, _, target = (x.strip() for x in line.partition("="))
                        mod, _, func = target.partition(":")
                        script = bindir / cmd
                        script.write_text(f"#!/usr/bin/python3\nimport sys\nfrom {mod} import {func.split('.')[0]}\n"
                                          f"sys.exit({func}())\n")
                        os.chmod(script, 0o755)
    return names
