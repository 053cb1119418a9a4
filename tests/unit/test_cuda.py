"""Step 2 (cuda): the repo file and profile from templates, the package set, NVIDIA's driver kept out."""

import subprocess

import pytest
from invoke import Result

from provision import config, facts as factmod
from provision.engine import NotFedora, StepError
from provision.host import Host
from provision.steps import cuda
from testbed.testing import facts_stdout, mock_context

PKGS = {"cuda-nvcc-12-9": "12.9.86-1", "cuda-cudart-devel-12-9": "12.9.79-1", "libcublas-devel-12-9": "12.9.1.4-1",
        "cuda-cccl-12-9": "12.9.27-1", "cuda-crt-12-9": "12.9.86-1"}


@pytest.fixture
def cfg():
    return config.validate(config.defaults()["gpubox"])


def host_facts(cfg, packages, *, repo=True, profile=True, nvcc="12.9", others=None, os_id="fedora"):
    files = {}
    if repo:
        files[cuda.repo_path(cfg)] = cuda.repo_text(cfg) if repo is True else repo
    if profile:
        files[cfg["cuda"]["profile_snippet"]] = cuda.profile_text(cfg) if profile is True else profile
    return {"os": {"id": os_id, "version": "42", "pretty": "x"}, "dnf": "dnf5", "packages": dict(packages),
            "cuda_files": files, "cuda_repos": others or {},
            "nvcc": {"path": "/usr/local/cuda-12.9/bin/nvcc", "version": nvcc, "build": "12.9.86"} if nvcc
            else {"path": "unknown", "version": "unknown", "build": "unknown"}}


def test_repo_file_renders_nvidias_id_baseurl_gpg_and_exclude(cfg):
    text = cuda.repo_text(cfg)
    assert cuda.repo_path(cfg) == "/etc/yum.repos.d/cuda-fedora41.repo"
    lines = text.splitlines()
    assert "[cuda-fedora41-x86_64]" in lines
    assert "baseurl=https://developer.download.nvidia.com/compute/cuda/repos/fedora41/x86_64" in lines
    assert "gpgcheck=1" in lines
    assert "gpgkey=https://developer.download.nvidia.com/compute/cuda/repos/fedora41/x86_64/D42D0685.pub" in lines
    assert ("exclude=nvidia-driver,nvidia-modprobe,nvidia-persistenced,nvidia-settings,nvidia-libXNVCtrl,"
            "nvidia-xconfig") in lines
    cfg["cuda"]["repo_gpgcheck"] = False
    cfg["cuda"]["repo_baseurl"] = "file:///srv/gpubox-repos/cuda"
    t2 = cuda.repo_text(cfg)
    assert "gpgcheck=0" in t2.splitlines() and "gpgkey" not in t2 and "baseurl=file:///srv/gpubox-repos/cuda" in t2


