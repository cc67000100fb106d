#!/usr/bin/env bash
# Every GPU check of the project as one script, for a lent GPU machine (the device tool): the CUDA tests
# (tests/test_cuda.py, skipped where there is no GPU), the generation benchmark on an 11B-sized random
# model in bfloat16 with the decode step compiled to CUDA graphs, and the serving benchmark on it at 1, 8
# and 32 concurrent requests. About 8 minutes on an H200.
#
# That machine has PyTorch, transformers, tiktoken, safetensors and einops but not llama-models, whose
# tokenizer.model the tests and the benchmark use, so copy it into .gpu/ (git-ignored) first, here:
#   mkdir -p .gpu && cp "$(python -c 'import llama_models.llama3 as m, os; print(os.path.dirname(m.__file__))')/tokenizer.model" .gpu/
# then run `bash bench/gpu_check.sh` there with carry [".gpu"]; the logs land in $OUT when it is set.
set -uo pipefail
cd "$(dirname "$0")/.."
export LLAMA_TOKENIZER_MODEL="${LLAMA_TOKENIZER_MODEL:-$PWD/.gpu/tokenizer.model}" PYTHONUNBUFFERED=1
logs="${OUT:-/tmp/gpu_check}"
mkdir -p "$logs"
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1  # offline: nothing fetched
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$logs/test_cuda.log"
tests=${PIPESTATUS[0]}
python3 bench/generate.py --device cuda --dtype bfloat16 --compile \
    --preset llama-3.2-11b-vision-instruct --skip-hf 2>&1 | tee "$logs/bench_11b.log"
bench=${PIPESTATUS[0]}
python3 bench/serving.py --device cuda --dtype bfloat16 --compile --preset llama-3.2-11b-vision-instruct \
    --skip-hf --clients 1 8 32 --new-tokens 64 2>&1 | tee "$logs/serving_11b.log"
serving=${PIPESTATUS[0]}
echo "tests exit $tests, benchmark exit $bench, serving exit $serving"
exit $((tests || bench || serving))
