"""Integration: steps 1-4 (driver, cuda, compiler, patch) for real against the sandbox over SSH.

- `fab ... plan` lists each change with its reason; `fab ... provision --only driver,cuda,compiler,patch`
  changes the host; a second run reports zero changes (Molecule-style idempotence); `plan` then lists none;
  the testinfra suites of the four steps pass against the sandbox.
- Fault test: the provision process killed with SIGKILL while each of steps 1-3 applies, then run again,
  converges to the same final state as an uninterrupted run.
- Refusals: a host that is not Fedora (this Debian machine through a local Context, and the sandbox with its
  os-release changed) and a dnf transaction that fails (a package missing from the repository): each a clear
  error naming the step, and nothing half-done (rpm -qa unchanged).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from invoke import Context

from provision import config
from provision.engine import Runner
from provision.host import Host
from provision.steps import BY_NAME

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STEPS = ["driver", "cuda", "compiler", "patch"]
ONLY = ",".join(STEPS)


# --- helpers --------------------------------------------------------------------------------------------

def ssh(inf, command: str, check: bool = True) -> str:
    r = subprocess.run(["ssh", "-F", inf.ssh_config, "gpubox", command], capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"ssh gpubox {command!r} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r.stdout


def fab_argv(inf, task: str, *args: str, report_dir: Path) -> list[str]:
    return [sys.executable, "-m", "fabric", "-S", inf.ssh_config, "-H", "gpubox", "-f", inf.overrides_file,
            task, "--only", ONLY, "--set", f"report_dir={report_dir}", *args]


def fab(inf, task: str, *args: str, report_dir: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(fab_argv(inf, task, *args, report_dir=report_dir), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def latest(report_dir: Path) -> dict:
    # named after the connection's host (the ssh config's HostName)
    found = sorted(report_dir.glob("*-latest.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


def by_step(rep: dict) -> dict:
    return {s["name"]: s for s in rep["steps"]}


def state(inf) -> dict:
    """What steps 1-4 own on the target, for comparing final states."""
    out = ssh(inf, "rpm -qa --qf '%{NAME}-%{VERSION}-%{RELEASE}\\n' | sort; echo @@; "
                   "cat /etc/dnf/versionlock.toml 2>/dev/null | grep -v '^comment'; echo @@; "
                   "cat /etc/yum.repos.d/cuda-*.repo /etc/profile.d/gpubox-cuda.sh 2>/dev/null; echo @@; "
                   "ls -l /var/lib/gpubox/shims 2>/dev/null | awk 'NR>1{print $1, $3, $9, $10, $11}'; echo @@; "
                   "modinfo -F version nvidia; echo @@; "
                   "sha256sum /usr/local/cuda-12.9/targets/x86_64-linux/include/crt/math_functions.h 2>/dev/null; "
                   "ls -a /etc/yum.repos.d /var/lib/gpubox/shims 2>/dev/null | grep -c gpubox", check=False)
    parts = out.split("@@\n")
    return {"rpm": parts[0], "locks": parts[1], "files": parts[2], "shims": parts[3], "module": parts[4],
            "header+temp": parts[5] if len(parts) > 5 else ""}


def verify_files() -> list[str]:
    return [str(REPO / "tests" / "verify" / f"test_{n}.py") for n in STEPS
            if (REPO / "tests" / "verify" / f"test_{n}.py").exists()]


# --- the main journey -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def journey(sandbox, tmp_path_factory):
    """plan -> provision -> provision again -> plan, from a pristine sandbox; the reports of each."""
    from testbed.sandbox import runtime, Paths
    runtime.reset(Paths.default(), log=lambda m: None)
    rd = tmp_path_factory.mktemp("reports")
    out = {"rpm_before": ssh(sandbox, "rpm -qa | sort")}
    for name in ("plan1", "run1", "run2", "plan2"):
        task = "plan" if name.startswith("plan") else "provision"
        t0 = time.monotonic()
        r = fab(sandbox, task, report_dir=rd)
        out[name] = {"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr, "report": latest(rd),
                     "wall": time.monotonic() - t0}
        if r.returncode != 0:
            pytest.fail(f"fab {task} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    out["state"] = state(sandbox)
    out["report_dir"] = rd
    return out


def test_plan_before_lists_each_change_with_its_reason(journey):
    rep = journey["plan1"]["report"]
    assert rep["mode"] == "plan"
    steps = by_step(rep)
    for name in STEPS:
        assert steps[name]["status"] == "would change", (name, steps[name])
        assert steps[name]["changes"], name
        for ch in steps[name]["changes"]:
            assert ch["what"] and ch["why"], (name, ch)
    whats = [c["what"] for c in steps["driver"]["changes"]]
    assert whats[0].startswith("install akmod-nvidia-580xx")
    assert whats[1].startswith("remove akmod-nvidia 590.48.01")
    assert any("--releasever=44 installs packages built for Fedora 44" in w for w in steps["driver"]["warnings"])
    assert "warning: --releasever=44" in journey["plan1"]["stdout"]
    # plan changed nothing: the fact script was its only command
    assert rep["fact_commands"] == 1 and all(steps[n]["commands"] == [] for n in STEPS)


def test_provision_changes_the_host(journey):
    rep = journey["run1"]["report"]
    steps = by_step(rep)
    assert [steps[n]["status"] for n in STEPS] == ["changed"] * 4, journey["run1"]["stdout"]
    # never claims the driver is active in a chroot: reboot required, as text in the report
    assert any(a.startswith("reboot required") for a in steps["driver"]["attention"])
    assert "! reboot required" in journey["run1"]["stdout"]
    st = journey["state"]
    assert "akmod-nvidia-580xx-580.119.02" in st["rpm"] and "akmod-nvidia-590" not in st["rpm"]
    assert "nvidia-driver" not in st["rpm"] and "cuda-nvcc-12-9-12.9.86" in st["rpm"]
    assert st["module"].strip() == "580.119.02"
    assert 'name = "xorg-x11-drv-nvidia-580xx-cuda-libs"' in st["locks"]


def test_second_run_reports_zero_changes(journey):
    rep = journey["run2"]["report"]
    steps = by_step(rep)
    assert [steps[n]["status"] for n in STEPS] == ["ok"] * 4, journey["run2"]["stdout"]
    assert all(steps[n]["changes"] == [] for n in STEPS)
    # only the fact script ran: one SSH command for the four steps
    assert rep["fact_commands"] == 1
    assert all(steps[n]["commands"] == [] for n in STEPS)
    # the reboot note persists, as status ok
    assert any(a.startswith("reboot required") for a in steps["driver"]["attention"])
    assert "0 changed" in journey["run2"]["stdout"]


def test_plan_after_lists_nothing(journey):
    steps = by_step(journey["plan2"]["report"])
    assert [steps[n]["status"] for n in STEPS] == ["ok"] * 4
    assert "would change" not in journey["plan2"]["stdout"]


def test_testinfra_suite_passes_against_the_sandbox(journey, sandbox, tmp_path):
    cfgfile = tmp_path / "verify-config.json"
    cfgfile.write_text(json.dumps(sandbox.gpubox_config(journey["report_dir"])))
    files = verify_files()
    assert len(files) >= 3
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *files,
                        "--hosts=ssh://gpubox", f"--ssh-config={sandbox.ssh_config}"],
                       cwd=REPO, capture_output=True, text=True, env=dict(os.environ, GPUBOX_CONFIG=str(cfgfile)),
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert " failed" not in r.stdout
    # only what a chroot cannot have is skipped (no loaded NVIDIA module before a reboot)
    skipped = [ln for ln in r.stdout.splitlines() if ln.startswith("SKIPPED")]
    assert all("reboot required" in ln for ln in skipped), skipped


# --- fault injection ------------------------------------------------------------------------------------

KILL_AFTER = {"driver": 0.6, "cuda": 2.0, "compiler": 0.3}


@pytest.mark.parametrize("step", list(KILL_AFTER))
def test_sigkill_mid_step_then_rerun_converges(step, journey, sandbox, reset_sandbox, tmp_path):
    reset_sandbox()
    rd = tmp_path / "reports"
    proc = subprocess.Popen(fab_argv(sandbox, "provision", report_dir=rd), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = threading.Event()
    lines: list[str] = []

    def watch():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(f"[{step}] applying"):
                seen.set()
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    assert seen.wait(300), "".join(lines)
    time.sleep(KILL_AFTER[step])
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    t.join(5)
    assert proc.returncode == -signal.SIGKILL
    # The killed run left the host part-way (or, for a fast step, done); a new run converges.
    r = fab(sandbox, "provision", report_dir=rd)
    if r.returncode != 0:
        # The transaction the killed run started may still hold dnf's lock on the target: one more try.
        time.sleep(5)
        r = fab(sandbox, "provision", report_dir=rd)
    assert r.returncode == 0, r.stdout + r.stderr
    r2 = fab(sandbox, "provision", report_dir=rd)
    assert r2.returncode == 0 and "0 changed" in r2.stdout, r2.stdout
    assert state(sandbox) == journey["state"]


# --- refusals -------------------------------------------------------------------------------------------

def test_refuses_this_debian_host_through_a_local_context(tmp_path):
    """The steps' apply refuses a host that is not Fedora; only the fact script ran here."""
    raw = config.defaults()["gpubox"]
    raw["report_dir"] = str(tmp_path)
    cfg = config.validate(raw)
    host = Host(Context())
    for name in ("driver", "cuda", "compiler"):
        rep = Runner(host, cfg, [BY_NAME[name]], echo=lambda s: None).run()
        res = rep.steps[0]
        assert res.status == "failed"
        assert res.error.startswith(f"{name}: this host is debian"), res.error
        assert "not Fedora 42" in res.error and "fix:" in res.error
        assert res.commands == []
    assert len(host.records) == 3 and all("@@fact" in r.command for r in host.records)


