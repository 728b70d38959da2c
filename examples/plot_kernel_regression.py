#!/usr/bin/env python3
"""Plot the CSVs of flashcpu-kernel-regression and flashcpu-kernel-regression-train.

    python3 examples/plot_kernel_regression.py [DIR] [--dpi 100] [--out PNG_DIR]

DIR is the programs' --out directory (default ./kernel-regression-out). Writes, to
PNG_DIR (default DIR), from flashcpu-kernel-regression's CSVs:

  kernel_regression_fits.png     2 x 2 panels, one per kernel: the noise-free f, the
                                 training points and the fit at each bandwidth (on the
                                 0.01 grid; gaps are queries with no training point in
                                 a compact kernel's support). The legend gives each
                                 fit's MSE on the 0.1 grid, as the program prints it.
  kernel_regression_weights.png  the Gaussian attention weights as a heatmap: one row
                                 per query x, one column per training input x_j
                                 (sorted), each row summing to 1.

and from flashcpu-kernel-regression-train's:

  kernel_regression_training_fit.png   the fit with the starting and with the learned
                                       w over the noise-free f and the training points.
  kernel_regression_training_loss.png  the leave-one-out loss per epoch, and the grid
                                       search's loss against w with the descent's path,
                                       the learned w and the grid's best marked.

A program whose CSVs are all absent is skipped with a note (run the two programs with
the same --out to get all four plots). Uses matplotlib's Agg backend: no display
needed. Exits 1 if some of a program's CSVs are missing, or all of both programs'
(after drawing what it can).
"""
import argparse
import csv
import io
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

KERNELS = [
    ("gaussian", r"Gaussian  $K(u) = e^{-u^2/2}$"),
    ("laplacian", r"Laplacian  $K(u) = e^{-|u|}$"),
    ("boxcar", r"Boxcar  $K(u) = 1$ if $|u| \leq 1$"),
    ("epanechnikov", r"Epanechnikov  $K(u) = \max(0,\ 1 - u^2)$"),
]
COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown"]


def save_png(fig, dst, dpi):
    """Saves as a 256-colour palette PNG (a third of the size, no visible loss on these
    flat-colour plots) when Pillow is there, else as matplotlib's RGBA PNG."""
    try:
        from PIL import Image
    except ImportError:
        fig.savefig(dst, dpi=dpi)
        return
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    buf.seek(0)
    with Image.open(buf) as image:
        image.convert("RGB").quantize(colors=256).save(dst, optimize=True)


