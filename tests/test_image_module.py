"""Image files: any mode read as upright RGB, truncated files, reduced-scale decoding, prediction input, and many
files decoded in parallel into memory or a .npy file."""

import io
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, JpegImagePlugin
from torchvision.transforms import functional as F

import image_module
from conftest import smooth_photo, write_image_tree, write_photo_tree
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


# ----------------------------------------------------------------------------- decoding many files


def photo_files(tmp_path):
    """Every file of a photo tree (JPEG, PNG, CMYK, greyscale, 16-bit, EXIF-rotated, WebP, BMP, GIF, a
    truncated JPEG; and broken.png, notes.txt, image.heic, which do not read), in sorted order: 70 files."""
    root = write_photo_tree(tmp_path / "photos")
    return sorted(os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names)


def rows_of(kind, tmp_path, shape):
    """Where decode_files writes, filled with 7s (so a row left unwritten shows): a tensor in memory, or the
    memory map of a new .npy file, as the cache builds it."""
    if kind == "tensor":
        return torch.full(shape, 7, dtype=torch.uint8)
    rows = np.lib.format.open_memmap(str(tmp_path / "rows.npy"), "w+", np.uint8, shape)
    rows[:] = 7
    return rows


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("kind", ["tensor", "npy"])
def test_decode_files_gives_read_stored_pixels_and_black_rows_for_files_it_cannot_read(tmp_path, kind,
                                                                                       num_workers):
    paths = photo_files(tmp_path)
    out = rows_of(kind, tmp_path, (len(paths), 24, 24, 3))
    failures = image_module.decode_files(paths, 24, out, num_workers, "decoding")
    rows = out.numpy() if kind == "tensor" else out
    unreadable = {"broken.png", "notes.txt", "image.heic"}
    assert [os.path.basename(paths[i]) for i, _ in failures] == sorted(unreadable)  # in row order
    for i, message in failures:
        with pytest.raises(DataError) as error:
            image_module.read_stored(paths[i], 24)
        assert message == str(error.value) and not rows[i].any()
    for i, path in enumerate(paths):
        if os.path.basename(path) not in unreadable:
            assert np.array_equal(rows[i], np.asarray(image_module.read_stored(path, 24))), path
    assert len(paths) == 70  # 9 chunks of 8 on 2 workers, 4 scratch chunks in memory: each reused


def test_decoding_workers_write_the_npy_file_themselves(tmp_path):
    """This process maps the file read-only: the pixels it then sees were written by the workers, and no
    pixel went through it."""
    paths = [path for path in photo_files(tmp_path) if not path.endswith(("broken.png", ".txt", ".heic"))]
    np.lib.format.open_memmap(str(tmp_path / "rows.npy"), "w+", np.uint8, (len(paths), 16, 16, 3))
    read_only = np.load(str(tmp_path / "rows.npy"), mmap_mode="r")
    failures = image_module.decode_files(paths, 16, read_only, 2, "decoding")
    assert failures == []
    for i, path in enumerate(paths):
        assert np.array_equal(read_only[i], np.asarray(image_module.read_stored(path, 16))), path


@pytest.mark.skipif(sys.platform != "linux", reason="the workers see the patched reader only when forked")
def test_an_error_in_a_decoding_worker_other_than_an_unreadable_file_is_raised(tmp_path, monkeypatch):
    paths = photo_files(tmp_path)
    read_stored = image_module.read_stored

    def failing(path, size):
        if path == paths[33]:
            raise MemoryError("out of memory in a worker")
        return read_stored(path, size)
    monkeypatch.setattr(image_module, "read_stored", failing)
    with pytest.raises(MemoryError, match="out of memory in a worker"):
        image_module.decode_files(paths, 16, torch.zeros(len(paths), 16, 16, 3, dtype=torch.uint8), 2, "decoding")


def test_the_decode_scales_a_jpeg_down_while_decoding_where_it_keeps_twice_the_stored_size(tmp_path, monkeypatch):
    """JPEG DCT scaling (Image.draft) by 1/2, 1/4 or 1/8 in decode_files as in read_stored, as far as the
    shorter side stays at least twice the stored size: an 800x600 JPEG stored at 50 px is decoded at 200x150,
    at 150 px at 400x300, and at 200 px whole (1/2 would leave 300 < 400); a PNG is decoded whole."""
    decoded = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(image, mode, size):
        result = draft(image, mode, size)
        decoded.append(image.size)
        return result
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    photo = Image.fromarray(smooth_photo(600, seed=1).numpy()).resize((800, 600))
    photo.save(tmp_path / "big.jpg", quality=95)
    photo.save(tmp_path / "big.png")
    paths = [str(tmp_path / "big.jpg"), str(tmp_path / "big.png")]
    for size, scaled in ((50, (200, 150)), (150, (400, 300)), (200, (800, 600))):
        decoded.clear()
        image_module.decode_files(paths, size, torch.zeros(2, size, size, 3, dtype=torch.uint8), 0, "decoding")
        assert decoded == [scaled]  # the JPEG's; a PNG has no DCT to scale
