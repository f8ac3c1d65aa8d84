"""The flow runs' workspaces (flows/workspace.py): started from the checkout as it is, kept for the
next run of the same experiment, reset when the checkout changed, held by one run at a time."""

import pytest

from flows.workspace import RUNS, WorkspaceBusy, check_experiment_name, dvc, git, run_workspace
from tests.conftest import make_clone


def test_a_workspace_starts_from_the_checkout_as_it_is_and_leaves_it_untouched(tmp_path):
    repo = make_clone(tmp_path / "repo")
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text() + "# edited\n")  # uncommitted
    (repo / "notes.txt").write_text("new file")  # untracked, not ignored
    (repo / "README.md").unlink()  # deleted
    (repo / "checkpoints/sft/checkpoint-2").mkdir(parents=True)
    (repo / "checkpoints/sft/checkpoint-2/adapter.bin").write_bytes(b"weights")
    dvc(repo, "remote", "add", "--local", "-d", "storage", str(tmp_path / "remote"))
    status = git(repo, "status", "--porcelain")
    log: list[str] = []
    with run_workspace(repo, "first", log.append) as ws:
        assert ws == repo / RUNS / "first"
        assert git(ws, "rev-parse", "HEAD") == git(repo, "rev-parse", "HEAD")
        assert (ws / "params.yaml").read_text().endswith("# edited\n")
        assert (ws / "notes.txt").read_text() == "new file" and not (ws / "README.md").exists()
        checkpoint = ws / "checkpoints/sft/checkpoint-2/adapter.bin"
        assert checkpoint.read_bytes() == b"weights"
        assert checkpoint.stat().st_ino == (repo / "checkpoints/sft/checkpoint-2/adapter.bin").stat().st_ino  # linked
        assert dvc(ws, "cache", "dir").stdout.strip() == str(repo / ".dvc/cache")
        assert "storage" in dvc(ws, "remote", "list").stdout
        (ws / "params.yaml").write_text("run's own\n")
        (ws / "dvc.lock").write_text("run's own\n")
        with pytest.raises(WorkspaceBusy, match="experiment 'first' is already running"):
            with run_workspace(repo, "first", log.append):
                pass
    assert any("starting the run workspace" in line for line in log)
    assert git(repo, "status", "--porcelain") == status and not (repo / "dvc.lock").read_text().startswith("run's")
    # the same checkout state: the next run continues where this one stopped
    with run_workspace(repo, "first", log.append) as ws:
        assert (ws / "dvc.lock").read_text() == "run's own\n"
    assert log[-1].startswith("continuing in the run workspace")
    # the checkout changed: the workspace is reset to its new state
    (repo / "notes.txt").write_text("changed")
    with run_workspace(repo, "first", log.append) as ws:
        assert (ws / "notes.txt").read_text() == "changed"
        assert (ws / "dvc.lock").read_bytes() == (repo / "dvc.lock").read_bytes()
    assert sorted(p.name for p in (repo / RUNS).iterdir() if p.is_dir()) == ["first"]


@pytest.mark.parametrize("name", ["a b", "a/b", "a..b", "x~1", "x.lock", ""])
def test_experiment_names_git_cannot_store_are_refused(name):
    with pytest.raises(ValueError, match="is not valid"):
        check_experiment_name(name)
