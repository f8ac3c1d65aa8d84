"""The entry point every stage shares: validate params.yaml first, then run the stage.

Bad params or data end the stage with exit code 2 and a line starting with PERMANENT_FAILURE,
which tells the Prefect flow not to retry it; a full disk and a transient fault end it with
their own codes and one line each (stack_dpo.faults), and the flow retries them. A training
stage whose params ask for more than one process re-runs itself under `accelerate launch`
(DDP, or the FSDP / DeepSpeed setup of launch.config_file)."""

from __future__ import annotations

import argparse
import ast
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable

from stack_dpo.faults import (
    INVALID_INPUT_EXIT,
    NO_SPACE_EXIT,
    TRANSIENT_EXIT,
    TransientError,
    describe_no_space,
    no_space,
)
from stack_dpo.params import InvalidInput, LaunchParams, Params, load_params

PERMANENT_FAILURE = "stack-dpo: invalid input, not retrying:"
TRANSIENT_FAILURE = "stack-dpo: transient failure, retry later:"
NO_SPACE_FAILURE = "stack-dpo: out of disk space, retry when freed:"


def accelerate_command(module: str, launch: LaunchParams) -> list[str]:
    """`accelerate launch` of `python -m module` with launch.num_processes processes on this node."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(launch.num_processes),
               "--num_machines", "1", "--dynamo_backend", "no"]
    if launch.config_file:
        if not os.path.isfile(launch.config_file):
            raise InvalidInput(f"launch.config_file = {launch.config_file!r}: no such file; expected an accelerate "
                               "config such as deploy/accelerate/fsdp.yaml")
        command += ["--config_file", launch.config_file]
    else:
        command += ["--multi_gpu", "--mixed_precision", "no"]  # DDP; on a CPU-only machine the trainer picks gloo
    return [*command, "-m", module]


class WhitespaceBoundaryWarning(logging.Filter):
    """Drops TRL's "tokenized prompt is not a prefix" warning when all it names is whitespace:
    the recipe's prompt ends in a space that joins the answer's first token. prepare checks that
    and says so once, and generation leaves the space out as training does
    (stack_dpo.dataset.generation_prompt). Any other boundary is still reported."""

    LEFT_OUT = re.compile(r"left out of the training sequence: ('[^']*')\. ")  # repr() of the part

    def filter(self, record: logging.LogRecord) -> bool:
        found = self.LEFT_OUT.search(record.getMessage())
        return not (found and not ast.literal_eval(found.group(1)).strip())


class HubKernelNotice(logging.Filter):
    """Drops bitsandbytes' notice, at import on CPUs with AVX512-BF16, that it could not download
    an inference kernel from the Hub (kernels-community): stages download nothing at run time,
    and stack_dpo.modeling turns that inference path off, so the kernel would not be used.
    Installed before anything imports bitsandbytes: by stages/__init__.py and by `stack-dpo`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


def parse_args() -> None:
    """`python -m stages.<name> --help` prints the stage's docstring and exits; the stage takes
    no arguments (params.yaml holds its settings), so any other argument is an error."""
    stage = sys.modules["__main__"]
    module = stage.__spec__.name if stage.__spec__ else "stages.<name>"
    argparse.ArgumentParser(prog=f"python -m {module}", description=stage.__doc__,
                            epilog="Settings come from params.yaml; `stack-dpo check` validates them.",
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()


def main(run: Callable[[Params], object], distributed: bool = False) -> None:
    parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    # raised inside TRL and PEFT (model.is_gradient_checkpointing), not by anything stack-dpo calls
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # TRL 1.16 deprecates use_liger_kernel for Hub kernels, which a GPU worker without internet cannot download
    warnings.filterwarnings("ignore", message="`use_liger_kernel=True` is deprecated", category=FutureWarning)
    logging.getLogger("trl.trainer.dpo_trainer").addFilter(WhitespaceBoundaryWarning())
    try:
        params = load_params()  # params are validated before any work: nothing is read or written
        launched = "LOCAL_RANK" in os.environ
        if distributed and params.launch.num_processes > 1 and not launched:
            import torch

            on_gpu = torch.cuda.is_available()
            devices, kind = (torch.cuda.device_count(), "GPUs") if on_gpu else (os.cpu_count(), "CPUs")
            if params.launch.num_processes > devices:
                raise InvalidInput(f"launch.num_processes = {params.launch.num_processes}: this machine has {devices} "
                                   f"{kind}; expected at most one process per device")
            module = sys.modules["__main__"].__spec__.name
            os.execv(sys.executable, accelerate_command(module, params.launch))
        run(params)
    except InvalidInput as exc:
        print(f"{PERMANENT_FAILURE} {exc}", file=sys.stderr)
        sys.exit(INVALID_INPUT_EXIT)
    except TransientError as exc:
        print(f"{TRANSIENT_FAILURE} {exc}", file=sys.stderr)
        sys.exit(TRANSIENT_EXIT)
    except OSError as exc:
        if not no_space(exc):
            raise
        print(f"{NO_SPACE_FAILURE} {describe_no_space(exc)}", file=sys.stderr)
        sys.exit(NO_SPACE_EXIT)
