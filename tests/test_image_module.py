"""Image files: any mode read as upright RGB, truncated files, reduced-scale decoding, prediction
input, and many files decoded in parallel into memory or a .npy file."""

import io
import os
import signal
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, JpegImagePlugin
from torchvision.transforms import functional as F
from tqdm import tqdm

import decode_module
import gpu_decode_module
import image_module
import process_module
from conftest import smooth_photo, write_image_tree, write_photo_tree
from image_module import DataError


def test_load_image_for_prediction(tmp_path):
    root = write_image_tree(tmp_path, splits=("train",))
    image = image_module.load_image(os.path.join(root, "train", "cats", "0.png"), 16, (0.5,) * 3,
                                    (0.5,) * 3)
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
    # 200 wide, 100 high: left half red, right half blue
    stored = np.zeros((100, 200, 3), dtype=np.uint8)
    stored[:, :100, 0] = 255
    stored[:, 100:, 2] = 255
    exif = Image.Exif()
    # Orientation 6: turn 90 degrees clockwise to view, so the left half ends on top
    exif[0x0112] = 6
    path = str(tmp_path / "phone.jpg")
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    upright = np.asarray(image_module.open_rgb(path)).astype(int)
    assert upright.shape == (200, 100, 3)
    assert (upright[:90, :, 0] > 200).all() and (upright[:90, :, 2] < 50).all()   # top: red
    assert (upright[110:, :, 2] > 200).all() and (upright[110:, :, 0] < 50).all()  # bottom: blue
    # the middle of the upright photo
    square = image_module.load_image(path, 16, (0,) * 3, (1,) * 3)
    assert (square[0, :7] > 0.8).all() and (square[2, 9:] > 0.8).all() and (square[0, 9:]
        < 0.2).all()


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
    """JPEG DCT scaling (Image.draft) keeps at least twice the stored size, then PIL resizes to the
    stored size: within a few levels of a full decode resized alike."""
    path = str(tmp_path / "big.jpg")
    Image.fromarray(smooth_photo(600, seed=3).numpy()).resize((800, 600)).save(path, quality=95)
    assert image_module.open_rgb(path, reduce_to=50).size == (200, 150)  # 1/4: 150 >= 2 x 50
    # 1/2 would leave 300 < 400
    assert image_module.open_rgb(path, reduce_to=200).size == (800, 600)
    stored = np.array(image_module.read_stored(path, 50)).astype(int)
    full = np.array(F.center_crop(F.resize(image_module.open_rgb(path), 50), [50, 50])).astype(int)
    assert stored.shape == (50, 50, 3) and np.abs(stored - full).mean() < 1 and np.abs(stored
        - full).max() <= 6


# ----------------------------------------------------------------------------- decoding many files


def photo_files(tmp_path):
    """Every file of a photo tree (JPEG, PNG, CMYK, greyscale, 16-bit, EXIF-rotated, WebP, BMP, GIF,
    a truncated JPEG; and broken.png, notes.txt, image.heic, which do not read), in sorted order: 70
    files."""
    root = write_photo_tree(tmp_path / "photos")
    return sorted(os.path.join(folder, name) for folder, _, names in os.walk(root)
                  for name in names)


def rows_of(kind, tmp_path, shape):
    """Where decode_files writes, filled with 7s (so a row left unwritten shows): a tensor in
    memory, or the memory map of a new .npy file, as the cache builds it."""
    if kind == "tensor":
        return torch.full(shape, 7, dtype=torch.uint8)
    rows = np.lib.format.open_memmap(str(tmp_path / "rows.npy"), "w+", np.uint8, shape)
    rows[:] = 7
    return rows


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("kind", ["tensor", "npy"])
def test_decode_files_gives_read_stored_pixels_and_black_rows_for_files_it_cannot_read(
        tmp_path, kind, num_workers):
    paths = photo_files(tmp_path)
    out = rows_of(kind, tmp_path, (len(paths), 24, 24, 3))
    failures = decode_module.decode_files(paths, 24, out, num_workers, "decoding")
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
    """This process maps the file read-only: the pixels it then sees were written by the workers,
    and no pixel went through it."""
    paths = [path for path in photo_files(tmp_path)
             if not path.endswith(("broken.png", ".txt", ".heic"))]
    np.lib.format.open_memmap(str(tmp_path / "rows.npy"), "w+", np.uint8, (len(paths), 16, 16, 3))
    read_only = np.load(str(tmp_path / "rows.npy"), mmap_mode="r")
    failures = decode_module.decode_files(paths, 16, read_only, 2, "decoding")
    assert failures == []
    for i, path in enumerate(paths):
        assert np.array_equal(read_only[i], np.asarray(image_module.read_stored(path, 16))), path


