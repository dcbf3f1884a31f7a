"""Atomic writes: the content lands whole, and no temporary file is ever left behind."""

import json
import threading

import pytest

from sbtemplate import atomic_write


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_text_bytes_and_json_are_written(tmp_path):
    atomic_write.write_text(tmp_path / "a.txt", "héllo\n")
    atomic_write.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic_write.write_json(tmp_path / "sub" / "c.json", {"b": 1, "a": [1, 2]}, sort_keys=True)
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    text = (tmp_path / "sub" / "c.json").read_text()
    assert text.endswith("\n") and text.index('"a"') < text.index('"b"')
    assert json.loads(text) == {"a": [1, 2], "b": 1}
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "sub") == []


def test_replaces_previous_content(tmp_path):
    target = tmp_path / "r.json"
    atomic_write.write_json(target, [1])
    atomic_write.write_json(target, [2])
    assert json.loads(target.read_text()) == [2]
    assert leftovers(tmp_path) == []


def test_unserialisable_json_keeps_the_previous_content(tmp_path):
    target = tmp_path / "r.json"
    atomic_write.write_json(target, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write.write_json(target, {"ok": True, "bad": object()})
    assert json.loads(target.read_text()) == {"ok": True}
    assert leftovers(tmp_path) == []


def test_failure_half_way_through_a_stream_keeps_the_previous_content(tmp_path):
    target = tmp_path / "rows.csv"
    atomic_write.write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_write.replacing(target) as handle:
            handle.write("new, half")
            handle.flush()
            assert leftovers(tmp_path)  # the half-written data is in the temp file only
            raise RuntimeError("writer failed")
    assert target.read_text() == "old\n"
    assert leftovers(tmp_path) == []


def test_temporary_names_differ_between_threads(tmp_path):
    names = []
    thread = threading.Thread(target=lambda: names.append(atomic_write.temporary_name("x")))
    thread.start()
    thread.join()
    assert names[0] != atomic_write.temporary_name("x")


def test_concurrent_writers_each_land_whole(tmp_path):
    target = tmp_path / "shared.json"
    payloads = [{"writer": k, "data": [k] * 20000} for k in range(8)]
    errors = []

    def write(payload):
        try:
            for _ in range(5):
                atomic_write.write_json(target, payload)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert json.loads(target.read_text()) in payloads
    assert leftovers(tmp_path) == []
