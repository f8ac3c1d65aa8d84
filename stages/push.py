"""push: models/merged -> the Hub repo push.repo_id, with its model card; reports/push.json.

Disabled in the default profile, and then the report says it skipped and why. The token comes
from HF_TOKEN or the Hub login (huggingface_hub finds either) and is never written anywhere.
"""

from __future__ import annotations

import json
import logging

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError

from stages.card import model_card
from stages.cli import main
from stages.outputs import write_json_atomic
from stages.params import InvalidInput, Params
from stages.paths import MERGED, METRICS, PUSH_REPORT

log = logging.getLogger("stages.push")


def push(params: Params) -> dict:
    if not params.push.repo_id:
        raise InvalidInput("params.yaml: push.repo_id is empty; set it to 'owner/name' to push")
    api = HfApi()
    try:
        user = api.whoami()["name"]
    except HfHubHTTPError as exc:
        status = exc.response.status_code
        raise RuntimeError(f"Hub login failed ({status}): set HF_TOKEN or run `hf auth login`") from None
    repo = api.create_repo(params.push.repo_id, private=params.push.private, exist_ok=True)
    card = model_card(params, json.loads((METRICS / "evaluate.json").read_text()))
    operations = [
        CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path))
        for path in sorted(MERGED.iterdir())
        if path.is_file() and path.name != "README.md"
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode()))
    commit = api.create_commit(
        repo.repo_id, operations, commit_message="stack-dpo: push models/merged",
        revision=params.push.revision, create_pr=params.push.create_pr,
    )
    log.info("pushed as %s to %s@%s: %s", user, repo.repo_id, params.push.revision, commit.commit_url)
    return {"pushed": True, "repo_id": repo.repo_id, "revision": params.push.revision, "commit": commit.oid,
            "pr_url": commit.pr_url}


def run(params: Params) -> dict:
    if params.push.enabled:
        record = push(params)
    else:
        record = {"pushed": False, "reason": "push.enabled is false in params.yaml (the default profile never pushes)"}
        log.info("skipped: %s", record["reason"])
    write_json_atomic(PUSH_REPORT, record)
    return record


if __name__ == "__main__":
    main(run)