@pytest.mark.skipif(sys.platform != "linux",
                    reason="the workers see the patched reader only when forked")
def test_an_error_in_a_decoding_worker_other_than_an_unreadable_file_is_raised(
        tmp_path, monkeypatch):
    paths = photo_files(tmp_path)
    read_stored = image_module.read_stored

    def failing(path, size):
        if path == paths[33]:
            raise MemoryError("out of memory in a worker")
        return read_stored(path, size)
    monkeypatch.setattr(image_module, "read_stored", failing)
    with pytest.raises(MemoryError, match="out of memory in a worker"):
        decode_module.decode_files(paths, 16, torch.zeros(len(paths), 16, 16, 3, dtype=torch.uint8),
                                   2, "decoding")


@pytest.mark.skipif(sys.platform != "linux", reason="workers see the patched reader when forked")
@pytest.mark.parametrize("kind", ["tensor", "npy"])
def test_a_decoding_worker_that_dies_is_named_with_its_file_at_once_and_the_others_stop(
        tmp_path, monkeypatch, kind):
    paths = [str(tmp_path / f"{i}.png") for i in range(40)]
    for path in paths:
        Image.new("RGB", (8, 8), "red").save(path)
    read_stored, pids = image_module.read_stored, tmp_path / "pids"

    def killed_on_the_thirtieth(path, size):  # as the out-of-memory killer kills a worker
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        if path == paths[29]:
            os.kill(os.getpid(), signal.SIGKILL)
        return read_stored(path, size)
    monkeypatch.setattr(image_module, "read_stored", killed_on_the_thirtieth)
    began = time.monotonic()
    with pytest.raises(process_module.WorkerDied) as died:
        decode_module.decode_files(paths, 8, rows_of(kind, tmp_path, (40, 8, 8, 3)), 2, "decoding")
    assert time.monotonic() - began < 10
    assert f"was killed by SIGKILL while decoding {paths[29]}: most likely the system ran out of " \
        f"memory" in str(died.value)
    workers = set(map(int, pids.read_text().split()))
    assert len(workers) == 2 and not any(os.path.exists(f"/proc/{pid}") for pid in workers)


def test_the_decode_scales_a_jpeg_down_while_decoding_where_it_keeps_twice_the_stored_size(
        tmp_path, monkeypatch):
    """JPEG DCT scaling (Image.draft) by 1/2, 1/4 or 1/8 in decode_files as in read_stored, as far
    as the shorter side stays at least twice the stored size: an 800x600 JPEG stored at 50 px is
    decoded at 200x150, at 150 px at 400x300, and at 200 px whole (1/2 would leave 300 < 400); a PNG
    is decoded whole."""
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
        decode_module.decode_files(paths, size, torch.zeros(2, size, size, 3, dtype=torch.uint8), 0,
                                   "decoding")
        assert decoded == [scaled]  # the JPEG's; a PNG has no DCT to scale


# ------------------------------------------------------------- JPEGs decoded in batches on a device

# width, height
JPEG_SHAPES = [(300, 200), (200, 300), (640, 480), (801, 603), (1200, 900), (1000, 250), (50, 40)]
# stored at 24 and 64 px, Pillow decodes these at every JPEG draft scale: 1/8, 1/4, 1/2 and whole
# (50x40: enlarged)


