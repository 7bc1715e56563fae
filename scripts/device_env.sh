#!/usr/bin/env bash
# Source this at the start of a command on the offline GPU machine (repo root as cwd):
#   . scripts/device_env.sh
# It installs the carried wheels in .whl (bitsandbytes etc.) into /tmp/site and makes `qconv` importable
# without pip (the image has no build tools offline): a /tmp/qconv_path/qconv folder whose sub-packages
# point at converter/, runtime/ and kernels/.
root=$(pwd)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
fi
rm -rf /tmp/qconv_path && mkdir -p /tmp/qconv_path/qconv
cp "$root"/qconv/*.py /tmp/qconv_path/qconv/
ln -s "$root/converter" /tmp/qconv_path/qconv/converter
ln -s "$root/runtime" /tmp/qconv_path/qconv/runtime
ln -s "$root/kernels" /tmp/qconv_path/qconv/kernels
export PYTHONPATH=/tmp/site:/tmp/qconv_path${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1
# The image sets PYTHONDONTWRITEBYTECODE=1 and its site-packages has no bytecode cache, so every process
# recompiled torch/transformers/bitsandbytes from source (~18 s). Keep a bytecode cache in /tmp instead,
# as a user's machine has one; warm it once here so timings see warm imports.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=/tmp/pyc
python3 -c "import torch, transformers, bitsandbytes, transformers.models.llama.modeling_llama; from transformers import AutoModelForCausalLM, AutoTokenizer" >/dev/null 2>&1 || true
python3 -c "import qconv, torch; print('qconv', qconv.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
