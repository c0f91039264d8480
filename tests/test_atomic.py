"""datamodules.atomic and datamodules.cache: a killed writer leaves no half file or folder, a
concurrent reader sees one whole version, cache names are stable digests."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from datamodules import atomic
from datamodules.cache import cache_name, digest
from datamodules.synthetic import SyntheticSpec

ROOT = Path(__file__).resolve().parents[1]
BIG = 2_000_000  # large enough that a write takes several system calls


def start_writer(code: str, *args: str) -> subprocess.Popen:
    """A Python process running ``code`` with this repository importable and ``argv[1:] = args``."""
    prelude = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from datamodules import atomic; "
    return subprocess.Popen(
        [sys.executable, "-c", prelude + code, *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def kill_when_ready(writer: subprocess.Popen) -> None:
    assert writer.stdout.readline().strip() == "ready"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)


# Stands in for the moment of the kill: the new content is complete but not yet renamed in.
HANG = "import os, time\ndef hang(*a, **k):\n    print('ready', flush=True); time.sleep(60)\n"


# --- files ---------------------------------------------------------------------------------------
def test_write_file_replaces_content_readable_as_the_umask_allows(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic.write_file(tmp_path / "sub" / "f.json", "one")
        atomic.write_file(path, b"two")
    finally:
        os.umask(old)
    assert path.read_bytes() == b"two"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # mkstemp's 0600 would hide a shared cache
    assert [p.name for p in path.parent.iterdir()] == ["f.json"]


def test_failed_file_write_keeps_old_content_and_leaves_nothing(tmp_path, monkeypatch):
    path = atomic.write_file(tmp_path / "f", "old")

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic.write_file(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f"]


def test_killed_file_writer_leaves_old_content_and_next_writer_cleans_up(tmp_path):
    path = atomic.write_file(tmp_path / "f", "old")
    writer = start_writer(HANG + "atomic.os.replace = hang; atomic.write_file(sys.argv[1], 'x' * 2_000_000)", str(path))
    kill_when_ready(writer)
    leftovers = [p for p in tmp_path.iterdir() if p != path]
    assert path.read_text() == "old"
    assert len(leftovers) == 1 and leftovers[0].stat().st_size == BIG  # the dead writer's staging file
    atomic.write_file(path, "new")
    assert path.read_text() == "new" and list(tmp_path.iterdir()) == [path]


def test_reader_never_sees_a_partial_file(tmp_path):
    path = atomic.write_file(tmp_path / "f", "a" * BIG)
    writer = start_writer("[atomic.write_file(sys.argv[1], c * 2_000_000) for _ in range(30) for c in 'ba']", str(path))
    reads = set()
    try:
        while writer.poll() is None:
            text = path.read_text()  # never missing, never short, never a mix
            assert len(text) == BIG and text in ("a" * BIG, "b" * BIG)
            reads.add(text[0])
    finally:
        writer.wait(timeout=120)
    assert writer.returncode == 0 and reads  # usually both versions were seen


# --- folders -------------------------------------------------------------------------------------
def fill_version(version: str):
    def fill(staging: Path) -> None:
        for name in ("a", "b"):
            (staging / name).write_text(version * BIG)

    return fill


def read_files(folder: Path) -> tuple[str, str]:
    return (folder / "a").read_text(), (folder / "b").read_text()


def read_version(folder: Path) -> str:
    a, b = read_files(folder)
    assert len(a) == len(b) == BIG and a == b, "a folder of two versions"
    return a[0]


def test_failed_fill_keeps_old_folder_and_leaves_nothing(tmp_path):
    folder = atomic.replace_folder(tmp_path / "c", fill_version("1"))

    def fail(staging: Path) -> None:
        (staging / "a").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic.replace_folder(folder, fail)
    assert read_version(folder) == "1" and [p.name for p in tmp_path.iterdir()] == ["c"]


def test_killed_folder_writer_leaves_old_folder_and_next_writer_cleans_up(tmp_path):
    folder = atomic.replace_folder(tmp_path / "c", fill_version("1"))
    writer = start_writer(
        HANG + "atomic.replace_folder(sys.argv[1], lambda s: ((s / 'a').write_text('2'), hang()))", str(folder)
    )
    kill_when_ready(writer)
    (staging,) = [p for p in tmp_path.iterdir() if p != folder]
    assert staging.name.startswith(".c.staging-") and (staging / "a").read_text() == "2"
    assert read_version(folder) == "1"
    assert not atomic.writer_active(folder)  # its writer is dead: readers need not wait for it
    atomic.replace_folder(folder, fill_version("3"))
    assert read_version(folder) == "3" and list(tmp_path.iterdir()) == [folder]


def test_reader_never_sees_a_partial_folder(tmp_path):
    folder = atomic.replace_folder(tmp_path / "c", fill_version("0"))
    writer = start_writer(
        "from pathlib import Path\n"
        "def fill(v):\n"
        "    return lambda s: [(s / n).write_text(v * 2_000_000) for n in 'ab']\n"
        "[atomic.replace_folder(Path(sys.argv[1]), fill(str(i % 10))) for i in range(1, 31)]",
        str(folder),
    )
    versions = []
    try:
        while writer.poll() is None:
            a, b = atomic.read_folder(folder, read_files, wait_s=30)
            assert len(a) == len(b) == BIG and a == b, "a folder of two versions"
            versions.append(a[0])
    finally:
        writer.wait(timeout=120)
    assert writer.returncode == 0 and versions
    assert read_version(folder) == "0"  # the 30th version (30 % 10)


def test_unwritable_parent_is_one_error(tmp_path):
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(atomic.UnwritableFolder) as info:
        atomic.replace_folder(tmp_path / "file" / "c", fill_version("1"))
    assert info.value.strerror and info.value.filename == str(tmp_path / "file")


# --- cache names ---------------------------------------------------------------------------------
def test_cache_names_are_digests_of_canonical_json():
    assert digest({"a": 1, "b": [2, 3]}) == digest({"b": [2, 3], "a": 1})
    assert cache_name("x", {"a": 1}) != cache_name("x", {"a": 2})
    assert cache_name("x", {"a": 1}, length=16).startswith("x-") and len(cache_name("x", {"a": 1}, length=16)) == 18
    # the names synthetic cohorts were cached under before the scheme was shared: still found
    assert SyntheticSpec().cache_key() == "synthetic-2000p-seed0-487eb9a6ae"
    assert SyntheticSpec(patients=40, seed=3, regimens=2).cache_key() == "synthetic-40p-seed3-a74c4b80c6"
