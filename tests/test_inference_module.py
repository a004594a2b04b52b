"""inference_module's Python API: load(output_dir).predict(images), used as the README shows it, and
its predictions against --predict's predictions.csv for the same images."""

import os
import pathlib
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import inference_module
import main
from conftest import write_fake_cifar

README = pathlib.Path(__file__).parent.parent / "README.md"
TINY = ["--val-split", "20", "--download", "false", "--ask-epoch", "none", "--batch-size", "32"]


def readme_api_lines() -> str:
    """The README's Python example: the code block after "**From Python**"."""
    text = README.read_text()
    return re.search(r"```\n(.*?)```", text[text.index("**From Python**"):], re.S).group(1)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A one-epoch run in runs/photos, cat.jpg and dog.png beside it, and --predict's
    predictions.csv for the two: (the folder they are in, the CSV's rows)."""
    root = tmp_path_factory.mktemp("api")
    data = write_fake_cifar(root / "data", per_batch=40)
    out = root / "runs" / "photos"
    assert main.main(["--data-dir", data, "--output-dir", str(out), "--epochs", "1", *TINY]) == 0
    rng = np.random.default_rng(1)
    for name in ("cat.jpg", "dog.png"):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / name)
    assert main.main(["--output-dir", str(out), "--predict", str(root / "cat.jpg"),
                      str(root / "dog.png")]) == 0
    return root, pd.read_csv(out / "predictions.csv")


def test_the_readme_lines_print_the_top_class_of_each_image_as_predict_does(
        run_folder, monkeypatch, capsys):
    root, csv = run_folder
    monkeypatch.chdir(root)
    capsys.readouterr()
    exec(readme_api_lines(), {})  # the README's lines, as they are there
    assert capsys.readouterr().out.splitlines() == [f"{row.top1} {row.p1:.1%}"
                                                    for row in csv.itertuples()]


def test_predict_equals_the_predict_flag_for_paths_pil_images_and_tensors(run_folder):
    root, csv = run_folder
    model = inference_module.load(str(root / "runs" / "photos"))
    found = model.predict([str(root / "cat.jpg"), root / "dog.png"], k=3)
    assert [p.classes for p in found] == csv[["top1", "top2", "top3"]].values.tolist()
    assert [p.probabilities for p in found] == [pytest.approx(row, abs=1e-6) for row in
                                                csv[["p1", "p2", "p3"]].values.tolist()]
    # a PNG holds its pixels exactly: as a PIL image, or a tensor of them, it is the same image
    png = Image.open(root / "dog.png")
    pixels = torch.from_numpy(np.array(png)).permute(2, 0, 1)  # (3, H, W) uint8
    for images in (png, [png], pixels, pixels[None] / 255, [pixels.float() / 255]):
        [dog] = model.predict(images, k=3)  # a batch of one, not two: the same up to rounding
        assert dog.classes == found[1].classes
        assert dog.probabilities == pytest.approx(found[1].probabilities, abs=1e-6)
    assert len(model.predict(pixels)[0].classes) == 5  # k's default: 5 of the 10 classes
    assert len(model.predict(pixels, k=50)[0].classes) == 10


def test_predict_refuses_normalised_tensors_and_other_things_in_one_line(run_folder):
    root, _ = run_folder
    model = inference_module.load(str(root / "runs" / "photos"))
    with pytest.raises(ValueError, match=r"^predict takes float tensors of values in \[0, 1\] "
                                         r"\(or uint8\), not from -1 to 1: not normalised$"):
        model.predict(torch.linspace(-1, 1, 3 * 8 * 8).reshape(3, 8, 8))
    with pytest.raises(ValueError, match="^predict takes image paths, PIL images or .* not 7$"):
        model.predict([7])



@pytest.mark.parametrize("images, k, refusal", [
    (torch.arange(3 * 4 * 4).reshape(3, 4, 4), 3, "uint8 or float tensors, not torch.int64"),
    (torch.ones(3, 4, 4, dtype=torch.bool), 3, "uint8 or float tensors, not torch.bool"),
    (torch.zeros(3, 0, 4, dtype=torch.uint8), 3,
     "images of 1 x 1 pixel or more, not of size (3, 0, 4)"),
    (Image.new("RGB", (0, 0)), 3, "images of 1 x 1 pixel or more, not of size (0, 0)"),
    (torch.zeros(3, 4, 4), 0, "k, the classes per image, of 1 or more, not 0"),
    (torch.zeros(3, 4, 4), -1, "k, the classes per image, of 1 or more, not -1"),
])
def test_predict_refuses_pixels_it_would_misread_or_a_k_below_1_in_one_line(
        run_folder, images, k, refusal):
    """An int64 tensor of 0-255 values would wrap round when scaled to 8 bits, an empty image divide
    by zero in the resize, a k below 1 fail inside torch.topk."""
    model = inference_module.load(str(run_folder[0] / "runs" / "photos"))
    with pytest.raises(ValueError, match=f"^predict takes {re.escape(refusal)}"):
        model.predict(images, k=k)


def test_the_predict_flag_shows_names_with_line_breaks_and_escape_codes_on_one_line(
        run_folder, capsys):
    root, _ = run_folder
    out, odd = root / "runs" / "photos", root / "odd"
    odd.mkdir(exist_ok=True)
    for name in ("new\nline.png", "\x1b[31mred.png"):
        (odd / name).write_bytes((root / "dog.png").read_bytes())
    capsys.readouterr()
    gone = str(odd / "gone\n.png")
    assert main.main(["--output-dir", str(out), "--predict", str(odd), gone]) == 2
    printed, err = capsys.readouterr()
    assert [line.split(": ")[0] for line in printed.splitlines()] == [
        os.path.join(str(odd), "\\x1b[31mred.png"), os.path.join(str(odd), "new\\nline.png")]
    assert err.splitlines()[0] == f"error: image {odd}/gone\\n.png does not exist"
    assert list(pd.read_csv(out / "predictions.csv")["path"]) == [line.split(": ")[0] for line
                                                                  in printed.splitlines()]
