"""testinfra: step 2 (cuda) on the target."""

import re




def test_packages_at_the_version(host, gcfg):
    ver = str(gcfg["cuda"]["version"])
    for p in gcfg["cuda"]["packages"]:
        pkg = host.package(p)
        assert pkg.is_installed, p
        assert pkg.version == ver or pkg.version.startswith(ver + "."), f"{p} {pkg.version}"


def test_nvcc_says_the_release(host, gcfg):
    ver = str(gcfg["cuda"]["version"])
    nvcc = gcfg["cuda"]["prefix"].rstrip("/") + "/bin/nvcc"
    out = host.check_output(f"{nvcc} --version")
    m = re.search(r"release (\d+\.\d+)", out)
    assert m and m.group(1) == ver, out


def test_no_nvidia_driver_from_the_cuda_repo(host):
    for p in ("nvidia-driver", "cuda-drivers", "cuda"):
        assert not host.package(p).is_installed, p
    assert host.run("rpm -qa 'nvidia-driver*' | grep .").rc != 0


def test_repo_file_keeps_the_driver_out(host, gcfg):
    c = gcfg["cuda"]
    f = host.file(f"/etc/yum.repos.d/cuda-{c['repo_release']}.repo")
    assert f.exists and f.user == "root"
    lines = f.content_string.splitlines()
    assert f"baseurl={c['repo_baseurl']}" in lines
    excl = [ln for ln in lines if ln.startswith("exclude=")]
    assert excl and set(c["exclude"]) <= set(re.split(r"[,\s]+", excl[0][len("exclude="):])), excl


def test_profile_snippet_for_login_shells(host, gcfg):
    c = gcfg["cuda"]
    nvcc = c["prefix"].rstrip("/") + "/bin/nvcc"
    assert host.file(c["profile_snippet"]).exists
    out = host.check_output(f"bash -c '. {c['profile_snippet']}; echo \"$CUDACXX\"; command -v nvcc'")
    assert out.splitlines() == [nvcc, nvcc]
