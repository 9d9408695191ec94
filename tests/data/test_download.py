"""Downloads against a local HTTP server: failing mirrors, corrupt files, cut transfers, resumption."""

import hashlib
import io
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cnnlab.cli import main
from cnnlab.data import download as download_module
from cnnlab.data.download import DATASETS, RemoteDataset, RemoteFile, download, fetch
from cnnlab.data.sources import all_sources, get_source, load_splits
from cnnlab.errors import CnnlabError
from tests.conftest import write_mnist_folder

PAYLOAD = bytes(range(256)) * 400  # 102,400 bytes
GOOD = RemoteFile("blob.bin", hashlib.sha256(PAYLOAD).hexdigest(), len(PAYLOAD))


class Server:
    """Serves `routes`: path -> (behaviour, body). Behaviours: ok, corrupt, cut (half, then hang up), 404.
    Every request's path and Range header is recorded in `requests`."""

    def __init__(self):
        self.routes = {}
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                behaviour, body = server.routes.get(self.path, ("404", b""))
                if behaviour == "404":
                    self.send_error(404)
                    return
                if behaviour == "corrupt":
                    body = body[:-1] + bytes([body[-1] ^ 1])
                asked = re.match(r"bytes=(\d+)-", self.headers.get("Range") or "")
                start = int(asked.group(1)) if asked else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if behaviour == "cut" and not start:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def mirror(self, name):
        return f"{self.base}/{name}/"


@pytest.fixture
def server():
    server = Server()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture
