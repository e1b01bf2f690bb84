# Sourced at the start of a GPU-machine command (it has no network): installs the carried wheels (.whl from the
# wheelhouse script, .unsloth_whl for the Unsloth peer if present) into /tmp/site and sets an offline env.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl $(ls .unsloth_whl/*.whl 2>/dev/null) || return 1
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1 WANDB_MODE=offline UNSLOTH_DISABLE_STATISTICS=1 \
  UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_compiled_cache
