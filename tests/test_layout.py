"""The layout the code and dvc.yaml must agree on: each stage is an entry point that imports
the library (stack_dpo) and never another stage; dvc.yaml lists as a stage's code deps exactly
the files its code imports, as its params exactly the keys its code reads, and no path the
library does not name."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import yaml

from stack_dpo import paths
from stack_dpo.layout import code_files, imported_modules
from tests.conftest import REPO

LIBRARY = "stack_dpo"


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def listed(entries: list) -> list[str]:
    return [next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries or []]


def test_every_stage_is_an_entry_point_that_imports_no_other_stage():
    stages = dvc_stages()
    for name, stage in stages.items():
        assert stage["cmd"] == f"python -m stages.{name}"
    modules = {path.stem for path in (REPO / "stages").glob("*.py") if path.stem != "__init__"}
    assert modules == set(stages), "stages/ holds the entry points of dvc.yaml's stages and nothing else"
    for module in modules:
        others = {m for m in imported_modules(REPO / f"stages/{module}.py") if m.startswith("stages.")}
        assert not others, f"stages/{module}.py imports {sorted(others)}: shared code belongs in {LIBRARY}/"


def test_library_imports_no_stage_and_its_init_holds_no_code():
    for path in (REPO / LIBRARY).glob("*.py"):
        assert not {m for m in imported_modules(path) if m.startswith("stages.")}, path
    init = ast.parse((REPO / LIBRARY / "__init__.py").read_text())
    assert all(isinstance(node, ast.Expr) for node in init.body), "code in __init__ would be a dep of every stage"


def test_dvc_yaml_code_deps_are_exactly_what_each_stage_imports():
    for name, stage in dvc_stages().items():
        listed_code = {dep for dep in listed(stage["deps"]) if dep.endswith(".py")}
        assert listed_code == set(code_files(name)), (
            f"dvc.yaml stage {name}: missing {sorted(set(code_files(name)) - listed_code)}, "
            f"not imported {sorted(listed_code - set(code_files(name)))}")


def test_dvc_yaml_paths_are_the_library_path_constants():
    constants = {str(value) for name, value in vars(paths).items() if name.isupper() and isinstance(value, Path)}
    used = set()
    for stage in dvc_stages().values():
        for entry in [*listed(stage.get("deps")), *listed(stage.get("outs")), *listed(stage.get("metrics"))]:
            if entry.endswith(".py"):
                continue
            owner = entry if entry in constants else next((c for c in constants if Path(entry).parent == Path(c)),
                                                          None)
            assert owner, f"dvc.yaml path {entry!r} is not one of (or directly under one of) {sorted(constants)}"
            used.add(owner)
    assert used == constants, f"stack_dpo/paths.py names paths dvc.yaml never uses: {sorted(constants - used)}"


# Params a stage reads that cannot change its outputs, so dvc.yaml leaves them out (a change
# to them reruns nothing). Each with why; everything else a stage reads must be its dep.
EXCUSED = [  # (stages, keys, why)
    (("prepare",), ("prepare.num_proc", "prepare.batch_rows"),
     "worker processes and rows per batch; the output is the same (tests/test_prepare.py)"),
    (("sft", "reference", "dpo"), ("track.report_to",), "other trackers the curves also go to"),
    # the reference stage builds dpo's trainer to compute log-probs with dpo's own setup; a
    # log-prob depends on none of the loss settings, the batch order or the optimizer's
    (("reference",), ("dpo.beta", "dpo.loss_type", "dpo.loss_weights", "dpo.group_by_length", "dpo.train"),
     "settings of the loss, the batch order and the optimizer; the sample's sizes and seed are deps one by one"),
    (("dpo",), ("reference.batch_size",), "the batch of a reference pass dpo never runs (it reads the stored ones)"),
    (("dpo",), ("sft.lora.r", "sft.lora.target_modules"), "the fit sizes the adapter of models/sft, a dep"),
]
READ_BUT_NOT_A_DEP = {(stage, key): why for stages, keys, why in EXCUSED for stage in stages for key in keys}


def covers(declared: str, key: str) -> bool:
    return key == declared or key.startswith(declared + ".")


def test_dvc_yaml_params_are_what_each_stage_reads(trained):
    """Each stage's params in dvc.yaml against the params keys its code read while the trained
    chain ran (tests/conftest.py records them): a key read and not declared would let
    `dvc repro` keep stale outputs; a key declared and never read reruns the stage for nothing.
    Reads inside the machine check (it refuses runs, never changes outputs) are not deps."""
    reads = json.loads((trained.parent / "built.json").read_text())["reads"]
    stages = dvc_stages()
    assert set(reads) == {"fetch", "prepare", "sft", "reference", "dpo", "merge", "evaluate"}
    for stage, read in reads.items():
        declared = stages[stage]["params"]
        undeclared = [key for key in read["uses"] if (stage, key) not in READ_BUT_NOT_A_DEP
                      and not any(covers(entry, key) for entry in declared)]
        assert not undeclared, f"dvc.yaml stage {stage} reads params it does not declare: {undeclared}"
        unread = [entry for entry in declared
                  if not any(covers(entry, key) or covers(key, entry) for key in read["uses"])]
        assert not unread, f"dvc.yaml stage {stage} declares params its code never read: {unread}"
    allowed_but_unread = [pair for pair in READ_BUT_NOT_A_DEP if pair[1] not in reads[pair[0]]["uses"]]
    assert not allowed_but_unread, f"excused reads that no longer happen: {allowed_but_unread}"
