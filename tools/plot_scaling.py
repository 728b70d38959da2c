#!/usr/bin/env python3
"""Plot a flashcpu-sweep CSV: time and peak extra memory against N, log-log.

    python3 tools/plot_scaling.py build/scaling.csv build/scaling.png

Two panels, one line per implementation (fused, naive, openblas, and openblas_full or
reference when the sweep ran them, and fused_<dtype>: the fused kernel on another data
type, from flashcpu-sweep --also-dtype). Points the sweep skipped (above a cutoff) are drawn hollow on the memory panel
at their analytic size, so the O(N^2) trend stays visible. Memory below 0.1 MiB is
drawn at 0.1 MiB (a log axis has no zero). The title names the data types when they
are not fp32 (CSVs from before the dtype column are fp32). Uses matplotlib's Agg
backend: no display needed.
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {
    "fused": dict(color="tab:blue", marker="o"),
    "naive": dict(color="tab:red", marker="s"),
    "openblas": dict(color="tab:green", marker="^"),
    "openblas_full": dict(color="tab:olive", marker="v"),
    "reference": dict(color="tab:gray", marker="x"),
}
SECOND_TYPE_STYLE = dict(color="tab:purple", marker="D")  # fused_<dtype>
LABEL = {
    "naive": "naive (textbook fp32)",
    "openblas": "OpenBLAS materialized",
    "openblas_full": "OpenBLAS full square",
    "reference": "reference (fp64)",
}
MEM_FLOOR_MIB = 0.1
# flashcpu-sweep --dtype: what each name stores in 16 bits.
DTYPE_TEXT = {
    "bf16": "bf16 q/K/V/out",
    "fp16": "fp16 q/K/V/out",
    "bf16kv": "fp32 q over bf16 K/V",
    "fp16kv": "fp32 q over fp16 K/V",
}


def label_of(impl, rows):
    if impl.startswith("fused_"):  # --also-dtype: name the type and the kernels that ran
        dtype = impl[len("fused_"):]
        isa = next((r["isa"] for r in rows if r["impl"] == impl), "?")
        return f"fused, {DTYPE_TEXT.get(dtype, dtype)} ({isa})"
    return LABEL.get(impl, impl)


def number(text):
    return float(text) if text not in ("", None) else None


def main(argv):
    if len(argv) not in (2, 3) or argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if len(argv) > 1 and argv[1] in ("-h", "--help") else 2
    src = argv[1]
    dst = argv[2] if len(argv) == 3 else src.rsplit(".", 1)[0] + ".png"

    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        print(f"plot_scaling: {src} has no rows", file=sys.stderr)
        return 1

    impls = []
    for r in rows:
        if r["impl"] not in impls:
            impls.append(r["impl"])

    first = rows[0]
    dtype = first.get("dtype") or "fp32"
    title = (f"attention scaling: B={first['batch']} H={first['heads']} D={first['dim']}"
             f"{' causal' if first['causal'] == '1' else ''}"
             f"{'' if dtype == 'fp32' else ' ' + DTYPE_TEXT.get(dtype, dtype)},"
             f" {first['threads']} threads, {first['isa']}")
    if first.get("openblas_core"):
        title += f", OpenBLAS {first['openblas_core']}"
    if first.get("cpu_model"):
        title += f"\n{first['cpu_model']}"

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    for impl in impls:
        style = STYLE.get(impl, SECOND_TYPE_STYLE if impl.startswith("fused_") else {})
        label = label_of(impl, rows)
        ok = [r for r in rows if r["impl"] == impl and r["status"] == "ok"]
        ok.sort(key=lambda r: int(r["n"]))
        if ok:
            n = [int(r["n"]) for r in ok]
            ax_t.plot(n, [float(r["time_ms"]) for r in ok], label=label, **style)
            mem = [(int(r["n"]), number(r["peak_extra_mib"])) for r in ok]
            mem = [(x, max(y, MEM_FLOOR_MIB)) for x, y in mem if y is not None]
            if mem:
                ax_m.plot(*zip(*mem), label=label + " (measured)", **style)
        skipped = [r for r in rows if r["impl"] == impl and r["status"] == "skipped"
                   and number(r["analytic_mib"]) is not None]
        if skipped:
            ax_m.plot([int(r["n"]) for r in skipped],
                      [number(r["analytic_mib"]) for r in skipped],
                      linestyle="none", markerfacecolor="none",
                      label=label + " (skipped: analytic)",
                      **{k: v for k, v in style.items()})

    ax_t.set_title("time per call (median)")
    ax_t.set_ylabel("ms")
    ax_m.set_title("peak working memory beyond inputs")
    ax_m.set_ylabel("MiB")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N = M (sequence length)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(f"plot_scaling: wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
