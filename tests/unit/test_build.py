"""Step 5 (build): decisions from facts (pure), the commands apply emits (MockContext), the job count as
data, the fact script against real git repositories, and Ninja progress parsing."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess

import pytest
from invoke import Context, MockContext, Result

from provision import config, facts as factmod, lockfile, repro
from provision.engine import StepError
from provision.host import Host
from provision.jobs import choose_jobs
from provision.steps import build

SHA = "a6f3d363e4c6a672803d0e6e036f8a75cf43d0ae"
OLD = "b0e900a28ee4172bbb97df0d1ea1c78e86bc0ac6"
NVCC129 = "Cuda compilation tools, release 12.9, V12.9.86"


def cfg_with(*sets: str) -> dict:
    return config.validate(config.apply_sets(config.defaults()["gpubox"], sets))


def bfact(**kw) -> dict:
    d = {"src": "missing", "bins": [], "stamp": None, "configured": None, "dirty": [], "has_sha": False,
         "head_on_ref": False, "cmakecache": False, "generated": False, "dialect": False,
         "path": "/usr/local/bin:/usr/bin:/bin", "ccache": "/usr/bin/ccache", "ccache_version": "ccache version 4.10",
         "cmake": "/usr/bin/cmake", "cmake_version": "cmake version 3.31.6", "ninja": "/usr/bin/ninja",
         "ninja_version": "1.12.1", "git": "/usr/bin/git", "cxx_path": "/usr/bin/g++-14",
         "cxx_version": "g++-14 (GCC) 14.2.1", "cc_path": "/usr/bin/gcc-14", "cc_version": "gcc-14 (GCC) 14.2.1",
         "nvcc_path": "/usr/local/cuda-12.9/bin/nvcc", "nvcc_version": NVCC129}
    d.update(kw)
    return d


def facts_with(gpus=(), glibc="2.39", cores=4, avail_gib=30, **kw) -> dict:
    return {"home": "/home/u", "user": {"name": "u", "uid": 1000}, "cores": cores,
            "mem": {"total_mib": 32768, "available_mib": avail_gib * 1024}, "gpus": list(gpus), "glibc": glibc,
            "os": {"id": "fedora", "version": "42", "pretty": "Fedora Linux 42"}, "build": bfact(**kw)}


GTX1080 = {"name": "NVIDIA GeForce GTX 1080", "compute_cap": "6.1", "arch": "61", "vram_mib": 8192,
           "free_mib": 8000, "driver": "580.95.05"}
H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_cap": "9.0", "arch": "90", "vram_mib": 81559,
        "free_mib": 81000, "driver": "580.82.07"}


def built(facts: dict, cfg: dict, **stamp_over) -> dict:
    """The facts after a successful build with this config: stamp, configure record, binaries, version."""
    p = build.plan(facts, cfg)
    stamp = {"sha": p["sha"], "generator": p["generator"], "cmake_args": p["args"], "compilers": p["compilers"],
             "targets": p["targets"]}
    if "gpu_archs" in p["fingerprint"]:
        stamp["gpu_archs"] = p["fingerprint"]["gpu_archs"]
    stamp.update(FILES)
    stamp.update(stamp_over)
    f = dict(facts)
    f["build"] = dict(facts["build"], src="git", head=p["sha"], has_sha=True, head_on_ref=True,
                      stamp=stamp, configured={"fingerprint": p["fingerprint"]}, cmakecache=True, generated=True,
                      dialect=True, bins=list(p["targets"]), version_rc=0,
                      version=f"version: 1.2.0 (build 10018, commit {p['sha'][:7]})",
                      lock=lockfile.with_build(None, lockfile.build_entry(stamp, p["build"])))
    return f


# What the manifest command prints for a bin/ with one executable, one library and its links.
MANIFEST = ("F\tllama-server\t4096\t" + "1" * 64 + "\nF\tlibllama.so.0.5.0\t8192\t" + "2" * 64 + "\n"
            "L\tlibllama.so.0\tlibllama.so.0.5.0\nL\tlibllama.so\tlibllama.so.0\n")
FILES = repro.parse_manifest(MANIFEST)


# --- jobs: cores and memory, as data -------------------------------------------------------------------

@pytest.mark.parametrize("cores, avail_gib, per_job, configured, want", [
    (4, 32, 4, 0, 4),        # the 4-core 32 GiB box: 4 jobs, ~16 GB of CUDA jobs at most
    (4, 10, 4, 0, 2),        # the same box with a browser open: memory decides
    (16, 128, 4, 0, 16),     # the GPU machine: every core busy
    (16, 126, 4, 0, 16),
    (2, 24, 4, 0, 2),        # this CI machine
    (16, 16, 4, 0, 4),       # many cores, little RAM
    (8, 3, 4, 0, 1),         # less than one job's worth of memory: still 1
    (64, 512, 4, 0, 64),
    (16, 128, 8, 0, 16),
    (32, 128, 8, 0, 16),     # mem_per_job_gb = 8 halves the memory bound
    (4, 32, 4, 12, 12),      # build.jobs overrides
    ("unknown", 32, 4, 0, 8),
    (16, "unknown", 4, 0, 2),
    ("unknown", "unknown", 4, 0, 2),
])
def test_jobs_from_cores_and_memory(cores, avail_gib, per_job, configured, want):
    avail = avail_gib * 1024 if isinstance(avail_gib, int) else avail_gib
    jobs, why = choose_jobs(cores, avail, per_job, configured)
    assert jobs == want
    assert why


def test_plan_uses_mem_available_from_facts():
    cfg = cfg_with()
    assert build.plan(facts_with(cores=16, avail_gib=20), cfg)["jobs"] == 5
    assert build.plan(facts_with(cores=16, avail_gib=126), cfg)["jobs"] == 16
    assert build.plan(facts_with(cores=16, avail_gib=126), cfg_with("build.jobs=3"))["jobs"] == 3


# --- configure decisions ----------------------------------------------------------------------------------

def flags(facts, cfg) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in build.plan(facts, cfg)["args"])


def test_cuda_build_flags_from_steps_2_3():
    cfg = cfg_with()
    d = flags(facts_with(gpus=[GTX1080]), cfg)
    assert d["GGML_CUDA"] == "ON"
    assert d["CMAKE_CUDA_COMPILER"] == "/usr/local/cuda-12.9/bin/nvcc"
    assert d["CMAKE_CUDA_HOST_COMPILER"] == "/usr/bin/g++-14"
    assert d["CMAKE_CXX_COMPILER"] == "/usr/bin/g++-14" and d["CMAKE_C_COMPILER"] == "/usr/bin/gcc-14"
    assert d["CMAKE_CUDA_ARCHITECTURES"] == "native"
    assert d["LLAMA_BUILD_UI"] == "OFF" and d["LLAMA_USE_PREBUILT_UI"] == "OFF" and d["LLAMA_CURL"] == "OFF"
    for lang in ("C", "CXX", "CUDA"):
        assert d[f"CMAKE_{lang}_COMPILER_LAUNCHER"] == "/usr/bin/ccache"
    # every flag carries its reason
    assert all(why for _, why in build.cmake_flags(facts_with(gpus=[GTX1080]), cfg))
    env = build.plan(facts_with(gpus=[GTX1080]), cfg)["env"]
    assert env["PATH"].split(":")[:2] == ["/var/lib/gpubox/shims", "/usr/local/cuda-12.9/bin"]


def test_no_gpu_falls_back_to_the_configured_arch_and_says_why():
    cfg = cfg_with()
    f = facts_with(gpus=[])
    assert flags(f, cfg)["CMAKE_CUDA_ARCHITECTURES"] == "61"
    chk = build.check(f, cfg)
    assert any("no GPU visible" in w and "61" in w for w in chk.warnings)
    assert "no GPU visible" in chk.info["arch_why"]


def test_native_needs_cmake_324_else_the_visible_gpus_arch():
    cfg = cfg_with()
    assert flags(facts_with(gpus=[H100], cmake_version="cmake version 3.22.1"), cfg)["CMAKE_CUDA_ARCHITECTURES"] == "90"
    assert flags(facts_with(gpus=[H100], cmake_version="cmake version 3.28.3"), cfg)["CMAKE_CUDA_ARCHITECTURES"] == "native"


def test_cpu_build_has_no_cuda_flags_and_uses_the_hosts_compilers():
    cfg = cfg_with("build.cuda=false")
    d = flags(facts_with(cxx_path="/usr/bin/c++", cc_path="/usr/bin/cc"), cfg)
    assert d["GGML_CUDA"] == "OFF"
    assert not any(k.startswith("CMAKE_CUDA") for k in d)
    assert d["CMAKE_CXX_COMPILER"] == "/usr/bin/c++"
    assert build.plan(facts_with(), cfg)["env"].get("PATH") is None


def test_without_ccache_and_ninja():
    cfg = cfg_with()
    f = facts_with(gpus=[GTX1080], ccache="", ccache_version="", ninja="")
    p = build.plan(f, cfg)
    assert p["generator"] == "Unix Makefiles"
    assert not any("LAUNCHER" in a for a in p["args"])
    assert any("ninja not found" in w for w in build.check(f, cfg).warnings)


def test_toolchain_from_config_is_reported():
    cfg = cfg_with("build.nvcc=/usr/local/cuda/bin/nvcc", "build.host_compiler=/usr/bin/g++")
    f = facts_with(gpus=[H100], glibc="2.39", nvcc_version="Cuda compilation tools, release 13.0, V13.0.48")
    d = flags(f, cfg)
    assert d["CMAKE_CUDA_COMPILER"] == "/usr/local/cuda/bin/nvcc"
    assert d["CMAKE_CUDA_HOST_COMPILER"] == "/usr/bin/g++" and d["CMAKE_C_COMPILER"] == "/usr/bin/gcc"
    chk = build.check(f, cfg)
    assert any("from config, not steps 2-3" in a for a in chk.attention)
    assert chk.info["toolchain"].startswith("config:")
    assert build.plan(f, cfg)["env"]["PATH"].startswith("/usr/local/cuda/bin:")


def test_cmake_extra_is_appended():
    d = flags(facts_with(), cfg_with("build.cuda=false", "build.cmake_extra=[GGML_NATIVE=OFF]"))
    assert d["GGML_NATIVE"] == "OFF"


# --- check: what rebuilds and what does not -----------------------------------------------------------

def test_fresh_host_clones_configures_builds():
    cfg = cfg_with()
    chk = build.check(facts_with(gpus=[GTX1080]), cfg)
    assert not chk.satisfied
    whats = [c.what for c in chk.changes]
    assert whats[0].startswith("clone https://github.com/AtomicBot-ai/atomic-llama-cpp-turboquant.git")
    assert "configure" in whats and whats[-1].startswith("build llama-server, llama-bench, llama-fit-params with 4 jobs")
    assert "--depth" not in " ".join(chk.changes[0].commands)
    assert chk.changes[0].commands[-1].endswith(f"checkout --detach {SHA}")


def test_second_build_with_nothing_changed_is_satisfied():
    cfg = cfg_with()
    f = built(facts_with(gpus=[GTX1080]), cfg)
    chk = build.check(f, cfg)
    assert chk.satisfied, chk.changes
    assert chk.changes == []


@pytest.mark.parametrize("sets, facts_over, expect_reconfigure, why_part", [
    (["build.sha=" + OLD], {}, False, "pinned b0e900a28ee4"),
    (["build.profile=recipe"], {}, False, "pinned b0e900a28ee4"),
    (["build.cuda_architectures=75"], {}, True, "CMAKE_CUDA_ARCHITECTURES=75"),
    ([], {"gpus": [H100]}, True, "native architecture changed"),
    ([], {"cxx_version": "g++-14 (GCC) 14.3.1"}, True, "compilers changed"),
    ([], {"nvcc_version": "Cuda compilation tools, release 12.9, V12.9.41"}, True, "compilers changed"),
    (["build.cmake_extra=[GGML_CUDA_FA_ALL_QUANTS=ON]"], {}, True, "+-DGGML_CUDA_FA_ALL_QUANTS=ON"),
    (["build.targets=[llama-server, llama-bench, llama-fit-params, llama-cli]"], {}, False, "llama-cli"),
])
def test_changes_that_rebuild(sets, facts_over, expect_reconfigure, why_part):
    cfg0 = cfg_with()
    f0 = built(facts_with(gpus=[GTX1080]), cfg0)
    f = dict(f0)
    if "gpus" in facts_over:
        f["gpus"] = facts_over["gpus"]
    f["build"] = dict(f0["build"], **{k: v for k, v in facts_over.items() if k != "gpus"})
    chk = build.check(f, cfg_with(*sets))
    assert not chk.satisfied
    whats = " | ".join(c.what for c in chk.changes)
    assert "build llama-server" in whats
    assert ("reconfigure from scratch" in whats) == expect_reconfigure, whats
    assert why_part in " | ".join(c.why for c in chk.changes)
    if expect_reconfigure:
        rc = next(c for c in chk.changes if c.what.startswith("reconfigure"))
        assert rc.commands[0] == "rm -f /opt/gpubox/build/llama.cpp/gpubox-stamp.json"   # no stamp while building
        assert rc.commands[1].startswith("rm -rf /opt/gpubox/build/llama.cpp/CMakeCache.txt")


def test_sha_change_checks_out_and_fetches_only_when_missing():
    cfg = cfg_with("build.sha=" + OLD)
    f = built(facts_with(gpus=[GTX1080]), cfg_with())
    f["build"]["has_sha"] = False
    chk = build.check(f, cfg)
    co = next(c for c in chk.changes if c.what.startswith("check out"))
    assert "fetch" in co.commands[0] and co.commands[-1].endswith(OLD)
    f["build"]["has_sha"] = True
    co = next(c for c in build.check(f, cfg).changes if c.what.startswith("check out"))
    assert len(co.commands) == 1


def test_a_binary_that_does_not_run_or_names_another_commit_is_rebuilt():
    cfg = cfg_with()
    f = built(facts_with(gpus=[GTX1080]), cfg)
    f["build"]["version_rc"] = 127
    f["build"]["version_tail"] = "error while loading shared libraries: libcuda.so.1"
    chk = build.check(f, cfg)
    assert not chk.satisfied and "libcuda.so.1" in chk.changes[-1].why
    f["build"]["version_rc"] = 0
    f["build"]["version"] = "version: 0 (build 0, commit unknown)"
    assert "does not name" in build.check(f, cfg).changes[-1].why


def test_missing_dialect_is_a_change():
    cfg = cfg_with()
    f = built(facts_with(gpus=[GTX1080]), cfg)
    f["build"]["dialect"] = False
    chk = build.check(f, cfg)
    assert [c.what for c in chk.changes] == ["store llama-server's flag dialect"]
    # no llama-server among the targets: no dialect to store
    cfg = cfg_with("build.targets=[llama-bench]")
    f = built(facts_with(gpus=[GTX1080]), cfg)
    f["build"]["dialect"] = False
    assert build.check(f, cfg).satisfied


def test_dirty_and_foreign_checkouts_are_reported():
    cfg = cfg_with()
    f = facts_with(src="git", head=OLD, dirty=["ggml/src/ggml.c"], has_sha=True, head_on_ref=True)
    chk = build.check(f, cfg)
    assert any("local changes (ggml/src/ggml.c)" in a for a in chk.attention)
    f = facts_with(src="git", head=OLD, has_sha=True, head_on_ref=False)
    assert any("on no branch or tag" in a for a in build.check(f, cfg).attention)
    f = facts_with(src="other")
    assert any("not a git checkout" in a for a in build.check(f, cfg).attention)
    # built from the pin, edited afterwards: the binaries are still right, the edit is a warning
    f = built(facts_with(gpus=[GTX1080]), cfg)
    f["build"]["dirty"] = ["src/llama.cpp"]
    chk = build.check(f, cfg)
    assert chk.satisfied and any("local changes" in w for w in chk.warnings)


def test_unpatched_header_on_glibc_241_refuses():
    cfg = cfg_with()
    f = facts_with(gpus=[GTX1080], glibc="2.41")
    f["patch_header"] = {"exists": False, "sha256": None, "owner": None, "mode": None, "backup": None, "lines": []}
    chk = build.check(f, cfg)
    assert any("not patched" in a and "run step patch first" in a for a in chk.attention)
    with pytest.raises(StepError, match="refusing to configure a CUDA build"):
        build.apply(Host(MockContext()), f, cfg, chk)   # MockContext: any command would raise
    # older glibc, or CUDA from config: no patch needed / not step 4's header
    assert build.patch_state(facts_with(glibc="2.39"), cfg)[0]
    assert build.patch_state(facts_with(glibc="2.41"), cfg_with("build.nvcc=/usr/local/cuda/bin/nvcc"))[0]


def test_check_never_raises_on_unreadable_facts():
    cfg = cfg_with()
    f = facts_with()
    f["build"] = factmod.UNKNOWN
    f["cores"] = f["mem"] = f["gpus"] = factmod.UNKNOWN
    chk = build.check(f, cfg)
    assert not chk.satisfied


# --- apply: the commands, against MockContext ------------------------------------------------------------

def ctx(responses: dict) -> MockContext:
    run = {re.compile(r"^sh -c .* gpubox-manifest \S+/bin$", re.S): Result(MANIFEST),    # hash_bin
           re.compile(r".*git -C \S+ log -1 --format=%ct [0-9a-f]{40}$"): Result("1721800000\n"),
           re.compile(r"^sh -c "): Result()}   # Host.write_file, the lock
    run.update(responses)
    return MockContext(run=run)


# build.in_build_env: umask 022 and SOURCE_DATE_EPOCH from the checkout, then the command.
EPOCH = (r"sh -c 'umask 022; e=\$\(git -C \"\$1\" log -1 --format=%ct \"\$2\" 2>/dev/null\) .*' sh \S+ "
         r"[0-9a-f]{40}")


def ran(host: Host) -> list[str]:
    return [r.command for r in host.records]


def test_apply_fresh_clone_configure_build_record(monkeypatch):
    cfg = cfg_with("build.cuda=false", "build.targets=[llama-server]")
    f = facts_with(cxx_path="/usr/bin/c++", cc_path="/usr/bin/cc")
    help_text = open("tests/data/help/llama-server-help.current-b10018-1.2.0.txt").read()
    host = Host(ctx({
        re.compile(r"^mkdir -p "): Result(),
        re.compile(r"^git clone "): Result(),
        re.compile(r".*cat-file -e "): Result(),
        re.compile(r".*checkout --detach "): Result(),
        re.compile(r"^rm -f .*gpubox-stamp.json$"): Result(),
        re.compile(r"^env LC_ALL=C TZ=UTC " + EPOCH + " cmake -S "):
            Result("-- Configuring done\n-- Generating done\n"),
        re.compile(r"^env LC_ALL=C TZ=UTC " + EPOCH + " bash -c 'cmake --build "): Result("[1/2] Building CXX\n[2/2] Linking CXX executable bin/llama-server\n"
                                                        "@@times\n0m0.01s 0m0.00s\n10m30.0s 0m30.0s\n"),
        re.compile(r".*llama-server --version$"): Result(stderr=f"version: 1.2.0 (build 10018, commit {SHA[:7]})\n"),
        re.compile(r".*llama-server --help$"): Result(help_text),
    }))
    lines: list[str] = []
    notes = build.apply(host, f, cfg, build.check(f, cfg), echo=lines.append)
    cmds = ran(host)
    assert cmds[0] == "mkdir -p /opt/gpubox/src"
    assert cmds[1] == f"git clone --no-checkout -- {cfg['build']['repo_url']} /opt/gpubox/src/llama.cpp"
    assert any(c.endswith(f"checkout --detach {SHA}") for c in cmds)
    i_rm = cmds.index("rm -f /opt/gpubox/build/llama.cpp/gpubox-stamp.json")
    i_cfg = next(i for i, c in enumerate(cmds) if " cmake -S " in c)
    i_bld = next(i for i, c in enumerate(cmds) if "bash -c 'cmake --build" in c)
    assert i_rm < i_cfg < i_bld
    assert "--target llama-server --parallel 4" in cmds[i_bld]   # 4 cores, 30 GiB
    assert not any("rm -rf" in c for c in cmds)           # nothing to reconfigure from scratch
    # the stamp is the last build file written, with bin/'s hashes; then the lock's build record
    # (Host.write_file: the first chunk into a private directory, then one rename: `mv -Tf ... PATH`)
    written = [shlex.split(c)[6] for c in cmds if c.startswith("sh -c ") and "mv -Tf" in c]
    assert written[-2:] == ["/opt/gpubox/build/llama.cpp/gpubox-dialect.json",
                            "/opt/gpubox/build/llama.cpp/gpubox-stamp.json"]
    stamp_chunk = next(c for c in cmds if "mkdir -m 0700" in c and ".gpubox-stamp.json.gpubox-" in c)
    stamp = json.loads(shlex.split(stamp_chunk)[5])
    assert stamp["files"] == FILES["files"] and stamp["links"] == FILES["links"]
    assert "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON" in stamp["cmake_args"]
    lock_cmd = cmds[-1]
    assert "gpubox-lock /var/lib/gpubox/gpubox.lock.json" in lock_cmd
    lock = json.loads(shlex.split(lock_cmd)[-1])
    assert lock["build"] == {"sha": SHA, "build_dir": "/opt/gpubox/build/llama.cpp", **FILES}
    assert lock["format"] == 1 and lock["models"] == {}
    # the 76 kB dialect goes in several argument-sized chunks, not through stdin
    chunks = [c for c in cmds if c.startswith("sh -c ") and ".gpubox-dialect.json.gpubox-" in c and "mv -Tf" not in c]
    assert len(chunks) >= 3 and all(len(c) < 100_000 for c in chunks)
    assert any("11.0 CPU-minutes" in ln for ln in lines)   # from bash's `times` after the build
    assert any("post-sync" in n or "dialect" in n for n in notes) or notes == []


def test_apply_reconfigures_from_scratch_when_inputs_changed():
    cfg0 = cfg_with()
    f = built(facts_with(gpus=[GTX1080]), cfg0)
    cfg = cfg_with("build.cuda_architectures=75", "build.targets=[llama-bench]")
    host = Host(ctx({
        re.compile(r".*cat-file -e "): Result(),
        re.compile(r"^(mkdir -p|rm -f|rm -rf) "): Result(),
        re.compile(r"^env PATH=\S+ CUDAHOSTCXX=/usr/bin/g\+\+-14 LC_ALL=C TZ=UTC " + EPOCH + " cmake -S "): Result(
            "-- Using CMAKE_CUDA_ARCHITECTURES=75 CMAKE_CUDA_ARCHITECTURES_NATIVE=\n"),
        re.compile(r"^env PATH=.* bash -c 'cmake --build "): Result("ninja: no work to do.\n@@times\n0m0s 0m0s\n0m1.0s 0m0.5s\n"),
    }))
    lines: list[str] = []
    build.apply(host, f, cfg, build.check(f, cfg), echo=lines.append)
    cmds = ran(host)
    assert "rm -rf /opt/gpubox/build/llama.cpp/CMakeCache.txt /opt/gpubox/build/llama.cpp/CMakeFiles " \
           "/opt/gpubox/build/llama.cpp/gpubox-configure.json" in cmds
    cm = next(c for c in cmds if " cmake -S " in c)
    assert "-DCMAKE_CUDA_ARCHITECTURES=75" in cm and "-DCMAKE_CUDA_HOST_COMPILER=/usr/bin/g++-14" in cm
    assert "Using CMAKE_CUDA_ARCHITECTURES=75" in " ".join(lines)
    assert not any("git clone" in c or "checkout" in c for c in cmds)


def test_unreachable_url_is_a_clear_error_and_nothing_is_removed():
    cfg = cfg_with("build.cuda=false", "build.repo_url=https://git.invalid/x/llama.cpp.git")
    f = facts_with()
    host = Host(ctx({
        re.compile(r"^mkdir -p "): Result(),
        re.compile(r"^git clone "): Result(stderr="fatal: unable to access 'https://git.invalid/x/llama.cpp.git/': "
                                                 "Could not resolve host: git.invalid\n", exited=128),
    }))
    with pytest.raises(StepError) as ei:
        build.apply(host, f, cfg, build.check(f, cfg))
    msg = str(ei.value)
    assert "cannot clone https://git.invalid/x/llama.cpp.git" in msg and "Could not resolve host" in msg
    assert "nothing was removed" in msg
    assert not any(c.startswith("rm") for c in ran(host))


def test_unknown_sha_is_a_clear_error_and_nothing_is_removed():
    cfg = cfg_with("build.cuda=false", "build.sha=" + "0" * 40)
    f = facts_with(src="git", head=SHA, has_sha=False, head_on_ref=True)
    host = Host(ctx({
        re.compile(r".*cat-file -e "): Result(exited=128),
        re.compile(r".* fetch --tags -- "): Result(),
        re.compile(r".* fetch -- \S+ 0{40}$"): Result(stderr="fatal: remote error: upload-pack: not our ref\n", exited=128),
    }))
    with pytest.raises(StepError, match=r"commit 0{40} is not in https://github.com/AtomicBot-ai"):
        build.apply(host, f, cfg, build.check(f, cfg))
    cmds = ran(host)
    assert not any(c.startswith("rm") or " checkout " in c for c in cmds)


def test_dirty_checkout_is_not_overwritten():
    cfg = cfg_with("build.cuda=false")
    f = facts_with(src="git", head=OLD, dirty=["common/arg.cpp"], has_sha=True, head_on_ref=True)
    host = Host(ctx({}))
    with pytest.raises(StepError, match="has local changes"):
        build.apply(host, f, cfg, build.check(f, cfg))
    assert ran(host) == []


def test_build_failure_names_the_failed_edge_and_oom_fix():
    cfg = cfg_with("build.cuda=false", "build.targets=[llama-server]")
    f = built(facts_with(), cfg)
    f["build"]["stamp"] = None
    out = ("[5/9] Building CUDA object fattn.cu.o\nFAILED: ggml/src/ggml-cuda/fattn.cu.o\n"
           "nvcc error   : 'cicc' died due to signal 9 (Kill signal)\nninja: build stopped: subcommand failed.\n")
    host = Host(ctx({
        re.compile(r".*cat-file -e |(mkdir -p|rm -f) "): Result(),
        re.compile(r".*bash -c 'cmake --build "): Result(out, exited=1),
    }))
    with pytest.raises(StepError) as ei:
        build.apply(host, f, cfg, build.check(f, cfg), echo=lambda s: None)
    msg = str(ei.value)
    assert "failed at 5/9: FAILED: ggml/src/ggml-cuda/fattn.cu.o" in msg
    assert "lower build.jobs" in msg and "continues where it stopped" in msg


# --- progress ------------------------------------------------------------------------------------------

def test_progress_lines_from_ninja():
    t = [0.0]
    out: list[str] = []
    logged: list[str] = []
    pr = build.Progress(echo=out.append, log=logged.append, every_pct=25, every_s=1e9, clock=lambda: t[0])
    for i in range(1, 101):
        t[0] = i * 3.0
        pr(f"[{i}/100] Building CXX object x{i}.o")
        if i == 50:
            pr("/src/x.cpp:1:2: warning: unused variable")
    assert len(logged) == 101                      # the step log gets everything
    assert out[0].startswith("[build] 1/100 (1%)")
    assert [o.split()[1] for o in out] == ["1/100", "25/100", "50/100", "75/100", "100/100"]
    assert out[-1].endswith("5m00s")


def test_progress_every_minute_and_makefile_fallback():
    t = [0.0]
    out: list[str] = []
    pr = build.Progress(echo=out.append, every_pct=50, every_s=60, clock=lambda: t[0])
    for i in range(1, 11):
        t[0] = i * 30.0
        pr(f"[ {i}%] Building C object a.o")
    assert [o.split()[1] for o in out] == ["1/100", "3/100", "5/100", "7/100", "9/100"]


def test_parse_times_and_names_commit():
    assert build.parse_times("@@times\n0m0.000s 0m0.000s\n65m0.000s 2m30.500s\n") == (3900.0, 150.5)
    assert build.parse_times("no marker") is None
    assert build.names_commit("version: 5 (085c9d9)", "085c9d9530e1bff6a373aa91e91ac60eef41a8c3")


# --- the fact script, for real, against git repositories -------------------------------------------------

def git(*args, cwd):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


@pytest.fixture()
def repo(tmp_path):
    r = tmp_path / "origin"
    r.mkdir()
    git("init", "-q", "-b", "main", cwd=r)
    (r / "a.c").write_text("int a;\n")
    git("add", "a.c", cwd=r)
    git("commit", "-q", "-m", "one", cwd=r)
    first = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=r, text=True).strip()
    (r / "a.c").write_text("int a, b;\n")
    git("commit", "-qam", "two", cwd=r)
    second = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=r, text=True).strip()
    return r, first, second


def gather(cfg) -> dict:
    return factmod.gather(Host(Context()), cfg, [build])


def test_fact_script_reads_a_real_checkout(repo, tmp_path):
    origin, first, second = repo
    src, bld = tmp_path / "src", tmp_path / "build"
    cfg = cfg_with("build.cuda=false", f"build.src_dir={src}", f"build.build_dir={bld}", f"build.sha={first}",
                   "build.targets=[llama-server]")
    f = gather(cfg)["build"]
    assert f["src"] == "missing" and f["bins"] == [] and f["stamp"] is None
    src.mkdir()
    assert gather(cfg)["build"]["src"] == "empty"
    subprocess.run(["git", "clone", "-q", str(origin), str(src)], check=True)
    f = gather(cfg)["build"]
    assert f["src"] == "git" and f["head"] == second and f["has_sha"] and f["head_on_ref"] and f["dirty"] == []
    assert f["origin"] == str(origin)
    (src / "a.c").write_text("int changed;\n")
    assert gather(cfg)["build"]["dirty"] == ["a.c"]
    # a fact never writes: the index is not refreshed (no optional locks)
    git("checkout", "-q", "--", "a.c", cwd=src)
    git("checkout", "-q", "--detach", first, cwd=src)
    (src / "a.c").write_text("int c;\n")
    git("commit", "-qam", "local", cwd=src)
    f = gather(cfg)["build"]
    assert not f["head_on_ref"] and f["head"] != first
    # binaries, stamp and a --version that runs
    (bld / "bin").mkdir(parents=True)
    server = bld / "bin" / "llama-server"
    server.write_text(f"#!/bin/sh\necho 'version: 1 (build 2, commit {first[:7]})' >&2\n")
    server.chmod(0o755)
    (bld / "gpubox-stamp.json").write_text(json.dumps({"sha": first, "cmake_args": ["-DA=1"]}, indent=2))
    f = gather(cfg)["build"]
    assert f["bins"] == ["llama-server"] and f["version_rc"] == 0 and first[:7] in f["version"]
    assert f["stamp"] == {"sha": first, "cmake_args": ["-DA=1"]}
    assert f["cmake"] and f["git"] and f["cxx_version"]


def test_fact_script_quotes_paths(tmp_path):
    odd = tmp_path / "a b;$(touch x)'"
    cfg = cfg_with("build.cuda=false", f"build.src_dir={odd}/src", f"build.build_dir={odd}/build")
    assert gather(cfg)["build"]["src"] == "missing"
    assert not (tmp_path / "x").exists()
    assert shlex.quote(f"{odd}/src") in build._fact_command(cfg)


# --- apply against a real local repository (git only; no compiler run) ---------------------------------

def test_ensure_source_clone_checkout_and_errors(repo, tmp_path):
    origin, first, second = repo
    src = tmp_path / "src"
    cfg = cfg_with("build.cuda=false", f"build.repo_url={origin}", f"build.src_dir={src}",
                   f"build.build_dir={tmp_path}/build", f"build.sha={first}")
    host = Host(Context())
    f = gather(cfg)
    build.ensure_source(host, build.plan(f, cfg), f["build"])
    assert subprocess.check_output(["git", "-C", str(src), "rev-parse", "HEAD"], text=True).strip() == first
    assert (src / ".git").is_dir()
    assert subprocess.check_output(["git", "-C", str(src), "rev-parse", "--is-shallow-repository"], text=True).strip() == "false"
    # unknown SHA: clear error, checkout unchanged
    bad = cfg_with("build.cuda=false", f"build.repo_url={origin}", f"build.src_dir={src}", "build.sha=" + "1" * 40)
    f = gather(bad)
    with pytest.raises(StepError, match="is not in"):
        build.ensure_source(host, build.plan(f, bad), f["build"])
    assert subprocess.check_output(["git", "-C", str(src), "rev-parse", "HEAD"], text=True).strip() == first
    # unreachable URL with a missing source: clear error, nothing created or removed
    gone = cfg_with("build.cuda=false", f"build.repo_url={tmp_path}/nope", f"build.src_dir={tmp_path}/src2")
    f = gather(gone)
    with pytest.raises(StepError, match="cannot clone"):
        build.ensure_source(host, build.plan(f, gone), f["build"])
    assert not (tmp_path / "src2").exists() and (src / ".git").is_dir()
    # a commit the clone lacks is fetched from the URL
    (origin / "a.c").write_text("int third;\n")
    git("commit", "-qam", "three", cwd=origin)
    third = subprocess.check_output(["git", "-C", str(origin), "rev-parse", "HEAD"], text=True).strip()
    newer = cfg_with("build.cuda=false", f"build.repo_url=file://{origin}", f"build.src_dir={src}", f"build.sha={third}")
    f = gather(newer)
    assert not f["build"]["has_sha"]
    ran_ops = build.ensure_source(host, build.plan(f, newer), f["build"])
    assert any(" fetch --tags -- " in n for n in ran_ops)
    assert subprocess.check_output(["git", "-C", str(src), "rev-parse", "HEAD"], text=True).strip() == third


def test_build_env_sets_the_pins_commit_time_and_umask(repo):
    """in_build_env, run for real: SOURCE_DATE_EPOCH is the pinned commit's committer time, the umask 022."""
    origin, first, _ = repo
    want = subprocess.check_output(["git", "-C", str(origin), "log", "-1", "--format=%ct", first], text=True).strip()
    p = {"src": str(origin), "sha": first}
    out = subprocess.check_output(build.in_build_env(p, ["sh", "-c", 'echo "$SOURCE_DATE_EPOCH"; umask']), text=True)
    assert out.split() == [want, "0022"]
    # no checkout yet (or git cannot say): unset, and the command still runs
    out = subprocess.check_output(build.in_build_env(dict(p, src="/nonexistent"), ["sh", "-c", 'echo "x${SOURCE_DATE_EPOCH}x"']),
                                  text=True, env={"PATH": os.environ["PATH"]})
    assert out.strip() == "xx"


