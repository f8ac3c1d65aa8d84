"""push: models/merged -> the Hub repo push.repo_id, with a model card that carries the
evaluation metrics and the run's lineage; reports/push.json records the repo, revision and
commit (or why it skipped).

Disabled in the default profile. A model whose held-out accuracy does not beat its baselines
or whose merge gap exceeds push.max_merge_accuracy_drop is refused (exit 2) unless
push.allow_unvetted is set, and its card then says which checks it failed. The token comes
from HF_TOKEN or the Hub login (huggingface_hub finds either) and is never written anywhere.
Everything that can be checked before uploading is: the endpoint answers, the token is
accepted, the namespace is writable. Files that did not change are not uploaded again, and a
push that changes nothing makes no commit (huggingface_hub compares each file's oid with the
Hub's).
"""

from __future__ import annotations

import logging

from stack_dpo.entrypoint import main
from stack_dpo.outputs import write_json_atomic
from stack_dpo.params import Params
from stack_dpo.paths import PUSH_REPORT
from stack_dpo.push import push

log = logging.getLogger("stages.push")


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

