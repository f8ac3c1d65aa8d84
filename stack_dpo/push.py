"""Publishing models/merged on the Hub: the vetting of what may be pushed, the access check
before anything is uploaded, and the commit of the files and the model card."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

from stack_dpo.card import lineage_body, model_card, render_plots
from stack_dpo.faults import Unreachable, with_retries
from stack_dpo.params import InvalidInput, Params
from stack_dpo.paths import MERGED, METRICS

log = logging.getLogger("stack_dpo.push")


class PushError(InvalidInput):
    """The Hub refuses this push (credentials, ownership): retrying cannot help."""


def check_access(api: HfApi, repo_id: str) -> str:
    """The user name the token belongs to, after checking it may write to repo_id's namespace."""
    try:
        me = api.whoami()
    except LocalTokenNotFoundError:
        raise PushError("no Hub token: set HF_TOKEN or run `hf auth login`") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            raise PushError(f"the Hub at {api.endpoint} rejected the token (401): set a valid HF_TOKEN") from None
        if status is not None and (status >= 500 or status == 429):  # the Hub cannot serve now: retried
            raise Unreachable(f"the Hub at {api.endpoint} answered {status} to whoami") from None
        answer = f"answered {status}" if status is not None else f"failed without a response ({exc})"
        raise RuntimeError(f"the Hub at {api.endpoint} {answer} to whoami") from None  # the flow retries it
    except httpx2.HTTPError as exc:
        raise Unreachable(f"the Hub at {api.endpoint} is unreachable ({type(exc).__name__}); "
                          "check HF_ENDPOINT and the network") from None
    writable = {me["name"], *(org["name"] for org in me.get("orgs", []))}
    namespace = repo_id.split("/")[0]
    if namespace not in writable:
        raise PushError(f"push.repo_id {repo_id!r} belongs to {namespace!r}, and the token's user {me['name']!r} "
                        f"can write only to {sorted(writable)}")
    return me["name"]


def unvetted_reasons(params: Params, evaluation: dict, merge_metrics: dict) -> list[str]:
    """Why this model should not be published: a held-out accuracy that does not beat every
    baseline, or a merge gap beyond push.max_merge_accuracy_drop. Empty when it passed."""
    accuracy = evaluation["rewards/accuracies"]
    reasons = [f"held-out accuracy {accuracy:.3f} does not beat {key} = {value:.3f}"
               for key, value in sorted(evaluation.items()) if key.startswith("baseline/") and not accuracy > value]
    drop = merge_metrics.get("gap/accuracy_drop")
    if drop is None:
        reasons.append(f"{METRICS / 'merge.json'} has no merge gap; rerun `dvc repro merge`")
    elif drop > params.push.max_merge_accuracy_drop:
        reasons.append(f"merging lost {drop:.3f} of held-out accuracy (gap/accuracy_drop) > "
                       f"push.max_merge_accuracy_drop = {params.push.max_merge_accuracy_drop}")
    return reasons


def unvetted_note(reasons: list[str]) -> str:
    if not reasons:
        return ""
    return ("## Warning: pushed although it failed the pipeline's checks\n\n"
            "This model was pushed with `push.allow_unvetted: true`. It failed:\n\n"
            + "".join(f"- {reason}\n" for reason in reasons) + "\n")


def commit_message() -> str:
    return f"stack-dpo: {os.environ.get('DVC_EXP_NAME') or 'workspace run'} (models/merged)"


def push(params: Params) -> dict:
    settings = params.push
    if not settings.repo_id or "/" not in settings.repo_id:
        raise InvalidInput(f"params.yaml: push.repo_id = {settings.repo_id!r}; expected 'owner/name' to push")
    metrics = json.loads((METRICS / "evaluate.json").read_text())
    unvetted = unvetted_reasons(params, metrics, json.loads((METRICS / "merge.json").read_text()))
    if unvetted and not settings.allow_unvetted:
        raise InvalidInput("push refused: " + "; ".join(unvetted) + ". Set push.allow_unvetted: true to push "
                           "anyway (the model card then says which checks it failed)")
    api = HfApi()
    user = with_retries("push", lambda: check_access(api, settings.repo_id))
    return with_retries("push", lambda: upload(api, params, user, metrics, unvetted))


def upload(api: HfApi, params: Params, user: str, metrics: dict, unvetted: list[str]) -> dict:
    """models/merged, the plots and the card in one commit (huggingface_hub skips files the Hub has)."""
    settings = params.push
    repo = api.create_repo(settings.repo_id, private=settings.private, exist_ok=True)
    if settings.revision != constants.DEFAULT_REVISION and not settings.create_pr:
        api.create_branch(repo.repo_id, branch=settings.revision, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        plots = render_plots(Path(tmp))
        card = model_card(params, metrics, body=unvetted_note(unvetted) + lineage_body(params, plots), for_hub=True)
        operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p))
                      for p in sorted(MERGED.iterdir()) if p.is_file() and p.name != "README.md"]
        operations += [CommitOperationAdd(path_in_repo=f"plots/{name}", path_or_fileobj=str(Path(tmp) / name))
                       for _, name in plots]
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode()))
        head_before = api.repo_info(repo.repo_id, revision=settings.revision).sha
        commit = api.create_commit(repo.repo_id, operations, commit_message=commit_message(),
                                   revision=settings.revision, create_pr=settings.create_pr)
    new_commit = commit.oid != head_before
    log.info("%s %s@%s as %s: %s", "pushed" if new_commit else "unchanged, no new commit on", repo.repo_id,
             settings.revision, user, commit.oid)
    return {"pushed": True, "repo_id": repo.repo_id, "revision": settings.revision, "commit": commit.oid,
            "new_commit": new_commit, "pr_url": commit.pr_url, "unvetted": unvetted}
