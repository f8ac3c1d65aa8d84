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


def test_outputs_and_their_metrics_never_disagree(tmp_path):
    target, metrics = tmp_path / "data", tmp_path / "metrics.json"
    with atomic_dir(target) as tmp:
        (tmp / "rows").write_text("old")
    write_text_atomic(metrics, "old metrics")
    try:  # a failure before the output lands leaves both as they were
        with atomic_dir(target, stale=metrics) as tmp:
            (tmp / "rows").write_text("new")
            raise OSError("disk full")
    except OSError:
        pass
    assert (target / "rows").read_text() == "old" and metrics.read_text() == "old metrics"
    # once the new output lands, the old metrics are gone: a failure before the new ones are
    # written leaves no metrics (DVC reruns the stage), never the old metrics beside new data
    with atomic_dir(target, stale=metrics) as tmp:
        (tmp / "rows").write_text("new")
    assert (target / "rows").read_text() == "new" and not metrics.exists()


def test_outputs_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "data") as tmp:
            (tmp / "rows").write_text("x")
        write_text_atomic(tmp_path / "metrics.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "data").stat().st_mode & 0o777 == 0o755  # tempfile would make it 0700
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o644  # and this 0600