# --- reproducibility: flags, environment, the stamp's hashes and the lock -------------------------------

def test_prefix_maps_and_rpath_for_a_cpu_build():
    cfg = cfg_with("build.cuda=false", "build.src_dir=/srv/a/src", "build.build_dir=/srv/a/src-build")
    d = flags(facts_with(), cfg)
    # the longer real prefix last: /srv/a/src-build must not be mapped as /gpubox/src-build
    assert d["CMAKE_C_FLAGS"] == ("-ffile-prefix-map=/srv/a/src=/gpubox/src "
                                  "-ffile-prefix-map=/srv/a/src-build=/gpubox/build")
    assert d["CMAKE_CXX_FLAGS"] == d["CMAKE_C_FLAGS"]
    assert d["CMAKE_BUILD_RPATH_USE_ORIGIN"] == "ON"
    assert "CMAKE_CUDA_FLAGS" not in d
    env = build.plan(facts_with(), cfg)["env"]
    assert env["LC_ALL"] == "C" and env["TZ"] == "UTC"
    # a path with a space is quoted for the shell Ninja runs the compiler through
    odd = cfg_with("build.cuda=false", "build.src_dir=/srv/my src", "build.build_dir=/srv/b")
    assert "'-ffile-prefix-map=/srv/my src=/gpubox/src'" in flags(facts_with(), odd)["CMAKE_C_FLAGS"]


