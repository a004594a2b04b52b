"""What a run leaves to look at: the test report against a hand computation, the figures' PNGs read
back pixel by pixel against what they must show."""

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from PIL import Image

import files_module
import model_module
import optim_module
import report_module
import train_module
from conftest import make_tiny_data

PNG_HEADER = b"\x89PNG\r\n\x1a\n"


def read_png(path):
    """The PNG's size in pixels, after checking that it is one."""
    with open(path, "rb") as f:
        assert f.read(8) == PNG_HEADER
    with Image.open(path) as image:
        image.verify()
        return image.size


def read_pixels(path):
    """The PNG's pixels as int (H, W, 3) RGB, on the 0-255 scale."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def laid_out(figure):
    """The figure drawn in memory, so that its transforms place data where the saved PNG has it (an
    axes with equal aspect, as imshow's, takes its final box only when drawn)."""
    FigureCanvasAgg(figure).draw()
    return figure


def pixel_rows_columns(pixels, axes, points):
    """The (row, column) of the PNG pixel at each (x, y) data point of the axes (display y runs
    upwards)."""
    x, y = axes.transData.transform(np.asarray(points, dtype=float)).T
    return np.round(len(pixels) - y).astype(int), np.round(x).astype(int)


def colour_distance(pixels, axes, points, colour, reach=1):
    """For each data point, how far the nearest PNG pixel within `reach` pixels of it is from the
    colour (the largest channel difference, 0-255): a drawn line or marker is 0 there, give or take
    antialiasing."""
    rows, columns = pixel_rows_columns(pixels, axes, points)
    target = 255 * np.asarray(to_rgb(colour))
    return np.min([np.abs(pixels[rows + dr, columns + dc] - target).max(1)
                   for dr in range(-reach, reach + 1) for dc in range(-reach, reach + 1)], axis=0)


# --------------------------------------------------------------------------- the test report


def test_the_report_agrees_with_a_hand_computation(tmp_path):
    confusion = torch.tensor([[5, 1, 0],  # rows: the true class; columns: the predicted one
                              [2, 3, 1],
                              [0, 0, 4]])
    path = tmp_path / "test_report.csv"
    report_module.write_test_report(confusion, ["ant", "bee", "cow"], str(path))
    frame = pd.read_csv(path)
    assert list(frame.columns) == ["class", "precision", "recall", "f1", "support"]
    assert list(frame["class"]) == ["ant", "bee", "cow", "macro avg", "weighted avg"]
    precision = [5 / 7, 3 / 4, 4 / 5]  # the diagonal over each column's sum
    recall = [5 / 6, 3 / 6, 4 / 4]  # the diagonal over each row's sum
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall)]
    support = [6, 6, 4]
    rows = frame.set_index("class")
    for i, name in enumerate(["ant", "bee", "cow"]):
        assert rows.loc[name, ["precision", "recall", "f1"]].tolist() == pytest.approx(
            [precision[i], recall[i], f1[i]], abs=1e-6)
        assert rows.loc[name, "support"] == support[i]
    for name, weights in (("macro avg", [1, 1, 1]), ("weighted avg", support)):
        expected = [sum(w * v for w, v in zip(weights, values)) / sum(weights) for values in (
            precision, recall, f1)]
        assert rows.loc[name, ["precision", "recall", "f1"]].tolist() == pytest.approx(
            expected, abs=1e-6)
        assert rows.loc[name, "support"] == 16
    # the accuracy
    assert rows.loc["weighted avg", "recall"] == pytest.approx((5 + 3 + 4) / 16, abs=1e-6)


