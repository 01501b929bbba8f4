#!/usr/bin/env bash
# Set up the onnxruntime-genai peer for the ONNX benchmark in its OWN venv
# (its model builder needs transformers 5; the project pins transformers 4.x).
#
#   bash benchmarks/setup_ort_genai.sh HF_DIR
#
# HF_DIR: a Hugging Face checkpoint folder of SmolLM2-135M-Instruct (float32
# safetensors + tokenizer files), e.g. tests.fixtures.smollm2.smollm2_hf_dir().
# Env overrides: VENV (default /work/venvs/ort-genai),
#                OUT  (default /work/venvs/ort-genai-models; gets fp32/ and int4/),
#                TORCH_PIP_ARGS (extra pip args for torch, e.g. a CPU-wheel index:
#                an unpinned/plain PyPI torch on Linux is the multi-GB CUDA build).
# Then: $VENV/bin/python benchmarks/ort_genai_peer.py $OUT/int4 --prompt ... --tokens 64 --threads 2
set -euo pipefail

HF_DIR=${1:?usage: setup_ort_genai.sh HF_DIR}
VENV=${VENV:-/work/venvs/ort-genai}
OUT=${OUT:-/work/venvs/ort-genai-models}
PY="$VENV/bin/python"

python3.11 -m venv "$VENV"
# shellcheck disable=SC2086
"$PY" -m pip install ${TORCH_PIP_ARGS:-} "torch==2.13.0"
"$PY" -m pip install "onnxruntime-genai==0.18.0" "onnxruntime==1.32.0" \
    "transformers==5.24.0" "tokenizers==0.23.3" "safetensors==0.8.0" \
    "onnx==1.23.2" "onnx-ir==1.1.0" "numpy==2.4.6" "protobuf==7.36.2"

# No hub access: everything comes from HF_DIR.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
"$PY" -m onnxruntime_genai.models.builder -i "$HF_DIR" -o "$OUT/fp32" -p fp32 -e cpu -c "$OUT/.cache"
# int4 = the builder's CPU defaults, spelled out: RTN, symmetric, block 32,
# accuracy_level 4 (int8 activations); lm_head (tied with the embedding) is int4 too.
"$PY" -m onnxruntime_genai.models.builder -i "$HF_DIR" -o "$OUT/int4" -p int4 -e cpu -c "$OUT/.cache" \
    --extra_options block_size=32 accuracy_level=4 is_symmetric=true
rm -rf "$OUT/.cache"
du -sh "$OUT/fp32" "$OUT/int4"