def test_cuda_flags_map_the_host_compiler_and_use_objtemp_only_when_nvcc_has_it():
    cfg = cfg_with()
    d = flags(facts_with(gpus=[GTX1080], nvcc_objtemp=True), cfg)
    assert d["CMAKE_CUDA_FLAGS"] == ("-Xcompiler=-ffile-prefix-map=/opt/gpubox/src/llama.cpp=/gpubox/src "
                                     "-Xcompiler=-ffile-prefix-map=/opt/gpubox/build/llama.cpp=/gpubox/build -objtemp")
    assert "-objtemp" not in flags(facts_with(gpus=[GTX1080], nvcc_objtemp=False), cfg)["CMAKE_CUDA_FLAGS"]
    assert all(why for _, why in build.cmake_flags(facts_with(gpus=[GTX1080], nvcc_objtemp=True), cfg))
    comma = cfg_with("build.src_dir=/opt/a,b/src")
    assert any("comma" in w for w in build.check(facts_with(gpus=[GTX1080]), comma).warnings)
    assert not any("comma" in w for w in build.check(facts_with(gpus=[GTX1080]), cfg).warnings)
    # the fact says whether this nvcc knows the option
    assert build.parse_fact("nvcc_objtemp=yes\n", 0)["nvcc_objtemp"] is True
    assert build.parse_fact("", 0)["nvcc_objtemp"] is False


