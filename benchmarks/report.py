"""Markdown table and PNG chart from pytest-benchmark JSON files.

    python benchmarks/report.py results/ results/benchmarks.json [more.json ...]

Each benchmark's extra_info carries: case, vocab, rows, impl, device, median_s, gbs,
ceiling_gbs and (CPU) extra_bytes / logits_bytes. Speed-ups are against the other
implementations of the same case and shape in the same run.
"""
import json
import os
import sys
from collections import defaultdict


def load(path):
    with open(path) as f:
        data = json.load(f)
    rows = [b["extra_info"] for b in data["benchmarks"] if b.get("extra_info")]
    return rows, data.get("machine_info", {})


def throughput(r) -> str:
    if "tokens_per_s" in r:
        return f"{r['tokens_per_s']:.0f} tok/s, {r['model_calls_per_run']:.0f} model calls"
    return f"{r['gbs']:.1f}"


def table(rows, machine) -> str:
    groups = defaultdict(dict)
    for r in rows:
        groups[(r.get("kind", "loss"), r["case"], r["rows"], r["vocab"])][r["impl"]] = r
    cpu = machine.get("cpu", {}).get("brand_raw", "")
    ceilings = [r["ceiling_gbs"] for r in rows]
    lines = [f"Machine: {cpu or machine.get('machine', '?')}, {os.cpu_count()} cores, "
             f"device {rows[0]['device']}; copy bandwidth measured before each benchmark: "
             f"{min(ceilings):.1f}-{max(ceilings):.1f} GB/s (% of copy BW uses each op's own)"
             if rows else "no results", "",
             "| op | case | N | V | impl | median ms | vs eager | vs compiled | vs torch | GB/s "
             "| % of copy BW | extra mem / logits |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (kind, case, n, v), impls in sorted(groups.items()):
        for name, r in sorted(impls.items(), key=lambda kv: kv[1]["median_s"]):
            def ratio(other):
                o = impls.get(other)
                return f"{o['median_s'] / r['median_s']:.1f}x" if o and name != other else ""
            torch_name = next((b for b in ("torch-ce", "flow-matching", "torch") if b in impls), "")
            mem = ""
            if r.get("extra_bytes") is not None and r.get("logits_bytes"):
                mem = f"{r['extra_bytes'] / r['logits_bytes']:.2f}x"
                if r.get("inplace_extra_bytes") is not None:
                    mem += f" (in-place {r['inplace_extra_bytes'] / r['logits_bytes']:.2f}x)"
            pct = 100 * r["gbs"] / r["ceiling_gbs"] if name.startswith("fused") else None
            lines.append(
                f"| {kind} | {case} | {n} | {v} | {name} | {1e3 * r['median_s']:.1f} | "
                f"{ratio('eager')} | {ratio('compiled')} | {ratio(torch_name)} | "
                f"{throughput(r)} | {'' if pct is None else f'{pct:.0f}%'} | {mem} |")
    return "\n".join(lines) + "\n"


def chart(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(dict)
    for r in rows:
        groups[(r.get("kind", "loss"), r["case"])][(r["vocab"], r["rows"], r["impl"])] = r
    fig, axes = plt.subplots(2, len(groups), figsize=(4.5 * len(groups), 7), squeeze=False)
    for col, ((kind, case), entries) in enumerate(sorted(groups.items())):
        impls = sorted({k[2] for k in entries})
        shapes = sorted({(k[0], k[1]) for k in entries})
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            xs = [j + i * width for j, s in enumerate(shapes) if (s[0], s[1], impl) in entries]
            got = [entries[(s[0], s[1], impl)] for s in shapes if (s[0], s[1], impl) in entries]
            axes[0][col].bar(xs, [1e3 * g["median_s"] for g in got], width, label=impl)
            mem = [(x, g["extra_bytes"] / g["logits_bytes"]) for x, g in zip(xs, got)
                   if g.get("extra_bytes") is not None]
            if mem:
                axes[1][col].bar([m[0] for m in mem], [m[1] for m in mem], width, label=impl)
        for row, ylabel in ((0, "median ms (fwd+bwd)"), (1, "extra memory / logits")):
            ax = axes[row][col]
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
            ax.set_xticklabels([f"V={s[0]}\nN={s[1]}" for s in shapes], fontsize=8)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{kind}: {case}", fontsize=10)
        axes[0][col].set_yscale("log")
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(out_dir, *json_paths):
    rows, machine = [], {}
    for path in json_paths:
        found, machine = load(path)
        rows += found
    text = table(rows, machine)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(text)
    print(text)
    if rows:
        chart(rows, os.path.join(out_dir, "chart.png"))


if __name__ == "__main__":
    main(*sys.argv[1:])