def test_undefined_ratios_are_left_empty_and_out_of_the_averages(tmp_path):
    confusion = torch.tensor([[2, 0, 0],  # "bee" is never predicted: no precision
                              # "cow" has no images and is never predicted: nothing is defined
                              [1, 0, 0],
                              [0, 0, 0]])
    frame = report_module.write_test_report(confusion, ["ant", "bee", "cow"],
                                            str(tmp_path / "r.csv"))
    rows = pd.read_csv(tmp_path / "r.csv").set_index("class")
    assert math.isnan(rows.loc["bee", "precision"]) and rows.loc["bee", "recall"] == 0 and rows.loc[
        "bee", "f1"] == 0
    assert rows.loc["cow", ["precision", "recall", "f1"]].isna().all() and rows.loc["cow",
        "support"] == 0
    assert rows.loc["macro avg", "precision"] == pytest.approx(2 / 3, abs=1e-6)  # ant's alone
    assert rows.loc["macro avg", "recall"] == pytest.approx((1 + 0) / 2, abs=1e-6)
    assert rows.loc["weighted avg", "recall"] == pytest.approx(2 / 3, abs=1e-6)
    assert frame.shape == rows.reset_index().shape


def test_the_reports_weighted_recall_is_evaluates_accuracy_and_recall_its_per_class_accuracy(
        tmp_path, one_thread):
    torch.manual_seed(0)
    # unbalanced counts would show a slip
    data = make_tiny_data(n_val=36, size=8, classes=3, batch_size=4)
    model = model_module.get_model("cnn", 3)
    result = train_module.evaluate(model, data.val, num_classes=3, collect=True)
    frame = report_module.write_test_report(result["confusion"], data.classes,
                                            str(tmp_path / "r.csv"))
    rows = frame.set_index("class")
    assert rows.loc["weighted avg", "recall"] == pytest.approx(result["acc"], abs=1e-12)
    assert rows.loc[data.classes, "recall"].tolist() == pytest.approx(
        result["per_class"], abs=1e-12)
    assert rows.loc[data.classes, "support"].sum() == len(data.val.labels)


# --------------------------------------------------------------------------- the figures


@pytest.mark.parametrize("classes, size", [(3, (620, 500)), (50, (2070, 1950))])
def test_the_confusion_matrix_shows_each_count_coloured_by_its_share_of_the_true_class(
        tmp_path, classes, size):
    """Rows are true classes, columns predictions: a transposed or column-normalised matrix fails,
    since each row's 10 stray predictions land in a random column."""
    generator = torch.Generator().manual_seed(0)
    confusion = 90 * torch.eye(classes).long()
    confusion[torch.arange(classes), torch.randint(0, classes, (classes,),
                                                   generator=generator)] += 10
    names = [f"class_{i:02d}" for i in range(classes)]
    path = tmp_path / "confusion_matrix.png"
    report_module.plot_confusion_matrix(confusion, names, str(path))
    assert read_png(path) == size  # the figure grows with the class count
    axes = laid_out(report_module.confusion_figure(confusion, names)).axes[0]
    written = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text()
               for t in axes.texts}
    assert written == {(row, column): str(count) for (row, column), count in np.ndenumerate(
        confusion.numpy())
                       if count or classes <= 20}  # beyond 20 classes, the cells that are not 0
    shares = confusion.double() / 100  # each row holds 100 images
    rows, columns = np.divmod(np.arange(classes * classes), classes)
    pixels = read_pixels(path)
    # a third of a cell up and left of each centre, clear of the count written there
    shown = pixels[pixel_rows_columns(pixels, axes, np.stack([columns - 0.33, rows - 0.33], 1))]
    expected = 255 * matplotlib.colormaps["Blues"](shares.flatten().numpy())[:, :3]
    assert np.abs(shown - expected).max() <= 2


