"""The sandbox's root filesystem: a debootstrap base and a pristine overlay layer on top of it.

base/      `debootstrap --variant=minbase sid` with BASE_PACKAGES. Rebuilt only when BASE_RECIPE changes.
           Built on a tmpfs when /dev/shm has room (dpkg's fsyncs cost nothing there), then copied to
           the cache; .debs are kept in debs/ (debootstrap --cache-dir), so a rebuild downloads nothing.
pristine/  the upper directory of an overlay over base in which the fixture RPMs were installed by the
           chroot's own dnf5 (fedora-release, the 590 driver family, akmods, kernel-devel ...), the real
           huggingface_hub wheels unpacked, sshd configured (ssh.service of the target's systemd) and the
           module "built" once by akmods.
           Rebuilt when its recipe (templates/sandbox, fixture inputs, this file) changes.

The running sandbox mounts overlay(lower = pristine:base, upper = instance/upper): `reset` drops the
upper layer and is back at pristine in well under a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from . import aptsources, fixtures
from .paths import GIT_MOUNT, PERSIST_MOUNT, REPO_MOUNT, Paths

SUITE = "sid"
# What the build step and the demo need in the target (Debian names; the fixture RPMs record the
# Fedora-named ones in rpm's database without overwriting these real files). systemd, systemd-sysv and
# dbus: the target boots systemd as PID 1 under systemd-nspawn, as a Fedora host does; iproute2: `ss`,
# which Fedora has and testinfra's host.socket() uses.
BASE_PACKAGES = [
    "openssh-server", "dnf5", "rpm", "python3", "git", "cmake", "ninja-build", "ccache",
    "gcc-14", "g++-14", "gcc-15", "g++-15", "make", "curl", "kmod", "procps", "ca-certificates",
    "sudo", "patch", "xz-utils", "binutils", "systemd", "systemd-sysv", "dbus", "iproute2",
]
# The mirror is not part of the recipe: it comes from this machine's apt sources (aptsources.py) and any
# Debian mirror serves the same suite.
BASE_RECIPE = {"suite": SUITE, "variant": "minbase", "packages": BASE_PACKAGES, "version": 2}
# Packages installed in the pristine state (the rest of packages.yaml.j2 is only available in the repos).
APT_OPTS = ["-o", "Acquire::Check-Valid-Until=false"]


class BuildError(Exception):
    pass


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def base_hash() -> str:
    return _hash(BASE_RECIPE)


def _stamp(d: Path) -> Path:
    return d.parent / f".{d.name}.recipe"


def is_current(d: Path, h: str) -> bool:
    s = _stamp(d)
    return d.is_dir() and s.exists() and s.read_text().split()[0] == h


def _run(argv, log, **kw):
    log("sandbox: $ " + " ".join(str(a) for a in argv))
    r = subprocess.run([str(a) for a in argv], text=True, capture_output=True, **kw)
    if r.returncode != 0:
        raise BuildError(f"command failed (exit {r.returncode}): {' '.join(map(str, argv))}\n"
                         f"{(r.stdout + r.stderr).strip()[-2000:]}")
    return r


def build_base(p: Paths, log=print, before_replace=lambda: None) -> bool:
    """debootstrap the base rootfs unless the cached one matches BASE_RECIPE. True if it was built.
    `before_replace` runs before a cached layer is replaced (the running sandbox must stop first)."""
    h = base_hash()
    if is_current(p.base, h):
        return False
    if not shutil.which("debootstrap"):
        raise BuildError("debootstrap is not installed; fix: apt-get install -y debootstrap (scripts/setup does)")
    try:
        mirror = aptsources.debian_mirror()
    except aptsources.MirrorError as e:
        raise BuildError(str(e)) from None
    p.debs.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    shm = Path("/dev/shm")
    use_shm = shm.is_dir() and shutil.disk_usage(shm).free > 4 << 30
    tmp = Path(tempfile.mkdtemp(prefix="gpubox-base-", dir=str(shm if use_shm else p.root)))
    target = tmp / "root"
    try:
        _run(["debootstrap", "--variant=minbase", f"--cache-dir={p.debs}", "--include=" + ",".join(BASE_PACKAGES),
              SUITE, target, mirror], log)
        # apt inside a sid chroot: its Release files may be past Valid-Until on snapshot mirrors.
        (target / "etc/apt/apt.conf.d/99gpubox").write_text('Acquire::Check-Valid-Until "false";\n')
        _run(["chroot", target, "apt-get", "clean"], log)
        before_replace()
        new = p.base.with_name("base.new")
        shutil.rmtree(new, ignore_errors=True)
        if use_shm:
            new.mkdir()
            _run(["cp", "-a", f"{target}/.", f"{new}/"], log)
        else:
            target.rename(new)
        _stamp(p.base).unlink(missing_ok=True)
        shutil.rmtree(p.base, ignore_errors=True)
        new.rename(p.base)
        _stamp(p.base).write_text(h + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"sandbox: base rootfs built in {time.monotonic() - t0:.0f}s ({p.base})")
    return True


def base_info(p: Paths) -> dict:
    """Versions of the base's real tools that the fixture packages mirror (cached per base build)."""
    cache = p.root / ".base.info.json"
    h = base_hash()
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
        d = json.loads(cache.read_text())
        if d["base"] == h and _stamp(p.base).read_text().split()[0] == h:
            return d["info"]

    def out(*argv):
        return subprocess.run(["chroot", str(p.base), *argv], capture_output=True, text=True).stdout.strip()
    py = out("python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])")
    info = {"gcc_default": out("gcc-15", "-dumpfullversion"), "gcc14": out("gcc-14", "-dumpfullversion"),
            "kmod": out("kmod", "--version").splitlines()[0].split()[-1], "python": py,
            "dnf5": out("dpkg-query", "-W", "-f", "${Version}", "dnf5").split("-")[0].split(":")[-1]}
    info = {k: v for k, v in info.items()}
    cache.write_text(json.dumps({"base": h, "info": info}))
    return info


