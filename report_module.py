"""What a run leaves to look at: the training curves, the test report, the confusion matrix, the
gallery of confident mistakes and the LR finder's plot (the trackers: tracker_module). Figures use
matplotlib's Figure, never pyplot (no global state or display); files are written atomically; a
figure that cannot be drawn only warns (the run matters more), but a failed write raises. Only
rank 0 calls these under torchrun."""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

import files_module
import messages_module
import utils

CURVES = "training_curves.png"
TEST_REPORT = "test_report.csv"
CONFUSION = "confusion_matrix.png"
MISCLASSIFIED = "misclassified.png"
LR_FINDER = "lr_finder.png"
# all this module writes in OUTPUT_DIR
FILES = (CURVES, TEST_REPORT, CONFUSION, MISCLASSIFIED, LR_FINDER)
REPORT_COLUMNS = ["class", "precision", "recall", "f1", "support"]
# the rows after the classes, as scikit-learn's classification_report
AVERAGES = ("macro avg", "weighted avg")


# --------------------------------------------------------------------------- the test set


def write_test_outputs(result: dict[str, Any], classes: Sequence[str], mean: Sequence[float],
                       std: Sequence[float], output_dir: str, split: str = "test") -> None:
    """Write test_report.csv, confusion_matrix.png and misclassified.png from evaluate(...,
    collect=True) on the split named ("validation" when a folder has no test/)."""
    write_test_report(result["confusion"], classes, os.path.join(output_dir, TEST_REPORT))
    plot_confusion_matrix(result["confusion"], classes, os.path.join(output_dir, CONFUSION), split)
    plot_misclassified(result["mistakes"], classes, mean, std,
                       os.path.join(output_dir, MISCLASSIFIED), split)


def classification_report(confusion: torch.Tensor, classes: Sequence[str]) -> pd.DataFrame:
    """Per-class precision, recall, F1 and support from a confusion matrix (rows the true class),
    then macro and support-weighted averages, as scikit-learn's classification_report with
    zero_division=nan: a 0 / 0 (precision of a class never predicted, recall of one without images)
    is NaN, left out of the averages. Recall is each class's accuracy, so the weighted recall is the
    accuracy."""
    classes = [messages_module.printable(name) for name in classes]  # not UTF-8: shown as bytes
    counts = confusion.double().cpu().numpy()
    if counts.shape != (len(classes), len(classes)):
        raise ValueError(f"a confusion matrix of shape {counts.shape} does not fit "
                         f"{len(classes)} classes")
    hits, support, predicted = np.diag(counts), counts.sum(1), counts.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):  # 0 / 0 is NaN, as wanted
        precision, recall = hits / predicted, hits / support
        f1 = 2 * hits / (support + predicted)  # their harmonic mean, also when one is undefined
    frame = pd.DataFrame({"class": list(classes), "precision": precision, "recall": recall,
                          "f1": f1, "support": support.astype(np.int64)})
    rows = [frame]
    for name, weights in zip(AVERAGES, (np.ones_like(support), support)):
        averages = {key: _nan_average(frame[key].to_numpy(), weights)
                    for key in ("precision", "recall", "f1")}
        rows.append(pd.DataFrame([{"class": name, **averages, "support": int(support.sum())}]))
    return pd.concat(rows, ignore_index=True)[REPORT_COLUMNS]


def _nan_average(values: np.ndarray, weights: np.ndarray) -> float:
    """The weighted mean of the non-NaN values (NaN when none is, or their weights sum to 0)."""
    known = ~np.isnan(values)
    total = weights[known].sum()
    return float((values[known] * weights[known]).sum() / total) if total else math.nan


def write_test_report(confusion: torch.Tensor, classes: Sequence[str], path: str) -> pd.DataFrame:
    """Write test_report.csv atomically and return it; unlike a figure, a failed write raises."""
    frame = classification_report(confusion, classes)
    safe = utils.spreadsheet_safe(frame)  # a class named "=1+2" is shown, never run
    files_module.atomic_write(path, lambda f: safe.to_csv(f, index=False, float_format="%.6f"))
    return frame


def plot_confusion_matrix(confusion: torch.Tensor, classes: Sequence[str], path: str,
                          split: str = "test") -> None:
    """Draw confusion_matrix.png: counts in cells, colours by row share, names on both axes; figure
    and fonts grow with the class count, legible up to LEGIBLE_CLASSES; past that, colours only, at
    that size."""
    _draw(path, lambda: confusion_figure(confusion, classes, split))


LEGIBLE_CLASSES = 50  # past this many classes the confusion matrix keeps this one's size (19.5
# inches, about 2,000 pixels a side) and drops the counts and every class name but one in
# ceil(classes / 50): a third of an inch a cell drew 34,370 x 34,250 pixels for 1,000 (4.4 GB)


