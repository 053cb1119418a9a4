"""The mini Gemma 4 twin (testbed/gemma4.py) loaded by the real upstream llama-server (CPU build of
llama-cpp-python 0.3.36's llama.cpp, tests/conftest.py `llama_bin`), drafting with its MTP head
(`-md head --spec-type draft-mtp`): it answers /v1/chat/completions, the rigged head's drafts are all
accepted and the random head's none, as the server's own `draft acceptance` log line says. Mismatched
files are refused by the real loader. Needs no sandbox: the server runs on this host, on loopback."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from testbed import gemma4 as g

ACCEPTANCE = re.compile(r"draft acceptance = ([0-9.]+) \(\s*(\d+) accepted /\s*(\d+) generated\)")
MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello in one short sentence."}]


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    def __init__(self, bin_dir: Path, log: Path, *args: str):
        self.port = free_port()
        self.log = log
        argv = [str(bin_dir / "llama-server"), *args, "-c", "2048", "-np", "1", "-t", "2",
                "--host", "127.0.0.1", "--port", str(self.port)]
        self.fh = open(log, "w")
        self.p = subprocess.Popen(argv, stdout=self.fh, stderr=subprocess.STDOUT)

    def text(self) -> str:
        self.fh.flush()
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                pytest.fail(f"llama-server exited {self.p.returncode}:\n{self.text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.3)
        pytest.fail(f"llama-server not ready in {timeout} s:\n{self.text()[-3000:]}")

    def chat(self, max_tokens: int = 24) -> dict:
        body = json.dumps({"messages": MESSAGES, "max_tokens": max_tokens}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.fh.close()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("twin")
    out = {}
    out["rigged"] = g.write_pair(d / "rigged")
    out["random"] = (out["rigged"][0], g.write_pair(d / "random", variant="random", only="head")[1])
    out["width"] = g.write_pair(d / "width", mismatch="width")
    out["pattern"] = g.write_pair(d / "pattern", mismatch="pattern")
    out["presync"] = (out["rigged"][0], g.write_pair(d / "presync", head="presync", only="head")[1])
    return out


def serve(llama_bin, tmp_path, target, head, name):
    s = Server(llama_bin, tmp_path / f"{name}.log", "-m", str(target), "-md", str(head), "--spec-type", "draft-mtp")
    try:
        s.wait_ready()
        r = s.chat()
        time.sleep(0.3)          # the timing lines follow the response
        return r, s.text()
    finally:
        s.stop()


@pytest.mark.parametrize("variant,acceptance", [("rigged", 1.0), ("random", 0.0)])
def test_mini_pair_drafts_with_mtp(llama_bin, tmp_path, pairs, variant, acceptance):
    target, head = pairs[variant]
    r, log = serve(llama_bin, tmp_path, target, head, variant)
    reply = r["choices"][0]["message"]["content"]
    assert reply.split() == ["ready"] * len(reply.split()) and len(reply.split()) >= 10, reply
    assert f"loading draft model '{head}'" in log
    # the head's sliding layers view the target's layer n-2 (4), its full layer the last one (5)
    assert all(re.search(rf"layer\s+{i}: sharing with layer 4", log) for i in (0, 1, 2))
    assert re.search(r"layer\s+3: sharing with layer 5", log)
    m = ACCEPTANCE.findall(log)
    assert m, log[-3000:]
    rate, accepted, generated = float(m[-1][0]), int(m[-1][1]), int(m[-1][2])
    print(f"\n{variant}: draft acceptance = {m[-1][0]} ({accepted} accepted / {generated} generated)")
    assert generated > 0 and rate == acceptance
    assert accepted == (generated if acceptance == 1.0 else 0)
    t = r["timings"]
    assert t["draft_n"] == generated and t["draft_n_accepted"] == accepted


def test_head_of_the_wrong_width_is_refused(llama_bin, tmp_path, pairs):
    target, head = pairs["width"]
    s = Server(llama_bin, tmp_path / "width.log", "-m", str(target), "-md", str(head), "--spec-type", "draft-mtp")
    try:
        rc = s.p.wait(60)
    finally:
        s.stop()
    log = s.log.read_text(errors="replace")
    # upstream has no friendly check: the head's pre-projection does not fit the concatenated input and
    # the graph reservation aborts (hence gpubox's preflight)
    assert rc != 0 and "GGML_ASSERT(ggml_can_mul_mat(a, b)) failed" in log, log[-2000:]


def test_pattern_mismatch_is_not_caught_by_upstream(llama_bin, tmp_path, pairs):
    """A target ending [full, sliding] loads and serves: upstream maps the head's sliding layers to target
    layer n-2 and its full layer to n-1 without checking their types (in the mini pair the views even have
    the same size). Only gpubox's preflight can refuse it."""
    target, head = pairs["pattern"]
    r, log = serve(llama_bin, tmp_path, target, head, "pattern")
    assert r["choices"][0]["message"]["content"].split()[0] == "ready"
    assert re.search(r"layer\s+3: sharing with layer 5", log) and re.search(r"layer\s+0: sharing with layer 4", log)


def test_presync_head_is_unknown_to_upstream(llama_bin, tmp_path, pairs):
    target, head = pairs["presync"]
    s = Server(llama_bin, tmp_path / "presync.log", "-m", str(target), "-md", str(head), "--spec-type", "draft-mtp")
    try:
        rc = s.p.wait(60)
    finally:
        s.stop()
    log = s.log.read_text(errors="replace")
    assert rc != 0 and "unknown model architecture: 'gemma4_assistant'" in log, log[-2000:]
