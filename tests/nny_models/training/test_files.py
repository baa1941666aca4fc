"""writing_dir: the folder is replaced as a whole on success and untouched when the writer fails."""

from __future__ import annotations

import pytest

import nny_models.training.files as files
from nny_models.training import writing_dir


def _write(dst, text):
    with writing_dir(dst) as tmp:
        (tmp / "a.txt").write_text(text)
        (tmp / f"only_{text}.txt").write_text(text)


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_as_a_whole_with_and_without_renameat2(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(files, "exchange_dirs", lambda a, b: False)  # a file system without RENAME_EXCHANGE
    dst = tmp_path / "model"
    _write(dst, "old")
    _write(dst, "new")
    assert sorted(p.name for p in dst.iterdir()) == ["a.txt", "only_new.txt"]  # nothing of the old export left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or .old folder left


def test_a_failing_writer_leaves_the_old_folder(tmp_path):
    dst = tmp_path / "model"
    _write(dst, "old")
    with pytest.raises(RuntimeError):
        with writing_dir(dst) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("disk full")
    assert (dst / "a.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_renameat2_exchange_is_used_here(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a")
    if not files.exchange_dirs(a, b):
        pytest.skip("this file system has no RENAME_EXCHANGE (the two-rename fallback is tested above)")
    assert (b / "x").read_text() == "a" and not (a / "x").exists()