def test_refuses_the_sandbox_when_it_is_not_fedora(sandbox, reset_sandbox, tmp_path):
    reset_sandbox()
    ssh(sandbox, "rm /etc/os-release && printf 'ID=debian\\nVERSION_ID=13\\nPRETTY_NAME=\"Debian 13\"\\n' > /etc/os-release")
    before = ssh(sandbox, "rpm -qa | sort")
    r = fab(sandbox, "provision", report_dir=tmp_path)
    assert r.returncode == 1
    assert "step driver FAILED:\n  driver: this host is debian 13, not Fedora 42" in r.stdout, r.stdout
    assert ssh(sandbox, "rpm -qa | sort") == before
    assert ssh(sandbox, "ls /etc/yum.repos.d/ /var/lib/gpubox 2>&1; true").count("cuda") == 0
    reset_sandbox()


@pytest.mark.parametrize("step,sets,expect", [
    ("driver", "driver.packages=[akmod-nvidia-580xx, xorg-x11-drv-nvidia-580xx-nosuch]",
     "driver: the 580xx driver transaction failed: the repositories have no package named xorg-x11-drv-nvidia-580xx-nosuch"),
    ("compiler", "compiler.packages=[gcc14, gcc14-nosuch]",
     "compiler: installing gcc-14 failed: the repositories have no package named gcc14-nosuch"),
])
def test_failed_transaction_is_clear_and_changes_nothing(step, sets, expect, sandbox, reset_sandbox, tmp_path):
    reset_sandbox()
    before = ssh(sandbox, "rpm -qa | sort")
    r = subprocess.run([sys.executable, "-m", "fabric", "-S", sandbox.ssh_config, "-H", "gpubox", "-f",
                        sandbox.overrides_file, "provision", "--only", step, "--set", sets,
                        "--set", f"report_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert f"step {step} FAILED:" in r.stdout and expect in r.stdout, r.stdout
    assert "nothing was installed or removed" in r.stdout
    assert "fix: check the package names" in r.stdout
    assert ssh(sandbox, "rpm -qa | sort") == before
    assert ssh(sandbox, "test -e /etc/dnf/versionlock.toml && echo locked || echo none").strip() == "none"
    assert ssh(sandbox, "test -e /var/lib/gpubox/shims && echo shims || echo none").strip() == "none"
    reset_sandbox()


def test_fab_with_several_hosts_runs_the_task_on_each(sandbox, tmp_path):
    """`fab -H a,b plan`: Fabric calls the same task body once per host. Both names reach the sandbox (its
    ssh config knows `gpubox` and the address), so two plans are printed, one per connection."""
    r = subprocess.run([sys.executable, "-m", "fabric", "-S", sandbox.ssh_config, "-H", "gpubox,10.200.0.2",
                        "-f", sandbox.overrides_file, "plan", "--only", "driver", "--set", f"report_dir={tmp_path}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("gpubox plan on 10.200.0.2 [Fedora Linux 42") == 2, r.stdout
    assert len(list(tmp_path.glob("10.200.0.2-*-plan.json"))) >= 1
