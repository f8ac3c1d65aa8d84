"""The layout the code and dvc.yaml must agree on: each stage is an entry point that imports
the library (stack_dpo) and never another stage; dvc.yaml lists as a stage's code deps exactly
the files its code imports, and no path the library does not name."""

from __future__ import annotations

import ast
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
            owner = next((c for c in constants if entry == c or Path(entry).parent == Path(c)), None)
            assert owner, f"dvc.yaml path {entry!r} is not one of (or directly under one of) {sorted(constants)}"
            used.add(owner)
    assert used == constants, f"stack_dpo/paths.py names paths dvc.yaml never uses: {sorted(constants - used)}"