@pytest.mark.parametrize("classes", [10, 50])
def test_the_confusion_matrix_stays_legible(classes):
    """Neighbouring class names are at least a line apart, none is cut off, and each count fits in
    its cell."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    confusion = 1000 * torch.eye(classes).long()  # four digits: the widest counts
    confusion[0, 1] = 7  # beyond 20 classes only counts that are not 0 are written
    figure = report_module.confusion_figure(confusion, [f"a_long_name_{i}" for i in range(classes)])
    canvas = FigureCanvasAgg(figure)
    canvas.draw()  # places the tick labels
    renderer, axes = canvas.get_renderer(), figure.axes[0]
    # pixels, square cells
    cell = axes.transData.transform((1, 0))[0] - axes.transData.transform((0, 0))[0]
    for label in axes.get_xticklabels() + axes.get_yticklabels():
        line = label.get_fontsize() * figure.dpi / 72  # pixels
        # y labels are level, stacked a cell apart
        rotation = math.radians(label.get_rotation() or 90)
        assert cell * math.sin(rotation) >= line  # the gap between neighbours, across the text
        box = label.get_window_extent(renderer)
        assert (box.x0 >= 0 and box.y0 >= 0 and box.x1 <= figure.bbox.width
                and box.y1 <= figure.bbox.height)
    widest = max(text.get_window_extent(renderer).width for text in axes.texts)
    assert len(axes.texts) == (classes * classes if classes <= 20 else classes
                               + 1) and widest < cell


@pytest.mark.parametrize("classes", [51, 1000])
def test_past_fifty_classes_the_confusion_matrix_keeps_fifty_s_size_and_writes_no_counts(
        tmp_path, classes):
    """1,000 classes drew 34,370 x 34,250 pixels; past 50 the figure stays 50 classes' size, with
    no counts in the cells and at most 50 class names an axis, each the name of its tick's class."""
    generator = torch.Generator().manual_seed(0)
    confusion = torch.randint(0, 5, (classes, classes), generator=generator)
    confusion += 90 * torch.eye(classes).long()
    names = [f"class_{i:04d}" for i in range(classes)]
    report_module.plot_confusion_matrix(confusion, names, str(tmp_path / "many.png"))
    fifty = confusion[:50, :50]
    report_module.plot_confusion_matrix(fifty, names[:50], str(tmp_path / "fifty.png"))
    assert read_png(tmp_path / "many.png") == read_png(tmp_path / "fifty.png") == (2070, 1950)
    axes = laid_out(report_module.confusion_figure(confusion, names)).axes[0]
    assert len(axes.texts) == 0
    for ticks, labels in ((axes.get_xticks(), axes.get_xticklabels()),
                          (axes.get_yticks(), axes.get_yticklabels())):
        assert 0 < len(labels) <= 50
        assert [label.get_text() for label in labels] == [names[int(at)] for at in ticks]
    shares = (confusion.double() / confusion.sum(1, keepdim=True)).numpy()
    assert np.allclose(axes.images[0].get_array(), shares)  # every cell still coloured by its share


def test_text_cells_of_the_test_report_that_start_as_a_formula_are_escaped(tmp_path):
    classes = ["=HYPERLINK(\"http://x\")", "+1", "-1", "@SUM(A1)", "\tx", "plain"]
    path = tmp_path / "test_report.csv"
    frame = report_module.write_test_report(torch.eye(len(classes)).long(), classes, str(path))
    # a control character is escaped as in every name shown (a tab: the two characters \t)
    assert frame["class"].tolist()[:6] == classes[:4] + ["\\tx", "plain"]
    written = pd.read_csv(path, keep_default_na=False)["class"].tolist()
    assert written == ["'" + name for name in classes[:4]] + ["\\tx", "plain", "macro avg",
                                                              "weighted avg"]


def test_the_gallery_shows_the_mistakes_of_evaluate(tmp_path, one_thread):
    torch.manual_seed(0)
    data = make_tiny_data(n_val=40, size=8, batch_size=4)
    result = train_module.evaluate(model_module.get_model("cnn", 4), data.val, num_classes=4,
                                   collect=True)
    assert len(result["mistakes"]) == train_module.MISTAKES
    path = tmp_path / "misclassified.png"
    report_module.plot_misclassified(result["mistakes"], data.classes, data.mean, data.std, str(
        path))
    assert read_png(path)[0] == 5 * 210  # a 5 x 5 grid, 2.1 inches a column
    figure = laid_out(report_module._mistakes_figure(result["mistakes"], data.classes, data.mean,
                                                     data.std))
    titles = [text.get_text() for text in figure.axes[0].texts]
    assert len(titles) == 25 and all(t.startswith("true: ") and "\npredicted: " in t
                                     for t in titles)
    assert titles == [f"true: {data.classes[m.target]}\npredicted: {data.classes[m.predicted]} "
                      f"({100 * m.probability:.1f}%)" for m in result["mistakes"]]
    pixels = read_pixels(path)
    mean, std = torch.tensor(data.mean).view(3, 1, 1), torch.tensor(data.std).view(3, 1, 1)
    rows, columns = np.divmod(np.arange(8 * 8), 8)
    for i, mistake in enumerate(result["mistakes"]):  # each image pixel, at its centre in the PNG
        top, left = report_module._gallery_origin(i, 5, 8, 8)
        shown = pixels[pixel_rows_columns(pixels, figure.axes[0],
                                          np.stack([left + columns, top + rows], 1))]
        expected = 255 * (mistake.image * std + mean).clamp(0, 1).permute(1, 2, 0).reshape(-1,
            3).numpy()
        assert np.abs(shown - expected).max() <= 1, f"mistake {i}"


