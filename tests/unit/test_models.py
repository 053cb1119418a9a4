"""Step 6 decisions (facts in, changes out) and the step run for real on this machine (Invoke Context,
local bash, the real fetch.py and huggingface_hub against a local hfserver)."""

import io
import json
from pathlib import Path

import pytest
from invoke import Context

from provision import config, lockfile
from testbed import hfserver
from provision.engine import CHANGED, FAILED, OK, Runner
from provision.host import Host
from provision.steps import models
from testbed.testmodels import write_tiny

C1, C2 = "1" * 40, "2" * 40
S1, S2 = "a" * 64, "b" * 64


@pytest.fixture
def cfg(tmp_path):
    c = config.validate(config.defaults()["gpubox"])
    c["state_dir"] = str(tmp_path / "state")
    c["report_dir"] = str(tmp_path / "reports")
    c["models"]["dir"] = str(tmp_path / "Models")
    c["models"]["reserve_gb"] = 0
    return c


def lock_entry(cfg, key, **kw):
    f = cfg["models"]["files"][key]
    e = {"repo": f["repo"], "filename": f["filename"], "revision": f["revision"], "commit": C1, "sha256": S1,
         "size": 1000, "path": f"{cfg['models']['dir']}/{f['filename']}", "mtime_ns": 7,
         "arch": "gemma4-assistant" if key == "assistant" else "gemma4"}
    e.update(kw)
    return e


def facts_for(cfg, files=None, lock="full", remote=None, free=10 ** 12, hf="2.4.0", owner_uid=0):
    base = {"user": {"name": "root", "uid": 0}, "os": {"id": "fedora", "version": "42", "pretty": "Fedora"},
            "packages": {}, "gpus": [], "nvcc": {}, "gcc": {}, "kernel": "6.14", "glibc": "2.41",
            "models_fork_head": "unknown"}
    if lock == "full":
        lock = {"format": 1, "models": {k: lock_entry(cfg, k) for k in cfg["models"]["files"]},
                "box": lockfile.box(base, cfg)}
    if files is None:
        files = {k: {"size": 1000, "mtime_ns": 7, "uid": 0} for k in cfg["models"]["files"]}
    base["models"] = {"dir": cfg["models"]["dir"], "files": files, "lock": lock, "remote": remote or {},
                      "free": free, "hf": hf, "owner_uid": owner_uid}
    return base


def whats(chk):
    return [c.what for c in chk.changes]


def test_locked_and_intact_is_done_without_the_hub(cfg):
    chk = models.check(facts_for(cfg), cfg)
    assert chk.satisfied, whats(chk)
    assert chk.info["files"]["model"]["sha256"] == S1 and chk.info["download_bytes"] == 0


def test_missing_files_show_sizes_from_the_hub(cfg):
    remote = {"model": {"size": 16 * 1024 ** 3, "commit": C1, "sha256": S1}, "assistant": {"error": "ConnectError"}}
    chk = models.check(facts_for(cfg, files={"model": {}, "assistant": {}}, lock=None, remote=remote), cfg)
    assert not chk.satisfied
    assert whats(chk) == ["download gemma-4-26B-A4B-it-Q4_K_M.gguf (16.0 GiB)",
                          "download gemma-4-26B-A4B-it-assistant.Q4_K_M.gguf (unknown size)"]
    assert "ConnectError" in chk.changes[1].why
    assert chk.info["download_bytes"] == 16 * 1024 ** 3 and chk.info["unknown_size"] == ["gemma-4-26B-A4B-it-assistant.Q4_K_M.gguf"]


def test_partial_is_resumed_and_disk_shortage_is_warned(cfg):
    cfg["models"]["reserve_gb"] = 2
    lock = {"format": 1, "models": {"assistant": lock_entry(cfg, "assistant")}, "box": {}}
    files = {"model": {"partial": 6 * 1024 ** 3}, "assistant": {"size": 1000, "mtime_ns": 7, "uid": 0}}
    remote = {"model": {"size": 16 * 1024 ** 3, "commit": C1, "sha256": S1}}
    chk = models.check(facts_for(cfg, files=files, lock=lock, remote=remote, free=11 * 1024 ** 3), cfg)
    assert whats(chk) == ["resume gemma-4-26B-A4B-it-Q4_K_M.gguf (10.0 GiB)"]
    assert "6.0 GiB of 16.0 GiB" in chk.changes[0].why
    assert any("not enough disk" in w and "2.0 GiB reserve" in w for w in chk.warnings)


