"""Image files: any mode read as upright RGB, truncated files, reduced-scale decoding, prediction input."""

import io
import os

import numpy as np
import pytest
from PIL import Image, ImageFile
from torchvision.transforms import functional as F

import image_module
from conftest import smooth_photo, write_image_tree
from image_module import DataError


def test_load_image_for_prediction(tmp_path):
    root = write_image_tree(tmp_path, splits=("train",))
    image = image_module.load_image(os.path.join(root, "train", "cats", "0.png"), 16, (0.5,) * 3, (0.5,) * 3)
    assert image.shape == (3, 16, 16)
    with pytest.raises(DataError, match="does not exist"):
        image_module.load_image(str(tmp_path / "missing.png"), 16, (0.5,) * 3, (0.5,) * 3)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="not an image"):
        image_module.load_image(str(tmp_path / "notes.txt"), 16, (0.5,) * 3, (0.5,) * 3)


def test_every_image_mode_reads_as_rgb():
    def pixel(image):
        return image_module.to_rgb(image).getpixel((0, 0))

    def row(image):
        return [tuple(p) for p in np.asarray(image_module.to_rgb(image))[0].tolist()]

    assert pixel(Image.new("L", (2, 2), 90)) == (90, 90, 90)
    assert pixel(Image.new("1", (2, 2), 1)) == (255, 255, 255)
    assert pixel(Image.new("CMYK", (2, 2), (0, 255, 255, 0))) == (255, 0, 0)
    # 16-bit greyscale scaled to 8 bits (Pillow's own convert clips every value above 255 to white)
    sixteen = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    for image in (Image.fromarray(sixteen), Image.fromarray(sixteen.astype(np.int32), "I")):
        assert image.mode in ("I;16", "I")
        assert np.array_equal(np.asarray(image_module.to_rgb(image))[0, :, 0], [0, 100, 255])
    # transparency is composited on white: opaque keeps its colour, clear is white, half is halfway
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(200, 0, 0, 255), (200, 0, 0, 0), (0, 0, 0, 128)])
    assert row(rgba) == [(200, 0, 0), (255, 255, 255), (127, 127, 127)]
    assert pixel(Image.new("LA", (2, 2), (10, 0))) == (255, 255, 255)
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.putdata([0, 1])
    assert row(palette) == [(255, 0, 0), (0, 0, 255)]
    palette.info["transparency"] = 0  # index 0 is clear
    assert row(palette) == [(255, 255, 255), (0, 0, 255)]
    for image in (rgba, palette, Image.new("I;16", (2, 2))):
        assert image_module.to_rgb(image).mode == "RGB"


def test_exif_orientation_turns_a_sideways_photo_upright(tmp_path):
    stored = np.zeros((100, 200, 3), dtype=np.uint8)  # 200 wide, 100 high: left half red, right half blue
    stored[:, :100, 0] = 255
    stored[:, 100:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: turn 90 degrees clockwise to view, so the left half ends on top
    path = str(tmp_path / "phone.jpg")
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    upright = np.asarray(image_module.open_rgb(path)).astype(int)
    assert upright.shape == (200, 100, 3)
    assert (upright[:90, :, 0] > 200).all() and (upright[:90, :, 2] < 50).all()   # top: red
    assert (upright[110:, :, 2] > 200).all() and (upright[110:, :, 0] < 50).all()  # bottom: blue
    square = image_module.load_image(path, 16, (0,) * 3, (1,) * 3)  # the middle of the upright photo
    assert (square[0, :7] > 0.8).all() and (square[2, 9:] > 0.8).all() and (square[0, 9:] < 0.2).all()


def test_a_truncated_jpeg_loads_grey_where_cut_with_a_warning(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(image_module, "_WARNED", set())
    noise = np.random.default_rng(0).integers(-20, 20, size=(80, 120, 3))
    whole = io.BytesIO()  # noisy, so that the data, not the header, fills most of the file
    Image.fromarray((noise + [200, 60, 60]).astype(np.uint8)).save(whole, "JPEG")
    path = str(tmp_path / "cut.jpg")
    with open(path, "wb") as f:
        f.write(whole.getvalue()[:len(whole.getvalue()) * 6 // 10])
    image = np.asarray(image_module.open_rgb(path)).astype(int)
    assert image.shape == (80, 120, 3)
    assert np.abs(image[:8].mean((0, 1)) - [200, 60, 60]).max() < 5 and (image[-1] == 128).all()
    assert "cut.jpg is truncated or damaged" in capsys.readouterr().err
    image_module.open_rgb(path)
    assert capsys.readouterr().err == ""  # named once per process
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # Pillow's global switch is left as it was


def test_photos_are_decoded_at_a_reduced_scale_close_to_a_full_decode(tmp_path):
    """JPEG DCT scaling (Image.draft) keeps at least twice the stored size, then PIL resizes to the stored size:
    within a few levels of a full decode resized alike."""
    path = str(tmp_path / "big.jpg")
    Image.fromarray(smooth_photo(600, seed=3).numpy()).resize((800, 600)).save(path, quality=95)
    assert image_module.open_rgb(path, reduce_to=50).size == (200, 150)  # 1/4: 150 >= 2 x 50
    assert image_module.open_rgb(path, reduce_to=200).size == (800, 600)  # 1/2 would leave 300 < 400
    stored = np.array(image_module.read_stored(path, 50)).astype(int)
    full = np.array(F.center_crop(F.resize(image_module.open_rgb(path), 50), [50, 50])).astype(int)
    assert stored.shape == (50, 50, 3) and np.abs(stored - full).mean() < 1 and np.abs(stored - full).max() <= 6
