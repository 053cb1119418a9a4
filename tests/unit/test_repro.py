"""provision.repro: manifests of real directories, the file-by-file comparison, and ELF sections named
when real objects differ (compiled here with gcc)."""

from __future__ import annotations

import json
import subprocess
import sys

from provision import repro


def cc(tmp_path, name: str, source: str, *flags: str):
    c = tmp_path / f"{name}.c"
    c.write_text(source)
    out = tmp_path / f"{name}.o"
    subprocess.run(["gcc", "-O2", "-c", *flags, str(c), "-o", str(out)], check=True)
    return out.read_bytes()


def test_compare_rows_for_every_kind_of_difference():
    a = repro.parse_manifest("F\tsame\t3\t" + "a" * 64 + "\nF\tdiff\t3\t" + "b" * 64 + "\nF\tonly-in-a\t1\t" + "c" * 64
                             + "\nL\tlink\tsame\nL\tlink2\tx\n")
    b = repro.parse_manifest("F\tsame\t3\t" + "a" * 64 + "\nF\tdiff\t4\t" + "d" * 64 + "\nF\tonly-in-b\t1\t" + "c" * 64
                             + "\nL\tlink\tsame\nL\tlink2\ty\n")
    rows = {r["name"]: r for r in repro.compare(a, b)}
    assert {n: r["status"] for n, r in rows.items()} == {
        "same": "identical", "diff": "different", "only-in-a": "only-a", "only-in-b": "only-b",
        "link": "identical", "link2": "different"}
    assert rows["diff"]["size_a"] == 3 and rows["diff"]["size_b"] == 4
    assert repro.differs(list(rows.values()))
    assert not repro.differs([rows["same"], rows["link"]])
    text = repro.report(list(rows.values()), "A", "B", {"diff": [".text"]})
    assert "diff       different  3 / 4 bytes" in text and "section differs: .text" in text
    assert "link2      different  -> x | b: -> y" in text
    assert text.endswith("6 entries compared: 4 not identical")
    # malformed lines are not read as files
    assert repro.parse_manifest("F\tx\tbig\t" + "a" * 64 + "\nF\ty\t1\tshort\nZ\tz\n") == {"files": {}, "links": {}}


