"""Planted bugs the test suite must catch: `make mutants` (python -m tests.mutants [NAME ...]).

Each mutant changes one line of the code in a scratch copy of this checkout and runs only the
tests chosen for it. It is caught only when one of them fails on an assertion (AssertionError
or pytest's own failure), not on an error in setup, import or collection (tests/outcomes.py
records which). Each mutant's tests must also pass, run alone in the same way, with no bug
planted, or the catch would prove nothing. The trained chain the tests share (tests/conftest.py)
is built once with no bug planted and handed to each run, which rebuilds it from the first
stage whose code the bug changed. Scratch copies run `--jobs` at a time, each with its share of
the cores. Prints `N of N planted bugs caught` and exits 0 only if every one was. A bug fixed
from now on gets its mutant here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from tests.conftest import SHUFFLE_SEED, TRAINED_CACHE

REPO = Path(__file__).resolve().parents[1]


class Mutant(NamedTuple):
    name: str
    file: str
    old: str  # must occur exactly once in `file`
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    Mutant("the length filter lets a pair one token over prepare.max_length through",
           "stack_dpo/prepare.py", "bad[fits] = token_counts(tokenizer, [texts[i] for i in fits]) > limit",
           "bad[fits] = token_counts(tokenizer, [texts[i] for i in fits]) > limit + 1",
           ("tests/test_prepare.py::test_trl_itself_never_truncates_a_kept_pair_and_no_dropped_pair_would_fit",)),
    Mutant("resume restores the step but not the weights",
           "stack_dpo/training.py", "        result = trainer.train(resume_from_checkpoint=",
           "        trainer._load_from_checkpoint = lambda *args, **kwargs: None\n"
           "        result = trainer.train(resume_from_checkpoint=",
           ("tests/test_training.py::test_sft_resumed_in_process_from_a_checkpoint_lands_on_the_uninterrupted_weights",)),
    Mutant("dpo recomputes the reference from the policy instead of reading the stored log-probs",
           "stack_dpo/dpo.py", "        pairs = with_stored_reference(pairs)", "        pass",
           ("tests/test_trust.py::test_dpo_stops_when_the_stored_reference_is_not_the_sft_models",)),
    Mutant("merge skips its check",
           "stages/merge.py", "    if not max_diff <= params.merge.rtol:", "    if False:",
           ("tests/test_merge_evaluate_push.py::test_merge_fails_beyond_tolerance_and_keeps_the_previous_output",)),
    Mutant("prepare swaps chosen and rejected in one pair of a hundred",
           "stack_dpo/prepare.py", "        writer.write(pairs.filter(pa.array(keep[passing])))",
           "        kept = pairs.filter(pa.array(keep[passing]))\n"
           "        swap = pa.array(np.arange(kept.num_rows) % 100 == 0)\n"
           "        writer.write(kept.set_column(1, 'chosen', pc.if_else(swap, kept['rejected'], kept['chosen']))"
           ".set_column(2, 'rejected', pc.if_else(swap, kept['chosen'], kept['rejected'])))",
           ("tests/test_prepare.py::test_dpo_pairs_match_the_seed_mapping_exactly",)),
    Mutant("push uploads unchanged files again",
           "stack_dpo/push.py", "        operations.append(CommitOperationAdd(path_in_repo=\"README.md\"",
           "        operations.append(CommitOperationAdd(path_in_repo=\"pushed_at.txt\", "
           "path_or_fileobj=str(__import__('time').time_ns()).encode()))\n"
           "        operations.append(CommitOperationAdd(path_in_repo=\"README.md\"",
           ("tests/test_push.py::test_second_push_of_the_same_model_makes_no_commit",)),
    Mutant("evaluate loads the reference in 4-bit while the final model is 16-bit",
           "stages/evaluate.py", "    reference, _ = merged_model(params.model, SFT_ADAPTER, params.merge.save_dtype)",
           "    from stack_dpo.modeling import load_adapter_model\n"
           "    reference, _ = load_adapter_model(params.model, SFT_ADAPTER), None",
           ("tests/test_trust.py::test_evaluate_never_loads_a_4bit_model",)),
    Mutant("a refused run deletes a checkpoint",
           "stages/sft.py", "    check_machine(params)  # a refused run leaves the checkpoints as they were\n",
           "",
           ("tests/test_bad_inputs.py::test_a_refused_run_leaves_the_checkpoints_as_they_were[sft]",)),
    Mutant("workers of a killed prepare outlive it (and hold its pipes open)",
           "stack_dpo/prepare.py", '    if sys.platform.startswith("linux"):', "    if False:",
           ("tests/test_prepare.py::test_workers_of_a_killed_prepare_do_not_outlive_it",)),
    Mutant("dpo trains against reference log-probs of other rows with the same count",
           "stack_dpo/pairs.py", "    if stored.get(\"pairs\", {}).get(split) != pairs_fingerprint(pairs[split]):",
           "    if False:",
           ("tests/test_trust.py::test_a_reference_of_other_rows_with_the_same_count_is_refused",)),
    Mutant("the flow reports a run done when its dvc push failed",
           "flows/pipeline.py", "            if pushed[0] != 0:", "            if False:",
           ("tests/test_flow.py::test_flow_pushes_what_it_ran_to_the_dvc_remote_and_fails_when_the_push_fails",)),
    Mutant("GPU stages run without holding the GPU slot",
           "flows/pipeline.py", "    slot = concurrency(GPU_LIMIT, occupy=1, strict=True) if uses_gpu else",
           "    slot = contextlib.nullcontext() if uses_gpu else",
           ("tests/test_flow.py::test_two_runs_in_one_checkout_keep_their_own_params_and_hold_the_gpu_slot_one_at_a_time",)),
    Mutant("a stage imports another stage (dvc.yaml then misses that stage's code)",
           "stages/reference.py", "from stack_dpo.entrypoint import main\n",
           "from stages import dpo  # noqa: F401\nfrom stack_dpo.entrypoint import main\n",
           ("tests/test_layout.py::test_every_stage_is_an_entry_point_that_imports_no_other_stage",
            "tests/test_layout.py::test_dvc_yaml_code_deps_are_exactly_what_each_stage_imports")),
    Mutant("the resume fingerprint hashes the whole library (editing the model card drops checkpoints)",
           "stack_dpo/training.py", "    files += [(name, layout.ROOT / name) for name in layout.code_files(stage)]",
           "    files += [(str(p), p) for p in sorted((layout.ROOT / 'stack_dpo').glob('*.py'))]",
           ("tests/test_training.py::test_resume_fingerprint_covers_what_training_depends_on_and_nothing_else",)),
    Mutant("push dereferences a Hub error without a response",
           "stack_dpo/push.py", "        status = exc.response.status_code if exc.response is not None else None",
           "        status = exc.response.status_code",
           ("tests/test_push.py::test_a_hub_error_other_than_401_is_not_invalid_input",)),
    Mutant("params accept an infinite or NaN float",
           "stack_dpo/params.py", 'model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)',
           'model_config = ConfigDict(extra="forbid", frozen=True)',
           ("tests/test_params.py::test_an_infinite_beta_in_params_yaml_stops_the_stage_before_any_work",)),
    Mutant("params take a boolean as a count",
           "stack_dpo/params.py", "    finetune: StrictInt | None = Field(None, gt=0)",
           "    finetune: int | None = Field(None, gt=0)",
           ("tests/test_params.py::test_bad_value_names_key_value_and_what_is_allowed",)),
    # issue 13: bad input and faults, round 2
    Mutant("a key written twice in params.yaml silently takes the last value",
           "stack_dpo/params.py", "            if isinstance(key, str) and key in lines:", "            if False:",
           ("tests/test_params.py::test_a_key_written_twice_is_refused_with_both_lines",)),
    Mutant("a params.yaml that is not UTF-8 is read with replacement characters",
           "stack_dpo/params.py", '        text = data.decode("utf-8")',
           '        text = data.decode("utf-8", "replace")',
           ("tests/test_params.py::test_params_that_are_not_utf8_get_a_clear_error",)),
    Mutant("prepare.num_proc has no upper bound",
           "stack_dpo/prepare.py", "    if (params.prepare.num_proc or 0) > cores:", "    if False:",
           ("tests/test_params.py::test_more_prepare_processes_than_cores_are_refused_before_any_work",)),
    Mutant("an unknown LoRA target passes sft's preflight",
           "stack_dpo/modeling.py", "        check_lora_targets(model, lora)", "        pass",
           ("tests/test_bad_inputs.py::test_an_unknown_lora_target_is_refused_before_sft_touches_its_checkpoints",)),
    Mutant("a tokenizer without EOS is accepted",
           "stack_dpo/modeling.py", "    if tokenizer.eos_token is None:", "    if False:",
           ("tests/test_bad_inputs.py::test_a_tokenizer_without_eos_is_refused_before_prepare_starts_workers",)),
    Mutant("make exp-full starts the experiment before checking the machine",
           "stack_dpo/experiment.py", "            check_machine(profile_params(args.profile))", "            pass",
           ("tests/test_params.py::test_the_full_profile_on_a_machine_without_cuda_fails_before_touching_the_workspace",)),
    Mutant("fetch checks the columns of the first shard only",
           "stack_dpo/fetch.py", "        missing = [name for name in RAW_SCHEMA.names if name not in names]",
           "        missing = []",
           ("tests/test_bad_inputs.py::test_a_column_missing_from_a_later_shard_names_the_file_and_column",)),
    Mutant("fetch hands datasets a shard of zero rows",
           "stack_dpo/fetch.py", "        if footer.num_rows:", "        if True:",
           ("tests/test_bad_inputs.py::test_a_shard_of_zero_rows_adds_nothing",)),
    Mutant("prepare keeps rows without a qid",
           "stack_dpo/prepare.py", '"missing_qid": pc.is_null(batch.column("qid")).to_numpy(False),',
           '"missing_qid": np.zeros(batch.num_rows, dtype=bool),',
           ("tests/test_bad_inputs.py::test_invisible_texts_whitespace_only_differences_and_missing_qids_are_dropped_by_reason",)),
    Mutant("prepare takes zero-width characters and a BOM for text",
           "stack_dpo/prepare.py", 'BLANK = r"[\\s\\x{85}\\pZ\\x{200B}-\\x{200D}\\x{2060}\\x{FEFF}]"',
           'BLANK = r"[\\s\\pZ]"',
           ("tests/test_bad_inputs.py::test_invisible_texts_whitespace_only_differences_and_missing_qids_are_dropped_by_reason",)),
    Mutant("prepare keeps answers that differ only in whitespace",
           "stack_dpo/prepare.py", 'pc.fill_null(pc.equal(words("response_j"), words("response_k")), False)',
           'pc.fill_null(pc.equal(batch.column("response_j"), batch.column("response_k")), False)',
           ("tests/test_bad_inputs.py::test_invisible_texts_whitespace_only_differences_and_missing_qids_are_dropped_by_reason",)),
    Mutant("SFT texts have no token limit",
           "stack_dpo/prepare.py", "    limit = params.prepare.max_sft_length or params.prepare.max_length",
           "    limit = 10**12",
           ("tests/test_bad_inputs.py::test_an_sft_text_over_the_token_limit_is_dropped_by_reason",)),
    Mutant("the old metrics stay beside a new output",
           "stack_dpo/outputs.py", "            Path(stale).unlink(missing_ok=True)", "            pass",
           ("tests/test_outputs.py::test_outputs_and_their_metrics_never_disagree",)),
    Mutant("output folders keep tempfile's private permissions",
           "stack_dpo/outputs.py", "    os.chmod(tmp, usual_mode(0o777))", "    pass",
           ("tests/test_outputs.py::test_outputs_get_the_usual_permissions",)),
    Mutant("a full disk ends in a traceback with exit 1",
           "stack_dpo/entrypoint.py", "        if not no_space(exc):", "        if True:",
           ("tests/test_bad_inputs.py::test_a_full_disk_is_reported_as_such_and_retryable",)),
    Mutant("push gives up at once on an unreachable Hub",
           "stack_dpo/push.py", '    user = with_retries("push", lambda: check_access(api, settings.repo_id))',
           "    user = check_access(api, settings.repo_id)",
           ("tests/test_push.py::test_an_unreachable_hub_is_retried_then_reported_as_transient",)),
    Mutant("the flow retries a stage that reported invalid input",
           "flows/pipeline.py", "        if exit_codes and exit_codes[-1] == INVALID_INPUT_EXIT:", "        if False:",
           ("tests/test_flow.py::test_permanent_failure_is_not_retried",)),
    # issue 12: runs that never edit the checkout
    Mutant("the flow runs its stages in the checkout",
           "flows/pipeline.py", "                stage_task(name, str(workspace), uses_gpu)",
           "                stage_task(name, str(checkout), uses_gpu)",
           ("tests/test_flow.py::test_two_runs_in_one_checkout_keep_their_own_params_and_hold_the_gpu_slot_one_at_a_time",)),
    Mutant("a run workspace does not see the checkout's uncommitted changes",
           "flows/workspace.py", "        shutil.copy2(checkout / rel, path / rel)", "        pass",
           ("tests/test_workspace.py::test_a_workspace_starts_from_the_checkout_as_it_is_and_leaves_it_untouched",)),
    Mutant("generation starts from the recipe's prompt with its closing space, a context training never shows",
           "stack_dpo/dataset.py", '    return prompt.rstrip(" ")', "    return prompt",
           ("tests/test_prepare.py::test_trl_itself_never_truncates_a_kept_pair_and_no_dropped_pair_would_fit",)),
    Mutant("TRL's prompt-boundary warning is dropped whatever it names",
           "stack_dpo/entrypoint.py", "        return not (found and not ast.literal_eval(found.group(1)).strip())",
           "        return not found",
           ("tests/test_prepare.py::test_trls_prompt_boundary_warning_is_dropped_only_for_whitespace",)),
    Mutant("prepare's tokenization check lets transformers warn of indexing errors for a text it only counts",
           "stack_dpo/prepare.py", "        prompt_ids = tokenizer(prompt, verbose=False)",
           "        prompt_ids = tokenizer(prompt)",
           ("tests/test_prepare.py::test_the_tokenization_check_does_not_warn_about_texts_beyond_the_models_context",)),
    Mutant("the fit leaves out the activations kept for the backward pass",
           "stack_dpo/fit.py", "    kept = CHECKPOINT_BYTES_PER_HIDDEN * shape.hidden if checkpointing else per_layer",
           "    kept = 0",
           ("tests/test_fit.py::test_a_larger_gpu_never_turns_checkpointing_on_nor_shrinks_the_micro_batch_it_runs_with",)),
    Mutant("the fit changes the global batch (accumulation not scaled to the micro-batch)",
           "stack_dpo/fit.py", "if fixed else per_process // micro", "if fixed else 1",
           ("tests/test_fit.py::test_the_full_profile_fits_fake_gpus_of_24_80_and_141_gib_keeping_the_global_batch",)),
    Mutant("merged weights are rounded through bf16 before the saved dtype",
           "stack_dpo/modeling.py", "        weight.data = weight.data.to(DTYPES[save_dtype])",
           "        weight.data = weight.data.to(torch.bfloat16).to(DTYPES[save_dtype])",
           ("tests/test_merge_evaluate_push.py::test_merged_weights_are_a_float32_merge_cast_once_to_the_saved_dtype",)),
    Mutant("a GPU without bfloat16 passes the machine check",
           "stack_dpo/machine.py", "            not torch.cuda.is_bf16_supported():", "            False:",
           ("tests/test_machine.py::test_a_gpu_that_lacks_something_is_refused_naming_it",)),
    Mutant("dpo.group_by_length is ignored: DPO batches in random order",
           "stack_dpo/dpo.py", '"group_by_length" if params.dpo.group_by_length else "random"', '"random"',
           ("tests/test_param_arrival.py::test_every_dpo_param_arrives_in_dpoconfig",)),
    Mutant("length-grouped DPO batches drawn from the global RNG (a resumed run trains other batches)",
           "stack_dpo/compat.py", "generator=torch.Generator().manual_seed(seed))", "generator=None)",
           ("tests/test_training.py::test_length_grouped_dpo_batches_do_not_depend_on_the_global_rng",)),
    Mutant("use_liger_kernel never reaches the trainer",
           "stack_dpo/training.py", 'named = train.model_dump(exclude={"global_batch_size"})',
           'named = train.model_dump(exclude={"global_batch_size", "use_liger_kernel"})',
           ("tests/test_param_arrival.py::test_every_sft_param_arrives_in_sftconfig_and_the_lora_config",)),
    # issue 23: the code behind the reported numbers, each caught by a test that recomputes them
    Mutant("held-out accuracy counts a tie as a win",
           "stack_dpo/evaluate.py", "accuracy = (rewards_chosen > rewards_rejected).double().mean().item()",
           "accuracy = (rewards_chosen >= rewards_rejected).double().mean().item()",
           ("tests/test_trust.py::test_an_untrained_dpo_adapter_scores_exactly_zero",)),
    Mutant("the reward margin is the chosen reward alone",
           "stack_dpo/evaluate.py", '"rewards/margins": (rewards_chosen - rewards_rejected).mean().item(),',
           '"rewards/margins": rewards_chosen.mean().item(),',
           ("tests/test_oracles.py::test_every_evaluate_figure_recomputed_from_the_per_pair_log_probs",)),
    Mutant("the Wilson interval is centred on the accuracy",
           "stack_dpo/evaluate.py", "centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)", "centre = accuracy",
           ("tests/test_oracles.py::test_every_evaluate_figure_recomputed_from_the_per_pair_log_probs",)),
    Mutant("the baselines count a tie as a loss",
           "stack_dpo/evaluate.py",
           "return ((chosen > rejected).double() + 0.5 * (chosen == rejected).double()).mean().item()",
           "return (chosen > rejected).double().mean().item()",
           ("tests/test_oracles.py::test_every_evaluate_figure_recomputed_from_the_per_pair_log_probs",)),
    Mutant("the code-block baseline compares the chosen answers with themselves",
           "stack_dpo/evaluate.py", 'has_code(pairs["chosen"]), has_code(pairs["rejected"])',
           'has_code(pairs["chosen"]), has_code(pairs["chosen"])',
           ("tests/test_trust.py::test_baselines_and_interval_are_computed_as_defined",)),
    Mutant("the SFT baseline reads the final model's log-probs",
           "stack_dpo/evaluate.py", '**baselines(pairs, logps["ref_chosen_logps"], logps["ref_rejected_logps"]),',
           '**baselines(pairs, logps["chosen_logps"], logps["rejected_logps"]),',
           ("tests/test_oracles.py::test_every_evaluate_figure_recomputed_from_the_per_pair_log_probs",)),
    Mutant("evaluate pairs each reference log-prob with the next pair's",
           "stages/evaluate.py", "scores = scores_table(chosen, rejected, ref_chosen, ref_rejected)",
           "scores = scores_table(chosen, rejected, ref_chosen.roll(1), ref_rejected.roll(1))",
           ("tests/test_oracles.py::test_the_per_pair_log_probs_are_the_two_models_own",)),
    Mutant("a response's log-prob leaves out its EOS token",
           "stack_dpo/modeling.py", "labels[i, len(p) : n] = torch.tensor(r)",
           "labels[i, len(p) : n - 1] = torch.tensor(r[:-1])",
           ("tests/test_oracles.py::test_the_pipelines_log_probs_match_the_oracles_on_the_base_model",)),
    Mutant("the merge gap compares the model as trained with itself",
           "stack_dpo/merge.py", "for model in (model_a, model_b)]", "for model in (model_a, model_a)]",
           ("tests/test_oracles.py::test_the_merge_gap_recomputed_with_transformers_and_peft",)),
    Mutant("the merge gap averages the logits of padding too",
           "stack_dpo/merge.py", ".logits.float()[mask.to(model.device)]", ".logits.float().flatten(0, 1)",
           ("tests/test_oracles.py::test_the_merge_gap_recomputed_with_transformers_and_peft",)),
    Mutant("dpo trains with TRL's default beta", "stack_dpo/dpo.py", "        beta=params.dpo.beta,\n", "",
           ("tests/test_param_arrival.py::test_every_dpo_param_arrives_in_dpoconfig",)),
    Mutant("DPO's max_length is TRL's default, not prepare.max_length",
           "stack_dpo/dpo.py", "max_length=params.prepare.max_length,", "",
           ("tests/test_param_arrival.py::test_every_dpo_param_arrives_in_dpoconfig",)),
    Mutant("SFT packs to TRL's default length, not sft.seq_length",
           "stack_dpo/sft.py", "max_length=params.sft.seq_length,", "",
           ("tests/test_param_arrival.py::test_every_sft_param_arrives_in_sftconfig_and_the_lora_config",)),
    Mutant("sft.lora.dropout never reaches PEFT",
           "stack_dpo/modeling.py", "lora_dropout=lora.dropout,", "lora_dropout=0.05,",
           ("tests/test_param_arrival.py::test_every_sft_param_arrives_in_sftconfig_and_the_lora_config",)),
    Mutant("the training sample leaves out the processes",
           "stack_dpo/params.py", "* train.gradient_accumulation_steps * launch.num_processes",
           "* train.gradient_accumulation_steps",
           ("tests/test_oracles.py::test_the_training_sample_is_steps_x_the_global_batch",)),
    Mutant("a training row of a held-out question gets through",
           "stack_dpo/prepare.py",
           'masks["qid_in_evaluation"] = np.isin(batch.column("qid").to_numpy(False), eval_qids)',
           'masks["qid_in_evaluation"] = np.zeros(batch.num_rows, dtype=bool)',
           ("tests/test_oracles.py::test_held_out_questions_never_reach_a_training_split",)),
    Mutant("the SFT eval split is drawn by row, not by question",
           "stack_dpo/prepare.py",
           'to_eval = is_sft_eval(batch.column("qid").to_numpy(False), params.prepare.sft_eval_fraction)',
           "to_eval = is_sft_eval(np.arange(batch.num_rows), params.prepare.sft_eval_fraction)",
           ("tests/test_oracles.py::test_held_out_questions_never_reach_a_training_split",)),
    Mutant("the pairs' fingerprint hashes the prompts only",
           "stack_dpo/pairs.py", 'pairs.select_columns(["prompt", "chosen", "rejected"])',
           'pairs.select_columns(["prompt"])',
           ("tests/test_oracles.py::test_the_pairs_fingerprint_changes_with_any_text_of_any_pair",)),
    Mutant("the prompt limit is prepare.max_length, not max_prompt_length",
           "stack_dpo/prepare.py", "np.ones(len(prompts), dtype=bool), params.prepare.max_prompt_length)",
           "np.ones(len(prompts), dtype=bool), params.prepare.max_length)",
           ("tests/test_param_arrival.py::test_every_data_param_arrives_in_what_fetch_and_prepare_write",)),
]


def scratch_copy(root: Path) -> Path:
    """This checkout's tracked and untracked-but-not-ignored files as a fresh git repo."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes((REPO / name).read_bytes())
    git = ["git", "-c", "user.name=mutants", "-c", "user.email=mutants@localhost"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "scratch"]):
        subprocess.run([*git, *args], cwd=root, check=True, capture_output=True)
    return root