def test_profile_snippet_exports_cudacxx_and_path_and_is_valid_sh(cfg, tmp_path):
    text = cuda.profile_text(cfg)
    assert "export CUDACXX=/usr/local/cuda-12.9/bin/nvcc" in text
    f = tmp_path / "p.sh"
    f.write_text(text)
    out = subprocess.run(["sh", "-c", f'. {f}; . {f}; echo "$CUDACXX|$PATH"'], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"}).stdout.strip()
    # sourced twice: the bin dir is on PATH once, first
    assert out == "/usr/local/cuda-12.9/bin/nvcc|/usr/local/cuda-12.9/bin:/usr/bin:/bin"


def test_profile_quotes_a_prefix_with_spaces(cfg, tmp_path):
    cfg["cuda"]["prefix"] = "/opt/cuda 12.9; touch /tmp/x"
    text = cuda.profile_text(cfg)
    f = tmp_path / "p.sh"
    f.write_text(text)
    out = subprocess.run(["sh", "-c", f'. {f}; echo "$CUDACXX"'], capture_output=True, text=True).stdout.strip()
    assert out == "/opt/cuda 12.9; touch /tmp/x/bin/nvcc"


def test_fresh_host_plans_repo_packages_and_profile(cfg):
    chk = cuda.check(host_facts(cfg, {}, repo=False, profile=False, nvcc=None), cfg)
    assert not chk.satisfied
    assert [c.what for c in chk.changes] == [
        "write /etc/yum.repos.d/cuda-fedora41.repo (repo cuda-fedora41-x86_64, exclude=nvidia-driver,nvidia-modprobe,"
        "nvidia-persistenced,nvidia-settings,nvidia-libXNVCtrl,nvidia-xconfig)",
        "install " + ", ".join(cfg["cuda"]["packages"]),
        "write /etc/profile.d/gpubox-cuda.sh",
    ]
    assert chk.changes[1].commands == ["dnf5 -y install " + " ".join(cfg["cuda"]["packages"])]
    assert all(p not in ("cuda", "cuda-drivers") for p in chk.changes[1].commands[0].split())


def test_done_host_is_satisfied(cfg):
    chk = cuda.check(host_facts(cfg, PKGS), cfg)
    assert chk.satisfied, [c.what for c in chk.changes]
    assert chk.info["nvcc_version"] == "12.9"


@pytest.mark.parametrize("repo,why", [
    ("[cuda-fedora41-x86_64]\nbaseurl=https://developer.download.nvidia.com/compute/cuda/repos/fedora41/x86_64\n",
     "no exclude= line keeping NVIDIA's driver out"),
    ("x\nexclude=nvidia-driver\n", "differs from gpubox's configuration (baseurl, gpg or exclude list)"),
])
def test_a_hand_made_repo_file_is_rewritten(cfg, repo, why):
    chk = cuda.check(host_facts(cfg, PKGS, repo=repo), cfg)
    assert [c.why for c in chk.changes] == [why]


def test_nvidias_driver_installed_is_removed(cfg):
    pk = dict(PKGS, **{"nvidia-driver": "575.57.08-1.fc41", "cuda-drivers": "575.57.08-1", "cuda": "12.9.1-1"})
    chk = cuda.check(host_facts(cfg, pk), cfg)
    assert [c.what for c in chk.changes] == ["remove cuda 12.9.1-1, cuda-drivers 575.57.08-1, nvidia-driver 575.57.08-1.fc41"]
    assert chk.changes[0].commands == ["dnf5 -y remove cuda cuda-drivers nvidia-driver"]


def test_nvcc_reporting_another_release(cfg):
    chk = cuda.check(host_facts(cfg, PKGS, nvcc="13.0"), cfg)
    assert [c.what for c in chk.changes] == ["reinstall cuda-nvcc-12-9"]
    assert "reports release 13.0, not 12.9" in chk.changes[0].why


def test_unguarded_second_cuda_repo_is_a_warning(cfg):
    chk = cuda.check(host_facts(cfg, PKGS, others={"/etc/yum.repos.d/cuda-fedora42.repo": "unguarded",
                                                   "/etc/yum.repos.d/cuda-fedora41.repo": "guarded"}), cfg)
    assert chk.satisfied
    assert len(chk.warnings) == 1 and chk.warnings[0].startswith("/etc/yum.repos.d/cuda-fedora42.repo also points")


def test_other_repos_fact_parser():
    out = facts_stdout({"cuda_repos": "/etc/yum.repos.d/a b.repo unguarded\n/etc/yum.repos.d/c.repo guarded"})
    assert factmod.parse(out, cuda.FACTS)["cuda_repos"] == {"/etc/yum.repos.d/a b.repo": "unguarded",
                                                           "/etc/yum.repos.d/c.repo": "guarded"}


def test_apply_order_repo_first_then_packages_then_profile(cfg):
    f = host_facts(cfg, {}, repo=False, profile=False, nvcc=None)
    install = "dnf5 -y install " + " ".join(cfg["cuda"]["packages"])
    ctx = mock_context({}, {install: Result(), __import__("re").compile(r"^sh -c "): Result()})
    host = Host(ctx, is_root=True)
    cuda.apply(host, f, cfg, cuda.check(f, cfg))
    cmds = [r.command for r in host.records]
    # (Host.write_file writes in a few commands; what matters is the order of the three changes.)
    first = lambda needle: next(i for i, c in enumerate(cmds) if needle in c)  # noqa: E731
    assert first("/etc/yum.repos.d/cuda-fedora41.repo") < cmds.index(install) < first("/etc/profile.d/gpubox-cuda.sh")
    assert cmds.count(install) == 1


def test_apply_refuses_non_fedora(cfg):
    f = host_facts(cfg, {}, os_id="debian")
    host = Host(mock_context({}), is_root=True)
    with pytest.raises(NotFedora, match="^cuda: this host is debian 42"):
        cuda.apply(host, f, cfg, cuda.check(f, cfg))
    assert host.records == []


def test_failed_install_names_the_step(cfg):
    f = host_facts(cfg, {}, nvcc=None)
    ctx = mock_context({}, {"dnf5 -y install " + " ".join(cfg["cuda"]["packages"]):
                            Result(exited=1, stderr="Failed to resolve the transaction:\nNo match for argument: cuda-crt-12-9\n")})
    with pytest.raises(StepError, match=r"^cuda: installing the CUDA 12.9 packages failed: the repositories have no package named cuda-crt-12-9"):
        cuda.apply(Host(ctx, is_root=True), f, cfg, cuda.check(f, cfg))


def test_config_refuses_the_metapackages(cfg):
    raw = config.defaults()["gpubox"]
    raw["cuda"]["packages"] = ["cuda-nvcc-12-9", "cuda-drivers"]
    with pytest.raises(config.ConfigError, match="must not contain 'cuda-drivers'"):
        config.validate(raw)
    raw = config.defaults()["gpubox"]
    raw["cuda"]["repo_gpgkey"] = "https://x/y key"
    with pytest.raises(config.ConfigError, match="cuda.repo_gpgkey"):
        config.validate(raw)
