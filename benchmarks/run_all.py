"""Run the whole benchmark suite with pytest-benchmark, save its JSON and render a markdown
table and a PNG chart from it.

    python benchmarks/run_all.py [pytest args...]     (or: make bench)

Writes benchmarks/results/{benchmarks.json, table.md, chart.png}. Environment knobs:
TCSM_BENCH_ROWS, TCSM_BENCH_VOCABS, TCSM_BENCH_ROUNDS, TCSM_BENCH_MEMORY=0 to skip the
fresh-process memory probes.
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def main(argv):
    os.makedirs(RESULTS, exist_ok=True)
    json_path = os.path.join(RESULTS, "benchmarks.json")
    code = subprocess.call([sys.executable, "-m", "pytest", HERE, "-p", "no:cacheprovider",
                            "--benchmark-only", f"--benchmark-json={json_path}",
                            "--benchmark-columns=median,min,max", "-q", *argv])
    if os.path.exists(json_path):
        subprocess.check_call([sys.executable, os.path.join(HERE, "report.py"), RESULTS,
                               json_path])
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
