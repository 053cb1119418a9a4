"""The sandbox host itself: systemd is its PID 1 (booted by systemd-nspawn) and runs sshd; it reports Fedora 42
to ssh, rpm, dnf5 and testinfra; the fixture packages relate as on Fedora (a real dnf5 conflict and swap);
reset restores pristine; down leaves nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest

from testbed.sandbox import ADDRESS, NETNS, PERSIST_MOUNT, runtime
from testbed.sandbox.paths import TARGET, fleet_targets

pytestmark = pytest.mark.integration


def ssh(inf, command: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ssh", "-F", inf.ssh_config, "gpubox", command], capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"ssh gpubox {command!r} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def test_os_release_says_fedora_42_over_ssh(sandbox):
    out = ssh(sandbox, "cat /etc/os-release").stdout
    fields = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert fields["ID"] == "fedora"
    assert fields["VERSION_ID"] == "42"
    assert ssh(sandbox, "hostname").stdout.strip() == "gpubox"
    assert ssh(sandbox, "cat /etc/redhat-release /etc/system-release").stdout.splitlines() == \
        ["Fedora release 42 (Adams)"] * 2


def test_dnf_is_dnf5_and_rpm_knows_fedora_release(sandbox):
    assert ssh(sandbox, "dnf --version").stdout.startswith("dnf5 version 5.")
    assert ssh(sandbox, "rpm -q fedora-release").stdout.strip() == "fedora-release-42-1.noarch"
    # dnf5 derives $releasever from fedora-release's system-release(42) provide.
    assert ssh(sandbox, "dnf5 -q --dump-variables").stdout.count("releasever = 42") == 1
    # Debian's `local` plugin is off (it would make every successful install exit 1).
    assert "enabled = 0" in ssh(sandbox, "cat /etc/dnf/libdnf5-plugins/local.conf").stdout


def test_testinfra_system_info_is_fedora_42(testinfra_host):
    info = testinfra_host.system_info
    assert (info.distribution, info.release) == ("fedora", "42")
    assert testinfra_host.package("akmod-nvidia").is_installed
    assert testinfra_host.package("akmod-nvidia").version == "590.48.01"
    assert not testinfra_host.package("akmod-nvidia-580xx").is_installed


def test_fabric_connection_runs_with_sandbox_overrides(conn, sandbox):
    r = conn.run("id -un; uname -n", hide=True)
    assert r.stdout.split() == ["root", "gpubox"]
    assert conn.config.gpubox.build.repo_url == sandbox.git_url == "file:///srv/git/llama.cpp.git"
    assert conn.config.gpubox.build.sha == sandbox.git_sha
    assert conn.config.gpubox.build.cuda is False
    assert conn.config.gpubox.cuda.repo_baseurl == sandbox.cuda_repo_baseurl
    # The config gpubox validates (a bad override would stop every step with exit 2).
    from provision import config
    cfg = config.load(conn)
    assert config.fork_pin(cfg)["sha"] == sandbox.git_sha


def test_akmod_580xx_conflicts_without_allowerasing_and_swaps_with_it(sandbox, reset_sandbox):
    reset_sandbox()
    try:
        r = ssh(sandbox, "dnf -y install akmod-nvidia-580xx", check=False)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "Failed to resolve the transaction" in r.stderr + r.stdout
        assert "conflicts with akmod-nvidia-branch" in r.stderr + r.stdout
        assert "--allowerasing" in r.stderr + r.stdout
        assert ssh(sandbox, "rpm -q akmod-nvidia").returncode == 0       # nothing changed

        ssh(sandbox, "dnf -y swap akmod-nvidia akmod-nvidia-580xx --allowerasing")
        after = ssh(sandbox, "rpm -qa --qf '%{NAME} %{VERSION}\\n' 'akmod-nvidia*'").stdout.split("\n")
        assert [l for l in after if l] == [l for l in after if l.startswith("akmod-nvidia-580xx 580.")] != []
        assert ssh(sandbox, "rpm -q akmod-nvidia", check=False).returncode == 1
    finally:
        reset_sandbox()


def test_versionlock_holds_580xx_against_the_updates_repo(sandbox, reset_sandbox):
    reset_sandbox()
    try:
        ssh(sandbox, "dnf -y install --allowerasing --repo=rpmfusion-nonfree akmod-nvidia-580xx")
        assert ssh(sandbox, "rpm -q --qf '%{VERSION}' akmod-nvidia-580xx").stdout == "580.105.08"
        ssh(sandbox, "dnf versionlock add akmod-nvidia-580xx xorg-x11-drv-nvidia-580xx xorg-x11-drv-nvidia-580xx-libs")
        assert "evr = 3:580.105.08-1.fc44" in ssh(sandbox, "dnf versionlock list").stdout
        ssh(sandbox, "dnf -y upgrade")
        assert ssh(sandbox, "rpm -q --qf '%{VERSION}' akmod-nvidia-580xx").stdout == "580.105.08"
        ssh(sandbox, "dnf versionlock delete akmod-nvidia-580xx xorg-x11-drv-nvidia-580xx xorg-x11-drv-nvidia-580xx-libs")
        ssh(sandbox, "dnf -y upgrade")
        assert ssh(sandbox, "rpm -q --qf '%{VERSION}' akmod-nvidia-580xx").stdout == "580.119.02"
    finally:
        reset_sandbox()


def test_stand_ins_answer_like_the_real_tools(sandbox, reset_sandbox):
    reset_sandbox()
    q = "nvidia-smi --query-gpu=name,compute_cap,memory.total,memory.free,driver_version --format=csv,noheader,nounits"
    assert ssh(sandbox, q).stdout.strip() == "NVIDIA GeForce GTX 1080, 6.1, 8192, 8110, 590.48.01"
    # akmods' module is read back by the REAL modinfo/depmod of the chroot.
    assert ssh(sandbox, "modinfo -F version nvidia").stdout.strip() == "590.48.01"
    kver = ssh(sandbox, "uname -r").stdout.strip()
    assert ssh(sandbox, "rpm -q --qf '[%{PROVIDENAME}=%{PROVIDEVERSION}\\n]' kernel-devel").stdout.count(
        f"kernel-devel-uname-r={kver}") == 1
    ssh(sandbox, "dnf -y swap akmod-nvidia akmod-nvidia-580xx --allowerasing --repo=rpmfusion-nonfree "
                 "&& akmods --force --kernels \"$(uname -r)\"")
    assert ssh(sandbox, "modinfo -F version nvidia").stdout.strip() == "580.105.08"
    r = ssh(sandbox, "mv /usr/src/kernels /usr/src/k.off; akmods --force", check=False)
    assert r.returncode == 1 and "Is the correct kernel-devel package installed?" in r.stderr
    reset_sandbox()


def test_cuda_repo_is_not_configured_but_serves_the_129_set_with_the_real_header(sandbox, reset_sandbox):
    reset_sandbox()
    assert ssh(sandbox, "ls /etc/yum.repos.d").stdout.split() == [
        "fedora.repo", "rpmfusion-nonfree-updates.repo", "rpmfusion-nonfree.repo"]
    repo = f"--repofrompath=cuda-test,{sandbox.cuda_repo_baseurl} --setopt=cuda-test.gpgcheck=0"
    try:
        ssh(sandbox, f"dnf -y install {repo} cuda-nvcc-12-9 cuda-cudart-devel-12-9 libcublas-devel-12-9 "
                     "cuda-cccl-12-9 cuda-crt-12-9")
        assert "release 12.9, V12.9.86" in ssh(sandbox, "/usr/local/cuda-12.9/bin/nvcc --version").stdout
        hdr = "/usr/local/cuda-12.9/targets/x86_64-linux/include/crt/math_functions.h"
        assert ssh(sandbox, f"stat -c %s {hdr}").stdout.strip() == "238284"
        assert "cospi(double x)" in ssh(sandbox, f"sed -n 2601p {hdr}").stdout   # docs/platform.md's line
        assert ssh(sandbox, "rpm -V cuda-crt-12-9").returncode == 0
        # `cuda` pulls NVIDIA's driver, which conflicts with RPM Fusion's.
        r = ssh(sandbox, f"dnf -y install {repo} cuda", check=False)
        assert r.returncode == 1 and "nvidia-driver" in r.stdout + r.stderr
    finally:
        reset_sandbox()


def test_gcc14_is_a_thin_package_over_the_real_compiler(sandbox, reset_sandbox):
    reset_sandbox()
    try:
        before = ssh(sandbox, "sha256sum /usr/bin/gcc-14 $(readlink -f /usr/bin/gcc-14)").stdout
        ssh(sandbox, "dnf -y install gcc14 gcc14-c++")
        assert ssh(sandbox, "sha256sum /usr/bin/gcc-14 $(readlink -f /usr/bin/gcc-14)").stdout == before
        assert ssh(sandbox, "rpm -qf /usr/bin/g++-14 --qf '%{NAME}'").stdout == "gcc14-c++"
        assert ssh(sandbox, "gcc-14 -dumpversion; gcc -dumpversion").stdout.split() == ["14", "15"]
        out = ssh(sandbox, "printf 'int main(){return 0;}' | g++-14 -x c++ - -o /tmp/a && /tmp/a && echo ok").stdout
        assert out.strip() == "ok"
    finally:
        reset_sandbox()


def test_reset_drops_changes_but_keeps_the_persistent_cache(sandbox, reset_sandbox):
    marker = f"{PERSIST_MOUNT}/test-reset-marker"
    ssh(sandbox, f"echo kept > {marker}; echo gone > /root/scratch; dnf -y install gcc14")
    reset_sandbox()
    assert ssh(sandbox, f"cat {marker}").stdout.strip() == "kept"
    assert ssh(sandbox, "test -e /root/scratch", check=False).returncode == 1
    assert ssh(sandbox, "rpm -q gcc14", check=False).returncode == 1
    assert ssh(sandbox, "ccache -k cache_dir").stdout.strip() == f"{PERSIST_MOUNT}/ccache"
    ssh(sandbox, f"rm -f {marker}")


def test_git_mirror_serves_the_pinned_llama_cpp(sandbox):
    out = ssh(sandbox, f"git ls-remote {sandbox.git_url}").stdout
    assert f"{sandbox.git_sha}\tHEAD" in out
    ssh(sandbox, f"rm -rf /tmp/l && git clone -q --no-checkout {sandbox.git_url} /tmp/l && "
                 f"git -C /tmp/l checkout -q {sandbox.git_sha} && test -f /tmp/l/CMakeLists.txt && "
                 "test -f /tmp/l/tools/server/server.cpp && rm -rf /tmp/l")


def test_hf_server_is_reachable_from_the_target_with_huggingface_hub(sandbox, hf_env):
    code = ("import os, huggingface_hub as h; "
            "p = h.hf_hub_download('unsloth/gemma-4-26B-A4B-it-GGUF', 'gemma-4-26B-A4B-it-Q4_K_M.gguf', "
            "local_dir='/tmp/hf'); print(os.path.getsize(p), open(p, 'rb').read(4))")
    out = ssh(sandbox, f"HF_ENDPOINT={sandbox.hf_endpoint} HF_HUB_DISABLE_TELEMETRY=1 python3 -c \"{code}\"").stdout
    size, magic = out.split(" ", 1)
    assert int(size) > 1000 and magic.strip() == "b'GGUF'"
    with urllib.request.urlopen(f"{sandbox.hf_endpoint_host}/api/models/unsloth/gemma-4-26B-A4B-it-GGUF") as r:
        assert json.load(r)["id"] == "unsloth/gemma-4-26B-A4B-it-GGUF"


def test_systemd_is_pid_1_and_runs_sshd(sandbox):
    assert ssh(sandbox, "readlink /proc/1/exe").stdout.strip() == "/usr/lib/systemd/systemd"
    assert ssh(sandbox, "systemctl is-system-running").stdout.strip() == "running"
    assert ssh(sandbox, "systemctl is-active ssh.service").stdout.strip() == "active"
    main = ssh(sandbox, "systemctl show -p MainPID --value ssh.service").stdout.strip()
    assert f"pid={main}," in ssh(sandbox, "ss -Hltnp 'sport = :22'").stdout          # the unit's sshd listens
    assert ssh(sandbox, "systemctl is-enabled akmods.service").stdout.strip() == "enabled"   # as on Fedora
    assert ssh(sandbox, "journalctl -b -u ssh.service --no-pager -o cat").stdout.count("Server listening") >= 1


MLOCK_25M = ("python3 -c \"import ctypes, os; c = ctypes.CDLL(None, use_errno=True); "
             "c.mmap.restype = ctypes.c_void_p; c.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, "
             "ctypes.c_int, ctypes.c_int, ctypes.c_long]; n = 25 << 20; p = c.mmap(None, n, 3, 0x22, -1, 0); "
             "print('ok' if c.mlock(ctypes.c_void_p(p), ctypes.c_size_t(n)) == 0 else os.strerror(ctypes.get_errno()))\"")


@pytest.mark.parametrize("props,locks", [
    ("", True),                                                       # root: every capability of the container
    ("-p CapabilityBoundingSet=~CAP_IPC_LOCK", False),               # the 8 MiB limit applies
    ("-p User=nobody", False),
    ("-p User=nobody -p LimitMEMLOCK=infinity", False),              # this systemd cannot raise the hard limit
    ("-p User=nobody -p AmbientCapabilities=CAP_IPC_LOCK", True),    # what llama-server.service adds for --mlock
])
def test_what_a_unit_needs_to_mlock_25_mib_here(sandbox, props, locks):
    """The container's systemd, like this machine's root, has no CAP_SYS_RESOURCE: LimitMEMLOCK=infinity is
    shown but the hard limit (8 MiB) stays; CAP_IPC_LOCK lifts the limit (docs/systemd.md)."""
    out = ssh(sandbox, f"systemd-run -q --wait --pipe {props} {MLOCK_25M}").stdout.strip()
    assert (out == "ok") == locks, out


def test_up_twice_is_harmless(sandbox, sandbox_paths):
    before = runtime.info(sandbox_paths).pids      # reset restarts the target: compare with the current PIDs
    again = runtime.up(sandbox_paths)
    assert again.pids == before
    assert ssh(sandbox, "true").returncode == 0


def _leftovers(pids: dict, paths, targets=(TARGET,)) -> list[str]:
    """What of a sandbox is still on this machine, looked up independently of runtime.leftovers()."""
    left = []
    for name, pid in pids.items():
        if pid and runtime._alive(pid):
            left.append(f"{name} pid {pid} still running")
    for t in targets:
        if Path(f"/run/netns/{t.netns}").exists():
            left.append(f"netns {t.netns}")
        if subprocess.run(["ip", "link", "show", t.host_if], capture_output=True).returncode == 0:
            left.append(f"veth {t.host_if}")
        for hier in ("systemd", "unified", ""):
            cg = Path("/sys/fs/cgroup", hier, t.cgroup)
            if cg.exists():
                left.append(f"cgroup {cg}")
    with open("/proc/self/mountinfo") as fh:
        left += [f"mount {l.split()[4]}" for l in fh
                 if str(paths.root) in l or l.split()[4] in {f"/run/netns/{t.netns}" for t in targets}]
    ps = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout
    for line in ps.splitlines():
        if (str(paths.root) in line or any(f"--machine={t.name} " in line + " " for t in targets)) and " Z" not in line:
            left.append("process " + line.strip())
    if Path("/run/systemd/nspawn").exists():
        left.append("/run/systemd/nspawn: " + " ".join(str(x) for x in Path("/run/systemd/nspawn").rglob("*")))
    return left


def test_down_leaves_nothing_and_twice_is_harmless(sandbox_lock):
    """Run last in this module: brings the sandbox down and up again for the following tests. Nothing of it
    stays, of the single host nor of a fleet's two: no process (nspawn, the containers' systemd and services,
    the HF servers, ssh's ControlMaster), no mount, cgroup, veth or namespace, nothing under /run/systemd/nspawn."""
    p = sandbox_lock
    inf = runtime.up(p)
    ssh(inf, "true")                      # an ssh ControlMaster exists now
    # A fleet of two beside it (`sandbox.up --hosts 2`): `down` takes them too.
    fl = runtime.up_fleet(2, p, log=lambda m: None)
    for h in fl.hosts:
        r = subprocess.run(["ssh", "-F", fl.ssh_config, h, "hostname"], capture_output=True, text=True, timeout=60)
        assert r.stdout.strip() == h, r.stderr
    targets = [TARGET, *fleet_targets(2)]
    pids = {**inf.pids, **{f"{h} {k}": v for h, d in fl.pids.items() for k, v in d.items()}, "fleet hf": fl.hfserver}
    up_now = _leftovers(pids, p, targets)
    assert any(x.startswith("cgroup") for x in up_now) and any("systemd-nspawn" in x for x in up_now), up_now
    assert {f"netns {t.netns}" for t in targets} <= set(up_now), up_now
    assert runtime.leftovers(p)           # the same check sees the running sandbox
    runtime.down(p, log=lambda m: None)
    assert _leftovers(pids, p, targets) == []
    assert runtime.leftovers(p) == []
    assert runtime.down(p, log=lambda m: None) == []
    assert not runtime.running(p)
    again = runtime.up(p)
    assert ssh(again, "cat /etc/fedora-release").stdout.strip() == "Fedora release 42 (Adams)"
