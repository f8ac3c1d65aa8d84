"""Typed schema of params.yaml, validated before any stage does work.

Unknown keys are rejected and a bad value fails with its key, the value and what is
allowed. `python -m stack_dpo.params` validates params.yaml; profiles and experiments are
stack_dpo.experiment's.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

PARAMS_FILE = "params.yaml"


class Section(BaseModel):
    # no inf or nan anywhere (an infinite dpo.beta trains a NaN adapter); counts and switches
    # take only ints and booleans (a YAML `true` is not the count 1). A float may still be
    # written as `5e-4`, which YAML 1.1 reads as a string and `dvc exp run -S` writes.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SplitDirs(Section):
    finetune: str = "data/finetune"
    rl: str = "data/rl"
    evaluation: str = "data/evaluation"


class SplitCaps(Section):
    finetune: StrictInt | None = Field(None, gt=0)
    rl: StrictInt | None = Field(None, gt=0)
    evaluation: StrictInt | None = Field(None, gt=0)


class DataParams(Section):
    source: str = Field(min_length=1)
    splits: SplitDirs = SplitDirs()


class ModelParams(Section):
    name_or_path: str = Field(min_length=1)
    quantization: Literal["none", "4bit"] = "none"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class FetchParams(Section):
    max_rows: SplitCaps = SplitCaps()
    streaming: StrictBool = True
    shard_rows: StrictInt = Field(50_000, gt=0)


class PrepareParams(Section):
    max_prompt_length: StrictInt = Field(gt=0)
    max_length: StrictInt = Field(gt=0)
    max_sft_length: StrictInt | None = Field(None, gt=0)  # None: max_length
    sft_eval_fraction: float = Field(gt=0, lt=1)
    batch_rows: StrictInt = Field(10_000, gt=0)
    num_proc: StrictInt | None = Field(None, gt=0)


class LoraParams(Section):
    r: StrictInt = Field(gt=0)
    alpha: StrictInt = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    target_modules: list[str] = Field(min_length=1)


AUTO = "auto"


def _count_or_auto(value):
    if value == AUTO or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise ValueError("expected a whole number above 0, or 'auto'")


def _switch_or_auto(value):
    if value == AUTO or isinstance(value, bool):
        return value
    raise ValueError("expected true, false or 'auto'")


# one error per key (a union would report each of its branches)
CountOrAuto = Annotated[int | Literal["auto"], PlainValidator(_count_or_auto)]
SwitchOrAuto = Annotated[bool | Literal["auto"], PlainValidator(_switch_or_auto)]


class TrainingParams(Section):
    """The transformers.TrainingArguments both trainers share. With per_device_train_batch_size
    `auto`, stack_dpo.fit chooses the micro-batch, the accumulation and (when `auto`) gradient
    checkpointing for the device's memory, keeping the global batch at global_batch_size."""

    learning_rate: float = Field(gt=0)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: StrictInt = Field(0, ge=0)
    max_steps: StrictInt = Field(gt=0)
    per_device_train_batch_size: CountOrAuto
    per_device_eval_batch_size: StrictInt = Field(gt=0)
    gradient_accumulation_steps: CountOrAuto = 1
    global_batch_size: StrictInt | None = Field(None, gt=0)  # with `auto` sizes: examples per step, all processes
    weight_decay: float = Field(0.0, ge=0)
    optim: str = "adamw_torch"
    gradient_checkpointing: SwitchOrAuto = False
    use_liger_kernel: StrictBool = False  # Liger's Triton RMSNorm, RoPE and SwiGLU (CUDA only)
    logging_steps: StrictInt = Field(gt=0)
    eval_steps: StrictInt = Field(gt=0)
    save_steps: StrictInt = Field(gt=0)
    save_total_limit: StrictInt = Field(2, gt=0)
    seed: StrictInt = 0

    @model_validator(mode="after")
    def _auto_sizes_together(self):
        auto = [self.per_device_train_batch_size == AUTO, self.gradient_accumulation_steps == AUTO]
        if any(auto) and not all(auto):
            raise ValueError("per_device_train_batch_size and gradient_accumulation_steps are `auto` together (the "
                             "fit chooses both) or both numbers")
        if all(auto) and self.global_batch_size is None:
            raise ValueError("with `auto` batch sizes, global_batch_size (examples per optimizer step) is required")
        if not any(auto) and self.global_batch_size is not None:
            raise ValueError("global_batch_size is for `auto` batch sizes; with numbers the global batch is "
                             "per_device_train_batch_size x gradient_accumulation_steps x launch.num_processes")
        return self


class SftParams(Section):
    seq_length: StrictInt = Field(gt=0)
    packing: StrictBool = True
    packing_strategy: Literal["wrapped", "bfd", "bfd_split"] = "wrapped"
    lora: LoraParams
    train: TrainingParams


