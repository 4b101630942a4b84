# Two commands a newcomer needs: `make run` and `make test`. Each builds .venv on first use, from the
# exact versions in requirements.lock (pyproject.toml keeps the loose ranges for library users).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench lock clean-venv

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement would fetch GBs of CUDA packages.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -r requirements.lock
	$(PY) -m pip install --no-deps -e .
	# DeepSpeed compiles its shared-memory op (into ~/.cache/torch_extensions) the first time a CPU rank
	# starts: ~45 s of both cores in the first training run. Once here instead.
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.accelerator import get_accelerator; \
		get_accelerator().create_op_builder('ShareMemCommBuilder').load()"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m pipelines.quickstart --config configs/tiny.yaml --keep-serving

# Two pytest-xdist workers: one runs every test that needs Ray (one cluster at a time, in order), the
# other the Ray-free tests beside it (tests/conftest.py).
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup

bench: $(STAMP)
	$(PY) -m bench.model

# Re-resolve the loose ranges of pyproject.toml in a scratch venv and write the exact versions.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --upgrade pip
	.lock-venv/bin/python -m pip install torch==2.13.0
	.lock-venv/bin/python -m pip install '.[dev]'
	echo '# Exact versions that `make` installs (CPU, Python 3.11, x86_64); refresh with `make lock`.' > requirements.lock
	.lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^deepkiln' >> requirements.lock
	rm -rf .lock-venv

clean-venv:
	rm -rf $(VENV)
