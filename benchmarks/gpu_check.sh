#!/usr/bin/env bash
# The GPU check (issue 14, benchmarks/gpu_check.py): the paper preset with random weights, batch 32 slices x R 4,
# T 8, all iterations, on one CUDA GPU: torch eager fp32 / fp16 / bf16 autocast, CUDA graphs, torch.compile; the
# CUDA-graph maps checked against eager; benchmarks/results/gpu_<card>.json (copied to $OUT when that is set).
#
#   bash benchmarks/gpu_check.sh              the check (about 5-6 minutes on an H100/H200; stops under 8)
#   bash benchmarks/gpu_check.sh --dry-run    tiny sizes on the CPU, seconds: is it wired? (tests/test_gpu_check.py)
#
# The lent GPU machine has python 3, torch with CUDA and Triton, numpy, scipy, safetensors, click, tqdm, onnx and
# onnxruntime, but no MONAI (the VQ-VAE), and no network. MONAI is pure python; fetch its wheel beside the
# checkout on a machine with network, from the repository root, before the run (.whl/ is git-ignored: carry it):
#
#   python3 -m pip download --no-deps --only-binary=:all: --platform any --python-version 3.12 \
#       --implementation py -d .whl monai==1.6.1
#
# This script installs every .whl/*.whl into /tmp/site (pip when the machine has it, else by unpacking the
# wheel, which is what installing a pure-python wheel does) and puts it and the repository on PYTHONPATH. The
# check needs nothing else of mimood's dependencies (no nibabel, scikit-learn, matplotlib or einops: the slices
# are synthetic; tested by blocking them).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
SITE="${GPU_CHECK_SITE:-/tmp/site}"

shopt -s nullglob
wheels=(.whl/*.whl)
if (( ${#wheels[@]} )); then
    mkdir -p "$SITE"
    if "$PYTHON" -m pip --version >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${wheels[@]}"
    else
        for w in "${wheels[@]}"; do "$PYTHON" -m zipfile -e "$w" "$SITE"; done
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c "import monai" 2>/dev/null; then
    echo "gpu_check: MONAI is not importable; fetch its wheel into .whl/ first (see the header of $0)" >&2
    exit 2
fi

# 470 s: the script's own budget (--budget, no path starts after it) keeps it well inside; results are written
# after every path, so even a kill leaves what was measured.
status=0
timeout 470 "$PYTHON" benchmarks/gpu_check.py "$@" || status=$?
if [[ -n "${OUT:-}" && -d "${OUT}" ]]; then
    for f in benchmarks/results/gpu_*.json; do cp "$f" "$OUT/"; done
fi
exit "$status"