def textured_photo(width, height, seed):
    """uint8 (height, width, 3): a smooth photo with fine noise on it (+-30 levels), the hardest
    case for a decoder's rounding and for scaled decoding."""
    smooth = Image.fromarray(smooth_photo(max(width, height), seed=seed).numpy()).resize((width,
        height))
    noise = np.random.default_rng(seed).integers(-30, 30, size=(height, width, 3))
    return np.clip(np.asarray(smooth).astype(int) + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """JPEG_SHAPES written as textured JPEGs (quality 85): their paths."""
    folder = tmp_path_factory.mktemp("jpegs")
    paths = []
    for k, (width, height) in enumerate(JPEG_SHAPES):
        paths.append(str(folder / f"{width}x{height}.jpg"))
        Image.fromarray(textured_photo(width, height, seed=k)).save(paths[-1], quality=85)
    return paths


def on_the_device(paths, size, rows=None):
    """_decode_jpegs on the CPU (the CUDA path's code, torchvision's CPU decoder): rows filled with
    7s first (or the rows given), and the numbers of the files it left to the CPU path."""
    rows = np.full((len(paths), size, size, 3), 7, np.uint8) if rows is None else rows
    left = gpu_decode_module._decode_jpegs(paths, size, rows, torch.device("cpu"),
                                           tqdm(disable=True))
    return rows, left


def differences(rows, paths, size):
    """Per file, the mean and the largest absolute difference of its row from read_stored's
    pixels."""
    gaps = [np.abs(row.astype(int) - np.asarray(image_module.read_stored(path, size)).astype(int))
            for row, path in zip(rows, paths)]
    return [gap.mean() for gap in gaps], [gap.max() for gap in gaps]


@pytest.mark.parametrize("size", [24, 64])
def test_the_batched_jpeg_decode_is_within_a_level_of_pillows_on_average_and_four_at_most(
        jpegs, size):
    """Measured on these JPEGs: mean absolute difference 0 to 0.52 levels, largest 3 (coarser noise,
    +-40 on 16-px blocks: up to 0.67 and 5). The JPEG draft is reproduced (block means at Pillow's
    scale): without it, the 1200x900 JPEG stored at 24 px differs by 14 levels on average (90 at
    most), the 801x603 one by 5.6."""
    rows, left = on_the_device(jpegs, size)
    assert left == []
    means, largest = differences(rows, jpegs, size)
    assert max(means) <= 1 and max(largest) <= 4, (means, largest)


def test_the_reduction_before_resizing_is_the_one_pillows_jpeg_draft_picks(jpegs):
    for path in jpegs:
        for size in (8, 24, 64, 100, 300):
            with Image.open(path) as image:
                width, height = image.size
                image.draft(None, (2 * size, 2 * size))
                scale = gpu_decode_module._draft_scale(height, width, size)
                assert image.size == (-(-width // scale), -(-height // scale)), (path, size, scale)


def test_files_the_device_may_not_decode_are_left_to_the_cpu_path_which_makes_them_as_always(
        tmp_path, monkeypatch):
    """PNG, WebP, BMP, GIF, CMYK and greyscale JPEGs, a JPEG with EXIF orientation 6, a truncated
    JPEG and files that are not images go to the CPU path; decode_files with a CUDA device (the seam
    pointed at the CPU) gives them exactly the rows and the failures it gives without one, and the
    plain JPEGs rows within the bound."""
    paths = photo_files(tmp_path)
    Image.fromarray(textured_photo(90, 60, seed=1)).convert("L").save(tmp_path / "grey.jpg")
    paths.append(str(tmp_path / "grey.jpg"))
    rows, left = on_the_device(paths, 24)
    on_device = [i for i in range(len(paths)) if i not in left]
    # 3 classes, 2 splits
    assert {os.path.basename(paths[i]) for i in on_device} == {"rgb.jpg"} and len(on_device) == 6
    assert {"sideways.jpg", "cmyk.jpg", "truncated.jpg", "grey.jpg"} <= {os.path.basename(paths[i])
                                                                         for i in left}
    assert (rows[left] == 7).all()  # not written: the CPU path's to fill

    cpu = torch.full((len(paths), 24, 24, 3), 7, dtype=torch.uint8)
    cpu_failures = decode_module.decode_files(paths, 24, cpu, 0, "decoding")
    monkeypatch.setattr(gpu_decode_module, "_jpeg_device", lambda device: torch.device("cpu"))
    out = torch.full((len(paths), 24, 24, 3), 7, dtype=torch.uint8)
    assert decode_module.decode_files(paths, 24, out, 2, "decoding", device="cuda") == cpu_failures
    assert [os.path.basename(paths[i])
            for i, _ in cpu_failures] == ["broken.png", "image.heic", "notes.txt"]
    for i in left:
        assert torch.equal(out[i], cpu[i]), paths[i]
    means, largest = differences(out[on_device].numpy(), [paths[i] for i in on_device], 24)
    assert max(means) <= 1 and max(largest) <= 4


def corrupt_jpeg(path, seed=0):
    """A JPEG whose header reads but whose data holds a bad marker: torchvision's decoder refuses
    it, Pillow decodes what it can and warns."""
    whole = io.BytesIO()
    Image.fromarray(textured_photo(64, 48, seed=seed)).save(whole, "JPEG", quality=90)
    data = bytearray(whole.getvalue())
    middle = (data.index(b"\xff\xda") + len(data)) // 2
    data[middle:middle + 16] = b"\xff\x20" * 8
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def test_a_corrupt_jpeg_falls_back_to_the_cpu_path_and_the_rest_of_its_batch_stays_on_the_device(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(image_module, "_WARNED", set())
    paths = [str(tmp_path / f"{k}.jpg") for k in range(4)]
    for k, path in enumerate(paths):
        Image.fromarray(textured_photo(64, 48, seed=k)).save(path, quality=90)
    paths.insert(2, corrupt_jpeg(tmp_path / "corrupt.jpg"))
    calls = []
    decode_jpeg = gpu_decode_module.decode_jpeg

    def counting(encoded, *args):
        calls.append(len(encoded))
        return decode_jpeg(encoded, *args)
    monkeypatch.setattr(gpu_decode_module, "decode_jpeg", counting)
    rows, left = on_the_device(paths, 16)
    assert left == [2] and (rows[2] == 7).all() and not (rows[[0, 1, 3, 4]] == 7).all((1, 2,
        3)).any()
    # the batch failed as one; then each alone, the corrupt one failing
    assert calls == [5, 1, 1, 1, 1, 1]

    monkeypatch.setattr(gpu_decode_module, "_jpeg_device", lambda device: torch.device("cpu"))
    out = torch.zeros(len(paths), 16, 16, 3, dtype=torch.uint8)
    # Pillow reads part
    assert decode_module.decode_files(paths, 16, out, 0, "decoding", device="cuda") == []
    assert torch.equal(out[2], torch.from_numpy(np.array(image_module.read_stored(paths[2], 16))))
    # as the CPU path warns
    assert capsys.readouterr().err.count("corrupt.jpg is truncated or damaged") == 1


def test_batches_hold_at_most_so_many_jpegs_and_decoded_pixels_and_rows_land_in_a_npy_file(
        tmp_path, monkeypatch, jpegs):
    """Small batches (3 files, or 1.2 M pixels) through the two staging buffers in turn, into the
    rows of a .npy file, which this process writes by name as the workers do; the non-JPEG between
    them is left."""
    Image.fromarray(textured_photo(40, 30, seed=9)).save(tmp_path / "between.png")
    # pixels: 60 k, 60 k, 307 k, -, 483 k, 1.08 M,
    paths = jpegs[:3] + [str(tmp_path / "between.png")] + jpegs[3:]
    # 250 k, 2 k: three files fill a batch, the fourth JPEG and the fifth each fill one with their
    # pixels
    monkeypatch.setattr(gpu_decode_module, "GPU_DECODE_BATCH", 3)
    monkeypatch.setattr(gpu_decode_module, "GPU_DECODE_PIXELS", 1_200_000)
    batches = [(files, others) for files, _, others in gpu_decode_module._jpeg_batches(paths)]
    # the PNG with the batch before it
    assert batches == [([0, 1, 2], [3]), ([4], []), ([5], []), ([6, 7], [])]
    rows = np.lib.format.open_memmap(str(tmp_path / "rows.npy"), "w+", np.uint8,
                                     (len(paths), 24, 24, 3))
    rows[:] = 7
    _, left = on_the_device(paths, 24, rows)
    assert left == [3] and (rows[3] == 7).all()
    del rows
    stored = np.load(str(tmp_path / "rows.npy"))
    means, largest = differences(stored[[0, 1, 2, 4, 5, 6, 7]], jpegs, 24)
    assert max(means) <= 1 and max(largest) <= 4


def test_decode_files_hands_a_cuda_device_its_jpegs_and_the_worker_processes_what_it_leaves(
        tmp_path, monkeypatch):
    assert gpu_decode_module._jpeg_device(None) is None and gpu_decode_module._jpeg_device(
        "cpu") is None
    assert gpu_decode_module._jpeg_device(torch.device("meta")) is None
    assert gpu_decode_module._jpeg_device("cuda:1") == torch.device("cuda:1")
    paths = photo_files(tmp_path)
    devices = []

    # stands in for the device: takes the plain JPEGs
    def on_device(paths, size, rows, device, bar):
        devices.append(device)
        left = [i for i, path in enumerate(paths) if not path.endswith("rgb.jpg")]
        rows[[i for i in range(len(paths)) if i not in left]] = 200
        return left
    monkeypatch.setattr(gpu_decode_module, "_decode_jpegs", on_device)
    for device in (None, "cpu", torch.device("cpu")):
        decode_module.decode_files(paths[:3], 16, torch.zeros(3, 16, 16, 3, dtype=torch.uint8), 0,
                                   "x", device=device)
    assert devices == []
    out = torch.full((len(paths), 16, 16, 3), 7, dtype=torch.uint8)
    failures = decode_module.decode_files(paths, 16, out, 2, "decoding", device="cuda")
    assert devices == [torch.device("cuda")]
    assert [os.path.basename(paths[i])
            for i, _ in failures] == ["broken.png", "image.heic", "notes.txt"]
    for i, path in enumerate(paths):
        if path.endswith("rgb.jpg"):
            assert (out[i] == 200).all()
        elif i not in dict(failures):  # the rest decoded by the workers, as without a device
            assert np.array_equal(out[i].numpy(),
                                  np.asarray(image_module.read_stored(path, 16))), path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG)")
def test_the_cuda_decode_is_close_to_the_same_code_on_the_cpu_and_to_pillow(jpegs, tmp_path):
    """nvJPEG and the float resize on the GPU against torchvision's CPU decoder through the same
    code: within 1.5 levels on average for each file. Unmeasured bounds, set before any GPU run:
    torchvision's own test holds nvJPEG within 2 levels on average of libjpeg before any resize (its
    chroma upsampling and IDCT differ), and resizing down averages that; the largest difference is
    bounded loosely (24), as the 50x40 JPEG is enlarged, not averaged. Against Pillow: the CPU
    path's bound widened alike."""
    cpu, left = on_the_device(jpegs, 64)
    rows = np.lib.format.open_memmap(str(tmp_path / "rows.npy"), "w+", np.uint8,
                                     (len(jpegs), 64, 64, 3))
    assert decode_module.decode_files(jpegs, 64, rows, 2, "decoding", device="cuda") == []
    gaps = np.abs(rows.astype(int) - cpu.astype(int)).reshape(len(jpegs), -1)
    assert left == [] and gaps.mean(1).max() <= 1.5 and gaps.max() <= 24, (gaps.mean(1), gaps.max(
        1))
    means, largest = differences(rows, jpegs, 64)
    assert max(means) <= 2 and max(largest) <= 24, (means, largest)


def test_other_formats_are_resized_before_their_mode_is_converted(tmp_path, monkeypatch):
    """A PNG stored at 50 px is resized while its mode is RGBA, before to_rgb's full-size copies (a
    palette image after them: resizing would mix palette indices; a JPEG only by its draft); its
    stored square has the pixels of a full decode resized after to_rgb, within rounding (Pillow
    resizes RGBA premultiplied)."""
    resized = []
    resize = Image.Image.resize

    def spy(image, size, *args, **kwargs):
        if image.mode not in ("RGBa", "La"):  # not Pillow's premultiplied step in an RGBA resize
            resized.append((image.mode, image.size, tuple(size)))
        return resize(image, size, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "resize", spy)
    photo = Image.fromarray(smooth_photo(600, seed=2).numpy()).resize((800, 600))
    resized.clear()
    alpha = photo.convert("RGBA")
    alpha.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 800, dtype=np.uint8), (600, 1))))
    alpha.save(tmp_path / "big.png")
    photo.convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.png")
    photo.save(tmp_path / "big.jpg", quality=95)
    assert image_module.open_rgb(str(tmp_path / "big.png"), reduce_to=50).size == (66, 50)
    assert resized == [("RGBA", (800, 600), (66, 50))]  # the decoded file, before any conversion
    resized.clear()
    assert image_module.open_rgb(str(tmp_path / "palette.png"), reduce_to=50).size == (800, 600)
    assert image_module.open_rgb(str(tmp_path / "big.jpg"), reduce_to=50).size == (200, 150)  # 1/4
    assert resized == []
    for name in ("big.png", "palette.png"):
        path = str(tmp_path / name)
        stored = np.array(image_module.read_stored(path, 50)).astype(int)
        full = np.array(F.center_crop(F.resize(image_module.open_rgb(path), 50), [50, 50]))
        difference = np.abs(stored - full.astype(int))
        assert difference.mean() < 0.5 and difference.max() <= 2  # RGBA is rounded twice


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's, as it opens
def test_an_image_over_pillows_pixel_limit_is_refused_before_it_decodes(tmp_path, monkeypatch):
    """PIL.Image.MAX_IMAGE_PIXELS, read when a file is opened: an image over it (Pillow only warns
    up to twice it) is never loaded, and every path that opens files calls it the same."""
    loads = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda image: loads.append(image.size) or load(image))
    sizes = {"small.png": (30, 20), "over.png": (40, 30), "twice_over.png": (60, 50),
             "over.jpg": (40, 30)}
    for name, size in sizes.items():
        Image.fromarray(smooth_photo(60, seed=1).numpy()).resize(size).save(tmp_path / name)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    paths = [str(tmp_path / name) for name in sizes]
    assert [image_module.check_image(path) for path in paths] == [None] + ["too many pixels"] * 3
    for path in paths[1:]:
        with pytest.raises(image_module.TooManyPixels, match=r"over 1,000 \(PIL.Image.MAX_IMA"):
            image_module.open_rgb(path, reduce_to=8)
    assert loads == []  # not one of the three was decoded
    rows = torch.zeros(4, 8, 8, 3, dtype=torch.uint8)
    failures = decode_module.decode_files(paths, 8, rows, 0, "decoding")
    assert [(i, image_module.skip_reason(message)) for i, message in failures] == [
        (1, "too many pixels"), (2, "too many pixels"), (3, "too many pixels")]
    # the device's JPEG decoder leaves it to the CPU path, which refuses it
    assert gpu_decode_module._device_pixels(np.fromfile(paths[3], np.uint8)) == 0
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # no limit: all of them read
    assert [image_module.check_image(path) for path in paths] == [None] * 4