def test_the_gallery_shows_the_images_as_they_were_before_normalisation():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.1)
    pixels = torch.rand(3, 6, 6)
    normalised = (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    other = torch.zeros(3, 6, 6)
    figure = report_module._mistakes_figure([train_module.Mistake(other, 1, 0, 0.95),
                                             train_module.Mistake(normalised, 0, 1, 0.9)],
                                            ["a", "b"], mean, std)
    shown = torch.from_numpy(figure.axes[0].images[0].get_array().data)
    top, left = report_module._gallery_origin(1, 2, 6, 6)  # the second of a row of two
    assert shown[top:top + 6, left:left + 6].permute(2, 0, 1) == pytest.approx(pixels, abs=1e-6)
    assert [text.get_text() for text in figure.axes[0].texts][1] == "true: a\npredicted: b (90.0%)"


def test_no_mistakes_give_a_png_that_says_so(tmp_path):
    report_module.plot_misclassified([], ["a", "b"], (0.5,) * 3, (0.2,) * 3,
                                     str(tmp_path / "m.png"))
    assert read_png(tmp_path / "m.png") == (400, 150)
    figure = report_module._mistakes_figure([], ["a", "b"], (0.5,) * 3, (0.2,) * 3)
    assert [text.get_text() for text in figure.texts] == ["no misclassified test images"]
    dark = (read_pixels(tmp_path / "m.png") < 128).all(2)
    rows, columns = np.nonzero(dark)  # the note's letters, centred on a white figure
    assert dark.sum() > 100 and abs(rows.mean() - 75) < 10 and abs(columns.mean() - 200) < 20


def test_the_lr_finder_plot_is_a_png_on_a_log_axis_with_the_suggestion_marked(tmp_path):
    lrs = [10 ** (-7 + 8 * i / 99) for i in range(100)]
    losses = [2.3 - 1.5 / (1 + math.exp(-(i - 50) / 8)) + (0.002 * (i - 80) ** 2 if i > 80 else 0)
              for i in range(100)]
    suggestion = optim_module.suggest_lr(lrs, losses)
    report_module.plot_lr_finder(lrs, losses, suggestion, str(tmp_path / "lr_finder.png"))
    assert read_png(tmp_path / "lr_finder.png") == (700, 450)
    axes = laid_out(report_module._lr_finder_figure(lrs, losses, suggestion)).axes[0]
    assert axes.get_xscale() == "log"
    assert [list(line.get_xdata()) for line in axes.lines][1] == [suggestion, suggestion]
    pixels = read_pixels(tmp_path / "lr_finder.png")
    lowest = losses.index(min(losses))  # the diverging tail beyond it runs off the top
    # the curve's points, but where the suggestion's line crosses it
    curve = [(lr, loss) for lr, loss in list(zip(lrs, losses))[:lowest + 1]
             if abs(math.log10(lr / suggestion)) > 0.1]
    assert colour_distance(pixels, axes, curve, "tab:blue").max() <= 16
    assert colour_distance(pixels, axes, list(zip(lrs, losses[::-1]))[:lowest + 1],
                           "tab:blue").min() > 16

    def red_share(lr):
        """The share of the plot's height that is red in the pixel column at lr."""
        box = axes.get_window_extent()
        column = pixels[round(len(pixels) - box.y1) + 2:round(len(pixels) - box.y0) - 2,
                        round(axes.transData.transform((lr, 1))[0])]
        return (np.abs(column - 255 * np.asarray(to_rgb("tab:red"))).max(1) <= 16).mean()

    assert red_share(suggestion) > 0.4  # dashed: about half the column
    # all within the plotted 1e-7 to 10
    elsewhere = (suggestion / 100, suggestion * 30, suggestion * 3000)
    # the legend's red sample is a few pixels high
    assert all(red_share(lr) < 0.05 for lr in elsewhere)


def test_the_training_curves_show_each_epochs_metrics_in_their_panel_and_mark_the_events(tmp_path):
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e, "train_acc": 0.5 + e / 20,
                "val_acc": 0.5 + e / 25, "lr": 0.05 if e < 3 else 0.025,
                "event": "restored epoch 2, LR cut" if e == 3 else ""} for e in range(1, 5)]
    report_module.plot_training_curves(history, str(tmp_path / "training_curves.png"))
    assert read_png(tmp_path / "training_curves.png") == (1200, 450)
    figure = laid_out(report_module._curves_figure(history))
    panels = {axes.get_title(): axes for axes in figure.axes if axes.get_title()}
    assert list(panels) == ["Loss", "Accuracy (%)"]
    pixels = read_pixels(tmp_path / "training_curves.png")
    for title, key, scale in (("Loss", "loss", 1), ("Accuracy (%)", "acc", 100)):
        for split, colour, other in (("train", "tab:blue", "tab:orange"),
                                     ("val", "tab:orange", "tab:blue")):
            points = [(row["epoch"], scale * row[f"{split}_{key}"]) for row in history]
            assert colour_distance(pixels, panels[title], points, colour).max() <= 8, (title, split)
            assert colour_distance(pixels, panels[title], points, other).min() > 100, (title, split)
        marks = {(line.get_xdata()[0], line.get_color()) for line in panels[title].lines
                 if line.get_label() in ("LR cut", "weights restored")}
        assert marks == {(3, "tab:red"), (3, "tab:purple")}
        lr_axis = next(axes for axes in figure.axes if axes is not panels[title]
                       and axes.bbox.bounds == panels[title].bbox.bounds)  # its twin
        assert lr_axis.get_yscale() == "log" and list(lr_axis.lines[0].get_ydata()) == [row["lr"]
            for row in history]