def confusion_figure(confusion: torch.Tensor, classes: Sequence[str], split: str = "test"):
    """The confusion matrix as a Figure (also TensorBoard's), no bigger than at LEGIBLE_CLASSES."""
    from matplotlib.figure import Figure

    classes = [messages_module.printable(name) for name in classes]  # as the report writes them
    counts = confusion.cpu().numpy()
    n = len(classes)
    with np.errstate(divide="ignore", invalid="ignore"):
        shares = np.nan_to_num(counts / counts.sum(1, keepdims=True))  # no images: an empty row
    shown = min(n, LEGIBLE_CLASSES)
    side = max(5.0, 2.5 + 0.34 * shown)  # inches: a third of an inch per cell beyond the margins
    # points: 10 up to 14 classes, 7 from 35 (four digits fit)
    cell_font = float(np.clip(12 - n / 7, 7, 10))
    label_font = float(np.clip(12 - shown / 10, 8, 10))
    figure = Figure(figsize=(side + 1.2, side), dpi=100)
    axes = figure.subplots()
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    written = counts if n <= LEGIBLE_CLASSES else counts[:0]  # past them, no cell fits its count
    for (row, column), count in np.ndenumerate(written):
        if count or n <= 20:  # beyond 20 classes a blank cell reads as 0: the matrix stays legible
            axes.text(column, row, str(count), ha="center", va="center", fontsize=cell_font,
                      color="white" if shares[row, column] > 0.5 else "black")
    ticks = np.arange(0, n, math.ceil(n / LEGIBLE_CLASSES))  # every class, or one in ceil(n / 50)
    names = [str(classes[i]) for i in ticks]
    axes.set_xticks(ticks, labels=names, rotation=45 if n <= 10 else 90, fontsize=label_font,
                    ha="right" if n <= 10 else "center",
                    rotation_mode="anchor" if n <= 10 else "default")
    axes.set_yticks(ticks, labels=names, fontsize=label_font)
    total = int(counts.sum())
    accuracy = np.trace(counts) / total if total else math.nan
    every = "" if len(ticks) == n else f" (one name in {ticks[1] - ticks[0]})"
    axes.set(xlabel=f"predicted class{every}", ylabel=f"true class{every}",
             title=f"Confusion matrix: {total} {split} images, accuracy {100 * accuracy:.2f}%")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    figure.tight_layout()
    return figure


def plot_misclassified(mistakes: Sequence[Any], classes: Sequence[str], mean: Sequence[float],
                       std: Sequence[float], path: str, split: str = "test") -> None:
    """Draw misclassified.png: the mistakes (train_module.Mistake, most confident first), each image
    un-normalised (x std + mean), titled with its true class, the predicted one and its
    probability."""
    _draw(path, lambda: _mistakes_figure(mistakes, classes, mean, std, split))


def _mistakes_figure(mistakes: Sequence[Any], classes: Sequence[str], mean: Sequence[float],
                     std: Sequence[float], split: str = "test"):
    """All the mistakes as one image (a mosaic in one axes, each cell a title band over the image),
    titles as text: it draws in 0.2-0.4 s, a grid of 25 axes with tight_layout in 0.7-0.9 s."""
    from matplotlib.figure import Figure

    classes = [messages_module.printable(name) for name in classes]  # as the report writes them
    if not mistakes:
        figure = Figure(figsize=(4, 1.5), dpi=100)
        figure.text(0.5, 0.5, f"no misclassified {split} images", ha="center", va="center")
        return figure
    columns = math.ceil(math.sqrt(len(mistakes)))
    rows = math.ceil(len(mistakes) / columns)
    mean_, std_ = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    images = [(m.image.float().cpu() * std_ + mean_).clamp(0, 1).permute(1, 2, 0) for m in mistakes]
    height, width, channels = images[0].shape
    cell_height, cell_width = _gallery_cell(height, width)
    mosaic = torch.ones(rows * cell_height, columns * cell_width, channels)  # white between images
    for i, (image, mistake) in enumerate(zip(images, mistakes)):
        top, left = _gallery_origin(i, columns, height, width)
        mosaic[top:top + height, left:left + width] = image
    title_band = 0.45  # inches above the grid for the figure's title
    figure_width = 2.1 * columns
    grid_height = figure_width * mosaic.shape[0] / mosaic.shape[1]
    figure = Figure(figsize=(figure_width, grid_height + title_band), dpi=100)
    axes = figure.add_axes((0, 0, 1, grid_height / (grid_height + title_band)))
    pixels = mosaic.numpy()
    axes.imshow(pixels[..., 0] if channels == 1 else pixels, cmap="gray", vmin=0, vmax=1,
                interpolation="nearest")
    for i, mistake in enumerate(mistakes):
        top, left = _gallery_origin(i, columns, height, width)
        axes.text(left + width / 2, top - 0.04 * height,
                  f"true: {classes[mistake.target]}\npredicted: {classes[mistake.predicted]} "
                  f"({100 * mistake.probability:.1f}%)", fontsize=8, color="tab:red", ha="center",
                  va="bottom")
    axes.axis("off")
    figure.suptitle(f"The {len(mistakes)} most confident mistakes on the test set")
    return figure


