"""provision/ggufhead.py, gpubox's one GGUF header reader, checked against the gguf package's GGUFReader on
real files the gguf package writes (a tiny llama model, a qwen3moe MoE, the Gemma 4 twin pair)."""

from __future__ import annotations

import subprocess
import sys

import gguf
import pytest

from provision import ggufhead, remote
from testbed.testmodels import write_tiny


def reference(path) -> dict:
    """What gguf's own reader says: metadata (scalars, strings, array lengths) and the tensor table."""
    r = gguf.GGUFReader(str(path))
    meta = {}
    for name, fld in r.fields.items():
        if name.startswith("GGUF."):
            continue
        t = fld.types[0]
        if t == gguf.GGUFValueType.STRING:
            meta[name] = bytes(fld.parts[fld.data[0]]).decode()
        elif t == gguf.GGUFValueType.ARRAY:
            meta[name] = len(fld.data)
        else:
            meta[name] = fld.parts[fld.data[0]].tolist()[0]
    tensors = [(t.name, [int(x) for x in t.shape], int(t.tensor_type), int(t.data_offset - r.data_offset))
               for t in r.tensors]
    return {"meta": meta, "tensors": tensors, "data_start": r.data_offset}


def ours(path) -> dict:
    h = ggufhead.read_header(str(path))
    meta = {}
    for k, v in h["metadata"].items():
        if isinstance(v, dict) and "array_len" in v:
            meta[k] = v["array_len"]
        elif isinstance(v, list):
            meta[k] = len(v)
        else:
            meta[k] = v
    tensors = [(t["name"], t["shape"], t["type"], t["offset"]) for t in h["tensors"]]
    return {"meta": meta, "tensors": tensors, "data_start": h["data_start"]}


@pytest.mark.parametrize("arch", ["llama", "qwen3moe"])
def test_agrees_with_gguf_field_by_field(tmp_path, arch):
    p = write_tiny(tmp_path / f"{arch}.gguf", arch=arch)
    want, got = reference(p), ours(p)
    assert got["tensors"] == want["tensors"] and got["data_start"] == want["data_start"]
    assert set(got["meta"]) == set(want["meta"])
    for k, v in want["meta"].items():
        assert got["meta"][k] == pytest.approx(v), k
    assert ggufhead.architecture(str(p)) == arch == want["meta"]["general.architecture"]


def test_architecture_reads_only_up_to_its_key(tmp_path):
    p = write_tiny(tmp_path / "m.gguf", arch="llama")
    data = p.read_bytes()
    # general.architecture is the first key: the first KB are enough (the models step relies on it)
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:1024])
    assert ggufhead.architecture(str(head)) == "llama"
    with pytest.raises(ggufhead.GGUFError):
        ggufhead.read_header(str(head))          # the whole header is not there


def test_bad_magic_and_truncation_are_errors(tmp_path):
    data = write_tiny(tmp_path / "m.gguf", arch="llama").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + data[4:100])
    with pytest.raises(ggufhead.GGUFError, match="bad magic"):
        ggufhead.read_header(str(bad))
    trunc = tmp_path / "t.gguf"
    trunc.write_bytes(data[:30])
    with pytest.raises(ggufhead.GGUFError, match="truncated"):
        ggufhead.architecture(str(trunc))


def test_runs_on_a_python_without_gpubox_through_remote(tmp_path):
    """The way the tuner runs it on the target: remote.argv, a bare interpreter (-I: no site, no PYTHONPATH)."""
    p = write_tiny(tmp_path / "m.gguf", arch="qwen3moe")
    argv = remote.argv([ggufhead], "print_summaries", str(p), str(tmp_path / "missing.gguf"))
    r = subprocess.run([sys.executable, "-I", *argv[1:]], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.splitlines()
    assert '"arch": "qwen3moe"' in first or '"architecture": "qwen3moe"' in first
    assert "FileNotFoundError" in second