def test_a_figure_that_cannot_be_drawn_only_warns_but_one_that_cannot_be_written_is_an_error(
        tmp_path, capsys, monkeypatch):
    path = tmp_path / "confusion_matrix.png"
    with monkeypatch.context() as patch:
        # matplotlib failing to draw
        patch.setattr(report_module, "confusion_figure", lambda *args: 1 / 0)
        report_module.plot_confusion_matrix(torch.eye(2, dtype=torch.int64), ["a", "b"], str(path))
    assert not path.exists() and f"warning: could not draw {path}" in capsys.readouterr().err
    # as a full or read-only disk would fail
    missing = tmp_path / "missing_folder" / "confusion_matrix.png"
    with pytest.raises(files_module.WriteFailed,
                       match="could not write confusion_matrix.png in .*missing_folder"):
        report_module.plot_confusion_matrix(torch.eye(2, dtype=torch.int64), ["a", "b"], str(
            missing))


def test_write_test_outputs_writes_the_three_files(tmp_path, one_thread):
    data = make_tiny_data(size=8)
    result = train_module.evaluate(model_module.get_model("cnn", 4), data.val, num_classes=4,
                                   collect=True)
    report_module.write_test_outputs(result, data.classes, data.mean, data.std, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion_matrix.png",
                                                          "misclassified.png",
                                                          # and no temporary files left
                                                          "test_report.csv"]


def test_the_curves_mark_whole_epochs_only_and_draw_a_run_without_validation():
    history = [{"epoch": e, "train_loss": 2.0 / e, "train_acc": 0.2 * e, "val_loss": None,
                "val_acc": None, "lr": 0.1, "event": ""} for e in range(1, 5)]
    figure = report_module._curves_figure(history)
    for panel in figure.axes[:2]:  # the loss and accuracy panels (their LR axes come after them)
        ticks = [t for t in panel.get_xticks() if 1 <= t <= 4]
        assert ticks and all(float(t).is_integer() for t in ticks)
        # no validation line
        assert [line.get_label() for line in panel.get_lines()] == ["training"]