def _gallery_cell(height: int, width: int) -> tuple[int, int]:
    """A gallery cell's size in image pixels: a two-line title above the image, a margin beside."""
    return height + math.ceil(0.4 * height), width + math.ceil(0.1 * width)


def _gallery_origin(i: int, columns: int, height: int, width: int) -> tuple[int, int]:
    """Where mistake i's image starts in the mosaic (row, column of its top-left pixel)."""
    cell_height, cell_width = _gallery_cell(height, width)
    row, column = divmod(i, columns)
    return row * cell_height + cell_height - height, column * cell_width + (cell_width - width) // 2


# --------------------------------------------------------------------------- training


def plot_training_curves(history: list[dict[str, Any]], path: str) -> None:
    """Draw training_curves.png: loss and accuracy per epoch, training and validation, the LR on a
    second axis, LR cuts and weight restores marked."""
    _draw(path, lambda: _curves_figure(history))


def _curves_figure(history: list[dict[str, Any]]):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    cuts = [row["epoch"] for row in history if "LR cut" in str(row.get("event") or "")]
    restores = [row["epoch"] for row in history if "restored" in str(row.get("event") or "")]
    figure = Figure(figsize=(12, 4.5), dpi=100)
    panels = figure.subplots(1, 2)
    for panel, key, scale, title in ((panels[0], "loss", 1, "Loss"),
                                     (panels[1], "acc", 100, "Accuracy (%)")):
        panel.plot(epochs, [scale * row[f"train_{key}"] for row in history], "o-", ms=3,
                   label="training")
        # none: a run without validation images
        if any(row.get(f"val_{key}") is not None for row in history):
            panel.plot(epochs,
                       [math.nan if row.get(f"val_{key}") is None else scale * row[f"val_{key}"]
                        for row in history], "o-", ms=3, label="validation")
        for i, epoch in enumerate(cuts):
            panel.axvline(epoch, color="tab:red", ls="--", alpha=0.5,
                          label="LR cut" if i == 0 else None)
        for i, epoch in enumerate(restores):
            panel.axvline(epoch, color="tab:purple", ls=":", alpha=0.8,
                          label="weights restored" if i == 0 else None)
        panel.set(xlabel="epoch", title=title)
        panel.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        lr_axis = panel.twinx()
        lr_axis.step(epochs, [row["lr"] for row in history], where="mid", color="gray", alpha=0.6,
                     label="LR")
        lr_axis.set_yscale("log")
        lr_axis.set_ylabel("learning rate")
        lines, labels = panel.get_legend_handles_labels()
        more_lines, more_labels = lr_axis.get_legend_handles_labels()
        panel.legend(lines + more_lines, labels + more_labels, fontsize="small")
    # tight_layout: 0.3 s more
    figure.subplots_adjust(left=0.06, right=0.93, bottom=0.11, top=0.93, wspace=0.32)
    return figure


def plot_lr_finder(lrs: Sequence[float], losses: Sequence[float], suggestion: float | None,
                   path: str) -> None:
    """Draw lr_finder.png: the smoothed loss against the LR (log axis), any suggested LR marked."""
    _draw(path, lambda: _lr_finder_figure(lrs, losses, suggestion))


def _lr_finder_figure(lrs: Sequence[float], losses: Sequence[float], suggestion: float | None):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=100)
    axes = figure.subplots()
    axes.plot(lrs, losses, color="tab:blue", label="smoothed training loss")
    axes.set_xscale("log")
    if suggestion is not None:  # None: the curve gave no clear answer
        axes.axvline(suggestion, color="tab:red", ls="--", label=f"suggested LR {suggestion:.3g}")
    lowest = int(np.argmin(losses))
    top = max(losses[:lowest + 1])  # the diverging tail runs off the top, not flattening the rest
    margin = 0.05 * (top - losses[lowest]) or 0.05 * abs(top) or 1.0
    axes.set_ylim(losses[lowest] - margin, top + margin)
    axes.set(xlabel="learning rate (log scale)", ylabel="loss", title="LR range test")
    axes.legend()
    figure.tight_layout()
    return figure


def _draw(path: str, make_figure: Callable[[], Any]) -> None:
    """Make a figure and write it to path as a PNG, atomically; a failure only warns."""
    try:
        figure = make_figure()
        files_module.atomic_write(path, lambda f: figure.savefig(f, format="png"))
    except files_module.WriteFailed:  # a full or failing disk: raised, as any failed write is
        raise
    except Exception as error:  # a plot that cannot be drawn is a convenience lost: never end a run
        print(f"warning: could not draw {path}: {error}", file=sys.stderr)