def test_ccache_off_means_no_launchers_and_ccache_disabled():
    cfg = cfg_with("build.ccache=false", "build.ccache_dir=/var/cache/cc")
    p = build.plan(facts_with(gpus=[GTX1080]), cfg)
    assert not any("LAUNCHER" in a for a in p["args"])
    assert p["env"]["CCACHE_DISABLE"] == "1" and "CCACHE_DIR" not in p["env"]
    on = build.plan(facts_with(gpus=[GTX1080]), cfg_with("build.ccache_dir=/var/cache/cc"))
    assert on["env"]["CCACHE_DIR"] == "/var/cache/cc" and "CCACHE_DISABLE" not in on["env"]


def test_stamp_without_hashes_rebuilds_and_a_missing_lock_record_is_written():
    cfg = cfg_with()
    f = built(facts_with(gpus=[GTX1080]), cfg)
    f["build"]["stamp"] = {k: v for k, v in f["build"]["stamp"].items() if k not in ("files", "links")}
    chk = build.check(f, cfg)
    assert not chk.satisfied and "records no sha256" in chk.changes[-1].why
    # built and right, but the lock lacks (or has another) build record: only the lock is written
    f = built(facts_with(gpus=[GTX1080]), cfg)
    f["build"]["lock"] = {"format": 1, "models": {"model": {"sha256": "x"}}, "box": {"os": {}}}
    chk = build.check(f, cfg)
    assert [c.what for c in chk.changes] == ["record bin/'s sha256 in /var/lib/gpubox/gpubox.lock.json"]
    host = Host(ctx({}))
    assert build.apply(host, f, cfg, chk) == []
    cmds = ran(host)
    assert len(cmds) == 1 and "gpubox-lock /var/lib/gpubox/gpubox.lock.json" in cmds[0]
    lock = json.loads(shlex.split(cmds[0])[-1])
    assert lock["models"] == {"model": {"sha256": "x"}} and lock["box"] == {"os": {}}   # kept
    assert lock["build"]["files"] == FILES["files"] and lock["build"]["sha"] == SHA
    f["build"]["lock"] = lock
    assert build.check(f, cfg).satisfied


