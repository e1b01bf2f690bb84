# make train   — set up .venv (uv) and run the default job: tiny model, nf4 QLoRA, offline W&B
# make test    — set up .venv and run the CPU test suite (what CI runs)
PY := .venv/bin/python
UV ?= $(shell command -v uv 2>/dev/null || echo .venv-uv/bin/uv)

.PHONY: setup train test sweep compare clean

setup: .venv/.installed

.venv/.installed: pyproject.toml
	@command -v uv >/dev/null 2>&1 || [ -x .venv-uv/bin/uv ] || \
		(python3 -m venv .venv-uv && .venv-uv/bin/pip install -q uv)
	$(UV) venv -q --allow-existing .venv
	$(UV) pip install -q -p $(PY) -e '.[dev]'
	@touch $@

train: setup
	$(PY) train.py $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

sweep: setup
	$(PY) train.py -m lora.r=8,16 $(ARGS)

compare: setup  # make compare SWEEP=outputs/multirun/<time>  (default: the newest sweep)
	$(PY) -m qlora_lab.compare $(or $(SWEEP),$(lastword $(sort $(wildcard outputs/multirun/*))))

clean:
	rm -rf outputs/runs outputs/multirun
