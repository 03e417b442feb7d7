# The two commands of the README. Each creates/uses .venv and builds what it needs.
.PHONY: demo test bench
demo:
	bash scripts/env.sh
	.venv/bin/python -m tcsm_kernels demo

test:
	bash scripts/env.sh
	.venv/bin/python -m pytest -q tests

bench:
	bash scripts/env.sh
	.venv/bin/python benchmarks/run_all.py