def plant(root: Path, mutant: Mutant) -> None:
    path = root / mutant.file
    text = path.read_text()
    if text.count(mutant.old) != 1:
        raise SystemExit(f"mutant {mutant.name!r}: {mutant.file} has {text.count(mutant.old)} copies of the line "
                         "it changes (expected 1); update tests/mutants.py")
    path.write_text(text.replace(mutant.old, mutant.new))


ASSERTIONS = ("AssertionError", "Failed")  # Failed: pytest.fail, pytest.raises that saw nothing raised


class Outcome(NamedTuple):
    caught: bool         # a chosen test failed on an assertion
    passed: bool         # every chosen test ran and passed (what the run with no bug planted must show)
    seconds: float
    why: str             # the failing test and what failed it, or the output's tail


def is_one_of(nodeid: str, tests: list[str]) -> bool:
    """Whether a test id is one of `tests` (a test named without parameters covers each of them)."""
    return any(nodeid == test or nodeid.startswith(test + "[") for test in tests)


def run_tests(mutant: Mutant | None, tests: list[str], threads: int, cache: Path | None) -> Outcome:
    """`tests` in a scratch copy with `mutant` planted, torch on `threads` threads."""
    with tempfile.TemporaryDirectory(prefix="stack-dpo-mutant-") as tmp:
        root = scratch_copy(Path(tmp) / "repo")
        if mutant is not None:
            plant(root, mutant)
        outcomes = Path(tmp) / "outcomes.jsonl"
        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": str(threads), "STACK_DPO_OUTCOMES":
               str(outcomes), **({TRAINED_CACHE: str(cache)} if cache else {})}
        env.pop(SHUFFLE_SEED, None)
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                 "-p", "tests.outcomes", *tests], cwd=root, env=env, capture_output=True, text=True)
        seconds = time.monotonic() - started
        records = [json.loads(line) for line in outcomes.read_text().splitlines()] if outcomes.exists() else []
    failed = [r for r in records if r["outcome"] == "failed"]
    on_assertion = [r for r in failed if r["when"] == "call" and r["exception"] in ASSERTIONS
                    and is_one_of(r["test"], tests)]
    passed_calls = {r["test"] for r in records if r["when"] == "call" and r["outcome"] == "passed"}
    passed = (result.returncode == 0 and not failed
              and all(any(is_one_of(t, [test]) for t in passed_calls) for test in tests))
    if on_assertion:
        why = f"{on_assertion[0]['test']}: {on_assertion[0]['exception']}"
    elif failed:
        why = f"not an assertion: {failed[0]['test']} failed in {failed[0]['when']} ({failed[0]['exception']})"
    else:
        why = result.stdout[-600:]
    return Outcome(bool(on_assertion), passed, seconds, why[:300])


