"""Shared fixtures: no network, tiny synthetic datasets, and the real-data folder from
CIFAR10_DIR."""

import contextlib
import copy
import io
import os
import pickle
import shlex
import signal
import socket
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import cache_module
import data_module
import loader_module
import main
import process_module
import run_module
import source_module
import step_module
import train_module

# A harness that starts pytest in the background without job control (`cmd &` in a script) leaves
# SIGINT ignored, and ignored signals pass to every child: the tests that send Ctrl-C need it heard,
# as it is from a terminal. A handler of our own is reset to the default in each child at exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# user_cache replaces it in every test; its own tests use this
REAL_DEFAULT_CACHE_DIR = cache_module.default_cache_dir
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Tests never download: any connection to another machine fails as it would offline (local
    sockets, which multiprocessing's workers use, still connect)."""
    connect = socket.socket.connect

    def refuse(self, address, *args, **kwargs):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError("network access is blocked in tests")
        return connect(self, address, *args, **kwargs)

    def refuse_any(*args, **kwargs):
        raise OSError("network access is blocked in tests")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse_any)


@pytest.fixture(autouse=True)
def run_not_ending():
    """Each test starts as a process does: no run ending and no signal taken (a run in an earlier
    test, ended by main.main, would otherwise make the failure watch wait for its files)."""
    yield
    process_module._ending.clear()
    process_module._stopped.clear()


@pytest.fixture(autouse=True)
def user_cache(tmp_path_factory, monkeypatch):
    """CACHE_DIR "auto" (the user's cache folder) in a folder of each test's own: no test writes to
    the real ~/.cache, and none finds another's cache. The folder is made only when a cache is built
    in it."""
    folder = tmp_path_factory.mktemp("user_cache") / cache_module.PROJECT
    monkeypatch.setattr(cache_module, "default_cache_dir", lambda: str(folder))
    return folder