@pytest.mark.parametrize("files,why", [
    ({"size": 1000, "mtime_ns": 8, "uid": 0}, "changed on disk"),
    ({"size": 999, "mtime_ns": 7, "uid": 0}, "changed on disk"),
])
def test_changed_on_disk_is_rehashed_not_downloaded(cfg, files, why):
    f = {k: {"size": 1000, "mtime_ns": 7, "uid": 0} for k in cfg["models"]["files"]}
    f["model"] = files
    chk = models.check(facts_for(cfg, files=f), cfg)
    assert whats(chk) == ["verify gemma-4-26B-A4B-it-Q4_K_M.gguf (sha256 of 1000 B)"] and why in chk.changes[0].why


def test_present_without_lock_is_verified(cfg):
    chk = models.check(facts_for(cfg, lock=None, remote={"model": {"size": 1000, "commit": C1, "sha256": S1},
                                                         "assistant": {"size": 1000, "commit": C1, "sha256": S1}}), cfg)
    assert [w.split(" (")[0] for w in whats(chk)] == ["verify gemma-4-26B-A4B-it-Q4_K_M.gguf",
                                                      "verify gemma-4-26B-A4B-it-assistant.Q4_K_M.gguf"]


def test_pinned_sha_other_than_the_lock_is_reverified(cfg):
    cfg["models"]["files"]["model"]["sha256"] = S2
    chk = models.check(facts_for(cfg), cfg)
    assert len(chk.changes) == 1 and "differs from the lock" in chk.changes[0].why


def test_update_follows_a_moved_branch_only_when_asked(cfg):
    remote = {"model": {"size": 2000, "commit": C2, "sha256": S2}, "assistant": {"size": 1000, "commit": C1, "sha256": S1}}
    assert models.check(facts_for(cfg, remote=remote), cfg).satisfied
    cfg["models"]["update"] = True
    chk = models.check(facts_for(cfg, remote=remote), cfg)
    assert whats(chk) == ["download gemma-4-26B-A4B-it-Q4_K_M.gguf (2.0 KiB)"]
    assert f"moved from {C1[:12]} to {C2[:12]}" in chk.changes[0].why


def test_a_commit_pin_matches_the_lock_entry(cfg):
    f = facts_for(cfg)   # locked from revision "main", resolved to C1
    cfg["models"]["files"]["model"]["revision"] = C1
    assert models.check(f, cfg).satisfied
    cfg["models"]["files"]["model"]["revision"] = C2
    assert not models.check(f, cfg).satisfied


def test_assistant_architecture_against_the_fork_profile(cfg):
    f = facts_for(cfg)
    f["models"]["lock"]["models"]["assistant"]["arch"] = "gemma4_assistant"   # a pre-sync file, post-sync build
    chk = models.check(f, cfg)
    assert not chk.satisfied
    (c,) = chk.changes
    assert "'gemma4_assistant'" in c.what and "'gemma4-assistant'" in c.what
    assert "--set build.profile=recipe" in c.why and "models.files.assistant.revision" in c.why
    cfg["build"]["profile"] = "recipe"
    f2 = facts_for(cfg)
    f2["models"]["lock"]["models"]["assistant"]["arch"] = "gemma4_assistant"
    assert models.check(f2, cfg).satisfied


def test_missing_huggingface_hub_and_unknown_fact_and_owner(cfg):
    chk = models.check(facts_for(cfg, files={"model": {}, "assistant": {}}, lock=None, hf=None), cfg)
    assert whats(chk)[0] == "install python3-huggingface-hub"
    f = facts_for(cfg)
    f["models"] = "unknown"
    assert not models.check(f, cfg).satisfied
    chk = models.check(facts_for(cfg, owner_uid=1000), cfg)
    assert [w.split(" to ")[0] for w in whats(chk)] == ["chown gemma-4-26B-A4B-it-Q4_K_M.gguf",
                                                        "chown gemma-4-26B-A4B-it-assistant.Q4_K_M.gguf"]


def test_box_drift_rewrites_only_the_lock(cfg):
    f = facts_for(cfg)
    f["nvcc"] = {"path": "/usr/local/cuda-12.9/bin/nvcc", "version": "12.9", "build": "12.9.86"}
    chk = models.check(f, cfg)
    assert [c.what.split(" in ")[0] for c in chk.changes] == ["record the box"]