def slow(tests: tuple[str, ...]) -> bool:
    return any(test.startswith(("tests/test_flow.py", "tests/test_deployments.py", "tests/test_reliability.py",
                                "tests/test_qlora.py", "tests/test_pipeline.py")) for test in tests)


def build_cache(root: Path) -> None:
    """The trained chain with no bug planted, for every run to start from."""
    code = scratch_copy(root / "repo")
    (root / "trained").mkdir()
    subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from tests.conftest import "
                    "build_trained; build_trained(Path(sys.argv[1]))", str(root / "trained")],
                   cwd=code, env={**os.environ, "PYTHONPATH": str(code)}, check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="substrings of the mutants to run (default: all)")
    parser.add_argument("-j", "--jobs", type=int, default=2, help="scratch copies tested at once (default 2)")
    args = parser.parse_args()
    planted = [m for m in MUTANTS if not args.names or any(n in m.name for n in args.names)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // args.jobs)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="stack-dpo-trained-") as tmp, ThreadPoolExecutor(args.jobs) as pool:
        build_cache(Path(tmp))
        cache = Path(tmp) / "trained"
        print(f"built the shared trained chain with no bug planted in {time.monotonic() - started:.0f} s", flush=True)
        # each mutant's tests alone with no bug planted: they must pass, or a failure proves nothing
        # the runs that start a Prefect server or train from scratch first, so no long one is left for last
        jobs = sorted([(None, tests) for tests in dict.fromkeys(m.tests for m in planted)]
                      + [(mutant, mutant.tests) for mutant in planted], key=lambda job: not slow(job[1]))
        futures = {(mutant, tests): pool.submit(run_tests, mutant, list(tests), threads, cache)
                   for mutant, tests in jobs}
        clean = {tests: futures[None, tests] for mutant, tests in jobs if mutant is None}
        mutated = [futures[mutant, mutant.tests] for mutant in planted]
        caught = []
        for mutant, future in zip(planted, mutated):
            outcome, baseline = future.result(), clean[mutant.tests].result()
            caught.append(outcome.caught and baseline.passed)
            verdict = "caught " if caught[-1] else "MISSED " if baseline.passed else "UNSOUND"
            print(f"{verdict} {outcome.seconds:6.1f} s  {mutant.name}", flush=True)
            print(f"          {outcome.why}" if baseline.passed else
                  f"          its tests with no bug planted: {baseline.why}", flush=True)
    print(f"{sum(caught)} of {len(caught)} planted bugs caught, each by an assertion of its own tests, which pass "
          f"with no bug planted ({len(clean)} clean runs); {time.monotonic() - started:.0f} s in all")
    sys.exit(0 if all(caught) else 1)


if __name__ == "__main__":
    main()
