"""Photo-folder training images/s, in one run and for the same model, step and batch: the bare step
rate (one fixed batch on the device), this pipeline's first epoch (decoding into the cache
included), its steady epochs resident on the device and streamed from the memory-mapped cache, how
soon a second run has its first batch, and torchvision's classification reference loader
(ImageFolder, RandomResizedCrop, flip, ToTensor, Normalize in one DataLoader worker per core, pinned
memory). Before them, the decode alone: decode_module.decode_files into a new .npy memory map, as
the cache is built, against a plain process pool decoding the same files alike (read_stored) and
writing nothing, on as many workers (decode_over_pool), and on a GPU decode_files with the device
(JPEGs decoded there in batches: gpu_img_s, gpu_over_pool). Prints images/s, the ratios, peak
memory, and this process's anonymous memory apart from its file pages (the cache's) after each path;
writes JSON.

    python benchmarks/folder_throughput.py --data-dir ./data  # writes 20,000 JPEGs first
    python benchmarks/folder_throughput.py --data-dir ./data --images 2000  # a CPU-sized run
    python benchmarks/folder_throughput.py --data-dir ./data --images 2000 --decode-only
    python benchmarks/folder_throughput.py --folder my_photos  # any ImageFolder tree

Defaults: resnet18 at 224 px, bf16, batch 256 on a GPU; the cnn at 64 px, fp32, batch 128 on the
CPU.
"""

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

import cache_module  # noqa: E402
import cifar_module  # noqa: E402
import data_module  # noqa: E402
import decode_module  # noqa: E402
import image_module  # noqa: E402
import model_module  # noqa: E402
import step_module  # noqa: E402
import train_module  # noqa: E402
import utils  # noqa: E402
import common  # noqa: E402  (benchmarks/common.py, beside this script)

PHOTO_SIZE = (400, 300)  # width, height of the JPEGs written from CIFAR-10's 32-px images


# --------------------------------------------------------------------------- the folder


def _write_jpeg(job: tuple[str, bytes]) -> None:
    path, pixels = job
    image = Image.frombytes("RGB", (32, 32), pixels).resize(PHOTO_SIZE, Image.Resampling.BICUBIC)
    image.save(path, quality=90)


