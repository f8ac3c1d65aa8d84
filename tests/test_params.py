import os
import subprocess
import sys

import pytest
import yaml

from stack_dpo.experiment import profile_set_args
from stack_dpo.params import InvalidInput, ParamsError, deep_merge, load_params, validate
from stages import prepare
from tests.conftest import DEFAULT_PARAMS, REPO, inside, make_clone, refused, subprocess_env


def test_default_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.model.quantization == "none"
    assert params.push.enabled is False


def test_unknown_key_is_rejected_by_name():
    with pytest.raises(ParamsError, match=r"dpo\.betta: unknown key"):
        validate(deep_merge(DEFAULT_PARAMS, {"dpo": {"betta": 0.1}}))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"dpo": {"beta": -1}}, r"dpo\.beta = -1: Input should be greater than 0"),
        ({"model": {"quantization": "8bit"}}, r"model\.quantization = '8bit': Input should be 'none' or '4bit'"),
        ({"sft": {"lora": {"r": 0}}}, r"sft\.lora\.r = 0: Input should be greater than 0"),
        ({"dpo": {"train": {"learning_rate": 0}}}, r"dpo\.train\.learning_rate = 0: Input should be greater than 0"),
        ({"sft": {"train": {"per_device_train_batch_size": 0}}}, r"per_device_train_batch_size = 0"),
        ({"fetch": {"max_rows": {"rl": "many"}}}, r"fetch\.max_rows\.rl = 'many': Input should be a valid integer"),
        ({"dpo": {"beta": float("inf")}}, r"dpo\.beta = inf: Input should be a finite number"),
        ({"merge": {"rtol": float("nan")}}, r"merge\.rtol = nan: Input should be a finite number"),
        ({"dpo": {"train": {"learning_rate": "-inf"}}}, r"learning_rate = .-inf.: Input should be a finite"),
        ({"fetch": {"max_rows": {"finetune": True}}}, r"fetch\.max_rows\.finetune = True: Input should be a valid int"),
        ({"sft": {"train": {"max_steps": 8.0}}}, r"sft\.train\.max_steps = 8\.0: Input should be a valid integer"),
        ({"fetch": {"streaming": 1}}, r"fetch\.streaming = 1: Input should be a valid boolean"),
    ],
)
def test_bad_value_names_key_value_and_what_is_allowed(override, expected):
    with pytest.raises(ParamsError, match=expected):
        validate(deep_merge(DEFAULT_PARAMS, override))


def test_deep_merge_leaves_its_inputs_alone():
    merged = deep_merge(DEFAULT_PARAMS, {"dpo": {"beta": 0.5}})
    del merged["sft"]["lora"]
    assert DEFAULT_PARAMS["dpo"]["beta"] == 0.1 and "lora" in DEFAULT_PARAMS["sft"]


def test_missing_key_is_named():
    broken = deep_merge(DEFAULT_PARAMS, {})
    del broken["dpo"]["beta"]
    with pytest.raises(ParamsError, match=r"dpo\.beta: required key is missing"):
        validate(broken)


def test_stage_fails_on_bad_params_before_any_work(workspace):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["dpo"]["beta"] = 0
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, "-m", "stages.fetch"], cwd=workspace, env=subprocess_env(),
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "dpo.beta = 0: Input should be greater than 0" in result.stderr
    assert not (workspace / "data" / "raw").exists()


def test_full_profile_is_valid_and_becomes_dvc_set_params():
    args = profile_set_args(REPO / "profiles" / "llama2-7b.yaml", REPO / "params.yaml")
    pairs = dict(arg.split("=", 1) for arg in args[1::2])
    assert set(args[::2]) == {"-S"}
    assert pairs["model.name_or_path"] == "meta-llama/Llama-2-7b-hf"
    assert pairs["model.quantization"] == "4bit"
    assert pairs["sft.lora.target_modules"] == "[q_proj, v_proj]"
    assert pairs["dpo.beta"] == "0.1" and pairs["dpo.train.max_steps"] == "1000"
    assert pairs["prepare.max_length"] == "1024" and pairs["prepare.max_prompt_length"] == "512"


def test_invalid_profile_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dpo: {beta: -0.5}\n")
    with pytest.raises(ParamsError, match=r"dpo\.beta = -0.5"):
        profile_set_args(bad, REPO / "params.yaml")


def test_a_float_written_without_a_dot_is_still_a_float():
    # YAML 1.1 (PyYAML) reads `5e-4` as a string, and `dvc exp run -S lr=5e-4` writes it so
    params = validate(yaml.safe_load(yaml.safe_dump(DEFAULT_PARAMS).replace("0.0005", "5e-4")))
    assert params.dpo.train.learning_rate == 5e-4


def test_an_infinite_beta_in_params_yaml_stops_the_stage_before_any_work(workspace):
    text = (workspace / "params.yaml").read_text()
    (workspace / "params.yaml").write_text(text.replace("beta: 0.1", "beta: .inf"))
    result = subprocess.run([sys.executable, "-m", "stages.fetch"], cwd=workspace, env=subprocess_env(),
                            capture_output=True, text=True)
    assert result.returncode == 2 and "dpo.beta = inf: Input should be a finite number" in result.stderr
    assert not (workspace / "data" / "raw").exists()


def test_a_key_written_twice_is_refused_with_both_lines(workspace):
    path = workspace / "params.yaml"
    lines = path.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("beta: 0.1"))
    lines.insert(at + 1, lines[at].replace("0.1", "0.5"))  # the same key again in the dpo section
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ParamsError, match=rf"params.yaml: the key 'beta' is written twice, on lines {at + 1} and "
                                          rf"{at + 2}; keep one"):
        load_params(path)


def test_params_that_are_not_utf8_get_a_clear_error(workspace):
    path = workspace / "params.yaml"
    text = path.read_bytes()
    path.write_bytes(text + b"# caf\xe9\n")  # a comment saved as latin-1
    line = len(text.splitlines()) + 1
    result = subprocess.run([sys.executable, "-m", "stages.fetch"], cwd=workspace, env=subprocess_env(),
                            capture_output=True, text=True)
    assert result.returncode == 2 and f"params.yaml: not UTF-8 text (byte b'\\xe9' on line {line})" in result.stderr
    assert "Traceback" not in result.stderr


def test_more_prepare_processes_than_cores_are_refused_before_any_work(workspace):
    cores = len(os.sched_getaffinity(0))
    with inside(workspace) as params:
        too_many = params.model_copy(update={"prepare": params.prepare.model_copy(update={"num_proc": cores + 1})})
        with refused(InvalidInput, match=rf"prepare.num_proc = {cores + 1}: this machine has {cores} cores"):
            prepare.run(too_many)
    assert not (workspace / "data/processed").exists() and not (workspace / "metrics/prepare.json").exists()


def test_the_full_profile_on_a_machine_without_cuda_fails_before_touching_the_workspace(tmp_path):
    repo = make_clone(tmp_path / "repo")
    before = (repo / "params.yaml").read_bytes()
    try:
        result = subprocess.run([sys.executable, "-m", "stack_dpo.experiment", "--profile", "profiles/llama2-7b.yaml",
                                 "--run-exp", "llama2-7b"], cwd=repo, capture_output=True, text=True,
                                env=subprocess_env(CUDA_VISIBLE_DEVICES=""), timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the experiment started instead of refusing the machine (still running after 30 s)")
    assert result.returncode == 1 and "launch.device = 'cuda': this machine has no CUDA GPU" in result.stderr
    assert (repo / "params.yaml").read_bytes() == before and not (repo / "data/raw").exists()
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout == ""
