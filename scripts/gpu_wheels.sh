#!/usr/bin/env bash
# Wheels for running `make gpu-check` on a GPU machine that has CUDA torch but not this project's
# other packages and no internet (this workplace's lent GPU: Python 3.12, torch, transformers,
# accelerate, numpy, pandas, pyarrow, safetensors, tokenizers already there). Run here, where the
# package index is reachable; carry .gpu-wheels (git-ignored) and on the GPU machine run:
#     pip install --no-index --no-deps .gpu-wheels/*.whl && python -m bench.gpu_check
# bitsandbytes is cut down to the CUDA library the machine's CUDA 13 torch loads (the whole wheel
# carries one per CUDA version), so that the wheels travel within 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.gpu-wheels
rm -rf "$out" && mkdir -p "$out"
packages=(trl peft transformers huggingface_hub httpx2 httpcore2 h2 hpack hyperframe truststore datasets dill
          multiprocess dvclive dvc dvc-render dvc-studio-client dvc-data dvc-objects flatten-dict funcy ruamel.yaml
          voluptuous pydantic pydantic-core annotated-types typing-inspection bitsandbytes liger-kernel hf-xet sniffio)
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 -c constraints.txt -d "$out" "${packages[@]}"
cuda=${GPU_CUDA:-130}  # the CUDA version of the GPU machine's torch: torch.version.cuda without the dot
wheel=$(ls "$out"/bitsandbytes-*.whl)
scratch=$(mktemp -d)
(cd "$scratch" && unzip -q "$OLDPWD/$wheel" && find bitsandbytes -name 'libbitsandbytes_cuda*.so' \
    ! -name "libbitsandbytes_cuda${cuda}.so" -delete && rm -f "$OLDPWD/$wheel" && zip -qr "$OLDPWD/$wheel" .)
rm -rf "$scratch"
du -sh "$out"
