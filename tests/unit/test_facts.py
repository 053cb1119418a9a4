"""Facts: command + parser. Parsers as data (text in, value out); unreadable -> unknown, never a crash;
all facts in one command."""

import pytest
from invoke import Context, Config

from provision import config, facts
from provision.facts import UNKNOWN
from provision.host import Host
from provision.steps import STEPS
from testbed.testing import FEDORA42_OS, facts_stdout, mock_context

CASES = [
    ("os", FEDORA42_OS, 0, {"id": "fedora", "version": "42", "pretty": "Fedora Linux 42 (Workstation Edition)"}),
    ("glibc", "glibc 2.41", 0, "2.41"),
    ("glibc", "", 127, UNKNOWN),
    ("dnf", "dnf5 version 5.2.13.1\ndnf5 plugin API version 2.0", 0, "dnf5"),
    ("dnf", "dnf4", 0, "dnf4"),
    ("dnf", "", 0, UNKNOWN),
    ("packages", "akmod-nvidia\t590.48.01-1.fc42\nxorg-x11-drv-nvidia-libs\t590.48.01-1.fc42\n"
                 "package cuda-nvcc-12-9 is not installed", 0,
     {"akmod-nvidia": "590.48.01-1.fc42", "xorg-x11-drv-nvidia-libs": "590.48.01-1.fc42"}),
    ("gpus", "NVIDIA GeForce GTX 1080, 6.1, 8192, 8066, 580.105.08", 0,
     [{"name": "NVIDIA GeForce GTX 1080", "compute_cap": "6.1", "arch": "61", "vram_mib": 8192, "free_mib": 8066,
       "driver": "580.105.08"}]),
    ("gpus", "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", 9, []),
    ("mem", "MemTotal:       32768000 kB\nMemFree: 1 kB\nMemAvailable:   16384000 kB", 0,
     {"total_mib": 32000, "available_mib": 16000}),
    ("cores", "16", 0, 16),
    ("cores", "", 127, UNKNOWN),
    ("gcc", "default 15\n/usr/bin/gcc-14 14\n/usr/bin/gcc-15 15", 0, {"default": 15, "available": [14, 15]}),
    ("gcc", "default \n", 0, {"default": UNKNOWN, "available": []}),
    ("nvcc", "/usr/local/cuda-12.9/bin/nvcc\nnvcc: NVIDIA (R) Cuda compiler driver\n"
             "Cuda compilation tools, release 12.9, V12.9.86\nBuild cuda_12.9.r12.9/compiler.36037853_0", 0,
     {"path": "/usr/local/cuda-12.9/bin/nvcc", "version": "12.9", "build": "12.9.86"}),
    ("nvcc", "", 1, {"path": UNKNOWN, "version": UNKNOWN, "build": UNKNOWN}),
    ("disk_free_mib", "/var/lib/gpubox\t1048576\n~/Models\t\n", 0, {"/var/lib/gpubox": 1024}),
    ("user", "garbage", 0, UNKNOWN),
]


@pytest.mark.parametrize("name,text,rc,want", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_parsers(name, text, rc, want):
    fact = next(f for f in facts.CORE_FACTS if f.name == name)
    assert facts.parse(facts_stdout({name: (text, rc)}), [fact])[name] == want


def test_missing_block_is_unknown():
    assert facts.parse("", facts.CORE_FACTS)["kernel"] == UNKNOWN


def test_all_facts_in_one_command():
    cfg = config.validate(config.defaults()["gpubox"])
    ctx = mock_context({"user": "root 0", "os": FEDORA42_OS})
    host = Host(ctx)
    got = facts.gather(host, cfg, STEPS)
    assert len(host.records) == 1 and ctx.run.call_count == 1
    assert got["os"]["id"] == "fedora" and host.is_root is True
    assert got["gpus"] == UNKNOWN  # not in the output -> unknown, not a crash


def test_gather_on_this_machine_reads_real_facts():
    cfg = config.validate(config.defaults()["gpubox"])
    got = facts.gather(Host(Context(Config(overrides={"run": {"in_stream": False}}))), cfg, STEPS)
    assert got["os"]["id"] not in (UNKNOWN, None)
    assert isinstance(got["cores"], int) and got["cores"] >= 1
    assert got["mem"]["total_mib"] > 0
    assert got["gpus"] == []          # no nvidia-smi here: no GPU, not a crash
    assert not facts.is_fedora(got)
