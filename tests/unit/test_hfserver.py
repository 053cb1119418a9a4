"""hfserver against the real huggingface_hub client (metadata, download, errors) and raw HTTP (ranges, knobs)."""

import hashlib
import http.client
import json
import os
import time

import pytest

from testbed import hfserver

REPO = "org/model-GGUF"
NAME = "m.gguf"


@pytest.fixture
def root(tmp_path):
    d = tmp_path / "hf" / "org" / "model-GGUF"
    d.mkdir(parents=True)
    data = os.urandom(300_000)
    (d / NAME).write_bytes(data)
    return tmp_path / "hf", data


@pytest.fixture
def server(root):
    srv, _ = hfserver.start(str(root[0]))
    yield srv, root[1]
    srv.shutdown()
    srv.server_close()


def request(srv, method, path, headers=None):
    host, port = srv.server_address[:2]
    c = http.client.HTTPConnection(host, port, timeout=10)
    c.request(method, path, headers=headers or {})
    r = c.getresponse()
    body = r.read()
    c.close()
    return r, body


def test_metadata_and_download_with_real_huggingface_hub(server, tmp_path, monkeypatch):
    srv, data = server
    from huggingface_hub import file_download as fd
    from huggingface_hub import hf_hub_url
    m = fd.get_hf_file_metadata(hf_hub_url(REPO, NAME, endpoint=srv.url))
    assert m.size == len(data)
    assert m.etag == hashlib.sha256(data).hexdigest()
    assert len(m.commit_hash) == 40
    # the resolved commit serves the same file; a download through the library gets the same bytes
    m2 = fd.get_hf_file_metadata(hf_hub_url(REPO, NAME, revision=m.commit_hash, endpoint=srv.url))
    assert m2.commit_hash == m.commit_hash
    p = fd.hf_hub_download(REPO, NAME, local_dir=str(tmp_path / "out"), endpoint=srv.url)
    assert open(p, "rb").read() == data


def test_errors_map_to_the_libraries_exceptions(server):
    srv, _ = server
    from huggingface_hub import file_download as fd
    from huggingface_hub import hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    with pytest.raises(EntryNotFoundError):
        fd.get_hf_file_metadata(hf_hub_url(REPO, "nope.gguf", endpoint=srv.url))
    with pytest.raises(RevisionNotFoundError):
        fd.get_hf_file_metadata(hf_hub_url(REPO, NAME, revision="0" * 40, endpoint=srv.url))
    with pytest.raises(RepositoryNotFoundError):
        fd.get_hf_file_metadata(hf_hub_url("org/absent", NAME, endpoint=srv.url))


def test_ranges(server):
    srv, data = server
    path = f"/{REPO}/resolve/main/{NAME}"
    r, body = request(srv, "GET", path, {"Range": "bytes=1000-"})
    assert r.status == 206 and body == data[1000:]
    assert r.getheader("Content-Range") == f"bytes 1000-{len(data) - 1}/{len(data)}"
    r, body = request(srv, "GET", path, {"Range": "bytes=10-19"})
    assert r.status == 206 and body == data[10:20]
    r, body = request(srv, "GET", path, {"Range": "bytes=-5"})
    assert body == data[-5:]
    r, body = request(srv, "GET", path, {"Range": f"bytes={len(data)}-"})
    assert r.status == 416 and body == b""
    r, _ = request(srv, "HEAD", path)
    assert r.getheader("Accept-Ranges") == "bytes" and int(r.getheader("X-Linked-Size")) == len(data)
    assert int(r.getheader("Content-Length")) == len(data)


def test_commit_follows_content(root):
    d, _ = root
    srv, _ = hfserver.start(str(d))
    try:
        r1, _ = request(srv, "HEAD", f"/{REPO}/resolve/main/{NAME}")
        c1 = r1.getheader("X-Repo-Commit")
        (d / "org" / "model-GGUF" / NAME).write_bytes(b"other content")
        r2, _ = request(srv, "HEAD", f"/{REPO}/resolve/main/{NAME}")
        assert r2.getheader("X-Repo-Commit") != c1
        r3, _ = request(srv, "HEAD", f"/{REPO}/resolve/{c1}/{NAME}")
        assert r3.status == 404 and r3.getheader("X-Error-Code") == "RevisionNotFound"
    finally:
        srv.shutdown()
        srv.server_close()


def test_corrupt_flips_one_byte_and_keeps_the_advertised_hash(root):
    d, data = root
    srv, _ = hfserver.start(str(d), corrupt=hfserver.parse_corrupt([f"{REPO}/{NAME}@1234"]))
    try:
        r, body = request(srv, "GET", f"/{REPO}/resolve/main/{NAME}")
        diff = [i for i in range(len(data)) if body[i] != data[i]]
        assert diff == [1234]
        assert r.getheader("X-Linked-Etag").strip('"') == hashlib.sha256(data).hexdigest()
        _, tail = request(srv, "GET", f"/{REPO}/resolve/main/{NAME}", {"Range": "bytes=1000-"})
        assert tail[234] != data[1234] and tail[:234] == data[1000:1234]
    finally:
        srv.shutdown()
        srv.server_close()
    with pytest.raises(ValueError):
        hfserver.parse_corrupt(["nofile@3"])


def test_rate_limit_is_honoured(root):
    d, data = root
    srv, _ = hfserver.start(str(d), rate=1_000_000)
    try:
        t0 = time.monotonic()
        _, body = request(srv, "GET", f"/{REPO}/resolve/main/{NAME}")
        dt = time.monotonic() - t0
        assert body == data
        assert 0.29 <= dt < 1.5, dt   # 300 kB at 1 MB/s
    finally:
        srv.shutdown()
        srv.server_close()


def test_token_and_request_log(root, tmp_path):
    d, data = root
    log = tmp_path / "req.jsonl"
    srv, _ = hfserver.start(str(d), token="s3cret", log=str(log))
    try:
        r, _ = request(srv, "HEAD", f"/{REPO}/resolve/main/{NAME}")
        assert r.status == 401
        r, body = request(srv, "GET", f"/{REPO}/resolve/main/{NAME}", {"Authorization": "Bearer s3cret"})
        assert r.status == 200 and body == data
    finally:
        srv.shutdown()
        srv.server_close()
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["status"] for x in lines] == [401, 200]
    assert lines[1]["sent"] == len(data)
    assert "s3cret" not in log.read_text()


def test_api_model_info_and_paths_info(server):
    srv, data = server
    from huggingface_hub import HfApi
    api = HfApi(endpoint=srv.url)
    info = api.model_info(REPO, files_metadata=True)
    assert [s.rfilename for s in info.siblings] == [NAME]
    assert info.siblings[0].lfs.sha256 == hashlib.sha256(data).hexdigest()
    (f,) = api.get_paths_info(REPO, [NAME], expand=True)
    assert f.size == len(data) and f.lfs.sha256 == hashlib.sha256(data).hexdigest()


def test_cli_refuses_a_missing_root(tmp_path, capsys):
    assert hfserver.main(["--root", str(tmp_path / "absent")]) == 2