def pristine_inputs(p: Paths, log=print) -> tuple[dict, str]:
    info = base_info(p)
    values = fixtures.host_inputs(p, info, log)
    pub = (p.key.with_suffix(".pub")).read_text()
    h = _hash({"base": base_hash(), "fixtures": fixtures.recipe_hash(values), "pub": pub, "python": info["python"],
               "rootfs": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()})
    return {**values, "python": info["python"]}, h


# Preinstalled fixture packages come from packages.yaml.j2 (`install: true`).
PRISTINE_SCRIPT = r"""
set -euo pipefail
export LC_ALL=C PATH=/usr/sbin:/usr/bin:/sbin:/bin
# Debian enables dnf's `local` plugin: it copies every installed RPM into a local repo and, in dnf5,
# makes a successful install exit 1 (createrepo_c). Fedora does not have it.
for f in /etc/dnf/libdnf5-plugins/local.conf /etc/dnf/plugins/local.conf; do
  [ -f "$f" ] && sed -i 's/^enabled *=.*/enabled = 0/' "$f"
done
# Fedora's default gcc (15) at Fedora's paths; gcc-14/g++-14 stay Debian's real binaries.
ln -sf dnf5 /usr/bin/dnf
ln -sf gcc-15 /usr/bin/gcc; ln -sf gcc-15 /usr/bin/cc; ln -sf g++-15 /usr/bin/g++; ln -sf g++-15 /usr/bin/c++
# Install the preinstalled fixture set with the chroot's own dnf5 (its repo files come with fedora-repos).
dnf5 -y -q --releasever=42 --setopt=reposdir=/nonexistent --setopt=install_weak_deps=False \
  --repofrompath=fedora,file://@REPOS@/fedora --repofrompath=rpmfusion,file://@REPOS@/rpmfusion \
  --setopt=fedora.gpgcheck=0 --setopt=rpmfusion.gpgcheck=0 \
  install @PACKAGES@
rpm -q fedora-release >/dev/null
dnf5 clean all -q >/dev/null 2>&1 || true
# The mainline (590) module as akmods would have built it for the running kernel.
akmods --force --kernels "$(uname -r)" >/dev/null
# ccache: its cache lives on the persistent mount, so it survives `sandbox.reset`.
printf 'cache_dir = @PERSIST@/ccache\nmax_size = 5G\n' > /etc/ccache.conf
# sshd (ssh.service, started by the target's systemd): own host key (stable across resets), key-only root
# login; its config (/etc/ssh/sshd_config) was written from testbed/templates/etc/sshd_config.j2.
mkdir -p /root/.ssh && chmod 700 /root/.ssh
[ -f /etc/ssh/ssh_host_ed25519_key ] || ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
rm -f /etc/ssh/ssh_host_rsa_key* /etc/ssh/ssh_host_ecdsa_key*
/usr/sbin/sshd -t
systemctl -q is-enabled ssh.service
# Timers and units a sandbox has no use for: they would only reach for the network (apt) or a disk (fstrim).
systemctl -q mask apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer fstrim.timer
git config --system --add safe.directory '*'
"""


