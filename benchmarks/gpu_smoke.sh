#!/usr/bin/env bash
# The GPU checks in one command: the CUDA test module (tests/gpu), the trainer-overhead benchmark
# on the GPU in fp32 and bf16, and the SFT benchmark at a 0.3B-parameter Llama built from a config
# (bf16, with MFU). CI has no GPU; run this on a machine that has one.
#
#   benchmarks/gpu_smoke.sh --fetch-wheels   on a machine with the package index: download into .whl/
#                                            the wheels a bare GPU machine lacks (for Python $PYVER,
#                                            default 3.12), at the versions this checkout's .venv holds
#   benchmarks/gpu_smoke.sh [OUT_DIR]        on the GPU machine (no network needed): install .whl/ into
#                                            a private folder, run the checks, write logs to OUT_DIR
#
# The GPU machine is expected to have torch with CUDA, transformers, numpy, pandas, pyarrow,
# scikit-learn, matplotlib, typer, rich, safetensors, tokenizers, tensorboard, prometheus-client,
# pytest, hypothesis and httpx (see the platform notes); what forgeml needs beyond those is below.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(pydantic pydantic_core annotated-types typing-inspection typing_extensions fastapi starlette
        annotated-doc uvicorn datasketch cleanlab termcolor imbalanced-learn sklearn-compat pytest-timeout
        peft accelerate)

if [ "${1:-}" = "--fetch-wheels" ]; then
    py=.venv/bin/python
    mkdir -p .whl
    for name in "${WHEELS[@]}"; do
        version=$($py -m pip show "$name" | sed -n 's/^Version: //p')
        python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d .whl "$name==$version"
    done
    du -sh .whl
    exit 0
fi

OUT=${1:-${OUT:-gpu-smoke-out}}
mkdir -p "$OUT"
site=$(mktemp -d)
if [ -d .whl ]; then
    python3 -m pip install --quiet --no-index --no-deps --no-compile --target "$site" .whl/*.whl
fi
export PYTHONPATH="$PWD/src:$site${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

status=0
python3 -m pytest -q -p no:cacheprovider tests/gpu -rs 2>&1 | tee "$OUT/tests.log" || status=1
for precision in fp32 bf16; do
    python3 benchmarks/train_overhead.py --device cuda --precision "$precision" --rounds 3 2>&1 \
        | tee -a "$OUT/train_overhead.log" || status=1
done
python3 benchmarks/sft.py --device cuda --precision bf16 --hidden 1024 --layers 24 --max-length 1024 \
    --batch 8 --steps 30 --rounds 1 --rows 3000 2>&1 | tee "$OUT/sft.log" || status=1
exit $status
