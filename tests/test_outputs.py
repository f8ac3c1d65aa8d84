"""Atomic outputs: a killed writer's temporary folders are cleaned up by the next writer."""

import os
import subprocess

from stack_dpo.outputs import atomic_dir, write_text_atomic


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_next_writer_removes_what_a_killed_writer_left_and_keeps_a_live_ones(tmp_path):
    target = tmp_path / "raw"
    dead = dead_pid()
    stale_dir = tmp_path / f".raw.tmp-{dead}-abc"
    stale_old = tmp_path / f".raw.old-{dead}"
    live = tmp_path / f".raw.tmp-{os.getppid()}-xyz"
    stale_file = tmp_path / f".push.json.tmp-{dead}-q"
    for folder in (stale_dir, stale_old, live):
        folder.mkdir()
        (folder / "part-00000.parquet").write_text("partial")
    stale_file.write_text("{")
    with atomic_dir(target) as tmp:
        (tmp / "part-00000.parquet").write_text("whole")
    write_text_atomic(tmp_path / "push.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["raw", live.name, "push.json"])
    assert (target / "part-00000.parquet").read_text() == "whole"
