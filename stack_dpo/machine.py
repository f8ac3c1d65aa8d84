"""What a run needs of the machine, checked before any work (sft and dpo before they touch their
checkpoints, `make exp-full` before DVC touches the workspace, `stack-dpo check` on demand): the
device asked for, and on a GPU bfloat16, its compute capability, one real NF4 matrix product, and
memory for the fitted batches; access to a gated base model with the token; disk for the merged
model. Everything missing is named at once."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import torch

from stack_dpo.faults import TransientError, transient, with_retries
from stack_dpo.fit import GIB, model_shape, plan
from stack_dpo.hub import HUB_ID
from stack_dpo.modeling import DTYPES, checked_source
from stack_dpo.params import InvalidInput, Params
from stack_dpo.paths import MERGED

BNB_MIN_CAPABILITY = (5, 0)     # bitsandbytes' 4-bit CUDA kernels
TRITON_MIN_CAPABILITY = (8, 0)  # Triton (Liger's kernels): Ampere or newer
NF4_MAX_ERROR = 2e-2            # relative error of an NF4 product in bf16 (bf16 operands: 1e-3 to 1e-2)
MERGE_DISK_MARGIN = 1.1         # the merged model's bytes, and a tenth more for tokenizer, card, temporaries


def nf4_matmul_error(device: str) -> float:
    """Relative error of one NF4 matrix product through bitsandbytes on `device`, against float32
    on the dequantized weights: a broken install or an unsupported GPU fails or returns garbage."""
    import bitsandbytes
    import bitsandbytes.functional as functional

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 512, generator=generator).to(device, torch.bfloat16)
    inputs = torch.randn(16, 512, generator=generator).to(device, torch.bfloat16)
    packed, state = functional.quantize_4bit(weight, quant_type="nf4")
    out = bitsandbytes.matmul_4bit(inputs, packed.t(), quant_state=state).float()
    want = inputs.float() @ functional.dequantize_4bit(packed, state).float().t()
    return ((out - want).norm() / want.norm()).item()


def check_gpu(params: Params, device: int) -> list[str]:
    """What the GPU must offer this run; returns what was found, raises with everything missing."""
    name = torch.cuda.get_device_name(device)
    capability = torch.cuda.get_device_capability(device)
    found, missing = [f"GPU {device}: {name}, compute capability {capability[0]}.{capability[1]}"], []
    if (params.model.dtype == "bfloat16" or params.model.quantization == "4bit") and \
            not torch.cuda.is_bf16_supported():
        missing.append(f"{name} has no bfloat16, which model.dtype = {params.model.dtype!r} and 4-bit compute "
                       "(bf16) need; set model.dtype: float16 with model.quantization: none, or use an Ampere or "
                       "newer GPU")
    if params.model.quantization == "4bit":
        if capability < BNB_MIN_CAPABILITY:
            missing.append(f"{name} (compute capability {capability[0]}.{capability[1]}) is older than bitsandbytes' "
                           f"4-bit kernels support ({BNB_MIN_CAPABILITY[0]}.{BNB_MIN_CAPABILITY[1]})")
        else:
            error = nf4_matmul_error(f"cuda:{device}")
            if not error <= NF4_MAX_ERROR:
                missing.append(f"an NF4 matrix product on {name} is off by {error:.2e} (relative; expected at most "
                               f"{NF4_MAX_ERROR}): bitsandbytes does not work on this GPU or install")
            else:
                found.append(f"NF4 matrix product on the GPU: relative error {error:.1e}")
            torch.cuda.empty_cache()  # the product's memory back to the GPU, for the fit to see
    if any(t.use_liger_kernel for t in (params.sft.train, params.dpo.train)) and capability < TRITON_MIN_CAPABILITY:
        missing.append(f"{name} (compute capability {capability[0]}.{capability[1]}) is older than Triton's kernels "
                       f"(Liger) support ({TRITON_MIN_CAPABILITY[0]}.{TRITON_MIN_CAPABILITY[1]}); set "
                       "use_liger_kernel: false")
    if missing:
        raise InvalidInput("this GPU cannot run these params:\n  - " + "\n  - ".join(missing))
    return found


def check_memory(params: Params, shape) -> list[str]:
    """The batches sft and dpo will use fit the memory the device has (stack_dpo.fit)."""
    fits = [("sft", params.sft.train, params.sft.seq_length), ("dpo", params.dpo.train, 2 * params.prepare.max_length)]
    found = []
    for stage, train, tokens in fits:
        chosen = plan(stage, train, params.launch, params.model, shape, tokens)
        found.append(f"{stage}: micro-batch {chosen.micro_batch} x accumulation {chosen.accumulation}, activation "
                     f"checkpointing {'on' if chosen.checkpointing else 'off'}: about {chosen.estimated_gib:.1f} GiB "
                     f"of {chosen.budget_gib:.1f} GiB ({chosen.budget})")
    return found


def check_hub_access(name_or_path: str) -> list[str]:
    """A base model on the Hub can be read with the token (gated models such as meta-llama's need an
    accepted license); not checked offline (HF_HUB_OFFLINE), where only the local cache is read."""
    if Path(name_or_path).exists() or not HUB_ID.match(name_or_path):
        return []
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return [f"model {name_or_path}: Hub access not checked (HF_HUB_OFFLINE): read from the local cache"]
    try:
        with_retries(f"the Hub's access check of {name_or_path}", lambda: HfApi().auth_check(name_or_path))
    except GatedRepoError:
        raise InvalidInput(f"model.name_or_path = {name_or_path!r} is gated and the Hub token (HF_TOKEN or `hf auth "
                           f"login`) has no access: accept its license at https://huggingface.co/{name_or_path} with "
                           "that account") from None
    except RepositoryNotFoundError:
        raise InvalidInput(f"model.name_or_path = {name_or_path!r}: no such model on the Hub, or a private one the "
                           "token cannot see") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            raise InvalidInput(f"the Hub rejected the token (401) checking {name_or_path!r}: set a valid "
                               "HF_TOKEN") from None
        if transient(exc):
            raise TransientError(f"the Hub's access check of {name_or_path} failed: {exc}") from None
        raise
    return [f"model {name_or_path}: readable with this token"]


def check_disk(params: Params, shape) -> list[str]:
    """Room for models/merged: every weight in merge.save_dtype."""
    need = (shape.linear_params + shape.other_params) * DTYPES[params.merge.save_dtype].itemsize * MERGE_DISK_MARGIN
    where = next(p for p in (MERGED.resolve(), *MERGED.resolve().parents) if p.exists())
    free = shutil.disk_usage(where).free
    if free < need:
        raise OSError(errno.ENOSPC, f"models/merged will need about {need / GIB:.1f} GiB and {where} has "
                                    f"{free / GIB:.1f} GiB free", str(MERGED))
    return [f"disk: {free / GIB:.1f} GiB free for models/merged (about {need / GIB:.1f} GiB)"]


def check_machine(params: Params, probe_gpu: bool = True) -> list[str]:
    """Everything above for `params`; returns what was found (`stack-dpo check` prints it). Without
    `probe_gpu` a GPU is not touched (no CUDA context in a long-lived process such as a Prefect
    flow's: the GPU stages check it themselves before work)."""
    from transformers import AutoConfig

    if params.launch.device == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("launch.device = 'cuda': this machine has no CUDA GPU (torch.cuda.is_available() is "
                           "False); run on a GPU worker, or set launch.device: auto to run on the CPU")
    found = check_hub_access(params.model.name_or_path)
    on_gpu = torch.cuda.is_available()
    if on_gpu and probe_gpu:
        found += check_gpu(params, int(os.environ.get("LOCAL_RANK", 0)))
    shape = model_shape(AutoConfig.from_pretrained(checked_source(params.model.name_or_path)), params.sft.lora)
    if probe_gpu or not on_gpu:
        found += check_memory(params, shape)
    return found + check_disk(params, shape)