def test_render_plain_lines_are_rate_limited():
    out = io.StringIO()
    r = models.Render(interval=3600, out=out)
    for done in (10, 20, 30):
        r('@@progress ' + json.dumps({"file": "f.gguf", "done": done, "total": 100, "rate": 5, "eta": 3}))
    r('@@progress ' + json.dumps({"file": "f.gguf", "done": 100, "total": 100, "rate": 5, "eta": 0}))
    r("f.gguf: resuming at 1 MiB")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "10.0%" in lines[0] and "100.0%" in lines[1] and "resuming" in lines[2]


# --- the step for real, on this machine --------------------------------------------------------------

@pytest.fixture
def hub(tmp_path):
    root = tmp_path / "hf"
    d = config.defaults()["gpubox"]["models"]["files"]
    write_tiny(root / d["model"]["repo"] / d["model"]["filename"], n_embd=128)
    write_tiny(root / d["assistant"]["repo"] / d["assistant"]["filename"], general_arch="gemma4-assistant", seed=2)
    srv = hfserver.start(str(root), token="hf_LocalT0ken")[0]
    yield srv, root
    srv.shutdown()


def test_provision_twice_locally(cfg, hub, monkeypatch):
    srv, root = hub
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    monkeypatch.setenv("HF_TOKEN", "hf_LocalT0ken")
    rep = Runner(Host(Context()), cfg, [models], echo=lambda s: None).run()
    assert rep.steps[0].status == CHANGED, rep.table()
    lock = json.loads(Path(lockfile.path(cfg)).read_text())
    d = cfg["models"]["files"]
    for key in ("model", "assistant"):
        p = Path(cfg["models"]["dir"]) / d[key]["filename"]
        src = root / d[key]["repo"] / d[key]["filename"]
        assert p.read_bytes() == src.read_bytes()
        e = lock["models"][key]
        assert e["size"] == p.stat().st_size and e["mtime_ns"] == p.stat().st_mtime_ns and len(e["commit"]) == 40
    assert lock["models"]["assistant"]["arch"] == "gemma4-assistant"
    assert lock["box"]["fork"]["wanted_sha"] == config.fork_pin(cfg)["sha"]
    # the token went to the server but into no command, log or report
    assert all("hf_LocalT0ken" not in c["command"] for c in rep.steps[0].commands)
    assert "hf_LocalT0ken" not in Path(rep.steps[0].log).read_text() and "hf_LocalT0ken" not in rep.to_json()
    # second run: zero changes, zero requests, the step itself well under a second
    srv.requests.clear()
    rep2 = Runner(Host(Context()), cfg, [models], echo=lambda s: None).run()
    assert rep2.steps[0].status == OK and rep2.changed == 0
    assert srv.requests == []
    assert rep2.steps[0].seconds < 1.0


def test_provision_locally_refuses_a_wrong_assistant(cfg, hub, monkeypatch):
    srv, _ = hub
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    monkeypatch.setenv("HF_TOKEN", "hf_LocalT0ken")
    cfg["build"]["profile"] = "recipe"   # pre-sync build wants gemma4_assistant; the server has gemma4-assistant
    rep = Runner(Host(Context()), cfg, [models], echo=lambda s: None).run()
    st = rep.steps[0]
    assert st.status == FAILED
    assert "'gemma4-assistant'" in st.error and "gemma4_assistant" in st.error and "build.profile=current" in st.error
    # verified and locked anyway: switching the profile needs no new download
    srv.requests.clear()
    cfg["build"]["profile"] = "current"
    rep = Runner(Host(Context()), cfg, [models], echo=lambda s: None).run()
    # only the lock's box record changes (the fork profile it names); nothing is fetched
    assert rep.steps[0].status == CHANGED and [c["what"].split(" in ")[0] for c in rep.steps[0].changes] == ["record the box"]
    assert [r for r in srv.requests if r["method"] == "GET"] == []
    assert json.loads(Path(lockfile.path(cfg)).read_text())["box"]["fork"]["profile"] == "current"


# --- unverified files: refused by default, per-file opt-in recorded in the lock ---------------------------