def write_folder(folder: str, n: int, data_dir: str, workers: int) -> None:
    """n CIFAR-10 training images as 400x300 JPEGs in folder/train/<class>/, and n // 10 test images
    in folder/val/<class>/; kept for the next run (folder/.complete records n)."""
    marker = os.path.join(folder, ".complete")
    if os.path.exists(marker) and open(marker).read() == str(n):
        return
    shutil.rmtree(folder, ignore_errors=True)
    train_images, train_labels, test_images, test_labels, classes = cifar_module.read_cifar10(
        data_dir, False)
    jobs = []
    for split, images, labels, count in (("train", train_images, train_labels, n),
                                         ("val", test_images, test_labels, max(n // 10, 10))):
        for name in classes:
            os.makedirs(os.path.join(folder, split, name), exist_ok=True)
        for i in range(count):
            j = i % len(images)
            path = os.path.join(folder, split, classes[labels[j]], f"{i:06d}.jpg")
            jobs.append((path, images[j].numpy().tobytes()))
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for _ in pool.imap_unordered(_write_jpeg, jobs, chunksize=64):
            pass
    with open(marker, "w") as f:
        f.write(str(n))
    print(f"wrote {len(jobs)} JPEGs of {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} to {folder} in "
          f"{time.perf_counter() - started:.1f} s")


# --------------------------------------------------------------------------- decoding


def _read_stored(job: tuple[str, int]) -> None:
    """In a pool worker: one file decoded as the cache stores it, the pixels dropped."""
    image_module.read_stored(*job)


def decode_rates(args, memory: common.MemoryWatch) -> dict:
    """Images/s of decode_files (into a new .npy memory map in the work folder, as the cache is
    built) and of a plain multiprocessing.Pool doing the same decode per file (read_stored, chunks
    of DECODE_CHUNK, pixels dropped), each with args.workers processes started in the pass, on the
    training files at the stored size; timed in turn after an untimed pass each (A B C, A B C, ...),
    best of args.decode_repeats, and the median of each turn's ratio (passes side by side in time:
    steadier when others share the machine). With CUDA, a fourth pass: decode_files into a new .npy
    with the GPU (its JPEGs decoded there). This process's memory after each (that of the last
    pass)."""
    paths = sorted(os.path.join(folder, name) for folder, _, names in os.walk(os.path.join(
        args.folder, "train"))
                   for name in names)
    size = args.decode_size
    npy = os.path.join(args.work_dir, "decode_rates.npy")
    # as decode_files
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)

    def ours(device: torch.device | None = None) -> float:
        rows = np.lib.format.open_memmap(npy, "w+", np.uint8, (len(paths), size, size, 3))
        cache_module._claim_space(npy)  # its blocks allocated, as the cache's are
        started = time.perf_counter()
        failures = decode_module.decode_files(paths, size, rows, args.workers, "decoding",
                                              device=device)
        seconds = time.perf_counter() - started
        assert not failures, failures[:3]
        del rows
        os.remove(npy)  # untimed: dropping a large file's pages takes a while
        return seconds

    def into_memory() -> float:  # as ImageFiles.decode does without a cache
        rows = torch.empty((len(paths), size, size, 3), dtype=torch.uint8)
        started = time.perf_counter()
        failures = decode_module.decode_files(paths, size, rows, args.workers, "decoding")
        seconds = time.perf_counter() - started
        assert not failures, failures[:3]
        return seconds

    def pool() -> float:
        started = time.perf_counter()
        with context.Pool(args.workers) as workers:
            for _ in workers.imap_unordered(_read_stored, [(path, size) for path in paths],
                                            chunksize=decode_module.DECODE_CHUNK):
                pass
        return time.perf_counter() - started

    passes = {"decode_files": ours, "decode_files into memory": into_memory, "plain pool": pool}
    if torch.cuda.is_available():
        passes["decode_files on the GPU"] = lambda: ours(torch.device("cuda"))
    rates, cpu_ms = {name: [] for name in passes}, {name: [] for name in passes}
    figures = {}
    for run in passes.values():
        run()  # untimed: the files into the page cache, the code warm
    memory.read()
    for _ in range(args.decode_repeats):
        for name, run in passes.items():
            cpu_before = cpu_seconds()
            rates[name].append(len(paths) / run())
            cpu_ms[name].append(1000 * (cpu_seconds() - cpu_before) / len(paths))
            figures[name] = memory.read()
    best = {name: max(values) for name, values in rates.items()}
    gpu = {}
    if "decode_files on the GPU" in best:
        gpu = {"gpu_img_s": best["decode_files on the GPU"],
               "gpu_over_pool": best["decode_files on the GPU"] / best["plain pool"],
               "gpu_passes_images_per_s": [round(rate) for rate in rates[
               "decode_files on the GPU"]],
               "gpu_cpu_ms_per_image": min(cpu_ms["decode_files on the GPU"])}
    return {"decode_size": size, "decode_workers": args.workers, "decode_images": len(paths),
            "decode_images_per_s": best["decode_files"], "pool_images_per_s": best["plain pool"],
            "decode_over_pool": best["decode_files"] / best["plain pool"],
            "decode_over_pool_median_of_turns": statistics.median(
                ours / pool for ours, pool in zip(rates["decode_files"], rates["plain pool"])),
            "decode_passes_images_per_s": [round(rate) for rate in rates["decode_files"]],
            "pool_passes_images_per_s": [round(rate) for rate in rates["plain pool"]],
            "decode_memory_images_per_s": best["decode_files into memory"],
            "decode_memory_over_pool": best["decode_files into memory"] / best["plain pool"],
            "decode_memory_passes_images_per_s": [round(rate)
                                                  for rate in rates["decode_files into memory"]],
            "decode_memory_cpu_ms_per_image": min(cpu_ms["decode_files into memory"]),
            "decode_cpu_ms_per_image": min(cpu_ms["decode_files"]),
            "pool_cpu_ms_per_image": min(cpu_ms["plain pool"]), **gpu, "memory": figures}


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its ended children (the pools' workers), user and
    system: what a pass costs whatever else shares the machine."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def print_decode(result: dict) -> None:
    print(f"decode, {result['decode_images']} files to {result['decode_size']} px on "
          f"{result['decode_workers']} workers, best of "
          f"{len(result['decode_passes_images_per_s'])} in turn: decode_files "
          f"{result['decode_images_per_s']:,.0f} img/s, plain pool "
          f"{result['pool_images_per_s']:,.0f} img/s: decode_over_pool "
          f"{result['decode_over_pool']:.2f}, median of the turns' ratios "
          f"{result['decode_over_pool_median_of_turns']:.2f} (each pass: "
          f"{', '.join(map(str, result['decode_passes_images_per_s']))} against "
          f"{', '.join(map(str, result['pool_passes_images_per_s']))}); CPU time per image (least "
          f"of the passes, workers included): {result['decode_cpu_ms_per_image']:.2f} ms against "
          f"{result['pool_cpu_ms_per_image']:.2f} ms")
    print(f"decode_files into memory (no cache): {result['decode_memory_images_per_s']:,.0f} "
          f"img/s, {result['decode_memory_over_pool']:.2f} of the pool (each pass: "
          f"{', '.join(map(str, result['decode_memory_passes_images_per_s']))}); CPU time per "
          f"image {result['decode_memory_cpu_ms_per_image']:.2f} ms")
    if "gpu_img_s" in result:
        print("decode_files with the GPU (JPEGs decoded there, in batches): "
              f"{result['gpu_img_s']:,.0f} img/s, gpu_over_pool {result['gpu_over_pool']:.2f} "
              f"(each pass: {', '.join(map(str, result['gpu_passes_images_per_s']))}); CPU time "
              f"per image {result['gpu_cpu_ms_per_image']:.2f} ms")


def print_memory(memory: dict[str, dict[str, float]]) -> None:
    """This process's RssAnon and RssFile (MB) after each path and at their peaks during it."""
    print(f"{'this process after':<44} {'anon':>8} {'peak anon':>10} {'file':>8} {'peak file':>10}")
    for path, figures in memory.items():
        print(f"{path:<44} {figures.get('anon_mb', float('nan')):>8,.0f} "
              f"{figures.get('peak_anon_mb', float('nan')):>10,.0f} "
              f"{figures.get('file_mb', float('nan')):>8,.0f} "
              f"{figures.get('peak_file_mb', float('nan')):>10,.0f}")


# --------------------------------------------------------------------------- timing


def fresh_model(args, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = model_module.get_model(args.model, 10, image_size=args.image_size)
    return model.to(device, memory_format=torch.channels_last)


def bare_pass(args, device, autocast_dtype, images: int) -> tuple:
    """A pass of bare steps over as many images as an epoch, for common.best_rates."""
    return common.bare_pass(fresh_model(args, device), args.batch_size, args.image_size,
                            images // args.batch_size, autocast_dtype=autocast_dtype,
                            graphed=device.type == "cuda")


def epoch_seconds(step: step_module.TrainStep, loader, epoch: int) -> float:
    """Seconds of one train_one_epoch over the loader with the step (a capture it makes
    included)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    common.synchronize(step.device)
    started = time.perf_counter()
    train_module.train_one_epoch(step, loader)
    common.synchronize(step.device)
    return time.perf_counter() - started


def loader_seconds(loader, device: torch.device) -> float:
    """Seconds of one pass over the loader's batches (read, cropped, normalised on the device), no
    model."""
    common.synchronize(device)
    started = time.perf_counter()
    for _ in loader:
        pass
    common.synchronize(device)
    return time.perf_counter() - started


def cold_start_seconds(args, cache_dir: str, limit: float = 300.0) -> float | None:
    """Seconds from starting `python main.py` on the folder (its cache already built) to the line it
    prints as its first epoch starts: imports, reading the cache (onto the device when it fits),
    building the model; the first step's own start-up (cuDNN's choices, a CUDA-graph capture) comes
    after. The run is then stopped. None, with its last lines printed, if the line did not come
    within `limit` seconds."""
    out = tempfile.mkdtemp(prefix="cold_start_")
    command = [sys.executable, os.path.join(ROOT, "main.py"), "--dataset", "folder", "--data-dir",
               args.folder, "--cache-dir", cache_dir, "--model", args.model, "--image-size",
               str(args.image_size), "--batch-size", str(args.batch_size), "--epochs", "1",
               "--ask-epoch", "none", "--output-dir", out, "--bf16", str(not args.no_bf16)]
    started, seconds, lines = time.perf_counter(), None, []
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    timer = threading.Timer(limit, process.kill)
    timer.start()
    try:
        for line in process.stdout:
            lines.append(line)
            if " batches of " in line:  # main.py's line as training starts
                seconds = time.perf_counter() - started
                break
    finally:
        timer.cancel()
        process.kill()
        process.communicate()
        shutil.rmtree(out, ignore_errors=True)
    if seconds is None:
        print("the cold main.py run did not start training; its last lines:\n" + "".join(lines[
            -10:]))
    return seconds


def get_folder_data(args, device, cache_dir: str, resident: str) -> data_module.Data:
    config = common.configs(DATASET="folder", DATA_DIR=args.folder, BATCH_SIZE=args.batch_size,
                            IMAGE_SIZE=args.image_size, RESIDENT=resident, CACHE_DIR=cache_dir,
                            SEED=0)
    return data_module.get_data(config.data, device)


def ours(args, device, autocast_dtype, memory: common.MemoryWatch) -> dict:
    """The pipeline: a first epoch that decodes into a new cache; a second run's start; steady
    epochs from the cache, streamed (memory-mapped, read a batch at a time) and resident on the
    device. This process's memory after each (result["memory"])."""
    result, figures = {}, {}
    memory.read()
    cache_dir = os.path.join(args.work_dir, "cache")
    shutil.rmtree(cache_dir, ignore_errors=True)
    model = fresh_model(args, device)
    started = time.perf_counter()
    data = get_folder_data(args, device, cache_dir, "auto")
    result["decode_s"] = time.perf_counter() - started
    result["first_epoch_s"] = result["decode_s"] + epoch_seconds(
        common.train_step(model, autocast_dtype, graphed=device.type == "cuda"), data.train, 1)
    result["first_epoch_resident"] = data.resident
    result["images_per_epoch"] = len(data.train) * args.batch_size
    result["cache_mb"] = os.path.getsize(data.cache_file) / 2**20
    del data
    figures["first run: the cache built, an epoch"] = memory.read()

    started = time.perf_counter()  # a second run in this process: no imports, no CUDA start-up
    data = get_folder_data(args, device, cache_dir, "auto")
    next(iter(data.train))
    common.synchronize(device)
    result["second_run_first_batch_s"] = time.perf_counter() - started
    del data
    figures["second run: the cache opened, a batch"] = memory.read()
    # a new process: imports, CUDA, model
    result["second_run_cold_start_s"] = cold_start_seconds(args, cache_dir)

    passes = {"bare": bare_pass(args, device, autocast_dtype, result["images_per_epoch"])}
    for name, resident in (("streamed", "no"), ("resident", "yes")):
        data = get_folder_data(args, device, cache_dir, resident)
        assert data.resident == (resident == "yes") and data.cache_file, "not the path meant"
        result[f"{name}_loader_alone_images_per_s"] = result["images_per_epoch"] / loader_seconds(
            data.train, device)
        passes[name] = common.epoch_pass(fresh_model(args, device), data.train, autocast_dtype,
                                         graphed=device.type == "cuda")
        # the CPU's default path reads the map: its peak memory, before the resident copy
        if name == "streamed":
            passes[name][0]()
            result["peak_rss_mb_streamed"] = peak_rss_mb()
        figures[f"{name}: loader alone, then an epoch" if name == "streamed" else
                f"{name}: loaded, loader alone"] = memory.read()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # timed in turn, best kept
    rates = common.best_rates(passes, repeats=args.epochs, device=device)
    result.update({f"{name}_images_per_s": rate for name, rate in rates.items()})
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result["peak_rss_mb"] = peak_rss_mb()
    figures["bare, streamed, resident timed in turn"] = memory.read()
    result["memory"] = figures
    return result


class _ToDevice:
    """The reference's loop: each batch to the device (non_blocking from pinned memory),
    channels_last."""

    def __init__(self, loader: DataLoader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True).contiguous(
                memory_format=torch.channels_last)
            yield images, labels.to(self.device, non_blocking=True)


def reference(args, device, autocast_dtype, memory: common.MemoryWatch) -> dict:
    """torchvision's references/classification loader (presets.ClassificationPresetTrain without
    auto-augment): every JPEG decoded and cropped by PIL in DataLoader workers, every epoch."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    transform = transforms.Compose([transforms.RandomResizedCrop(args.image_size),
                                    transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                    transforms.Normalize(mean, std)])
    dataset = datasets.ImageFolder(os.path.join(args.folder, "train"), transform)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        pin_memory=device.type == "cuda", drop_last=True)
    step = common.train_step(fresh_model(args, device), autocast_dtype,
                             graphed=device.type == "cuda")
    seconds = [epoch_seconds(step, _ToDevice(loader, device), epoch)
               for epoch in range(args.epochs + 1)]  # the first starts the workers
    images = len(loader) * args.batch_size
    return {"reference_first_epoch_s": seconds[0], "reference_images_per_s": images / min(seconds[
        1:]),
            "reference_workers": args.workers, "memory": {"reference": memory.read()}}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder",
                        help="an ImageFolder tree (train/<class>/<image>); default: write one")
    parser.add_argument("--data-dir", default="./data",
                        help="holds cifar-10-batches-py/, to write the folder from")
    parser.add_argument("--images", type=int, default=None,
                        help="training JPEGs to write (default: 20,000 on a GPU, 2,000 on the CPU)")
    parser.add_argument("--work-dir", default=None,
                        help="where the folder and the cache go (default: "
                             "$TMPDIR/folder_throughput_<images>)")
    parser.add_argument("--model", default=None, help="default: resnet18 on a GPU, cnn on the CPU")
    parser.add_argument("--image-size", type=int, default=None,
                        help="default: 224 on a GPU, 64 on the CPU")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: 256 on a GPU, 128 on the CPU")
    parser.add_argument("--epochs", type=int, default=None,
                        help="timed passes per path, taken in turn after one untimed pass each, "
                             "best kept (default: 3 on a GPU, 2 on the CPU)")
    common.add_device_arguments(parser, "reference DataLoader workers")
    parser.add_argument("--decode-size", type=int, default=None,
                        help="pixels the decode comparison stores (default: the pipeline's, "
                             "--image-size / RESIZE_RATIO)")
    parser.add_argument("--decode-repeats", type=int, default=3,
                        help="timed passes of each decode, in turn")
    parser.add_argument("--decode-only", action="store_true",
                        help="the decode comparison alone, no training")
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()

    device = utils.get_device()
    on_gpu = device.type == "cuda"
    args.images = args.images or (20000 if on_gpu else 2000)
    args.model = args.model or ("resnet18" if on_gpu else "cnn")
    args.image_size = args.image_size or (224 if on_gpu else 64)
    args.batch_size = args.batch_size or (256 if on_gpu else 128)
    args.epochs = args.epochs or (3 if on_gpu else 2)
    args.work_dir = args.work_dir or os.path.join(tempfile.gettempdir(),
                                                  f"folder_throughput_{args.images}")
    args.decode_size = args.decode_size or round(args.image_size / data_module.RESIZE_RATIO)
    # a --folder given: nothing is written there, but the scratch files
    os.makedirs(args.work_dir, exist_ok=True)
    if args.folder is None:
        args.folder = os.path.join(args.work_dir, "photos")
        write_folder(args.folder, args.images, args.data_dir, os.cpu_count() or 1)
    args.images = sum(len(files) for _, _, files in os.walk(os.path.join(args.folder, "train")))
    torch.backends.cudnn.benchmark = True
    autocast_dtype = torch.bfloat16 if on_gpu and not args.no_bf16 else None
    name = common.device_name(on_gpu)
    print(f"{args.model} at {args.image_size} px, batch {args.batch_size}, {args.images} training "
          f"images in {args.folder}, best of {args.epochs}, on {name}")

    memory = common.MemoryWatch()
    if args.decode_only:
        result = {"device": name, "images": args.images, **decode_rates(args, memory)}
        print_decode(result)
        print_memory(result["memory"])
        write_result(result, os.path.join(args.output,
                                          f"folder_decode_{args.decode_size}_{args.images}.json"))
        return
    step_alone, _ = bare_pass(args, device, autocast_dtype, args.images)
    step_alone()  # the model step alone: its peak memory, before any data is read
    peak_rss_bare = peak_rss_mb()
    del step_alone  # its model and batch would count in the device peak below
    result = {"device": name, "model": args.model, "image_size": args.image_size,
              "batch_size": args.batch_size, "images": args.images,
              "bf16": autocast_dtype is not None, "peak_rss_mb_bare": peak_rss_bare,
              "memory": {"bare steps": memory.read()}}
    for part in (decode_rates(args, memory), ours(args, device, autocast_dtype, memory),
                 reference(args, device, autocast_dtype, memory)):
        result.update({**part, "memory": {**result["memory"], **part.pop("memory")}})
    bare = result["bare_images_per_s"]
    result["peak_rss_mb_with_reference"] = peak_rss_mb()
    steady = result["streamed_images_per_s"]
    first_path = "resident" if result["first_epoch_resident"] else "streamed"  # what "auto" chose
    first_rate = result["images_per_epoch"] / result["first_epoch_s"]
    result["first_over_steady_epoch"] = result[f"{first_path}_images_per_s"] / first_rate
    result["ours_over_reference"] = max(steady, result["resident_images_per_s"]) / result[
        "reference_images_per_s"]
    print(f"{'path':<52} {'images/s':>9} {'of bare':>8}")
    for label, rate in [("bare step rate (one fixed batch on the device)", bare),
                        ("ours, first epoch (decoding into the cache included)", first_rate),
                        ("ours, steady, streamed from the memory-mapped cache", steady),
                        ("ours, steady, resident on the device", result["resident_images_per_s"]),
                        ("ours, streamed loader alone (no model)", result[
                        "streamed_loader_alone_images_per_s"]),
                        ("ours, resident loader alone (no model)", result[
                        "resident_loader_alone_images_per_s"]),
                        (f"reference: ImageFolder + PIL, {args.workers} workers", result[
                        "reference_images_per_s"])]:
        print(f"{label:<52} {rate:>9,.0f} {rate / bare:>8.2f}")
    print(f"ours / reference: {result['ours_over_reference']:.2f}; first epoch "
          f"{result['first_epoch_s']:.1f} s (decoding {result['decode_s']:.1f} s, then "
          f"{first_path}) = {result['first_over_steady_epoch']:.2f} steady epochs; a second run's "
          f"first batch after {result['second_run_first_batch_s']:.2f} s in this process, and a "
          "cold `python main.py` on the folder printed its first epoch's start after "
          f"{result['second_run_cold_start_s'] or float('nan'):.1f} s")
    print(f"peak host RSS {result['peak_rss_mb_bare']:,.0f} MB after the bare steps, "
          f"{result['peak_rss_mb_streamed']:,.0f} MB streamed from the cache "
          f"({result['cache_mb']:,.0f} MB file), {result['peak_rss_mb']:,.0f} MB after "
          "the resident path"
          + (f"; peak GPU memory {result['peak_gpu_mb']:,.0f} MB with both paths' "
             "data on the device" if on_gpu else ""))
    print_decode(result)
    print_memory(result["memory"])
    write_result(result, os.path.join(args.output, f"folder_throughput_{device.type}_{args.model}_"
                                                   f"{args.image_size}_{args.images}.json"))


def write_result(result: dict, path: str) -> None:
    """The result as JSON, floats to 3 decimals."""
    def rounded(value):
        if isinstance(value, dict):
            return {key: rounded(item) for key, item in value.items()}
        return round(value, 3) if isinstance(value, float) else value
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rounded(result), f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
