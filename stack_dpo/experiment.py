"""A profile (profiles/*.yaml, overrides of params.yaml) as a DVC experiment, checked first:
`python -m stack_dpo.experiment --profile profiles/llama2-7b.yaml` prints it as `dvc exp run -S
key=value` arguments, and `--run-exp NAME` runs it as the experiment NAME (what `make exp-full`
uses), after checking the params and this machine, so a refused run touches nothing.

Not a stage dependency: it imports the model code only to check the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from stack_dpo.params import PARAMS_FILE, InvalidInput, Params, deep_merge, flatten, read_yaml, validate


def profile_set_args(profile: Path, params_file: Path = Path(PARAMS_FILE)) -> list[str]:
    """`-S key=value` arguments that turn params.yaml into `profile` (validated first)."""
    override = read_yaml(profile) or {}
    profile_params(profile, params_file)
    args = []
    for key, value in flatten(override).items():
        args += ["-S", f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]
    return args


def profile_params(profile: Path, params_file: Path = Path(PARAMS_FILE)) -> Params:
    """params.yaml with `profile` laid over it, validated."""
    return validate(deep_merge(read_yaml(params_file), read_yaml(profile) or {}), f"{params_file} + {profile}")


def check_machine(params: Params, probe_gpu: bool = True) -> list[str]:
    """What this machine must have for `params` (stack_dpo.machine: the GPU the profile asks for,
    memory, access to the base, disk), checked before an experiment touches the workspace: a 7B
    profile refused on a CPU must not first replace params.yaml and data/raw and then fail."""
    from stack_dpo.machine import check_machine as check  # torch and transformers: only when needed

    return check(params, probe_gpu)


def main() -> None:
    parser = argparse.ArgumentParser(description="Print a profile as dvc -S arguments, or run it as an experiment.")
    parser.add_argument("--profile", type=Path, required=True, help="a profile YAML (overrides of params.yaml)")
    parser.add_argument("--run-exp", metavar="NAME", help="run the profile as the DVC experiment NAME")
    args = parser.parse_args()
    try:
        set_args = profile_set_args(args.profile)
        if args.run_exp:
            check_machine(profile_params(args.profile))
            os.execvp("dvc", ["dvc", "exp", "run", "--name", args.run_exp, *set_args])
        print(" ".join(set_args))
    except InvalidInput as exc:
        sys.exit(str(exc))


if __name__ == "__main__":
    main()
