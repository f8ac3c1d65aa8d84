"""push against a local Hub-protocol server (tests/hub_server.py) with the real huggingface_hub
client: round trip, model card, idempotence, branches and PRs, clear failures, no leaked token."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, snapshot_download
from transformers import AutoModelForCausalLM

from stack_dpo.faults import TRANSIENT_EXIT
from stages import merge
from tests.conftest import inside, refused, subprocess_env, writable_copy
from tests.hub_server import FakeHub

TOKEN = "hf_stackdpo_test_token_0123456789abcdef"
OTHER_TOKEN = "hf_someone_else_token_fedcba9876543210"


@pytest.fixture
def hub():
    server = FakeHub(tokens={TOKEN: "alice", OTHER_TOKEN: "bob"}, orgs={"alice": ["alice-org"]}).start()
    yield server
    server.stop()


@pytest.fixture
def pushable(trained, tmp_path):
    """A copy of the trained workspace with push enabled and models/merged in 1 MB shards."""
    ws = tmp_path / "ws"
    writable_copy(trained, ws, checkpoints=False)
    set_params(ws, {"push": {"enabled": True, "repo_id": "alice/tiny-dpo", "license": "mit"},
                    "merge": {"max_shard_size": "1MB"}})
    with inside(ws) as params:
        merge.run(params)
    return ws


def set_params(ws, changes):
    params = yaml.safe_load((ws / "params.yaml").read_text())
    for section, values in changes.items():
        params[section].update(values)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def push(ws, hub_url, token=TOKEN, **extra_env):
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("HF_")}
    env.update({"HF_ENDPOINT": hub_url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(ws / ".hf-home"), **extra_env})
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "stages.push"], cwd=ws, env=env, capture_output=True, text=True)


def report(ws):
    return json.loads((ws / "reports/push.json").read_text())


def test_round_trip_gives_the_same_model(pushable, hub, tmp_path):
    done = push(pushable, hub.url)
    assert done.returncode == 0, done.stderr
    record = report(pushable)
    assert record["pushed"] and record["new_commit"] and record["repo_id"] == "alice/tiny-dpo"
    assert hub.repos["alice/tiny-dpo"].private is True
    assert hub.repos["alice/tiny-dpo"].refs["main"] == record["commit"]
    local = snapshot_download("alice/tiny-dpo", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "cache")
    files = sorted(os.listdir(local))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) >= 2
    expected = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"}
    assert expected <= set(files)
    assert sorted(os.listdir(os.path.join(local, "plots"))) == [
        "dpo_loss.png", "dpo_rewards_accuracies.png", "dpo_rewards_margins.png", "sft_loss.png"]
    inputs = {"input_ids": torch.tensor([[1, 50, 60, 70, 80, 90]])}
    with torch.no_grad():
        pulled = AutoModelForCausalLM.from_pretrained(local)(**inputs).logits
        original = AutoModelForCausalLM.from_pretrained(pushable / "models/merged")(**inputs).logits
    assert torch.equal(pulled, original)


def test_public_repo_when_private_is_false(pushable, hub):
    set_params(pushable, {"push": {"private": False}})
    done = push(pushable, hub.url)
    assert done.returncode == 0, done.stderr
    assert hub.repos["alice/tiny-dpo"].private is False
    assert report(pushable)["pushed"] is True


def test_model_card_carries_metrics_and_lineage(pushable, hub, tmp_path):
    assert push(pushable, hub.url).returncode == 0
    local = snapshot_download("alice/tiny-dpo", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "cache")
    card = ModelCard.load(os.path.join(local, "README.md"))
    metrics = json.loads((pushable / "metrics/evaluate.json").read_text())
    # the bundled tiny model and sample are not Hub repos: the card does not claim them as ones
    assert card.data.base_model is None and card.data.datasets is None
    assert "tiny Llama-architecture model bundled with stack-dpo (`data/sample/tiny-llama`, not on the Hub)" \
        in card.text
    assert "its answers are not useful" in card.text  # the limitation that says so
    # usage in the recipe's prompt format, the training settings that matter
    assert 'AutoModelForCausalLM.from_pretrained("alice/tiny-dpo"' in card.text
    # the prompt as the model was trained on it: the closing space joins the answer's first token
    assert "prompt = 'Question: How do I undo the last git commit?\\n\\nAnswer:'" in card.text
    assert "| DPO | 4 steps, beta 0.1, loss sigmoid" in card.text and "## Limitations" in card.text
    assert {"trl", "sft", "dpo", "lora"} <= set(card.data.tags) and card.data.license == "mit"
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {k: metrics[k] for k in ("rewards/accuracies", "rewards/margins")}
    assert "![DPO reward accuracy](plots/dpo_rewards_accuracies.png)" in card.text
    assert "beta: 0.1" in card.text and "git commit:" in card.text  # the params that produced it


def test_the_card_names_the_base_model_and_dataset_when_they_are_hub_repos():
    from stack_dpo.card import DATASET, model_card
    from stack_dpo.params import deep_merge, validate
    from tests.conftest import DEFAULT_PARAMS

    params = validate(deep_merge(DEFAULT_PARAMS, {"model": {"name_or_path": "meta-llama/Llama-2-7b-hf"},
                                                  "data": {"source": DATASET},
                                                  "push": {"repo_id": "alice/llama2-7b-dpo"}}))
    card = model_card(params, {"rewards/accuracies": 0.7, "rewards/margins": 0.5}, for_hub=True)
    assert card.data.base_model == "meta-llama/Llama-2-7b-hf" and card.data.datasets == [DATASET]
    assert card.data.eval_results[0].dataset_type == DATASET
    assert "[meta-llama/Llama-2-7b-hf](https://huggingface.co/meta-llama/Llama-2-7b-hf)" in card.text
    assert "its answers are not useful" not in card.text


def test_second_push_of_the_same_model_makes_no_commit(pushable, hub):
    assert push(pushable, hub.url).returncode == 0
    first = report(pushable)
    commits = hub.commit_count("alice/tiny-dpo")
    uploads = sum(1 for method, path, _ in hub.requests if method == "PUT")
    again = push(pushable, hub.url)
    assert again.returncode == 0, again.stderr
    second = report(pushable)
    assert hub.commit_count("alice/tiny-dpo") == commits
    assert second["commit"] == first["commit"] and second["new_commit"] is False
    assert sum(1 for method, path, _ in hub.requests if method == "PUT") == uploads  # nothing uploaded again


def test_push_to_a_branch_and_as_a_pull_request(pushable, hub):
    set_params(pushable, {"push": {"revision": "dev"}})
    assert push(pushable, hub.url).returncode == 0
    repo = hub.repos["alice/tiny-dpo"]
    assert repo.refs["dev"] == report(pushable)["commit"] != repo.refs["main"]
    assert "config.json" not in hub.commits[repo.refs["main"]].files
    set_params(pushable, {"push": {"revision": "main", "create_pr": True}})
    done = push(pushable, hub.url)
    assert done.returncode == 0, done.stderr
    record = report(pushable)
    assert record["pr_url"].endswith("/alice/tiny-dpo/discussions/1")
    assert repo.refs["refs/pr/1"] == record["commit"]
    assert "config.json" not in hub.commits[repo.refs["main"]].files  # main untouched until the PR is merged


@pytest.mark.parametrize(
    ("token", "repo_id", "message"),
    [
        ("hf_wrong", "alice/tiny-dpo", "rejected the token (401)"),
        (None, "alice/tiny-dpo", "no Hub token: set HF_TOKEN"),
        (TOKEN, "bob/his-model", "push.repo_id 'bob/his-model' belongs to 'bob'"),
    ],
)
def test_refused_push_fails_clearly_before_any_upload(pushable, hub, token, repo_id, message):
    set_params(pushable, {"push": {"repo_id": repo_id}})
    done = push(pushable, hub.url, token=token)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "not retrying" in done.stderr
    assert [(method, path) for method, path, _ in hub.requests if method in ("POST", "PUT")] == []
    assert hub.repos == {}


def test_an_unreachable_hub_is_retried_then_reported_as_transient(pushable):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    done = push(pushable, closed, STACK_DPO_RETRY_DELAYS_S="0.1,0.2")
    assert done.returncode == TRANSIENT_EXIT  # not invalid input (2): the flow retries it
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("stack-dpo: transient failure, retry later: push: Unreachable: the Hub at "
                           f"{closed} is unreachable") and last.endswith("(after 3 attempts)")
    assert done.stderr.count("retrying in") == 2 and "Traceback" not in done.stderr


def test_token_is_written_nowhere(pushable, hub):
    done = push(pushable, hub.url)
    assert done.returncode == 0
    assert TOKEN not in done.stdout + done.stderr
    for path in pushable.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert TOKEN.encode() not in path.read_bytes(), path
    for commit in hub.commits.values():
        for blob in commit.files.values():
            assert blob.content is None or TOKEN.encode() not in blob.content


@pytest.mark.parametrize("response, expected, is_transient", [
    (None, "failed without a response", False),  # no AttributeError on a missing response; the flow retries it
    (503, "answered 503", True),  # the stage itself retries it first
    (429, "answered 429", True),
    (403, "answered 403", False),
])
def test_a_hub_error_other_than_401_is_not_invalid_input(response, expected, is_transient):
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from stack_dpo.faults import transient
    from stack_dpo.push import PushError, check_access

    class FailingHub(HfApi):
        def whoami(self, *args, **kwargs):
            answer = httpx2.Response(response or 500, request=httpx2.Request("GET", "http://127.0.0.1:9/whoami"))
            error = HfHubHTTPError("whoami failed", response=answer)
            error.response = None if response is None else answer  # the attribute is Optional in the library
            raise error

    with refused((RuntimeError, ConnectionError), match=expected) as raised:
        check_access(FailingHub(endpoint="http://127.0.0.1:9"), "alice/tiny-dpo")
    assert not isinstance(raised.value, PushError)  # not invalid input: the flow retries it
    assert transient(raised.value) is is_transient