@pytest.fixture
def nosha_hub(tmp_path):
    """A Hub that reports no sha256 for any file (as for files outside LFS)."""
    root = tmp_path / "hf-nosha"
    d = config.defaults()["gpubox"]["models"]["files"]
    write_tiny(root / d["model"]["repo"] / d["model"]["filename"], n_embd=128)
    write_tiny(root / d["assistant"]["repo"] / d["assistant"]["filename"], general_arch="gemma4-assistant", seed=2)
    srv = hfserver.start(str(root), no_sha=True)[0]
    yield srv, root
    srv.shutdown()


def test_unknown_sha256_is_refused_and_nothing_lands(cfg, nosha_hub, monkeypatch):
    srv, _ = nosha_hub
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    rep = Runner(Host(Context()), cfg, [models], echo=lambda s: None).run()
    st = rep.steps[0]
    assert st.status == FAILED and "no sha256 is known" in st.error and "allow_unverified=true" in st.error
    assert [r for r in srv.requests if r["method"] == "GET"] == []
    mdir = Path(cfg["models"]["dir"])
    assert not mdir.exists() or list(mdir.iterdir()) == []


def test_the_opt_in_is_per_file_and_the_lock_says_unverified(cfg, nosha_hub, monkeypatch):
    import hashlib
    srv, root = nosha_hub
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    f = cfg["models"]["files"]
    f["model"]["allow_unverified"] = True
    f["assistant"]["sha256"] = hashlib.sha256((root / f["assistant"]["repo"] / f["assistant"]["filename"]).read_bytes()).hexdigest()
    rep = Runner(Host(Context()), cfg, [models], echo=lambda s: None).run()
    assert rep.steps[0].status == CHANGED, rep.table()
    lock = json.loads(Path(lockfile.path(cfg)).read_text())
    assert lock["models"]["model"]["verified"] is False and lock["models"]["assistant"]["verified"] is True
    src = root / f["model"]["repo"] / f["model"]["filename"]
    assert lock["models"]["model"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    # steady state with the opt-in: nothing to do, no request
    srv.requests.clear()
    assert Runner(Host(Context()), cfg, [models], echo=lambda s: None).run().steps[0].status == OK
    assert srv.requests == []
    # the opt-in withdrawn: the locked file is not trusted on its own hash; provision refuses, the file stays
    f["model"]["allow_unverified"] = False
    rep = Runner(Host(Context()), cfg, [models], echo=lambda s: None).run()
    st = rep.steps[0]
    assert st.status == FAILED and "no sha256 is known" in st.error
    assert any("verified: false" in c["why"] for c in st.changes)
    assert (Path(cfg["models"]["dir"]) / f["model"]["filename"]).read_bytes() == src.read_bytes()


def test_plan_warns_when_the_hub_reports_no_sha256(cfg):
    remote = {"model": {"size": 1000, "commit": C1, "sha256": "0123abcd" * 5}, "assistant": {"size": 1000, "commit": C1, "sha256": S1}}
    chk = models.check(facts_for(cfg, files={"model": {}, "assistant": {}}, lock=None, remote=remote), cfg)
    (w,) = [w for w in chk.warnings if "no sha256" in w]
    assert "models.files.model.allow_unverified=true" in w
    cfg["models"]["files"]["model"]["allow_unverified"] = True
    chk = models.check(facts_for(cfg, files={"model": {}, "assistant": {}}, lock=None, remote=remote), cfg)
    assert not [w for w in chk.warnings if "no sha256" in w]


def test_tilde_paths_land_in_the_target_users_home_not_in_dot_tilde(cfg, hub, monkeypatch, tmp_path):
    """state_dir and models.dir as ~/...: the lock and the files are written under $HOME of the target user
    (here: the login user of a local Context), never under ./~ of the working directory."""
    srv, _ = hub
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    monkeypatch.setenv("HF_TOKEN", "hf_LocalT0ken")
    monkeypatch.chdir(work)
    cfg["state_dir"] = "~/.gpubox-state"
    cfg["models"]["dir"] = "~/Models"
    rep = Runner(Host(Context()), cfg, [models], echo=lambda s: None).run()
    assert rep.steps[0].status == CHANGED, rep.table()
    assert (home / ".gpubox-state" / "gpubox.lock.json").is_file()
    names = {f["filename"] for f in cfg["models"]["files"].values()}
    assert {p.name for p in (home / "Models").iterdir()} == names
    assert not (work / "~").exists() and list(work.iterdir()) == []
    assert all(e["path"].startswith(str(home) + "/Models/")
               for e in json.loads((home / ".gpubox-state" / "gpubox.lock.json").read_text())["models"].values())
