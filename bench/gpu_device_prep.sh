#!/usr/bin/env bash
# Prepares bench/gpu_bench.py for a GPU machine that cannot reach a package registry or the
# shared data (this workplace's device machine: PyTorch, transformers, accelerate, peft, pyarrow
# and pandas are there; TRL and datasets are not). Writes, under the ignored folder .device/:
#   wheels/     TRL, datasets and their pure-Python needs, for Python 3.12 (--no-deps each)
#   tokenizer/  the default model's tokenizer and chat template (the weights stay behind: --random)
#   issues.json a copy of the real issue sample, for real lengths (not committed: carried only)
# Then, on the machine (the repository root, .device carried):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/wheels/*.whl &&
#   PYTHONPATH=/tmp/site:src python3 bench/gpu_bench.py --random --tokenizer .device/tokenizer \
#       --data .device/issues.json --out $OUT/gpu_bench.json
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
mkdir -p .device/wheels
pins() { grep -E "^($1)==" constraints.txt; }
for spec in $(pins 'trl|datasets|dill|multiprocess'); do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .device/wheels "$spec"
done
.venv/bin/python - <<'PY'
from transformers import AutoTokenizer

from gpt_finetune.home import Home
from gpt_finetune.local.base_weights import DEFAULT_BASE_MODEL, resolve_base, tokenizer_dir

AutoTokenizer.from_pretrained(tokenizer_dir(resolve_base(DEFAULT_BASE_MODEL), Home())).save_pretrained(".device/tokenizer")
PY
if [ -f ../shared/data/nlbse24_sample.json ]; then cp ../shared/data/nlbse24_sample.json .device/issues.json; fi
du -sh .device
