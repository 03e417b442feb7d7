# The two commands of the README. Each creates/uses .venv and builds what it needs (once; the
# C++ build's progress is printed, its full log is build/tcsm_build.log).
.PHONY: demo test bench
demo:
	bash scripts/env.sh
	.venv/bin/python -m tcsm_kernels demo

test:
	bash scripts/env.sh
	.venv/bin/python -m pytest -q tests

# also installs the benchmark-only packages (cut-cross-entropy, the `bench` extra)
bench:
	TCSM_BENCH=1 bash scripts/env.sh
	.venv/bin/python benchmarks/run_all.py