def refused_url():
    """A URL on a port nothing listens on: connection refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_refused_and_missing_mirrors_are_skipped_for_the_next(server, refused_url, tmp_path):
    server.routes["/good/blob.bin"] = ("ok", PAYLOAD)
    target = tmp_path / "blob.bin"
    fetch(GOOD, [refused_url + "blob.bin", server.mirror("missing") + "blob.bin", server.mirror("good") + "blob.bin"],
          target, io.StringIO())  # fmt: skip
    assert target.read_bytes() == PAYLOAD
    assert leftovers(tmp_path) == ["blob.bin"]


def test_a_corrupt_file_is_dropped_and_the_next_mirror_used(server, tmp_path):
    server.routes["/bad/blob.bin"] = ("corrupt", PAYLOAD)
    server.routes["/good/blob.bin"] = ("ok", PAYLOAD)
    urls = [server.mirror("bad") + "blob.bin", server.mirror("good") + "blob.bin"]
    fetch(GOOD, urls, tmp_path / "blob.bin", io.StringIO())
    assert (tmp_path / "blob.bin").read_bytes() == PAYLOAD and leftovers(tmp_path) == ["blob.bin"]


def test_only_corrupt_mirrors_leave_nothing_behind(server, tmp_path):
    server.routes["/bad/blob.bin"] = ("corrupt", PAYLOAD)
    with pytest.raises(CnnlabError, match="SHA-256 does not match"):
        fetch(GOOD, [server.mirror("bad") + "blob.bin"], tmp_path / "blob.bin", io.StringIO())
    assert leftovers(tmp_path) == []


def test_a_cut_transfer_is_continued_with_a_range_request(server, tmp_path):
    server.routes["/cut/blob.bin"] = ("cut", PAYLOAD)
    fetch(GOOD, [server.mirror("cut") + "blob.bin"], tmp_path / "blob.bin", io.StringIO())
    assert (tmp_path / "blob.bin").read_bytes() == PAYLOAD
    assert server.requests == [("/cut/blob.bin", None), ("/cut/blob.bin", f"bytes={len(PAYLOAD) // 2}-")]
    assert leftovers(tmp_path) == ["blob.bin"]


def test_a_partial_file_from_an_earlier_run_is_continued(server, tmp_path):
    server.routes["/good/blob.bin"] = ("ok", PAYLOAD)
    (tmp_path / ".blob.bin.part").write_bytes(PAYLOAD[:1000])
    fetch(GOOD, [server.mirror("good") + "blob.bin"], tmp_path / "blob.bin", io.StringIO())
    assert server.requests == [("/good/blob.bin", "bytes=1000-")]
    assert (tmp_path / "blob.bin").read_bytes() == PAYLOAD and leftovers(tmp_path) == ["blob.bin"]


def test_a_wrong_partial_file_is_thrown_away_and_the_file_fetched_whole(server, tmp_path):
    server.routes["/good/blob.bin"] = ("ok", PAYLOAD)
    (tmp_path / ".blob.bin.part").write_bytes(b"x" * 1000)
    fetch(GOOD, [server.mirror("good") + "blob.bin"], tmp_path / "blob.bin", io.StringIO())
    assert [r[1] for r in server.requests] == ["bytes=1000-", None]
    assert (tmp_path / "blob.bin").read_bytes() == PAYLOAD


def test_a_file_already_there_is_not_fetched_again(server, tmp_path):
    (tmp_path / "blob.bin").write_bytes(PAYLOAD)
    fetch(GOOD, [server.mirror("good") + "blob.bin"], tmp_path / "blob.bin", io.StringIO())
    assert server.requests == []


def test_a_server_sending_too_much_is_refused(server, tmp_path):
    server.routes["/big/blob.bin"] = ("ok", PAYLOAD + b"extra")
    with pytest.raises(CnnlabError, match="sends 102,405 bytes, but blob.bin has 102,400"):
        fetch(GOOD, [server.mirror("big") + "blob.bin"], tmp_path / "blob.bin", io.StringIO())
    assert leftovers(tmp_path) == []


def test_when_every_mirror_fails_one_line_says_what_and_where_to_put_the_files(server, refused_url, tmp_path):
    with pytest.raises(CnnlabError) as error:
        download("mnist", tmp_path, mirrors=[refused_url, server.mirror("nothing")], stream=io.StringIO())
    message = str(error.value)
    assert "\n" not in message
    assert "could not download train-images-idx3-ubyte.gz" in message and "HTTP 404" in message
    assert refused_url in message and "refused" in message.lower()
    assert f"yourself from https://ossci-datasets.s3.amazonaws.com/mnist/ into {tmp_path / 'mnist'}" in message
    assert "t10k-labels-idx1-ubyte.gz" in message
    assert leftovers(tmp_path / "mnist") == []


def test_the_command_line_downloads_into_the_data_dir(server, tmp_path, monkeypatch, capsys):
    """`cnnlab datasets --download mnist` from a CNNLAB_MIRRORS server, then train-ready."""
    write_mnist_folder(tmp_path / "served" / "mnist")
    files = []
    for path in sorted((tmp_path / "served" / "mnist").iterdir()):
        data = path.read_bytes()
        server.routes[f"/mirror/mnist/{path.name}"] = ("ok", data)
        files.append(RemoteFile(path.name, hashlib.sha256(data).hexdigest(), len(data)))
    monkeypatch.setitem(DATASETS, "mnist", RemoteDataset("mnist", ("https://unused.invalid/",), tuple(files)))
    monkeypatch.setenv("CNNLAB_MIRRORS", f"{server.base}/nowhere, {server.base}/mirror/")
    data_dir = tmp_path / "data"
    assert main(["datasets", "--download", "mnist", "--data-dir", str(data_dir)]) == 0
    assert f"mnist is ready in {data_dir / 'mnist'}" in capsys.readouterr().out
    assert leftovers(data_dir / "mnist") == sorted(f.name for f in files)
    assert len(load_splits("mnist", data_dir, 0.1, 0).test) == 20


def test_the_command_line_reports_a_failed_download_in_one_line(refused_url, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CNNLAB_MIRRORS", refused_url)
    assert main(["datasets", "--download", "kmnist", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cnnlab: error: could not download"), err
    assert "/kmnist/train-images-idx3-ubyte.gz" in err


def test_unknown_datasets_cannot_be_downloaded(tmp_path):
    with pytest.raises(CnnlabError, match="cannot download 'digits': choose one of mnist, fashion-mnist"):
        download("digits", tmp_path)


def test_every_downloadable_source_lists_the_files_it_downloads():
    for name, dataset in DATASETS.items():
        source = get_source(name)
        expected = tuple(f"{n}.gz" if n.endswith("ubyte") else n for n in source.files)
        assert tuple(f.name for f in dataset.files) == expected
        assert f"cnnlab datasets --download {name}" in source.how_to_get
        for file in dataset.files:
            assert re.fullmatch(r"[0-9a-f]{64}", file.sha256) and file.size > 0
        assert all(m.startswith(("https://", "http://")) and m.endswith("/") for m in dataset.mirrors)
    assert {s.name for s in all_sources() if s.files} == set(DATASETS)


def test_datasets_lists_the_new_sources_and_how_to_get_them(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("cnnlab.data.sources.SYSTEM_DATA_DIR", tmp_path / "system")
    assert main(["datasets", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("kmnist", "cifar10", "cifar100"):
        assert f"or run `cnnlab datasets --download {name}`" in out
    assert "folder:PATH" in out


def test_progress_is_one_line_per_file_off_a_terminal(server, tmp_path):
    server.routes["/good/blob.bin"] = ("ok", PAYLOAD)
    stream = io.StringIO()
    fetch(GOOD, [server.mirror("good") + "blob.bin"], tmp_path / "blob.bin", stream)
    assert stream.getvalue() == f"blob.bin: 102,400 of 102,400 bytes from {server.mirror('good')}blob.bin\n"
    assert download_module.TIMEOUT_S > 0