def test_the_models_step_keeps_the_build_record():
    old = lockfile.with_build(None, {"sha": SHA, "build_dir": "/b", **FILES})
    new = lockfile.build(old, facts_with(), cfg_with(), [])
    assert new["build"] == old["build"]


def test_prefix_map_flags_hide_the_real_paths_from_gcc(tmp_path):
    """The flags as emitted, on a real gcc: __FILE__ of a source and of a generated file in a build
    directory whose path starts with the source tree's, with debug info on (the worst case)."""
    src, bld = tmp_path / "src", tmp_path / "src-build"
    (src / "lib").mkdir(parents=True)
    bld.mkdir()
    (src / "lib" / "a.c").write_text('const char *where_a = __FILE__;\n')
    (bld / "gen.c").write_text('const char *where_g = __FILE__;\n')
    d = flags(facts_with(), cfg_with("build.cuda=false", f"build.src_dir={src}", f"build.build_dir={bld}"))
    cflags = shlex.split(d["CMAKE_C_FLAGS"])
    for c in (src / "lib" / "a.c", bld / "gen.c"):
        subprocess.run(["gcc", *cflags, "-g", "-c", str(c), "-o", str(bld / (c.stem + ".o"))], cwd=bld, check=True)
    text = (bld / "a.o").read_bytes() + (bld / "gen.o").read_bytes()
    assert b"/gpubox/src/lib/a.c" in text and b"/gpubox/build/gen.c" in text
    assert str(tmp_path).encode() not in text


