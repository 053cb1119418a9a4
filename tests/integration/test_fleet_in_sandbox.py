"""A fleet of three sandbox hosts (gpubox1..3, `sandbox.up --hosts 3`), planned and provisioned in parallel over
real SSH by `gpubox -H gpubox1,gpubox2,gpubox3 fleet` and `fab fleet --hosts ...`, steps 1-4 (driver, cuda,
compiler, patch; build and models are left out: on this 2-core machine three llama.cpp builds at once are
not affordable, and they add nothing to what the fleet runner does).

One host is made to fail: on gpubox2 only, an empty tmpfs is mounted over /srv/gpubox-repos/cuda inside the
target, so the directory its cuda.repo_baseurl (file:///srv/gpubox-repos/cuda) names holds no repository:
its CUDA repository is removed, the other two hosts still have theirs. The combined report says gpubox2 failed
at step cuda, with dnf's command and its last lines; gpubox1 and gpubox3 converge; a second run changes
nothing on them (every step ok, no operation run) while gpubox2 fails at cuda again.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.sandbox import runtime

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STEPS = ["driver", "cuda", "compiler", "patch"]
HOSTS = ["gpubox1", "gpubox2", "gpubox3"]
BROKEN = "gpubox2"


def ssh(inf, host: str, command: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ssh", "-F", inf.ssh_config, host, command], capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"ssh {host} {command!r} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def fleet3(sandbox_lock):
    p = sandbox_lock
    inf = runtime.up_fleet(3, p, log=lambda m: None)
    runtime.reset_fleet(p, log=lambda m: None)
    yield inf
    runtime.down_fleet(p, log=lambda m: None)
    # the fleet's own names (gpubox1.., veth vgpubox1..); the single host `gpubox` (veth gpubox0) may be up
    left = [x for x in runtime.leftovers(p) if re.search(r"gpubox[1-9]", x)]
    assert left == [], left


def run(argv: list[str], inf) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_ENDPOINT": inf.hf_endpoint, "PYTHONPATH": str(REPO)})


def gpubox_fleet(inf, report_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """The installed command's way: `gpubox -H a,b,c fleet` (provision/cli.py, its executor hands -H over)."""
    return run([sys.executable, "-m", "provision.cli", "-S", inf.ssh_config, "-f", inf.overrides_file,
                "-H", ",".join(HOSTS), "fleet", "--only", ",".join(STEPS), "--set", f"report_dir={report_dir}",
                *args], inf)


