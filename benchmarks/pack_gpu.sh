#!/usr/bin/env bash
# Fill gpu-wheels/ (ignored by git) with the wheels that the GPU machine of docs/gpu.md lacks, for its Python 3.12 on
# x86-64 Linux, so that `benchmarks/gpu_check.py` runs there without a network:
#
#     bash benchmarks/pack_gpu.sh [FOLDER]        # default: gpu-wheels (at the repository's root)
#
# That machine's image (as read there, 2026-11) holds torch 2.11, transformers 5.17, accelerate 1.15, peft, timm,
# safetensors 0.8.0, huggingface_hub 1.33, torchvision, torchmetrics 1.9, matplotlib, pillow, requests, numpy, pyyaml,
# regex and tqdm, which rglcd imports too; it lacks the packages below. All are pure Python but wcwidth (an abi3
# wheel for any CPython >= 3.10). The versions are the ones this repository's CPU suite runs with; diffusers 0.42.1
# needs huggingface_hub >= 1.32 and safetensors >= 0.8.0, which the image meets. Every wheel is fetched with
# --no-deps: a dependency that is not in this list comes from the image.
set -euo pipefail

cd "$(dirname "$0")/.."
folder="${1:-gpu-wheels}"
packages=(
    diffusers==0.42.1
    importlib_metadata==10.2.0  # a declared requirement of diffusers
    open_clip_torch==3.3.0      # rewards (HPSv2.1) and the CLIP tokenizer's BPE file
    ftfy==6.3.1                 # open_clip's text cleaning
    wcwidth==0.9.5              # ftfy's
    webdataset==1.0.2           # the training data stream
    braceexpand==0.1.7          # webdataset's
)

rm -rf "$folder"
mkdir -p "$folder"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --dest "$folder" "${packages[@]}"
ls -l "$folder"
du -sh "$folder"