def test_fact_script_reads_the_lock_and_the_manifest_hashes_real_files(tmp_path):
    cfg = cfg_with("build.cuda=false", f"state_dir={tmp_path}/state", f"build.src_dir={tmp_path}/src",
                   f"build.build_dir={tmp_path}/build")
    assert gather(cfg)["build"]["lock"] is None
    (tmp_path / "state").mkdir()
    lock = lockfile.with_build(None, {"sha": SHA, "build_dir": "/b", "files": {"x": {"size": 1, "sha256": "0" * 64}}})
    (tmp_path / "state" / "gpubox.lock.json").write_text(lockfile.dumps(lock))
    assert gather(cfg)["build"]["lock"] == lock
    # the manifest of a real bin/: regular files hashed, links by target, nothing else
    b = tmp_path / "bin"
    b.mkdir()
    (b / "libx.so.1.0").write_bytes(b"\x7fELF" + b"\0" * 60)
    (b / "libx.so.1").symlink_to("libx.so.1.0")
    (b / "sub").mkdir()
    out = subprocess.run(repro.manifest_argv(str(b)), capture_output=True, text=True, check=True).stdout
    m = repro.parse_manifest(out)
    import hashlib
    assert m["files"] == {"libx.so.1.0": {"size": 64, "sha256": hashlib.sha256(b"\x7fELF" + b"\0" * 60).hexdigest()}}
    assert m["links"] == {"libx.so.1": "libx.so.1.0"}
