# dora-lightning developer commands. `make test` and `make demo` build the venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install test test-fast bench bench-gpu bench-learning bench-learning-gpu device-wheels demo format lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# pytest processes (pytest-xdist; each test file runs whole in one of them); TEST_WORKERS=0 runs in this process
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"

bench: install
	$(PY) benchmarks/bench_data.py --out bench_out/bench_data.json
	$(PY) benchmarks/bench_diversity.py --out bench_out/bench_diversity.json
	$(PY) benchmarks/bench_resume_layout.py --out bench_out/bench_resume_layout.json
	$(PY) benchmarks/bench_interlaced.py --out bench_out/bench_interlaced.json
	$(PY) benchmarks/bench_handoff.py --out bench_out/bench_handoff.json
	$(PY) benchmarks/bench_step.py --out bench_out/bench_step.json
	$(PY) benchmarks/bench_knn.py --out bench_out/bench_knn.json
	$(PY) benchmarks/bench_seg.py --out bench_out/bench_seg.json
	$(PY) benchmarks/bench_davis.py --out bench_out/bench_davis.json

# random init vs DINO vs DoRA on the bundled video, evaluated with k-NN, linear probe and DAVIS propagation
demo: install
	$(PY) -m dora_lightning.compare --config configs/demo.yaml --output_dir runs/demo

# the same comparison over 3 seeds (mean and spread; docs/benchmarks.md)
bench-learning: install
	$(PY) -m dora_lightning.compare --config configs/demo.yaml --output_dir bench_out/learning --seeds 0 1 2

# random init vs DINO vs DoRA at a GPU budget (one GPU, <= 8 min), checked against issue 13's learning targets
bench-learning-gpu: install
	benchmarks/bench_learning_gpu.sh bench_out/learning_gpu

# one GPU, <= 6 min: bare step, Lightning overhead, dora fit with the real loader (docs/benchmarks.md)
bench-gpu: install
	$(PY) benchmarks/bench_gpu.py bench_out/gpu

# the wheels the lent GPU machine lacks (Python 3.12 there), for benchmarks/on_device.sh (carry .whl; docs/benchmarks.md)
device-wheels:
	python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl av==18.1.0 jsonargparse==4.53.0 docstring-parser typeshed-client

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) lightning_logs .pytest_cache