def test_sections_of_real_objects_name_what_differs(tmp_path):
    base = cc(tmp_path, "one", "int f(int x) { return x * 3; }\nconst char s[] = \"same\";\n")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "f.o").write_bytes(base)
    (tmp_path / "b" / "f.o").write_bytes(cc(tmp_path, "two", "int f(int x) { return x * 5; }\nconst char s[] = \"same\";\n"))
    (tmp_path / "a" / "g.o").write_bytes(base)
    (tmp_path / "b" / "g.o").write_bytes(base)
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "b" / "notes.txt").write_text("y")
    ok, text = repro.compare_dirs(str(tmp_path / "a"), str(tmp_path / "b"))
    assert not ok
    lines = text.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.strip().startswith("f.o"))
    assert "different" in lines[i] and "section differs: .text" in lines[i + 1]
    assert not any(".rodata" in ln for ln in lines)          # the string is the same
    assert any(ln.strip().startswith("g.o") and "identical" in ln for ln in lines)
    j = next(i for i, ln in enumerate(lines) if ln.strip().startswith("notes.txt"))
    assert "(no section list: not a 64-bit ELF file)" in lines[j + 1]
    # the CLI: same report, exit 1; and 0 for two identical directories
    r = subprocess.run([sys.executable, "-m", "provision.repro", "compare", str(tmp_path / "a"), str(tmp_path / "b")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "section differs: .text" in r.stdout
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "g.o").write_bytes(base)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "g.o").write_bytes(base)
    r = subprocess.run([sys.executable, "-m", "provision.repro", "compare", str(tmp_path / "c"), str(tmp_path / "d")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "every file identical" in r.stdout


def test_section_script_accounts_for_every_byte(tmp_path):
    """Sections plus the pseudo-section cover the file: a change anywhere is seen somewhere."""
    o = tmp_path / "x.o"
    o.write_bytes(cc(tmp_path, "x", "int v = 7; int f(void) { return v; }\n", "-g"))
    out = json.loads(subprocess.run(repro.sections_argv([str(o)]), capture_output=True, text=True, check=True).stdout)
    secs = out[str(o)]
    assert ".text" in secs and ".symtab" in secs and ".debug_info" in secs and ".data" in secs
    assert "(headers and padding)" in secs
    # flip one byte in the ELF header's padding area (e_ident[9..15] are zero padding): only the pseudo-section changes
    data = bytearray(o.read_bytes())
    data[12] ^= 1
    o2 = tmp_path / "y.o"
    o2.write_bytes(bytes(data))
    out2 = json.loads(subprocess.run(repro.sections_argv([str(o2)]), capture_output=True, text=True, check=True).stdout)
    assert repro.section_diff(secs, out2[str(o2)]) == ["(headers and padding)"]


# --- the whole check, for real: gpubox's build step twice on a tiny CMake project -----------------------

TINY_CMAKE = """cmake_minimum_required(VERSION 3.14)
project(tiny C)
set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
set(CMAKE_LIBRARY_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
add_library(where SHARED lib/where.c)
add_executable(tiny main.c)
target_link_libraries(tiny where)
"""


def _git(*args, cwd):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True, capture_output=True)


def test_check_build_on_a_real_project_and_the_check_can_fail(tmp_path, capsys):
    """Two clean builds of one commit by gpubox's build step (real git, cmake, ninja, gcc) in directories
    of different lengths: every file of bin/ identical, although the code embeds __FILE__ and links a
    shared library from bin/. Then the control: with the prefix maps overridden away (cmake_extra comes
    last), the same check reports the executable and the library as different and names .rodata."""
    from invoke import Context
    origin = tmp_path / "origin"
    (origin / "lib").mkdir(parents=True)
    (origin / "CMakeLists.txt").write_text(TINY_CMAKE)
    (origin / "lib" / "where.c").write_text('const char *where(void) { return __FILE__; }\n')
    (origin / "main.c").write_text('#include <stdio.h>\nconst char *where(void);\n'
                                   'int main(void) { puts(where()); puts(__FILE__); return 0; }\n')
    _git("init", "-q", "-b", "main", cwd=origin)
    _git("add", "-A", cwd=origin)
    _git("commit", "-q", "-m", "tiny", cwd=origin)
    sha = subprocess.check_output(["git", "-C", str(origin), "rev-parse", "HEAD"], text=True).strip()
    sets = ["build.cuda=false", f"build.repo_url={origin}", f"build.sha={sha}", "build.targets=[tiny]",
            f"build.src_dir={tmp_path}/s/src", f"build.build_dir={tmp_path}/b", "build.ccache=false",
            f"state_dir={tmp_path}/state", f"report_dir={tmp_path}/reports"]
    from provision import config
    from provision.engine import Runner
    from provision.host import Host
    from provision.steps import build as step
    c = Context()
    report = Runner(Host(c), config.load(c, sets), [step], echo=lambda s: None).run()
    assert not report.failed, report.steps[0].error
    same, text = repro.check_build(c, sets, echo=lambda s: None)
    assert same, text
    assert "tiny  " in text and "libwhere.so  " in text and text.endswith("every file identical")
    assert (tmp_path / "s" / "src-repro" / ".git").is_dir() and (tmp_path / "b-repro" / "bin" / "tiny").is_file()
    # the box's lock still describes the first build; the second has its own
    lock = json.loads((tmp_path / "state" / "gpubox.lock.json").read_text())
    assert lock["build"]["build_dir"] == f"{tmp_path}/b"
    assert json.loads((tmp_path / "state" / "repro" / "gpubox.lock.json").read_text())["build"]["build_dir"] == f"{tmp_path}/b-repro"
    run = subprocess.run([str(tmp_path / "b-repro" / "bin" / "tiny")], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["/gpubox/src/lib/where.c", "/gpubox/src/main.c"]   # and it finds its library
    # the control: no prefix maps in either build -> the real, different paths are in the bytes
    bare = [*sets, "build.cmake_extra=[CMAKE_C_FLAGS=]"]
    report = Runner(Host(c), config.load(c, bare), [step], echo=lambda s: None).run()
    assert not report.failed, report.steps[0].error
    same, text = repro.check_build(c, bare, echo=lambda s: None)
    assert not same
    lines = text.splitlines()
    for name in ("tiny", "libwhere.so"):
        i = next(i for i, ln in enumerate(lines) if ln.strip().startswith(name + " "))
        assert "different" in lines[i], text
        assert any(".rodata" in ln for ln in lines[i + 1:i + 6]), text
