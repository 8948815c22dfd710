"""Figures for people: labelled confusion matrices, ROC curves, training curves, samples, heatmaps, reliability
diagrams, duplicate strips and latency bars, saved as PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from brainmri.core.files import atomic_path  # noqa: E402


def save(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def confusion_figure(matrix: np.ndarray, names: tuple[str, ...], title: str, ax=None):
    """Rows: actual class; columns: predicted class; `names` in label order ((negative, positive) for two classes)."""
    fig = None
    k = len(names)
    if ax is None:
        fig, ax = plt.subplots(figsize=(3.6, 3.2) if k == 2 else (1.2 * k + 1.6, 1.1 * k + 1.2))
    ax.imshow(matrix, cmap="Blues", vmin=0)
    ax.set_xticks(range(k), labels=list(names), rotation=0 if k == 2 else 30)
    ax.set_yticks(range(k), labels=list(names))
    ax.set_xlabel("Predicted")
    ax.set_ylabel("Actual")
    ax.set_title(title, fontsize=9)
    peak = matrix.max() or 1
    for (r, c), v in np.ndenumerate(matrix):
        ax.text(c, r, str(int(v)), ha="center", va="center", color="white" if v > peak / 2 else "black", fontsize=12)
    return fig or ax.figure


def confusion_grid(matrices: dict[str, np.ndarray], names: tuple[str, str]):
    """Every model's confusion matrix, four to a row: name -> matrix; `names` as confusion_figure's."""
    cols = min(4, len(matrices))
    fig, axes = plt.subplots(-(-len(matrices) // cols), cols, figsize=(3.4 * cols, 3.0 * -(-len(matrices) // cols)), squeeze=False)
    for ax, (name, matrix) in zip(axes.ravel(), matrices.items(), strict=False):
        confusion_figure(matrix, names, name, ax=ax)
    for ax in axes.ravel()[len(matrices) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray, float]]):
    """One ROC curve per model: name -> (fpr, tpr, auc)."""
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUC {'n/a' if auc is None else f'{auc:.3f}'})", linewidth=1.4)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title("ROC on the held-out test split")
    ax.legend(fontsize=7, loc="lower right")
    return fig


def curves_figure(histories: dict[str, object]):
    """Training and validation loss per epoch, one panel per model (pandas frames with epoch, loss, val_loss)."""
    n = max(1, len(histories))
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, h) in zip(axes.ravel(), histories.items(), strict=False):
        ax.plot(h["epoch"], h["loss"], label="train")
        ax.plot(h["epoch"], h["val_loss"], label="val")
        if "selected" in h and h["selected"].any():
            ax.axvline(int(h.loc[h["selected"].astype(bool), "epoch"].iloc[0]), color="grey", linestyle=":", linewidth=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("BCE loss", fontsize=8)
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(histories) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def samples_figure(samples: list[tuple[np.ndarray, str, bool]], cols: int = 6):
    """A grid of images titled with their prediction; green frame when correct, red when wrong."""
    rows = max(1, -(-len(samples) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.35 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (img, title, correct) in zip(axes.ravel(), samples, strict=False):
        ax.imshow(img)
        ax.set_title(title, fontsize=7.5, color="#1a7f37" if correct else "#cf222e")
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_edgecolor("#1a7f37" if correct else "#cf222e")
            side.set_linewidth(3)
    fig.tight_layout()
    return fig


def saliency_figure(overlays: list[tuple[np.ndarray, np.ndarray, np.ndarray, str, bool]], cols: int = 6):
    """Model inputs with their Grad-CAM heatmap laid over them and the head's outline; titled and framed as the samples."""
    rows = max(1, -(-len(overlays) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.35 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (img, cam, mask, title, correct) in zip(axes.ravel(), overlays, strict=False):
        ax.imshow(img)
        ax.imshow(cam / cam.max() if cam.max() > 0 else cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.contour(mask.astype(float), levels=[0.5], colors="white", linewidths=0.8)
        ax.set_title(title, fontsize=7.5, color="#1a7f37" if correct else "#cf222e")
    fig.tight_layout()
    return fig


def reliability_figure(tables: dict[str, tuple[dict, dict, str]], cols: int = 4):
    """Reliability diagrams, one panel per model: name -> (before, after, caption); each table has predicted, observed, n."""
    names = list(tables)
    rows = -(-len(names) // cols) or 1
    fig, axes = plt.subplots(rows, min(cols, len(names)) or 1, figsize=(3.2 * min(cols, len(names) or 1), 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.ravel(), names, strict=False):
        before, after, caption = tables[name]
        ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls=":")
        ax.plot(before["predicted"], before["observed"], "o-", color="tab:red", ms=3, lw=1, label="before")
        ax.plot(after["predicted"], after["observed"], "o-", color="tab:blue", ms=3, lw=1, label="after")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability", ylabel="observed tumour rate")
        ax.set_title(f"{name}\n{caption}", fontsize=8)
        ax.legend(fontsize=7, loc="upper left")
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def strips_figure(strips: list[tuple[str, list[tuple[np.ndarray, str]]]], max_cols: int = 6):
    """One row per group: its title, then each member's image with a caption (at most `max_cols` shown)."""
    cols = min(max_cols, max(len(m) for _, m in strips))
    fig, axes = plt.subplots(len(strips), cols, figsize=(1.6 * cols, 1.75 * len(strips)), squeeze=False)
    for row, (title, members) in zip(axes, strips, strict=True):
        for ax in row:
            ax.axis("off")
        for ax, (img, caption) in zip(row, members, strict=False):
            ax.imshow(img, cmap="gray")
            ax.set_title(caption, fontsize=6)
        row[0].text(-0.08, 0.5, title, transform=row[0].transAxes, rotation=90, va="center", ha="right", fontsize=6)
    fig.tight_layout()
    return fig


def latency_figure(table, labels: list[str]):
    """Median ms per image, one panel per batch size, one bar per runtime `label` (the table's '<label> ms' column)."""
    batches = sorted(table["Batch"].unique())
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    for ax, bs in zip(axes[0], batches, strict=True):
        t = table[table["Batch"] == bs]
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            ax.bar([j + i * width for j in range(len(t))], t[f"{label} ms"], width, label=label)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(t))], labels=list(t["Model"]), rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("ms per image (median)")
        ax.set_title(f"batch {bs}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
