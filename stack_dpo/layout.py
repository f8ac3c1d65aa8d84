"""Which files a stage's code is: its entry point stages/<stage>.py and every stack_dpo module
it reaches through imports. dvc.yaml lists exactly these as the stage's code deps
(tests/test_layout.py), and a training stage's resume fingerprint hashes exactly these."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout: stages/ and stack_dpo/ side by side
PACKAGES = ("stages", "stack_dpo")


def imported_modules(path: Path) -> set[str]:
    """The stages.* and stack_dpo.* modules a file imports (`from stack_dpo import x` counts x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names
                      if (ROOT / node.module.replace(".", "/") / f"{alias.name}.py").is_file()}
    return {name for name in found if name.split(".")[0] in PACKAGES and "." in name}


def code_files(stage: str) -> list[str]:
    """stages/<stage>.py and every library module it reaches, as paths relative to ROOT."""
    todo, seen = [f"stages.{stage}"], set()
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += imported_modules(ROOT / (module.replace(".", "/") + ".py"))
    return sorted(module.replace(".", "/") + ".py" for module in seen)