def read_columns(path):
    """A CSV with a header as {name: np.array of float}; 'nan' reads as NaN."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = [[float(v) for v in row] for row in reader if row]
    data = np.array(rows, dtype=float).reshape(len(rows), len(header))
    return header, {name: data[:, i] for i, name in enumerate(header)}


def read_mse(path):
    """{(kernel, bandwidth string, grid_step string): (mse, nan, queries)} from mse.csv."""
    table = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            table[(r["kernel"], r["bandwidth"], r["grid_step"])] = (
                float(r["mse"]), int(r["nan"]), int(r["queries"]))
    return table


def plot_fits(src, dst, dpi):
    _, train = read_columns(os.path.join(src, "train.csv"))
    header, pred = read_columns(os.path.join(src, "predictions_fine.csv"))
    mse_path = os.path.join(src, "mse.csv")
    mse = read_mse(mse_path) if os.path.exists(mse_path) else {}

    x = pred["x"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.4), sharex=True, sharey=True)
    for ax, (kernel, title) in zip(axes.flat, KERNELS):
        ax.plot(x, pred["truth"], color="black", linestyle="--", linewidth=1.5,
                label=r"truth $f(x) = 2\sin x + x^{0.8}$", zorder=3)
        ax.scatter(train["x"], train["y"], s=18, color="0.5",
                   label="training points", zorder=2)
        columns = [c for c in header if c.startswith(kernel + "_h")]
        for color, column in zip(COLORS, columns):
            h = column[len(kernel) + 2:]
            label = f"h = {h}"
            stats = mse.get((kernel, h, "0.1"))
            if stats:
                label += f"   MSE {stats[0]:.3f}"
                if stats[1]:
                    label += f", {stats[1]}/{stats[2]} NaN"
            ax.plot(x, pred[column], color=color, linewidth=1.6, label=label, zorder=4)
        ax.set_title(title, fontsize=12)
        ax.grid(True, color="0.9")
        ax.legend(loc="upper right", fontsize=9, framealpha=0.9)
    for ax in axes[1]:
        ax.set_xlabel("x (query)", fontsize=11)
    for ax in axes[:, 0]:
        ax.set_ylabel("y", fontsize=11)
    axes[0, 0].set_xlim(0, 5)
    lo = min(np.nanmin(train["y"]), np.nanmin(pred["truth"]))
    hi = max(np.nanmax(train["y"]), np.nanmax(pred["truth"]))
    axes[0, 0].set_ylim(lo - 0.3, hi + 0.3 + 0.45 * (hi - lo))  # headroom for the legend
    fig.suptitle("Nadaraya-Watson kernel regression with flashcpu.nadaraya_watson: "
                 f"{len(train['x'])} noisy samples, y = f(x) + N(0, 0.5²)\n"
                 "MSE against f on the query grid 0, 0.1, ..., 5; NaN: no training point within the "
                 "kernel's support (a gap in the curve)", fontsize=11.5)
    fig.tight_layout()
    save_png(fig, dst, dpi)
    plt.close(fig)
    print(f"plot_kernel_regression: wrote {dst}")


def plot_weights(src, dst, dpi):
    _, train = read_columns(os.path.join(src, "train.csv"))
    header, cols = read_columns(os.path.join(src, "weights.csv"))
    xq = cols["x_query"]
    h = cols["bandwidth"][0]
    wcols = [c for c in header if c.startswith("w_")]
    weights = np.stack([cols[c] for c in wcols], axis=1)  # [queries, training inputs]
    xt = train["x"]
    m = len(wcols)

    fig, ax = plt.subplots(figsize=(8.2, 6.6))
    step = (xq[-1] - xq[0]) / (len(xq) - 1) if len(xq) > 1 else 1.0
    image = ax.imshow(weights, cmap="Reds", aspect="auto", interpolation="nearest",
                      extent=(-0.5, m - 0.5, xq[-1] + step / 2, xq[0] - step / 2))
    ax.set_xlabel(f"training input index j  (the {m} inputs sorted by x_j)", fontsize=11)
    ax.set_ylabel("query x_i", fontsize=11)
    ax.set_xticks(np.arange(0, m, 5))

    # The top axis reads the same columns as input values x_j (not evenly spaced).
    index = np.arange(m, dtype=float)
    top = ax.secondary_xaxis("top", functions=(lambda j: np.interp(j, index, xt),
                                                lambda v: np.interp(v, xt, index)))
    top.set_xticks([v for v in range(0, 6) if xt[0] <= v <= xt[-1]])
    top.set_xlabel("training input x_j", fontsize=11)

    bar = fig.colorbar(image, ax=ax, pad=0.02)
    bar.set_label("attention weight (each row sums to 1)", fontsize=11)
    ax.set_title(f"Gaussian attention weights, h = {h:g}:  "
                 r"$w_{ij} = \mathrm{softmax}_j\,(-(x_i - x_j)^2 / (2h^2))$" "\n"
                 "flashcpu.reference.attention_weights, score = gaussian, "
                 f"scale = 1/(2h²) = {1 / (2 * h * h):.4g}", fontsize=11, pad=12)
    fig.tight_layout()
    save_png(fig, dst, dpi)
    plt.close(fig)
    print(f"plot_kernel_regression: wrote {dst}")


def training_labels(loss):
    """Legend text for the starting and the learned w, from training_loss.csv's first and
    last rows."""
    def label(row):
        w = loss["w"][row]
        return f"w = {w:.4g}  (h = 1/w = {1 / w:.3g}),  leave-one-out loss {loss['loss'][row]:.4f}"
    return label(0), label(-1)


def plot_training_fit(src, dst, dpi):
    _, train = read_columns(os.path.join(src, "training_points.csv"))
    _, fit = read_columns(os.path.join(src, "training_fit.csv"))
    _, loss = read_columns(os.path.join(src, "training_loss.csv"))
    before, after = training_labels(loss)
    epochs = int(loss["epoch"][-1])

    fig, ax = plt.subplots(figsize=(9, 5.6))
    ax.plot(fit["x"], fit["truth"], color="black", linestyle="--", linewidth=1.5,
            label=r"truth $f(x) = 2\sin x + x^{0.8}$", zorder=3)
    ax.scatter(train["x"], train["y"], s=18, color="0.5", label="training points", zorder=2)
    ax.plot(fit["x"], fit["before"], color="tab:orange", linewidth=1.8,
            label="before training: " + before, zorder=4)
    ax.plot(fit["x"], fit["after"], color="tab:blue", linewidth=1.8,
            label=f"after {epochs} epochs: " + after, zorder=5)
    ax.set_xlim(0, 5)
    lo = min(np.nanmin(train["y"]), np.nanmin(fit["truth"]))
    hi = max(np.nanmax(train["y"]), np.nanmax(fit["truth"]))
    ax.set_ylim(lo - 0.3, hi + 0.3 + 0.35 * (hi - lo))  # headroom for the legend
    ax.set_xlabel("x (query)", fontsize=11)
    ax.set_ylabel("y", fontsize=11)
    ax.grid(True, color="0.9")
    ax.legend(loc="upper right", fontsize=9.5, framealpha=0.9)
    ax.set_title(r"Learning the Gaussian kernel's width:  $\hat f(x) = \sum_i "
                 r"\mathrm{softmax}_i(-\frac{1}{2}((x - x_i)\,w)^2)\, y_i$" "\n"
                 "w by gradient descent on the leave-one-out loss, the gradient from "
                 "flashcpu.attention_backward", fontsize=11.5)
    fig.tight_layout()
    save_png(fig, dst, dpi)
    plt.close(fig)
    print(f"plot_kernel_regression: wrote {dst}")


def plot_training_loss(src, dst, dpi):
    _, loss = read_columns(os.path.join(src, "training_loss.csv"))
    _, grid = read_columns(os.path.join(src, "training_grid.csv"))
    best = int(np.nanargmin(grid["loss"]))
    w_learned, loss_learned = loss["w"][-1], loss["loss"][-1]

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.9))
    left.plot(loss["epoch"], loss["loss"], color="tab:blue", marker="o", markersize=3.5,
              linewidth=1.4, label="leave-one-out loss")
    left.axhline(grid["loss"][best], color="tab:red", linestyle=":", linewidth=1.3,
                 label=f"grid search's best, {grid['loss'][best]:.4f}")
    left.set_xlabel("epoch", fontsize=11)
    left.set_ylabel("leave-one-out mean squared error", fontsize=11)
    left.set_title(f"Loss per epoch (from w = {loss['w'][0]:.3g})", fontsize=11.5)
    left.grid(True, color="0.9")
    left.legend(loc="upper right", fontsize=9.5, framealpha=0.9)
    # The loss flattens within a few epochs; the gradient shows on a log scale how the
    # descent goes on, down to the fp32 rounding of dL/dw.
    inset = left.inset_axes([0.42, 0.28, 0.54, 0.42])
    slope = np.abs(loss["dloss_dw"])
    shown = slope > 0
    inset.semilogy(loss["epoch"][shown], slope[shown], color="tab:purple", marker="o",
                   markersize=2.5, linewidth=1)
    inset.set_title("|dL/dw| from attention_backward", fontsize=9)
    inset.tick_params(labelsize=8)
    inset.grid(True, color="0.9")

    right.plot(grid["w"], grid["loss"], color="0.35", linewidth=1.5,
               label=f"grid search: {len(grid['w'])} log-spaced w")
    right.plot(loss["w"], loss["loss"], color="tab:blue", marker="o", markersize=3.5,
               linewidth=0.9, alpha=0.8, label="the descent, one point per epoch")
    right.axvline(grid["w"][best], color="tab:red", linestyle=":", linewidth=1.3,
                  label=f"grid's best w = {grid['w'][best]:.4g}")
    right.plot([w_learned], [loss_learned], marker="*", markersize=15, color="tab:green",
               markeredgecolor="black", linestyle="none", zorder=5,
               label=f"learned w = {w_learned:.4g}")
    right.set_xscale("log")
    right.set_xlabel("w  (= 1/h)", fontsize=11)
    right.set_ylabel("leave-one-out mean squared error", fontsize=11)
    right.set_title("The same loss against w", fontsize=11.5)
    right.grid(True, color="0.9", which="both")
    right.legend(loc="upper right", fontsize=9.5, framealpha=0.9)
    fig.tight_layout()
    save_png(fig, dst, dpi)
    plt.close(fig)
    print(f"plot_kernel_regression: wrote {dst}")


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", nargs="?", default="kernel-regression-out",
                        help="the flashcpu-kernel-regression --out directory")
    parser.add_argument("--out", default=None, help="where to write the PNGs (default: DIR)")
    parser.add_argument("--dpi", type=float, default=100, help="resolution (default 100)")
    args = parser.parse_args(argv[1:])
    out = args.out or args.dir
    os.makedirs(out, exist_ok=True)

    # Each program's plots, with the CSVs each plot reads.
    programs = [
        ("flashcpu-kernel-regression", [
            (plot_fits, ["train.csv", "predictions_fine.csv"], "kernel_regression_fits.png"),
            (plot_weights, ["train.csv", "weights.csv"], "kernel_regression_weights.png"),
        ]),
        ("flashcpu-kernel-regression-train", [
            (plot_training_fit, ["training_points.csv", "training_fit.csv", "training_loss.csv"],
             "kernel_regression_training_fit.png"),
            (plot_training_loss, ["training_loss.csv", "training_grid.csv"],
             "kernel_regression_training_loss.png"),
        ]),
    ]
    status = 0
    drawn_programs = 0
    for program, jobs in programs:
        inputs = {i for _, needed, _ in jobs for i in needed}
        if not any(os.path.exists(os.path.join(args.dir, i)) for i in inputs):
            print(f"plot_kernel_regression: no CSVs of {program} in {args.dir}: its plots skipped",
                  file=sys.stderr)
            continue
        drawn_programs += 1
        for fn, needed, name in jobs:
            missing = [i for i in needed if not os.path.exists(os.path.join(args.dir, i))]
            if missing:
                print(f"plot_kernel_regression: {', '.join(missing)} not in {args.dir}: "
                      f"{name} not drawn", file=sys.stderr)
                status = 1
                continue
            fn(args.dir, os.path.join(out, name), args.dpi)
    if drawn_programs == 0:
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
