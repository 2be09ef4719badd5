"""The dataset registry's downloads: a local HTTP server serves archives built here, and the
registry's expected size and sha256 are pointed at them. No test touches the network."""

import hashlib
import http.server
import io
import socket
import stat
import threading
import zipfile

import numpy as np
import pytest

from jaxcf import config as cfg
from jaxcf.cli.train import main as train_main
from jaxcf.data import DataError, registry
from jaxcf.data.download import Archive
from jaxcf.serving.inference import load_model

# (user, item, rating) rows shared by every fake archive: 10 users x 4 items, half stars.
ROWS = [(user, item, (user * 7 + item // 10) % 10 / 2 + 0.5) for user in range(1, 11) for item in (10, 20, 30, 40)]


def ml1m_style(folder="ml-1m", movies_encoding="latin-1"):
    """``::``-separated ratings.dat and movies.dat (with a non-ASCII title)."""
    ratings = "".join(f"{u}::{i}::{r:g}::97830076{k % 10}\n" for k, (u, i, r) in enumerate(ROWS))
    movies = "10::Café Society (1995)::Drama\n20::Star Wars: Episode IV (1977)::Sci-Fi\n30::Heat (1995)::Action\n"
    movies += "40::Toy Story (1995)::Animation|Children's\n"
    return {f"{folder}/ratings.dat": ratings.encode(), f"{folder}/movies.dat": movies.encode(movies_encoding)}


def csv_style(folder):
    ratings = "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r:g},1\n" for u, i, r in ROWS)
    movies = 'movieId,title,genres\n10,"Café Society, The (1995)",Drama\n20,Star Wars (1977),Sci-Fi\n'
    movies += "30,Heat (1995),Action\n40,Toy Story (1995),Animation\n"
    return {f"{folder}/ratings.csv": ratings.encode(), f"{folder}/movies.csv": movies.encode("utf-8")}


def build_zip(members, links=()):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, payload in members.items():
            bundle.writestr(name, payload)
        for name, target in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            bundle.writestr(info, target)
    return buffer.getvalue()


class Server:
    """http.server on 127.0.0.1 in a thread; ``files`` maps URL paths to bytes."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.truncate: set[str] = set()
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                payload = server.files.get(self.path)
                if payload is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.path in server.truncate:
                    # Half the body, then the connection closes: an interrupted download.
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch, tmp_path):
    srv = Server()
    monkeypatch.setenv("JAXCF_DATA_URL", srv.url)
    monkeypatch.setenv("JAXCF_DATA", str(tmp_path / "cache"))
    yield srv
    srv.close()


def serve(server, monkeypatch, name, payload, *, size=None, sha256=None):
    """Serves ``payload`` as the archive of dataset ``name`` and makes the registry expect it."""
    archive = registry.ARCHIVES[name]
    server.files[f"/{archive.filename}"] = payload
    expected = Archive(
        archive.name, archive.filename, archive.folder,
        len(payload) if size is None else size,
        hashlib.sha256(payload).hexdigest() if sha256 is None else sha256,
    )
    monkeypatch.setitem(registry.ARCHIVES, name, expected)
    return expected


def load(name, **overrides):
    return registry.load(cfg.DataConfig(name=name, **overrides), seed=0)


def cache_listing(tmp_path):
    cache = tmp_path / "cache"
    return sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*")) if cache.exists() else []


def check_ratings(dataset):
    r = dataset.ratings
    raw = list(zip(r.user_ids.raw[r.users].tolist(), r.item_ids.raw[r.items].tolist(), r.ratings.tolist()))
    assert raw == [(u, i, float(x)) for u, i, x in ROWS]
    assert len(dataset.split.train) + len(dataset.split.valid) == len(ROWS)


# ------------------------------------------------------------------------------ formats


@pytest.mark.parametrize(
    "name, members, title_10",
    [
        ("ml-1m", ml1m_style(), "Café Society (1995)"),
        ("ml-10m", ml1m_style("ml-10M100K", "utf-8"), "Café Society (1995)"),
        ("ml-latest-small-2018", csv_style("ml-latest-small"), "Café Society, The (1995)"),
        ("ml-20m", csv_style("ml-20m"), "Café Society, The (1995)"),
        ("ml-25m", csv_style("ml-25m"), "Café Society, The (1995)"),
    ],
)
def test_each_release_is_parsed_in_its_own_format(name, members, title_10, server, monkeypatch, tmp_path):
    serve(server, monkeypatch, name, build_zip(members))
    dataset = load(name)
    check_ratings(dataset)
    assert dataset.titles[10] == title_10 and dataset.titles[20].startswith("Star Wars")
    assert dataset.ratings.source == name
    assert server.requests == [f"/{registry.ARCHIVES[name].filename}"]
    files = cache_listing(tmp_path)
    assert f"{name}.zip" in files and not any(p.split("/")[-1].startswith(".") for p in files)


def test_second_load_uses_the_cache_without_a_request(server, monkeypatch, tmp_path):
    serve(server, monkeypatch, "ml-1m", build_zip(ml1m_style()))
    first = load("ml-1m")
    assert len(server.requests) == 1
    second = load("ml-1m")
    assert len(server.requests) == 1
    np.testing.assert_array_equal(first.ratings.ratings, second.ratings.ratings)
    assert first.ratings.sha256 == second.ratings.sha256


def test_a_downloaded_dataset_trains_end_to_end(server, monkeypatch, tmp_path, capsys):
    serve(server, monkeypatch, "ml-1m", build_zip(ml1m_style()))
    workdir = tmp_path / "run"
    args = ["--workdir", str(workdir), "--quiet", "--set", "data.name=ml-1m", "train.epochs=1", "train.batch_size=4"]
    assert train_main(args) == 0
    model = load_model(workdir)
    assert (model.num_users, model.num_items) == (10, 4)
    assert model.title(10) == "Café Society (1995)"


def test_downloaded_datasets_have_no_predefined_split(server, monkeypatch):
    serve(server, monkeypatch, "ml-1m", build_zip(ml1m_style()))
    with pytest.raises(DataError, match="ml-1m has no predefined splits"):
        load("ml-1m", split="u1")


def test_unknown_names_list_every_dataset():
    with pytest.raises(DataError) as err:
        load("ml-32m")
    for name in ("ml-latest-small", "ml-latest-small-2018", "ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m"):
        assert name in str(err.value)


# ------------------------------------------------------------------------------ failures


def test_checksum_mismatch_leaves_nothing_in_the_cache(server, monkeypatch, tmp_path):
    serve(server, monkeypatch, "ml-1m", build_zip(ml1m_style()), sha256="0" * 64)
    with pytest.raises(DataError, match="sha256 .*expected 0000.*the download was deleted") as err:
        load("ml-1m")
    assert "\n" not in str(err.value)
    assert cache_listing(tmp_path) == []


def test_size_mismatch_is_refused(server, monkeypatch, tmp_path):
    payload = build_zip(ml1m_style())
    serve(server, monkeypatch, "ml-1m", payload, size=len(payload) + 1)
    with pytest.raises(DataError, match=f"size {len(payload)} bytes, expected {len(payload) + 1}"):
        load("ml-1m")
    assert cache_listing(tmp_path) == []


def test_interrupted_download_leaves_nothing_that_looks_complete(server, monkeypatch, tmp_path):
    serve(server, monkeypatch, "ml-1m", build_zip(ml1m_style()))
    server.truncate.add("/ml-1m.zip")
    with pytest.raises(DataError, match="broke off"):
        load("ml-1m")
    assert cache_listing(tmp_path) == []
    # The next attempt, with a healthy server, completes.
    server.truncate.clear()
    check_ratings(load("ml-1m"))


def test_http_error_names_the_url(server, monkeypatch, tmp_path):
    serve(server, monkeypatch, "ml-1m", build_zip(ml1m_style()))
    server.files.clear()
    with pytest.raises(DataError, match=r"cannot download http://127\.0\.0\.1:\d+/ml-1m\.zip: HTTP 404"):
        load("ml-1m")
    assert cache_listing(tmp_path) == []


def _closed_port_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_offline_error_names_the_url_and_where_to_put_the_archive(monkeypatch, tmp_path):
    url = _closed_port_url()
    monkeypatch.setenv("JAXCF_DATA_URL", url)
    monkeypatch.setenv("JAXCF_DATA", str(tmp_path / "cache"))
    with pytest.raises(DataError) as err:
        load("ml-25m")
    message = str(err.value)
    assert f"{url}/ml-25m.zip" in message and str(tmp_path / "cache" / "ml-25m.zip") in message
    assert "\n" not in message
    assert cache_listing(tmp_path) == []


def test_archive_put_in_the_cache_by_hand_is_verified_and_used_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXCF_DATA_URL", _closed_port_url())
    monkeypatch.setenv("JAXCF_DATA", str(tmp_path / "cache"))
    payload = build_zip(ml1m_style())
    archive = registry.ARCHIVES["ml-1m"]
    monkeypatch.setitem(
        registry.ARCHIVES, "ml-1m",
        Archive("ml-1m", archive.filename, archive.folder, len(payload), hashlib.sha256(payload).hexdigest()),
    )
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "ml-1m.zip").write_bytes(payload)
    check_ratings(load("ml-1m"))
    # A wrong file put there is refused (and left for the user to replace).
    monkeypatch.setitem(registry.ARCHIVES, "ml-1m", Archive("ml-1m", archive.filename, archive.folder, None, "1" * 64))
    (tmp_path / "cache" / "ml-1m").rename(tmp_path / "moved")
    with pytest.raises(DataError, match="not the official ml-1m.zip: delete it"):
        load("ml-1m")


@pytest.mark.parametrize(
    "extra, links",
    [
        ({"ml-1m/../../evil.txt": b"x"}, ()),
        ({"../evil.txt": b"x"}, ()),
        ({"ABSOLUTE/evil-absolute.txt": b"x"}, ()),
        ({"ml-1m\\..\\..\\evil.txt": b"x"}, ()),
        ({}, [("ml-1m/link", "/etc/passwd")]),
    ],
    ids=["dotdot-inside", "dotdot", "absolute", "backslash", "symlink"],
)
def test_hostile_archives_are_refused_before_writing(extra, links, server, monkeypatch, tmp_path):
    # An absolute member names a place inside tmp_path, so that a failure would show below.
    extra = {name.replace("ABSOLUTE", str(tmp_path)): payload for name, payload in extra.items()}
    members = {**ml1m_style(), **extra}
    payload = build_zip(members, links)
    with zipfile.ZipFile(io.BytesIO(payload)) as bundle:  # the hostile name really is in the zip
        assert set(extra) | {name for name, _ in links} <= set(bundle.namelist())
    serve(server, monkeypatch, "ml-1m", payload)
    with pytest.raises(DataError, match="refusing to extract"):
        load("ml-1m")
    assert cache_listing(tmp_path) == []
    assert not list(tmp_path.rglob("evil*")) and not (tmp_path / "cache" / "ml-1m").exists()


def test_archive_without_the_expected_folder(server, monkeypatch, tmp_path):
    serve(server, monkeypatch, "ml-1m", build_zip(ml1m_style("something-else")))
    with pytest.raises(DataError, match="has no ml-1m/ folder"):
        load("ml-1m")
    assert cache_listing(tmp_path) == []


def test_bundled_datasets_need_no_network(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXCF_DATA_URL", _closed_port_url())
    monkeypatch.setenv("JAXCF_DATA", str(tmp_path / "cache"))
    assert len(load("ml-latest-small").ratings) == 100_004
    dataset = load("ml-100k", split="ua")
    assert (len(dataset.split.train), len(dataset.split.test)) == (90_570, 9_430)
    assert cache_listing(tmp_path) == []
