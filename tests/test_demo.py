"""Where the demo's photos come from: a given folder, a shared copy, or a one-time download."""

import functools
import http.server
import threading
import zipfile

import pytest
from conftest import copy_subset, shared

from pyimagesearch_tl import demo
from pyimagesearch_tl.errors import DatasetError


def test_given_folder_wins_and_a_missing_one_is_an_error(tmp_path):
    assert demo.resolve_demo_data(tmp_path) == tmp_path
    with pytest.raises(DatasetError, match="does not exist"):
        demo.resolve_demo_data(tmp_path / "nope")


def test_shared_copy_is_used_when_present(monkeypatch):
    folder = shared("cats_and_dogs_filtered")
    monkeypatch.setattr(demo, "SHARED_LOCATIONS", (str(folder.parent),))
    assert demo.resolve_demo_data() == folder


@pytest.fixture
def archive_server(tmp_path):
    """A local HTTP server offering a small cats_and_dogs_filtered.zip made of real photos."""
    photos = copy_subset(shared("cats_and_dogs_filtered"), tmp_path / "src" / "cats_and_dogs_filtered", 2)
    served = tmp_path / "served"
    served.mkdir()
    with zipfile.ZipFile(served / "cats_and_dogs_filtered.zip", "w") as archive:
        for path in sorted(photos.rglob("*.jpg")):
            archive.write(path, path.relative_to(photos.parent))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_once_into_the_cache(archive_server, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "SHARED_LOCATIONS", ())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "DEMO_URL", f"{archive_server}/cats_and_dogs_filtered.zip")
    folder = demo.resolve_demo_data()
    assert folder == tmp_path / "cache" / "pyimagesearch_tl" / "datasets" / "cats_and_dogs_filtered"
    assert len(list(folder.glob("*/*/*.jpg"))) == 8
    monkeypatch.setattr(demo, "DEMO_URL", f"{archive_server}/gone.zip")  # the cached copy is reused
    assert demo.resolve_demo_data() == folder


def test_failed_download_is_a_clear_error(archive_server, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "SHARED_LOCATIONS", ())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "DEMO_URL", f"{archive_server}/missing.zip")
    with pytest.raises(DatasetError, match="could not download .*missing.zip.*DATA=DIR"):
        demo.resolve_demo_data()
    assert not list((tmp_path / "cache").rglob("*.partial"))
