"""Step 4 (patch): the rule engine on the REAL CUDA 12.9.86 header, the fact command run for real
(bash/awk on a copy of the header), the step's decisions (facts in, Check / commands out, with
Invoke's MockContext), and apply/undo run for real on a local copy (atomic write, backup, kill -9)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from invoke import Context, MockContext, Result

from provision import config
from provision import facts as factmod
from provision.engine import StepError
from provision.host import Host
from provision.steps import patch

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("nvcc_chroot", REPO / "tests" / "integration" / "nvcc_chroot.py")
nvcc_chroot = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("nvcc_chroot", nvcc_chroot)
_spec.loader.exec_module(nvcc_chroot)

FUNCS = ["rsqrt", "rsqrtf", "sinpi", "sinpif", "cospi", "cospif"]
TYPES = {"rsqrt": "double", "sinpi": "double", "cospi": "double", "rsqrtf": "float", "sinpif": "float", "cospif": "float"}
LINES = {"rsqrt/device": 597, "rsqrtf/device": 621, "sinpi/device": 2556, "sinpif/device": 2579,
         "cospi/device": 2601, "cospif/device": 2623, "rsqrt/host": 5986, "sinpi/host": 5990, "cospi/host": 5992,
         "rsqrtf/host": 6006, "sinpif/host": 6010, "cospif/host": 6012}


@pytest.fixture(scope="session")
def headers():
    try:
        return nvcc_chroot.cuda129_headers()
    except RuntimeError as e:
        pytest.skip(f"the real CUDA 12.9.86 header is needed: {e}")


@pytest.fixture(scope="session")
def header(headers):
    return headers[0]


@pytest.fixture(scope="session")
def cfg():
    return config.validate(config.defaults()["gpubox"])


@pytest.fixture(scope="session")
def rs(cfg):
    return patch.rules_for(cfg)


def recipe_style(text: str, outer: bool = False) -> str:
    """The original recipe's hand edit, made with plain string edits (not the rule engine):
    `noexcept (true)` on the six device declarations, `throw()` on the six host forms."""
    for f in FUNCS:
        t = TYPES[f]
        text, n = re.subn(rf"(__device_builtin__ +{t} +{f}\({t} x\));", r"\1 noexcept (true);", text)
        assert n == 1
        old = f"__func__({t} {f}({t} a));"
        new = f"__func__({t} {f}({t} a)) throw();" if outer else f"__func__({t} {f}({t} a) throw());"
        assert text.count(old) == 1
        text = text.replace(old, new)
    return text


# --- the real header and the rules -------------------------------------------------------------------

def test_real_header_is_the_one_platform_md_describes(header, rs):
    assert len(header.encode()) == nvcc_chroot.HEADER_SIZE == 238284
    sha = hashlib.sha256(header.encode()).hexdigest()
    assert sha == nvcc_chroot.HEADER_SHA256
    assert sha in rs.originals


def test_every_rule_finds_its_declaration_once_at_the_documented_line(header, rs):
    a = patch.analyze_text(header, rs)
    assert a.kind == "unpatched" and not a.problems
    assert {rid: n for rid, (n, _) in a.lines.items()} == LINES
    assert {r.id: r.line for r in rs.rules} == LINES
    assert a.pairs == {f: "unpatched" for f in FUNCS}


def test_rule_gates(rs):
    gates = {r.function: r.glibc for r in rs.rules}
    assert gates == {"sinpi": "2.41", "cospi": "2.41", "sinpif": "2.41", "cospif": "2.41",
                     "rsqrt": "2.42", "rsqrtf": "2.42"}
    assert all(r.specifier == rs.specifiers[r.glibc] for r in rs.rules)


def test_patch_changes_exactly_the_twelve_lines_and_adds_the_preamble(header, rs):
    new = patch.transform(header, rs)
    old_lines, new_lines = header.splitlines(), new.splitlines()
    pre = rs.preamble_lines()
    assert len(new_lines) == len(old_lines) + len(pre)
    at = LINES["rsqrt/device"]  # everything before line 62 is unchanged, then the preamble
    assert new_lines[61:61 + len(pre)] == pre
    body = new_lines[:61] + new_lines[61 + len(pre):]
    changed = [i + 1 for i, (o, n) in enumerate(zip(old_lines, body)) if o != n]
    assert changed == sorted(LINES.values())
    for r in rs.rules:
        line = body[r.line - 1]
        assert line == old_lines[r.line - 1].replace("(" + TYPES[r.function] + (" x)" if r.form == "device" else " a)"),
                                                     "(" + TYPES[r.function] + (" x)" if r.form == "device" else " a)")
                                                     + " " + r.specifier, 1), line
    assert at < 1000
    assert patch.analyze_text(new, rs).kind == "patched-gpubox"


def test_second_patch_is_a_no_op(header, rs):
    once = patch.transform(header, rs)
    assert patch.transform(once, rs) == once


@pytest.mark.parametrize("outer", [False, True], ids=["throw-inside-macro", "throw-after-macro"])
def test_recipe_style_is_recognised_as_patched(header, rs, outer):
    text = recipe_style(header, outer)
    a = patch.analyze_text(text, rs)
    assert a.kind == "patched-recipe", a.problems
    assert patch.transform(text, rs) == text


def test_recipe_style_with_other_spacing_is_recognised(header, rs):
    text = recipe_style(header).replace("noexcept (true);", "noexcept(true) ;").replace(" throw());", " throw ( ) );")
    assert patch.analyze_text(text, rs).kind == "patched-recipe"


def test_whitespace_insensitive_matching(header, rs):
    """Columns realigned with tabs and other runs of spaces: still the same declarations."""
    text = re.sub(r"__device_builtin__ double {17}sinpi\(double x\);", "__device_builtin__\tdouble\tsinpi( double x );",
                  header)
    text = text.replace("__func__(float cospif(float a));", "__func__( float  cospif( float a ) );")
    assert text != header
    a = patch.analyze_text(text, rs)
    assert a.kind == "unpatched"
    assert patch.analyze_text(patch.transform(text, rs), rs).kind == "patched-gpubox"


def test_split_pair_is_partial_and_gets_fixed(header, rs):
    """Only the six device declarations patched: nvcc's host pass fails ("different exception specifier");
    the step sees split pairs and rewrites both lines of each pair in its own style."""
    text = header
    for f in FUNCS:
        text = re.sub(rf"(__device_builtin__ +{TYPES[f]} +{f}\({TYPES[f]} x\));", r"\1 noexcept (true);", text)
    a = patch.analyze_text(text, rs)
    assert a.kind == "partial" and set(a.pairs.values()) == {"split"}
    new = patch.transform(text, rs)
    assert patch.analyze_text(new, rs).kind == "patched-gpubox"
    assert "noexcept (true)" not in new.split(rs.end)[1]


def test_half_done_recipe_is_completed(header, rs):
    """The four glibc-2.41 functions patched recipe-style, rsqrt/rsqrtf not: finish those two pairs."""
    full = recipe_style(header)
    text = header
    for f in ["sinpi", "sinpif", "cospi", "cospif"]:
        t = TYPES[f]
        text = re.sub(rf"(__device_builtin__ +{t} +{f}\({t} x\));", r"\1 noexcept (true);", text)
        text = text.replace(f"__func__({t} {f}({t} a));", f"__func__({t} {f}({t} a) throw());")
    assert text != full
    a = patch.analyze_text(text, rs)
    assert a.kind == "partial" and a.todo == ["rsqrt", "rsqrtf"]
    new = patch.analyze_text(patch.transform(text, rs), rs)
    assert new.kind == "patched-mixed" and new.preamble == "present"


def test_cuda13_header_is_refused(rs):
    h13 = nvcc_chroot.CUDA13 / nvcc_chroot.CRT / "math_functions.h"
    if not h13.exists():
        pytest.skip(f"no CUDA 13 header at {h13}")
    a = patch.analyze_text(h13.read_text(), rs)
    assert a.kind == "unknown"
    assert any("__NV_IEC_60559_FUNCS_EXCEPTION_SPECIFIER" in p for p in a.problems), a.problems
    with pytest.raises(StepError):
        patch.transform(h13.read_text(), rs)


@pytest.mark.parametrize("mutation", ["renamed-parameter", "duplicated", "deleted", "damaged-preamble"])
def test_other_headers_are_refused(header, rs, mutation):
    if mutation == "renamed-parameter":     # what another CUDA release could look like
        text = header.replace("sinpif(float x);", "sinpif(float v);")
        expect = "sinpif/device"
    elif mutation == "duplicated":
        text = header.replace("__func__(double cospi(double a));", "__func__(double cospi(double a));\n"
                              "__func__(double cospi(double a));")
        expect = "found 2 times"
    elif mutation == "deleted":
        text = header.replace("__func__(float rsqrtf(float a));", "")
        expect = "found 0 times"
    else:
        text = patch.transform(header, rs).replace("#define __GPUBOX_GLIBC_NOTHROW noexcept(true)",
                                                   "#define __GPUBOX_GLIBC_NOTHROW")
        expect = "preamble"
    a = patch.analyze_text(text, rs)
    assert a.kind == "unknown"
    assert any(expect in p for p in a.problems), a.problems


def test_diff_file_matches_the_rules(header, rs):
    """patches/cuda-12.9-glibc-2.41.diff is the reviewable form of the rules: it must stay in sync."""
    diff = (REPO / "patches" / "cuda-12.9-glibc-2.41.diff").read_text()
    assert diff == patch.unified_diff(header, rs, "targets/x86_64-linux/include/crt/math_functions.h")


def test_diff_file_applies_with_patch_to_the_same_result(header, rs, tmp_path):
    if not shutil.which("patch"):
        pytest.skip("GNU patch not installed")
    d = tmp_path / "targets/x86_64-linux/include/crt"
    d.mkdir(parents=True)
    (d / "math_functions.h").write_text(header)
    r = subprocess.run(["patch", "-p1", "-i", str(REPO / "patches" / "cuda-12.9-glibc-2.41.diff")], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (d / "math_functions.h").read_text() == patch.transform(header, rs)


def test_select_covers_every_line_the_rules_read(header, rs):
    """The fact prints only the lines matching `select` (awk ERE): every line a rule or the anchor can
    match must be among them, on the unpatched and on both patched forms."""
    for text in (header, patch.transform(header, rs), recipe_style(header)):
        r = subprocess.run(["awk", "-v", "x=1", "$0 ~ ENVIRON[\"S\"] { print NR }"], input=text, capture_output=True,
                           text=True, env=dict(os.environ, S=rs.select))
        selected = {int(n) for n in r.stdout.split()}
        wanted = {n for n, line in enumerate(text.splitlines(), 1)
                  if rs.anchor.search(line) or any(rule.probe.match(line) for rule in rs.rules)}
        assert wanted and wanted <= selected


def test_preamble_gates_on_this_machines_glibc(rs, tmp_path):
    """The preamble compiled by this machine's g++: specifiers follow __GLIBC_PREREQ; C sees no C++."""
    if not shutil.which("g++") or not shutil.which("gcc"):
        pytest.skip("no gcc/g++ here")
    glibc = tuple(int(x) for x in os.confstr("CS_GNU_LIBC_VERSION").split()[1].split(".")[:2])
    pre = "\n".join(rs.preamble_lines()) + "\n"
    src = pre + ("void a() __GPUBOX_GLIBC_2_41_NOTHROW;\nvoid b() __GPUBOX_GLIBC_2_42_NOTHROW;\n"
                 f"static_assert(noexcept(a()) == {str(glibc >= (2, 41)).lower()}, \"2.41 gate\");\n"
                 f"static_assert(noexcept(b()) == {str(glibc >= (2, 42)).lower()}, \"2.42 gate\");\n")
    (tmp_path / "g.cpp").write_text(src)
    r = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "g.cpp"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (tmp_path / "g.c").write_text(pre + "double sinpi(double) __GPUBOX_GLIBC_2_41_NOTHROW;\n")
    r = subprocess.run(["gcc", "-fsyntax-only", "g.c"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (tmp_path / "o.cpp").write_text(pre + "void a() __GPUBOX_GLIBC_2_41_NOTHROW;\n")
    r = subprocess.run(["g++", "-std=c++98", "-fsyntax-only", "o.cpp"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# --- the fact, run for real on copies of the header ---------------------------------------------------

def local_cfg(cfg, prefix: Path) -> dict:
    c = json.loads(json.dumps(cfg))
    c["cuda"]["prefix"] = str(prefix)
    return c


def install(prefix: Path, text: str, mode: int = 0o644) -> Path:
    h = prefix / "targets/x86_64-linux/include/crt/math_functions.h"
    h.parent.mkdir(parents=True, exist_ok=True)
    h.write_text(text)
    h.chmod(mode)
    return h


def gather(cfg) -> dict:
    """The real fact script (core facts + this step's) run by bash on this machine."""
    return factmod.gather(Host(Context()), cfg, [patch])


@pytest.mark.parametrize("variant", ["unpatched", "gpubox", "recipe", "split", "renamed"])
def test_fact_extract_classifies_like_the_whole_file(header, rs, cfg, tmp_path, variant):
    text = {"unpatched": header, "gpubox": patch.transform(header, rs), "recipe": recipe_style(header),
            "split": re.sub(r"(sinpi\(double x\));", r"\1 noexcept (true);", header),
            "renamed": header.replace("cospi(double x);", "cospi(double y);")}[variant]
    c = local_cfg(cfg, tmp_path)
    install(tmp_path, text, 0o640)
    f = gather(c)["patch_header"]
    assert f["exists"] and f["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert f["mode"] == "640" and f["owner"] == f"{os.getuid()}:{os.getgid()}"
    assert len(f["lines"]) < 60
    assert patch.analyze(f["lines"], rs).kind == patch.analyze_text(text, rs).kind
    assert patch.state_of({"patch_header": f}, c).kind == patch.analyze_text(text, rs).kind


def test_fact_for_a_missing_header(cfg, tmp_path):
    f = gather(local_cfg(cfg, tmp_path / "nope"))["patch_header"]
    assert f == {"exists": False, "sha256": None, "owner": None, "mode": None, "backup": None, "lines": []}


def test_fact_quotes_the_configured_path(cfg, header, tmp_path):
    odd = tmp_path / "cuda 12.9; touch pwned"
    install(odd, header)
    f = gather(local_cfg(cfg, odd))["patch_header"]
    assert f["exists"] and not (Path.cwd() / "pwned").exists()


# --- check: facts in, decisions out ----------------------------------------------------------------

def facts_for(cfg, tmp_path, text, glibc="2.41", os_id="fedora"):
    c = local_cfg(cfg, tmp_path)
    if text is not None:
        install(tmp_path, text)
    f = gather(c)
    f["glibc"] = glibc
    f["os"] = {"id": os_id, "version": "42", "pretty": "x"}
    return c, f


def test_check_missing_header(cfg, tmp_path):
    c, f = facts_for(cfg, tmp_path, None)
    chk = patch.check(f, c)
    assert not chk.satisfied and chk.info["state"] == "missing"
    assert chk.changes[0].what == "patch crt/math_functions.h after CUDA is installed"
    assert "cuda-crt-12-9" in chk.changes[0].why


@pytest.mark.parametrize("glibc,needed,later", [("2.41", "sinpi, sinpif, cospi, cospif", "rsqrt, rsqrtf"),
                                                 ("2.42", "rsqrt, rsqrtf, sinpi, sinpif, cospi, cospif", None),
                                                 ("2.36", None, "rsqrt, rsqrtf, sinpi, sinpif, cospi, cospif")])
def test_check_unpatched_says_why_for_this_glibc(cfg, header, tmp_path, glibc, needed, later):
    c, f = facts_for(cfg, tmp_path, header, glibc)
    chk = patch.check(f, c)
    assert not chk.satisfied and chk.info["state"] == "unpatched"
    assert chk.info["original"].startswith("12.9.86")
    ch = chk.changes[0]
    assert "12 declarations" in ch.what
    if needed:
        assert f"glibc {glibc} declares {needed} noexcept" in ch.why and "exception specification is incompatible" in ch.why
    if later:
        assert f"{later}: needed from glibc" in ch.why and "__GLIBC_PREREQ" in ch.why


@pytest.mark.parametrize("style,kind", [("gpubox", "patched-gpubox"), ("recipe", "patched-recipe")])
def test_check_patched_is_satisfied(cfg, header, rs, tmp_path, style, kind):
    text = patch.transform(header, rs) if style == "gpubox" else recipe_style(header)
    c, f = facts_for(cfg, tmp_path, text)
    chk = patch.check(f, c)
    assert chk.satisfied and not chk.changes and chk.info["state"] == kind
    assert bool(chk.warnings) == (style == "recipe")     # hand-patched, no backup: undo cannot restore


def test_check_unknown_reports_a_change_and_what_was_found(cfg, header, tmp_path):
    c, f = facts_for(cfg, tmp_path, header.replace("rsqrt(double x);", "rsqrt(double x) __THROW;"))
    chk = patch.check(f, c)
    assert not chk.satisfied and chk.info["state"] == "unknown"
    assert "apply will refuse" in chk.changes[0].why
    assert any("rsqrt/device" in w and "__THROW" in w for w in chk.warnings)


def test_check_on_a_host_that_is_not_fedora_does_not_raise(cfg, header, tmp_path):
    c, f = facts_for(cfg, tmp_path, header, os_id="debian")
    assert not patch.check(f, c).satisfied
    f["patch_header"] = factmod.UNKNOWN
    assert patch.check(f, c).info["state"] == "unread"


# --- apply with MockContext: commands out ----------------------------------------------------------

def read_result(text: str, backup: str | None = None, stat: str = "0:0 644") -> Result:
    sha = hashlib.sha256(text.encode()).hexdigest()
    return Result(stdout=f"{stat}\n{backup or 'none'}\n{sha}\n{text}", exited=0)


def mock_host(read: Result, **more) -> tuple[Host, MockContext]:
    runs = {re.compile(r"^sh -c .*cat \"\$h\"' sh "): read, re.compile(r"^sh -c 'set -e; h=\$1; b=\$2"): Result(),
            re.compile(r"(?s)^env .*sh -c 'set -e; p=\$1"): Result(), re.compile(r"^sh -c 'set -e; p=\$1"): Result(), **more}
    c = MockContext(run=runs)
    return Host(c, is_root=True), c


def commands(c: MockContext) -> list[str]:
    return [call.args[0] for call in c.run.call_args_list]


def test_apply_unpatched_backs_up_then_writes_the_patched_text(cfg, header, rs, tmp_path):
    host, c = mock_host(read_result(header))
    assert patch.apply(host, {}, cfg, patch.check({}, cfg)) == []
    cmds = commands(c)
    h = patch.header_path(cfg)
    sha_old = hashlib.sha256(header.encode()).hexdigest()
    new = patch.transform(header, rs)
    sha_new = hashlib.sha256(new.encode()).hexdigest()
    assert len(cmds) == 3
    assert cmds[1].endswith(f"sh {h} {h}.gpubox-orig {sha_old}")
    assert cmds[2].startswith("env 'GPUBOX_L597=") and cmds[2].endswith(f"sh {h} {sha_new} 0:0 644")
    assert len(cmds[2]) < 16000       # edits, not the 238 kB header, travel in the command
    # The command the step sends, run for real on a copy of the header, produces exactly that text.
    copy = tmp_path / "math_functions.h"
    copy.write_text(header)
    real = cmds[2].replace(f"sh {h} {sha_new} 0:0 644", f"sh {copy} {sha_new} {os.getuid()}:{os.getgid()} 644")
    subprocess.run(["sh", "-c", real], check=True)
    assert copy.read_text() == new


def test_apply_keeps_an_existing_backup_of_the_same_original(cfg, header):
    sha = hashlib.sha256(header.encode()).hexdigest()
    host, c = mock_host(read_result(header, backup=sha, stat="0:0 640"))
    patch.apply(host, {}, cfg, patch.check({}, cfg))
    cmds = commands(c)
    assert len(cmds) == 2 and cmds[1].endswith(" 0:0 640")


def test_apply_replaces_a_stale_backup_when_a_new_original_arrived(cfg, header):
    host, c = mock_host(read_result(header, backup="0" * 64))
    patch.apply(host, {}, cfg, patch.check({}, cfg))
    assert "gpubox-orig" in commands(c)[1]


def test_apply_on_patched_header_changes_nothing(cfg, header, rs):
    host, c = mock_host(read_result(recipe_style(header)))
    assert "already patched" in patch.apply(host, {}, cfg, patch.check({}, cfg))[0]
    assert len(commands(c)) == 1


def test_apply_refuses_unknown_header_without_writing(cfg, header):
    host, c = mock_host(read_result(header.replace("sinpi(double x);", "sinpi(double x) noexcept(false);")))
    with pytest.raises(StepError) as e:
        patch.apply(host, {}, cfg, patch.check({}, cfg))
    msg = str(e.value)
    assert msg.startswith("patch: refusing to edit /usr/local/cuda-12.9/targets/x86_64-linux/include/crt/math_functions.h")
    assert "sinpi/device" in msg and "left untouched" in msg and "fix:" in msg and "dnf reinstall cuda-crt-12-9" in msg
    assert len(commands(c)) == 1


def test_apply_refuses_missing_header(cfg):
    host, c = mock_host(Result(stderr="no such file", exited=3))
    with pytest.raises(StepError) as e:
        patch.apply(host, {}, cfg, patch.check({}, cfg))
    assert "does not exist: CUDA 12.9 is not installed" in str(e.value) and "invoke cuda" in str(e.value)


def test_apply_refuses_a_read_that_is_not_byte_exact(cfg, header):
    bad = Result(stdout="0:0 644\nnone\n" + "0" * 64 + "\n" + header, exited=0)
    host, c = mock_host(bad)
    with pytest.raises(StepError, match="not read byte for byte"):
        patch.apply(host, {}, cfg, patch.check({}, cfg))
    assert len(commands(c)) == 1


# --- apply / undo for real on a local copy ---------------------------------------------------------

def test_apply_check_undo_round_trip_on_a_real_file(cfg, header, rs, tmp_path):
    c = local_cfg(cfg, tmp_path)
    h = install(tmp_path, header, 0o640)
    host = Host(Context())
    f = gather(c)
    chk = patch.check(f, c)
    assert not chk.satisfied
    patch.apply(host, f, c, chk)
    assert h.read_text() == patch.transform(header, rs)
    assert (tmp_path / (str(h.relative_to(tmp_path)) + ".gpubox-orig")).read_text() == header
    assert oct(h.stat().st_mode & 0o777) == "0o640"
    assert not [p for p in h.parent.iterdir() if p.name.startswith(".gpubox.") or ".gpubox-orig." in p.name]
    f2 = gather(c)
    assert patch.check(f2, c).satisfied          # second run: nothing to do
    assert f2["patch_header"]["backup"] == hashlib.sha256(header.encode()).hexdigest()
    notes = patch.undo(host, f2, c)
    assert notes == [f"restored {h} from {h}.gpubox-orig"]
    assert h.read_text() == header and not Path(f"{h}.gpubox-orig").exists()
    assert oct(h.stat().st_mode & 0o777) == "0o640"
    assert patch.undo(host, gather(c), c) == [f"{h}: not patched by gpubox and no backup; nothing to undo"]


def test_undo_of_a_patched_header_without_backup_refuses(cfg, header, rs, tmp_path):
    c = local_cfg(cfg, tmp_path)
    install(tmp_path, patch.transform(header, rs))
    with pytest.raises(StepError, match="backup .* is gone"):
        patch.undo(Host(Context()), {}, c)


def test_edit_never_renames_a_result_with_the_wrong_sha256(tmp_path):
    """The temp file is checked against the sha256 of the text Python computed: a result that differs
    (a different file came in between, a truncated disk write) leaves the old file and no temp file."""
    target = tmp_path / "f.h"
    target.write_text("old\n")
    r = subprocess.run(["sh", "-c", patch._EDIT, "sh", str(target), "0" * 64, f"{os.getuid()}:{os.getgid()}", "644"],
                       capture_output=True, text=True, env=dict(os.environ, GPUBOX_AWK=patch._EDIT_AWK, GPUBOX_L1="new"))
    assert r.returncode == 4 and "not renamed" in r.stderr
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["f.h"]


KILL_DRIVER = """
import sys
from invoke import Context
from provision import config
from provision import facts as factmod
from provision.host import Host
from provision.steps import patch
cfg = config.validate(config.defaults()["gpubox"])
cfg["cuda"]["prefix"] = sys.argv[1]
host = Host(Context())
f = factmod.gather(host, cfg, [patch])
chk = patch.check(f, cfg)
if not chk.satisfied:
    patch.apply(host, f, cfg, chk)
print("done")
"""


def test_sigkill_at_any_point_leaves_old_or_new_header_and_rerun_converges(cfg, header, rs, tmp_path):
    """Fault test: kill -9 the whole process group of a run at spread-out moments; after each kill the
    header is byte-for-byte the original or the patched one; a clean rerun then converges."""
    new = patch.transform(header, rs)
    states = {hashlib.sha256(header.encode()).hexdigest(): "old", hashlib.sha256(new.encode()).hexdigest(): "new"}
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_DRIVER)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # How long a full run takes here, to spread the kills over it.
    prefix = tmp_path / "timing"
    install(prefix, header)
    t0 = time.monotonic()
    subprocess.run([sys.executable, str(driver), str(prefix)], env=env, check=True, capture_output=True)
    total = time.monotonic() - t0
    seen = {"old": 0, "new": 0}
    for i in range(10):
        prefix = tmp_path / f"k{i}"
        h = install(prefix, header)
        p = subprocess.Popen([sys.executable, str(driver), str(prefix)], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(total * (0.35 + 0.65 * i / 9))
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        state = states.get(hashlib.sha256(h.read_bytes()).hexdigest())
        assert state in ("old", "new"), f"kill {i}: header is neither the original nor the patched one"
        seen[state] += 1
        if state == "old" and Path(f"{h}.gpubox-orig").exists():
            seen["old, backup written"] = seen.get("old, backup written", 0) + 1
        r = subprocess.run([sys.executable, str(driver), str(prefix)], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert h.read_text() == new
        assert Path(f"{h}.gpubox-orig").read_text() == header
    print(f"kills: {seen} (run takes {total:.2f}s)")
    assert seen["old"] >= 1        # some kills did land before the rename