class DpoParams(Section):
    beta: float = Field(gt=0)
    group_by_length: StrictBool = True  # batches of pairs of similar length (less padding; each pair once)
    # TRL's DPO losses (sigmoid is the recipe's); several are combined with loss_weights. The
    # dpo stage checks the names against the installed TRL.
    loss_type: list[str] = Field(["sigmoid"], min_length=1)
    loss_weights: list[float] | None = None
    train: TrainingParams

    @field_validator("loss_type", mode="before")
    @classmethod
    def _one_or_several(cls, value):
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _a_weight_per_loss(self):
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} weights for {len(self.loss_type)} loss types "
                             f"{self.loss_type}; expected one weight per loss type")
        return self


class ReferenceParams(Section):
    batch_size: StrictInt = Field(16, gt=0)


class LaunchParams(Section):
    """Where the model stages run, and how sft and dpo are launched: more than one process runs
    them under `accelerate launch`."""

    num_processes: StrictInt = Field(1, gt=0)
    config_file: str | None = None  # an accelerate config file (FSDP, DeepSpeed); None: plain DDP
    device: Literal["auto", "cuda"] = "auto"  # cuda: refuse to start without a CUDA GPU
    max_memory_gib: float | None = Field(None, gt=0)  # memory a process may use on its device; None: all free


class MergeParams(Section):
    save_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    max_shard_size: str = Field("5GB", pattern=r"^\d+(KB|MB|GB)$")
    rtol: float = Field(1e-4, gt=0)
    gap_pairs: StrictInt | None = Field(None, gt=0)


class EvaluateParams(Section):
    max_pairs: StrictInt | None = Field(None, gt=0)
    batch_size: StrictInt = Field(gt=0)
    generations: StrictInt = Field(ge=0)
    max_new_tokens: StrictInt = Field(gt=0)


class PushParams(Section):
    enabled: StrictBool = False
    repo_id: str = ""
    private: StrictBool = True
    revision: str = "main"
    create_pr: StrictBool = False
    license: str = "other"
    max_merge_accuracy_drop: float = Field(0.02, ge=0, le=1)
    allow_unvetted: StrictBool = False


class TrackParams(Section):
    # experiment trackers besides dvclive (always on); off by default, never required. Not a dvc.yaml
    # dep nor part of the resume fingerprint: where the curves also go does not change the outputs.
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = []


class Params(Section):
    data: DataParams
    model: ModelParams
    fetch: FetchParams
    prepare: PrepareParams
    launch: LaunchParams = LaunchParams()
    sft: SftParams
    reference: ReferenceParams = ReferenceParams()
    dpo: DpoParams
    merge: MergeParams
    evaluate: EvaluateParams
    push: PushParams
    track: TrackParams = TrackParams()

    @model_validator(mode="after")
    def _global_batch_splits_over_processes(self):
        for name, train in (("sft", self.sft.train), ("dpo", self.dpo.train)):
            if train.global_batch_size is not None and train.global_batch_size % self.launch.num_processes:
                raise ValueError(f"{name}.train.global_batch_size = {train.global_batch_size} does not split over "
                                 f"launch.num_processes = {self.launch.num_processes}; expected a multiple of it")
        return self


def global_batch(train: TrainingParams, launch: LaunchParams) -> int:
    """Examples per optimizer step over all processes."""
    if train.global_batch_size is not None:
        return train.global_batch_size
    return train.per_device_train_batch_size * train.gradient_accumulation_steps * launch.num_processes


class InvalidInput(ValueError):
    """Bad params or data: rerunning cannot fix it, so orchestrators must not retry."""


class ParamsError(InvalidInput):
    """params.yaml does not fit the schema; the message names every bad key."""


def _describe(errors: list[dict[str, Any]], source: str) -> str:
    lines = [f"{source}: invalid parameters:"]
    for err in errors:
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (allowed keys are those in params.yaml's schema, stack_dpo/params.py)")
        elif err["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        elif isinstance(err.get("input"), dict):  # a rule across keys (a model validator): the section is the input
            lines.append(f"  {key}: {err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {key} = {err.get('input')!r}: {err['msg']}")
    return "\n".join(lines)


def validate(raw: Any, source: str = PARAMS_FILE) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(_describe(exc.errors(), source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key written twice in one mapping (plain YAML keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, str) and key in lines:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is written twice, on lines {lines[key]} and {line}; keep one")
            lines[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> Any:
    """A params or profile file, as UTF-8 YAML with no key written twice; else ParamsError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (paths are relative to the repository root)") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ParamsError(f"{path}: not UTF-8 text (byte {data[exc.start:exc.start + 1]!r} on line {line}); "
                          "save it as UTF-8") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.constructor.ConstructorError as exc:
        raise ParamsError(f"{path}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    return validate(read_yaml(path), str(path))


def deep_merge(base: dict, override: dict) -> dict:
    """A new tree: `base` with `override` laid over it (neither is modified)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def main() -> None:
    try:
        load_params()
        print(f"{PARAMS_FILE}: valid")
    except InvalidInput as exc:
        sys.exit(str(exc))


if __name__ == "__main__":
    main()