def build_pristine(p: Paths, log=print, before_replace=lambda: None) -> bool:
    values, h = pristine_inputs(p, log)
    repos_h = _hash({"fixtures": fixtures.recipe_hash(values)})
    if not is_current(p.repos, repos_h):
        before_replace()
        fixtures.build_repos(p, values, log)
        _stamp(p.repos).write_text(repos_h + "\n")
    if is_current(p.pristine, h):
        return False
    t0 = time.monotonic()
    pkgs = [pk["name"] for pk in fixtures.catalogue(values) if pk.get("install")]
    stage = p.root / "pristine.build"
    shutil.rmtree(stage, ignore_errors=True)
    upper, work, merged = stage / "upper", stage / "work", stage / "merged"
    for d in (upper, work, merged):
        d.mkdir(parents=True)
    # Files written from the host into the new layer before the chroot script runs.
    (upper / "etc/ssh").mkdir(parents=True)
    (upper / "etc/ssh/sshd_config").write_text(fixtures.render("etc/sshd_config.j2"))
    (upper / "root/.ssh").mkdir(parents=True, mode=0o700)
    (upper / "root/.ssh/authorized_keys").write_text(p.key.with_suffix(".pub").read_text())
    os.chmod(upper / "root/.ssh/authorized_keys", 0o600)
    site = upper / f"usr/local/lib/python{values['python']}/dist-packages"
    fixtures.install_wheels(fixtures.hf_wheels(p, values["python"], log), site, upper / "usr/local/bin")
    script = (PRISTINE_SCRIPT.replace("@REPOS@", REPO_MOUNT).replace("@PERSIST@", PERSIST_MOUNT)
              .replace("@PACKAGES@", " ".join(pkgs)))
    outer = f"""
set -euo pipefail
mount --make-rprivate /
mount -t overlay overlay -o lowerdir={p.base},upperdir={upper},workdir={work} {merged}
mount -t proc proc {merged}/proc
mount --rbind /dev {merged}/dev
mount -t tmpfs tmpfs {merged}/tmp
mkdir -p {merged}{REPO_MOUNT}
mount --bind {p.repos} {merged}{REPO_MOUNT}
chroot {merged} /bin/bash -c {_shq(script)}
"""
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", outer],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"pristine layer: the set-up script failed (exit {r.returncode}):\n"
                         f"{(r.stdout + r.stderr).strip()[-3000:]}")
    # The mount points the script made (they are empty dirs in the layer) stay; tmp/proc content was tmpfs.
    before_replace()
    shutil.rmtree(p.pristine, ignore_errors=True)
    _stamp(p.pristine).unlink(missing_ok=True)
    upper.rename(p.pristine)
    shutil.rmtree(stage, ignore_errors=True)
    _stamp(p.pristine).write_text(h + "\n")
    log(f"sandbox: pristine layer built in {time.monotonic() - t0:.0f}s ({len(pkgs)} fixture RPMs installed by dnf5)")
    return True


def _shq(s: str) -> str:
    import shlex
    return shlex.quote(s)


def ensure_key(p: Paths, log=print) -> None:
    if p.key.exists() and p.key.with_suffix(".pub").exists():
        return
    p.ssh.mkdir(parents=True, exist_ok=True)
    os.chmod(p.ssh, 0o700)
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "gpubox-sandbox", "-f", p.key], log)


def kernel() -> str:
    return platform.release()
