"""Host.write_file on a real shell: two writers at once end with one whole file, a planted symlink is never
followed, a directory at the path is an error, nothing is left behind, and as_user writes as that user."""

import os
import pwd
import stat
import threading
from pathlib import Path

import pytest
from invoke import Config, Context

from provision.host import WRITE_CHUNK, CommandFailed, Host


def host(**kw) -> Host:
    return Host(Context(Config(overrides={"run": {"in_stream": False}})), **kw)


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".gpubox-" in p.name)


def test_two_concurrent_writers_leave_one_whole_file(tmp_path):
    """Fixed temp names made this a wrong file in 10 of 10 trials: each chunk of one writer could land in
    the other's temp file. Now each writer has its own directory."""
    path = tmp_path / "unit.service"
    a = "A" * (3 * WRITE_CHUNK + 17)
    b = "b" * (2 * WRITE_CHUNK + 5) + "\n"
    for trial in range(10):
        errors = []

        def write(text):
            try:
                host().write_file(str(path), text, mode="0644")
            except Exception as e:   # noqa: BLE001  (reported below)
                errors.append(e)
        ts = [threading.Thread(target=write, args=(t,)) for t in (a, b)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert errors == []
        assert path.read_text() in (a, b), trial
        assert leftovers(tmp_path) == []


def test_a_symlink_planted_at_the_old_temp_name_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    # the name the old writer used, and names like the new one's: none is opened
    (tmp_path / ".f.conf.gpubox-tmp").symlink_to(victim)
    for i in range(3):
        (tmp_path / f".f.conf.gpubox-{i:016x}").symlink_to(victim)
    host().write_file(str(tmp_path / "f.conf"), "new\n")
    assert victim.read_text() == "precious\n" and (tmp_path / "f.conf").read_text() == "new\n"


def test_a_symlink_at_the_path_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "f.conf"
    link.symlink_to(victim)
    host().write_file(str(link), "mine\n", mode="0600")
    assert victim.read_text() == "precious\n"
    assert not link.is_symlink() and link.read_text() == "mine\n" and stat.S_IMODE(link.stat().st_mode) == 0o600


def test_a_directory_at_the_path_is_an_error_and_nothing_is_left(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(CommandFailed):
        host().write_file(str(tmp_path / "d"), "x\n")
    assert (tmp_path / "d").is_dir() and list((tmp_path / "d").iterdir()) == [] and leftovers(tmp_path) == []


def test_nul_in_content_is_refused_before_any_command(tmp_path):
    h = host()
    with pytest.raises(ValueError, match="NUL"):
        h.write_file(str(tmp_path / "f"), "a\0b")
    assert h.records == []


@pytest.fixture
def nobody_dir():
    """A directory nobody can reach (pytest's tmp_path is under a 0700 directory of root's)."""
    import shutil
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="gpubox-host-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


@pytest.mark.skipif(os.geteuid() != 0, reason="writes as another user with runuser (root only)")
def test_as_user_writes_as_that_user(nobody_dir):
    tmp_path = nobody_dir
    nobody = pwd.getpwnam("nobody")
    tree = tmp_path / "tree"
    tree.mkdir()
    os.chown(tree, nobody.pw_uid, nobody.pw_gid)
    h = host(is_root=True)
    h.write_file(str(tree / "sub" / "stamp.json"), '{"a": 1}\n' * 5000, as_user="nobody")
    f = tree / "sub" / "stamp.json"
    assert f.read_text() == '{"a": 1}\n' * 5000
    assert f.stat().st_uid == nobody.pw_uid and (tree / "sub").stat().st_uid == nobody.pw_uid
    assert all(r.command.startswith("runuser -u nobody -- ") for r in h.records)
    # and a directory that user cannot write stays unwritten
    with pytest.raises(CommandFailed):
        h.write_file(str(tmp_path / "x"), "y", as_user="nobody")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError):
        h.write_file(str(tree / "y"), "y", as_user="nobody", root=True)
