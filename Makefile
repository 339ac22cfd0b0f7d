# Two commands do all the set-up (see README.md):
#   make course  - install and open the course in JupyterLab, on the embedded model
#   make test    - install and run every check: notebooks/library sync, every notebook, every test
#   make render  - execute every notebook and write its outputs (pictures) into the committed notebooks
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
TORCH ?= torch>=2.6
CONSTRAINTS ?=    # e.g. tests/oldest.txt: install the oldest supported releases (use another VENV for it)

.PHONY: install course test sync lint-sync render render-check bench bench-gpu clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]" $(if $(strip $(CONSTRAINTS)),-c $(strip $(CONSTRAINTS)))

course: install
	cd nbs && ../$(BIN)/jupyter lab

sync:
	$(BIN)/nbdev_clean
	$(BIN)/nbdev_export
	@git status --porcelain -- nbs sd_intro | grep . && { echo "Notebooks and sd_intro/ are out of sync or unclean: run nbdev_export and nbdev_clean, then commit"; git diff --stat; exit 1; } || echo "sync check: notebooks and library agree"

test: install sync
	$(BIN)/python -m pytest tests -v --durations=15

render: install  # execute every notebook as a student's Run All does (embedded model, no GPU) and keep the outputs
	$(BIN)/python tools/render.py --write
	@echo "outputs written: commit nbs/*.ipynb, nbs/_rendered.json and nbs/images/"

render-check:  # the committed outputs are there and fresh (no code cell changed since make render)
	$(BIN)/python -m pytest tests/test_rendered.py -q

CPU_BENCH = overhead guidance course embedded finetune
GPU_BENCH = bench_gpu playground_gpu

bench: install  # the CPU benchmarks (bench/RESULTS.md sections 1, 2 and 4)
	for f in $(CPU_BENCH); do $(BIN)/python bench/bench_$$f.py || exit 1; done

bench-gpu: install  # needs CUDA: SD 1.5 at full size, plain vs fast (section 5), and the playground on the GPU
	for f in $(GPU_BENCH); do $(BIN)/python bench/$$f.py || exit 1; done

clean:
	rm -rf $(VENV) _docs _proc