def fab_fleet(inf, report_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """A clone's way: `fab fleet --hosts a,b,c`."""
    return run([sys.executable, "-m", "fabric", "-S", inf.ssh_config, "-f", inf.overrides_file, "fleet",
                "--hosts", ",".join(HOSTS), "--only", ",".join(STEPS), "--set", f"report_dir={report_dir}", *args],
               inf)


def fleet_report(report_dir: Path) -> dict:
    data = json.loads((report_dir / "fleet-latest.json").read_text())
    data["by"] = {h["host"]: h for h in data["hosts"]}
    return data


def host_lines(stdout: str) -> list[str]:
    """What the hosts printed while they ran: everything above the fleet's table."""
    lines = stdout.splitlines()
    head = next(i for i, l in enumerate(lines) if l.startswith("gpubox fleet "))
    return lines[:head]


def test_three_hosts_in_parallel_one_fails_the_others_converge_and_stay(fleet3, tmp_path):
    inf = fleet3
    assert inf.hosts == HOSTS
    for h in HOSTS:                                    # three hosts, one ssh config
        assert ssh(inf, h, "hostname").stdout.strip() == h
    assert "Host gpubox " in Path(inf.ssh_config).read_text()      # the single host stays in it
    # One HF server for the fleet (gpubox1's host side); the other hosts reach it by their route.
    probe = (f"python3 -c \"import json, urllib.request as u; print(json.load(u.urlopen('{inf.hf_endpoint}"
             "/api/models/unsloth/gemma-4-26B-A4B-it-GGUF', timeout=10))['id'])\"")
    assert ssh(inf, "gpubox3", probe).stdout.strip() == "unsloth/gemma-4-26B-A4B-it-GGUF"
    # gpubox2's CUDA repository is removed: an empty directory over it, inside that target only.
    ssh(inf, BROKEN, "mount -t tmpfs -o size=1m gpubox-test-no-cuda /srv/gpubox-repos/cuda")
    assert ssh(inf, BROKEN, "ls -A /srv/gpubox-repos/cuda").stdout == ""
    assert "repodata" in ssh(inf, "gpubox1", "ls /srv/gpubox-repos/cuda").stdout.split()

    # 1. plan, two hosts at a time: changes nothing, exit 0, every host would change every step.
    rd = tmp_path / "plan"
    r = gpubox_fleet(inf, rd, "--plan", "--parallel", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    plan = fleet_report(rd)
    assert plan["mode"] == "plan" and plan["failed"] == [] and plan["parallel"] == 2
    # The bound: two hosts ran together, the third took the first free slot (it started when one had ended).
    spans = sorted((plan["by"][h]["start"], plan["by"][h]["end"]) for h in HOSTS)
    assert spans[1][0] < spans[0][1] and spans[2][0] >= min(spans[0][1], spans[1][1]) - 0.01, spans
    for h in HOSTS:
        assert plan["by"][h]["status"] == "would change", plan["by"][h]
        assert [plan["by"][h]["steps"][s] for s in STEPS] == ["would change"] * 4
    assert "plan for gpubox1, gpubox2, gpubox3:" in r.stdout       # one plan, the three hosts listed together
    for h in HOSTS:
        assert ssh(inf, h, "rpm -q akmod-nvidia-580xx", check=False).returncode == 1   # nothing changed

    # 2. provision, in parallel: gpubox2 fails at cuda, the other two converge; exit status 1.
    rd = tmp_path / "provision"
    r = gpubox_fleet(inf, rd, "--parallel", "3")
    print(r.stdout)
    assert r.returncode == 1, r.stdout + r.stderr
    prov = fleet_report(rd)
    assert prov["failed"] == [BROKEN]
    for h in ("gpubox1", "gpubox3"):
        assert prov["by"][h]["status"] == "changed" and prov["by"][h]["failure"] == {}
        assert [prov["by"][h]["steps"][s] for s in STEPS] == ["changed"] * 4, prov["by"][h]
        assert ssh(inf, h, "rpm -q cuda-nvcc-12-9 gcc14 akmod-nvidia-580xx").returncode == 0
    bad = prov["by"][BROKEN]
    assert [bad["steps"][s] for s in STEPS] == ["changed", "failed", "not run", "not run"]
    f = bad["failure"]
    assert f["step"] == "cuda" and f["exited"] not in (0, None)
    assert re.match(r"dnf5? -y install ", f["command"]) and "cuda-nvcc-12-9" in f["command"], f
    assert "No match for argument: cuda-nvcc-12-9" in f["output"], f      # dnf's own words: the repo is gone
    assert Path(f["log"]).is_file() and Path(bad["report"]).is_file()
    assert ssh(inf, BROKEN, "rpm -q cuda-nvcc-12-9", check=False).returncode != 0
    # ... and the table says which host and why.
    assert re.search(r"^  host +driver +cuda +compiler +patch +time +ssh$", r.stdout, re.M), r.stdout
    assert re.search(r"^  gpubox2 +changed +FAILED +not run +not run +\d", r.stdout, re.M), r.stdout
    assert re.search(r"^first failure of each failed host:\n  gpubox2: step cuda: installing the CUDA 12.9 packages "
                     r"failed: the repositories have no package named cuda-nvcc-12-9", r.stdout, re.M), r.stdout
    assert f"    command: {f['command']}" in r.stdout
    # In parallel: the three hosts' runs overlapped (each started before any other ended).
    spans = [(prov["by"][h]["start"], prov["by"][h]["end"]) for h in HOSTS]
    assert max(s for s, _ in spans) < min(e for _, e in spans), spans
    # Readable: every line the hosts printed while running is one host's, prefixed with its name.
    lines = host_lines(r.stdout)
    assert lines and all(re.match(r"^\[gpubox[123]\] ", l) for l in lines), lines
    for h in HOSTS:
        assert f"[{h}] [driver] applying: " in "\n".join(lines)
        assert prov["by"][h]["ssh_commands"] > 4

    # 3. again, through fab: nothing changes on the good hosts; gpubox2 still fails at cuda.
    rd = tmp_path / "again"
    r = fab_fleet(inf, rd)
    assert r.returncode == 1, r.stdout + r.stderr
    again = fleet_report(rd)
    assert again["failed"] == [BROKEN]
    for h in ("gpubox1", "gpubox3"):
        row = again["by"][h]
        assert row["status"] == "ok" and row["changed"] == 0
        assert [row["steps"][s] for s in STEPS] == ["ok"] * 4
        host_rep = json.loads(Path(row["report"]).read_text())
        assert [s["ran"] for s in host_rep["steps"] if s["name"] in STEPS] == [[]] * 4    # no operation ran
    assert again["by"][BROKEN]["steps"]["driver"] == "ok"       # converged in the first run
    assert again["by"][BROKEN]["failure"]["step"] == "cuda"
    print(r.stdout)


def test_ctrl_c_in_the_middle_of_a_fleet_run_leaves_no_host_locked(fleet3, tmp_path):
    """SIGINT (Ctrl-C) while the three hosts are being provisioned: the controller exits at once with a
    non-zero status instead of waiting for the hosts (the group's threads are daemon threads); each host's run
    lock went with its SSH connection (no holder left on any target), and the next fleet run converges all
    three from wherever the interrupted one stopped."""
    import signal
    import time
    inf = fleet3
    runtime.reset_fleet(log=lambda m: None)             # pristine again: a real provision to interrupt
    rd = tmp_path / "interrupted"
    argv = [sys.executable, "-m", "provision.cli", "-S", inf.ssh_config, "-f", inf.overrides_file,
            "-H", ",".join(HOSTS), "fleet", "--only", ",".join(STEPS), "--set", f"report_dir={rd}"]
    # SIGINT as a terminal delivers it: a test session started in the background by a non-interactive shell
    # (CI's) inherits SIGINT ignored, and Python leaves an ignored SIGINT ignored; the child gets the default.
    p = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "HF_ENDPOINT": inf.hf_endpoint, "PYTHONPATH": str(REPO)},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen: list[str] = []
    for line in p.stdout:                               # until every host is working on a step
        seen.append(line.rstrip("\n"))
        if len({l.split("]")[0] for l in seen if "applying: " in l}) == len(HOSTS):
            break
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    try:
        rest, _ = p.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("the controller did not exit within 20 s of SIGINT:\n" + "\n".join(seen))
    took = time.monotonic() - t0
    print(f"\nSIGINT after {len(seen)} lines; controller exited {p.returncode} after {took:.2f} s")
    assert p.returncode != 0, rest
    assert not (rd / "fleet-latest.json").exists()      # no fleet report claims a finished run
    time.sleep(2)                                        # the targets' sshd notice the closed connections
    for h in HOSTS:
        holders = ssh(inf, h, "pgrep -af '[g]pubox-lock' || true").stdout.strip()   # [g]: not pgrep's own shell
        assert holders == "", (h, holders)
    # The next run (the lock refused at once if it were still held: lock_wait defaults to 0) converges all.
    rd2 = tmp_path / "after"
    r = gpubox_fleet(inf, rd2)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    after = fleet_report(rd2)
    assert after["failed"] == []
    for h in HOSTS:
        assert after["by"][h]["status"] in ("changed", "ok")
        assert ssh(inf, h, "rpm -q cuda-nvcc-12-9 gcc14 akmod-nvidia-580xx").returncode == 0