@pytest.fixture
def one_thread():
    """One intra-op thread: batches this small gain nothing from more, and on a busy 2-core machine
    two threads spin idle waiting for each other (tens of times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cifar_dir():
    """The real CIFAR-10 folder (CIFAR10_DIR holds cifar-10-batches-py/); skips without it."""
    path = os.environ.get("CIFAR10_DIR")
    if not path:
        pytest.skip("CIFAR10_DIR is not set: it names the folder that holds cifar-10-batches-py/ "
                    "(.ci/run sets it to ../shared/data)")
    if not os.path.isdir(os.path.join(path, "cifar-10-batches-py")):
        pytest.fail(f"CIFAR10_DIR={path} has no cifar-10-batches-py/")
    return path


def alive(pid):
    """Whether the process runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def write_fake_cifar(root, per_batch=20, seed=0):
    """A CIFAR-10 python-version folder with per_batch images in each of the six batch files."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        labels = [i % 10 for i in range(per_batch)]
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data,
                         "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}, f, protocol=2)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f,
                    protocol=2)
    return str(root)


class RunsOnLoad:
    """Pickles into a call that writes the file `marker` when it is unpickled: os.system, as a
    crafted file would, or exec."""

    def __init__(self, marker, call="system"):
        self.marker, self.call = str(marker), call

    def __reduce__(self):
        if self.call == "system":
            return os.system, (f"echo ran > {shlex.quote(self.marker)}",)
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def plant_crafted_batch(data_dir, marker, name="data_batch_1", call="system"):
    """Replace the CIFAR-10 batch file `name` in data_dir with a crafted one, whose batch keys hold
    code that writes marker when it is unpickled; returns its path."""
    path = os.path.join(data_dir, "cifar-10-batches-py", name)
    with open(path, "wb") as f:
        pickle.dump({"batch_label": name, "labels": [0], "data": RunsOnLoad(marker, call),
                     "label_names": RunsOnLoad(marker, call)}, f, protocol=2)
    return path


@pytest.fixture
def fake_cifar(tmp_path):
    return write_fake_cifar(tmp_path / "data")


def write_image_tree(root, splits=("train", "val"), classes=("cats", "dogs", "owls"), per_class=6,
                     size=(20, 14), seed=0):
    """An ImageFolder tree of small PNGs, each class a different mean colour."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for c, name in enumerate(classes):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                base = np.array([60 * c, 255 - 60 * c, 128], dtype=np.int16)
                pixels = np.clip(base + rng.integers(-40, 40, size=(size[1], size[0], 3)), 0,
                                 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
    return str(root)


def configs(**constants) -> run_module.Config:
    """main.build_config of main.py's constants, the ones named (as main.py spells them) changed:
    each setting's default lives in main.py alone, and tests build their configs from it."""
    return main.build_config({**main.constants(), **constants})


def augmentation(mean, std, crop_size=None, **constants):
    """The Augmentation get_data makes of main.py's constants (the ones named changed), with
    these statistics and crop_size (photos'; None: pad-crops)."""
    return configs(**constants).data.augmentation(mean, std, crop_size)


def make_tiny_data(n_train=64, n_val=32, classes=4, size=8, batch_size=16, seed=0, device="cpu"):
    """A Data of random uint8 images whose class sets the mean brightness, so a model can learn
    it."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        labels = torch.arange(n) % classes
        noise = torch.randint(0, 60, (n, size, size, 3), generator=g)
        images = (labels.view(-1, 1, 1, 1) * (190 // max(classes - 1, 1))
                  + noise).clamp(0, 255).to(torch.uint8)
        return images, labels

    (train_images, train_labels), (val_images, val_labels) = split(n_train), split(n_val)
    mean, std = source_module.channel_stats(train_images)
    train = loader_module.ResidentLoader(train_images.to(device), train_labels.to(device),
                                         loader_module.Batching(batch_size, train=True, seed=seed),
                                         augmentation(mean, std, CROP_PADDING=1))
    val = loader_module.ResidentLoader(
        val_images.to(device), val_labels.to(device),
        loader_module.Batching(2 * batch_size, train=False, seed=seed), augmentation(mean, std))
    return data_module.Data(train, val, val, [f"c{i}" for i in range(classes)], mean, std, size,
                            True, test_is_val=True)


def run_main(args, cwd=ROOT, timeout=300, env=None, **kwargs):
    """python main.py ARGS as a subprocess; returns the CompletedProcess (text output)."""
    import subprocess
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=full_env, **kwargs)


PHOTO_CLASSES = ["chat noir", "zèbre", "éléphant"]  # as ImageFolder sorts them (by code point)
PHOTO_KINDS = [  # (file name, width, height): one of each in every class folder of every split
    ("rgb.jpg", 300, 200), ("grey.png", 40, 30), ("alpha.png", 120, 90), ("palette.png", 64, 64),
    ("palette_transparent.png", 80, 60), ("cmyk.jpg", 100, 150), ("sixteen_bit.png", 90, 70),
    ("sideways.jpg", 100, 200), ("lossy.webp", 150, 100), ("bitmap.bmp", 50, 60),
    ("still.gif", 70, 50)]
PHOTOS_PER_CLASS = len(PHOTO_KINDS)  # in each split; train/chat noir/ has one more, truncated.jpg


def photo_pixels(rng, label, width, height):
    """uint8 (height, width, 3) noise around a colour of the label's own, so a model can tell
    classes apart."""
    base = np.array([70 * label + 30, 220 - 70 * label, 60 + 50 * (label % 2)], dtype=np.int16)
    return np.clip(base + rng.integers(-35, 35, size=(height, width, 3)), 0, 255).astype(np.uint8)


def write_photo_tree(root, splits=("train", "val"), seed=0):
    """An ImageFolder tree of what a user's photo folder holds: PHOTO_CLASSES (spaces, accents),
    each with the PHOTO_KINDS (sizes 40x30 to 300x200; RGB, L, RGBA, P with and without
    transparency, CMYK, 16-bit greyscale; JPEG, PNG, WebP, BMP, GIF; sideways.jpg stored 200x100
    with EXIF orientation 6, so it is 100x200 upright). train/chat noir/ also holds truncated.jpg
    (its header opens, its data is cut), notes.txt and image.heic (not images to this Pillow without
    a HEIF plugin) and broken.png (unreadable)."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for label, name in enumerate(PHOTO_CLASSES):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for file_name, width, height in PHOTO_KINDS:
                path = os.path.join(folder, file_name)
                image = Image.fromarray(photo_pixels(rng, label, width, height))
                if file_name == "grey.png":
                    image.convert("L").save(path)
                elif file_name == "alpha.png":
                    alpha = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))
                    image.putalpha(Image.fromarray(alpha))
                    image.save(path)
                elif file_name.startswith("palette"):
                    palette = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
                    palette.save(path, **({"transparency": 0} if "transparent" in file_name
                                          else {}))
                elif file_name == "cmyk.jpg":
                    image.convert("CMYK").save(path, quality=95)
                elif file_name == "sixteen_bit.png":
                    # 8-bit values, 16-bit range
                    grey = np.asarray(image.convert("L")).astype(np.uint16) * 257
                    Image.fromarray(grey).save(path)
                # stored turned 90 degrees anticlockwise, as phones do
                elif file_name == "sideways.jpg":
                    exif = Image.Exif()
                    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
                    image.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)
                else:
                    image.save(path, **({"quality": 95} if file_name.endswith((".jpg", ".webp"))
                                        else {}))
    if "train" in splits:
        folder = os.path.join(root, "train", PHOTO_CLASSES[0])
        whole = io.BytesIO()
        Image.fromarray(photo_pixels(rng, 0, 120, 80)).save(whole, "JPEG")
        with open(os.path.join(folder, "truncated.jpg"), "wb") as f:
            f.write(whole.getvalue()[:len(whole.getvalue()) * 6 // 10])
        with open(os.path.join(folder, "notes.txt"), "w") as f:
            f.write("photos from the zoo trip\n")
        with open(os.path.join(folder, "image.heic"), "wb") as f:
            f.write(b"\x00\x00\x00\x18ftypheic" + bytes(64))
        with open(os.path.join(folder, "broken.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n garbage")
    return str(root)


def collect(loader, limit=None):
    """A loader's batches (the first `limit` of them) joined: (images, labels)."""
    images, labels = [], []
    for i, (x, y) in enumerate(loader):
        if limit is not None and i >= limit:
            break
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


def smooth_photo(size=256, seed=0):
    """A uint8 (size, size, 3) image with a photo's smoothness: bicubic-enlarged noise."""
    noise = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(seed)) * 255
    big = torch.nn.functional.interpolate(noise, size=(size, size), mode="bicubic",
                                          align_corners=False)
    return big.clamp(0, 255).round().to(torch.uint8)[0].permute(1, 2, 0).contiguous()


# --------------------------------------------------------------------------- training state and
# CUDA-graph stand-ins


def state_of(model, optimizer):
    """Copies of the model's state and the optimizer's, for assert_same_state."""
    return ({k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(
        optimizer.state_dict()))


def assert_same_state(model, optimizer, state):
    """The model and the optimizer hold exactly what state_of copied: weights, buffers, LRs,
    momentum."""
    weights, optimizer_state = state
    for key, value in model.state_dict().items():  # weights and BatchNorm buffers, bit for bit
        assert torch.equal(value, weights[key]), key
    assert optimizer.state_dict()["param_groups"] == optimizer_state["param_groups"]  # LRs included
    now = optimizer.state_dict()["state"]
    assert now.keys() == optimizer_state["state"].keys()
    for key in now:
        assert torch.equal(now[key]["momentum_buffer"], optimizer_state["state"][key][
            "momentum_buffer"])


def random_batch(n=8, size=16, seed=0):
    """A seeded batch of n random images and 4-class targets."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=generator), torch.randint(
        0, 4, (n,), generator=generator)


class _EagerGraph:
    """torch.cuda.CUDAGraph's stand-in on the CPU: replay() runs the captured TrainStep's step
    eagerly on its input buffers and writes its output buffers, as a replay does; broken=True leaves
    out the optimizer step."""

    def __init__(self, step, broken=False):
        self.step, self.broken = step, broken

    def replay(self):
        step = self.step.optimizer.step
        if self.broken:
            self.step.optimizer.step = lambda: None
        try:
            loss, logits = self.step._step(*self.step.inputs)
        finally:
            self.step.optimizer.step = step
        with torch.no_grad():
            self.step.outputs[0].copy_(loss)
            self.step.outputs[1].copy_(logits)


@pytest.fixture
def stand_in_cuda(monkeypatch):
    """torch.cuda's streams and graph capture replaced by stand-ins that run eagerly (the capture's
    step rolled back: a capture records work without doing it), and TrainStep by one that takes
    graph=True on the CPU. This tests the CUDA-graph path's bookkeeping only (when a step is
    captured, what is rolled back, when the capture is checked and dropped), never capture itself:
    nothing here records or replays device work. Yields the sizes of the optimizer state at each
    capture, and a switch that breaks the replays."""
    captured, capturing, broken = [], [], []

    class Stream:
        def __init__(self, *args):
            pass

        def wait_stream(self, other):
            pass

    class CapturedStep(step_module.TrainStep):
        def __init__(self, *args, graph=False, **kwargs):
            super().__init__(*args, **kwargs)
            self.use_graph = graph  # past the CUDA check

        def _capture(self, images, targets):
            capturing[:] = [self]
            super()._capture(images, targets)
            captured.append(len(self.optimizer.state))

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *args: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: None)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, **options: step_module.rolled_back(
        capturing[0].model, capturing[0].optimizer))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: _EagerGraph(capturing[0], broken=bool(
        broken)))
    monkeypatch.setattr(train_module, "TrainStep", CapturedStep)
    monkeypatch.setattr(step_module, "TrainStep", CapturedStep)
    yield captured, broken
