"""inference_module's Python API: load(output_dir).predict(images), used as the README shows it, and
its predictions against --predict's predictions.csv for the same images."""

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


def test_the_readme_lines_print_the_top_class_of_each_image_as_predict_does(run_folder,
                                                                             monkeypatch, capsys):
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
