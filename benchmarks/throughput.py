"""Training images/s of one model and batch size, in one run: the bare step rate (one fixed batch,
no data work), on CUDA the same step captured in a CUDA graph (the limit: no launch cost), this
pipeline's device-resident path (train_one_epoch over its loader), and a tutorial path (torchvision
dataset, PIL crop/flip in DataLoader workers, fp32). The first three are warmed up by one untimed
pass each and then timed in turn, best kept, so the bare figure cannot lose to the pipeline by
coming first. Prints a table with the ratios, writes JSON, and reports peak memory. Works on the CPU
and on a GPU.

    python benchmarks/throughput.py --data-dir ./data
    python benchmarks/throughput.py --data-dir ./data --batch-size 512 --images 45000 --epochs 3
    python benchmarks/throughput.py --data-dir ./data --main-epochs 1   # also: peak RSS of main.py
    python benchmarks/throughput.py --data-dir ./data --recipe  # also: each recipe feature
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402
from torchvision import transforms  # noqa: E402

import cifar_module  # noqa: E402
import data_module  # noqa: E402
import model_module  # noqa: E402
import utils  # noqa: E402
import common  # noqa: E402  (benchmarks/common.py, beside this script)


def fresh_model(name: str, device: torch.device, channels_last: bool):
    torch.manual_seed(0)
    model = model_module.get_model(name, 10,
                                   sample_images=lambda n: torch.randn(min(n, 512), 3, 32, 32))
    return model.to(device,
                    memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def step_and_epoch_rates(args, device, autocast_dtype) -> dict[str, float]:
    """Images/s of the bare step (one fixed batch, no data work), of the same step captured in a
    CUDA graph (on CUDA: the limit when kernel launches cost nothing), and of train_one_epoch over
    the pipeline's device-resident loader (crop, flip, normalise on the device, loss and accuracy
    tallied there): each warmed up by one untimed pass, then timed in turn, best of --epochs."""
    data = data_module.get_data(cifar_config(args), device)
    n_steps = len(data.train)
    passes = {"bare": common.bare_pass(fresh_model(args.model, device, channels_last=True),
                                       args.batch_size, 32, n_steps, autocast_dtype=autocast_dtype)}
    if device.type == "cuda":
        passes["graphed"] = common.bare_pass(fresh_model(args.model, device, channels_last=True),
                                             args.batch_size, 32, n_steps,
                                             autocast_dtype=autocast_dtype, graphed=True)
    passes["pipeline"] = common.epoch_pass(fresh_model(args.model, device, channels_last=True),
                                           data.train, autocast_dtype)
    if device.type == "cuda":  # main.py's default there (CUDA_GRAPHS = "auto")
        passes["pipeline_graphed"] = common.epoch_pass(
            fresh_model(args.model, device, channels_last=True), data.train, autocast_dtype,
            graphed=True)
    return common.best_rates(passes, repeats=args.epochs, device=device)


def cifar_config(args, **constants) -> data_module.DataConfig:
    """The resident CIFAR-10 training set of --data-dir, --batch-size and --images, the constants
    named changed."""
    return common.configs(DATA_DIR=args.data_dir, BATCH_SIZE=args.batch_size, VAL_SPLIT=0,
                          TRAIN_SUBSET=args.images, RESIDENT="yes", DOWNLOAD=False,
                          **constants).data


RECIPE = {  # issue 23's features, alone and as the GPU accuracy run has them (constants, EMA, step)
    "AUTO_AUGMENT trivialaugment": (dict(AUTO_AUGMENT="trivialaugment"), None, {}),
    "AUTO_AUGMENT randaugment": (dict(AUTO_AUGMENT="randaugment"), None, {}),
    "RANDOM_ERASING 0.25": (dict(RANDOM_ERASING=0.25), None, {}),
    "MIXUP 0.2 + CUTMIX 1.0": (dict(MIXUP=0.2, CUTMIX=1.0), None, {}),
    "EMA_DECAY 0.999": ({}, 0.999, {}),
    "ACCUMULATE_STEPS 4": ({}, None, dict(accumulate=4)),
    "CLIP_GRAD_NORM 1.0": ({}, None, dict(clip_grad_norm=1.0)),
    "trivialaugment + EMA 0.999": (dict(AUTO_AUGMENT="trivialaugment"), 0.999, {}),
}


def recipe_rates(args, device, autocast_dtype) -> dict[str, float]:
    """Images/s of the pipeline as main.py runs it here (on CUDA replayed from a graph, which
    accumulation turns off), plain and with each RECIPE feature, timed in turn as
    step_and_epoch_rates does."""
    graphed = device.type == "cuda"
    plain = data_module.get_data(cifar_config(args), device).train
    passes = {"plain": common.epoch_pass(fresh_model(args.model, device, channels_last=True), plain,
                                         autocast_dtype, graphed)}
    for name, (constants, ema_decay, step_options) in RECIPE.items():
        loader = data_module.get_data(cifar_config(args, **constants), device).train
        passes[name] = common.epoch_pass(
            fresh_model(args.model, device, channels_last=True), loader, autocast_dtype,
            graphed and not step_options.get("accumulate"), ema_decay=ema_decay, **step_options)
    return common.best_rates(passes, repeats=args.epochs, device=device)


def tutorial_rate(args, device) -> tuple[float, float]:
    """Images/s of the loop most tutorials teach: torchvision's dataset with PIL transforms in
    DataLoader workers, fp32, .item() every batch. Returns (steady rate, first epoch seconds with
    worker start-up)."""
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    transform = transforms.Compose([transforms.RandomCrop(32, padding=4),
                                    transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                    transforms.Normalize(mean, std)])
    dataset = cifar_module.CIFAR10(args.data_dir, train=True, transform=transform)
    loader = DataLoader(Subset(dataset, range(args.images)), batch_size=args.batch_size,
                        shuffle=True, num_workers=args.workers, pin_memory=device.type == "cuda",
                        drop_last=True)
    model = fresh_model(args.model, device, channels_last=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    model.train()
    first, best = 0.0, 0.0
    for epoch in range(args.epochs + 1):
        started = time.perf_counter()
        running_loss, seen = 0.0, 0
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            seen += len(labels)
        elapsed = time.perf_counter() - started
        if epoch == 0:
            first = elapsed
        else:
            best = max(best, seen / elapsed)
    return best, first


def main_peak_rss(args) -> dict:
    """Run main.py on the full CIFAR-10 training set for --main-epochs and report its peak RSS."""
    out = os.path.join(args.output, "main_run")
    command = [sys.executable, os.path.join(ROOT, "main.py"), "--data-dir", args.data_dir,
               "--epochs", str(args.main_epochs), "--output-dir", out, "--ask-epoch", "none"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"main.py failed:\n{result.stderr}")
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"main_epochs": args.main_epochs, "main_seconds": round(seconds, 1),
            "main_peak_rss_mb": round(peak_mb)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="./data",
                        help="folder that holds cifar-10-batches-py/")
    parser.add_argument("--model", default="cnn", choices=list(model_module.MODELS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--images", type=int, default=None,
        help="training images per pass (default: 45,000 on a GPU, 2,048 on the CPU)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="timed passes per path, best kept (default: 3 on a GPU, 2 on the CPU)")
    common.add_device_arguments(parser, "tutorial DataLoader workers")
    parser.add_argument("--main-epochs", type=int, default=0,
                        help="also run main.py for this many epochs and report its "
                             "peak RSS (0: skip)")
    parser.add_argument("--recipe", action="store_true",
                        help="also time the pipeline with each recipe feature (AUTO_AUGMENT, "
                             "RANDOM_ERASING, MIXUP/CUTMIX, EMA_DECAY, ACCUMULATE_STEPS, "
                             "CLIP_GRAD_NORM)")
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()

    device = utils.get_device()
    on_gpu = device.type == "cuda"
    args.images = args.images or (45000 if on_gpu else 2048)
    args.epochs = args.epochs or (3 if on_gpu else 2)
    torch.backends.cudnn.benchmark = True
    autocast_dtype = torch.bfloat16 if on_gpu and not args.no_bf16 else None
    os.makedirs(args.output, exist_ok=True)
    name = common.device_name(on_gpu)
    print(f"{args.model}, batch {args.batch_size}, {args.images} images a pass, best of "
          f"{args.epochs}, on {name}")

    rates = step_and_epoch_rates(args, device, autocast_dtype)
    bare, resident, graphed = rates["bare"], rates["pipeline"], rates.get("graphed")
    limit = graphed or bare  # the fastest the step itself can go
    ours = rates.get("pipeline_graphed", resident)  # the pipeline as main.py runs it here
    tutorial, tutorial_first = tutorial_rate(args, device)
    result = {
        "device": name, "model": args.model, "batch_size": args.batch_size, "images": args.images,
        "bf16": autocast_dtype is not None, "tutorial_workers": args.workers,
        "bare_images_per_s": round(bare), "graphed_bare_images_per_s": graphed and round(graphed),
        "pipeline_images_per_s": round(resident),
        "graphed_pipeline_images_per_s": graphed and round(ours),
        "tutorial_images_per_s": round(tutorial),
        "tutorial_first_epoch_s": round(tutorial_first, 2),
        "pipeline_over_bare": round(resident / bare, 3), "ours_over_limit": round(ours / limit, 3),
        "ours_over_tutorial": round(ours / tutorial, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    if on_gpu:
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    if args.main_epochs:
        result.update(main_peak_rss(args))

    print(f"{'path':<44} {'images/s':>10} {'ratio':>8}")
    print(f"{'bare step rate (one fixed batch)':<44} {bare:>10,.0f} {1:>8.2f}")
    if graphed:
        print(f"{'bare step in a CUDA graph (the limit)':<44} {graphed:>10,.0f} "
              f"{graphed / bare:>8.2f}  of bare")
    print(f"{'pipeline, device-resident data':<44} {resident:>10,.0f} "
          f"{resident / bare:>8.2f}  of bare")
    if graphed:
        print(f"{'pipeline, steps replayed from a CUDA graph':<44} {ours:>10,.0f} "
              f"{ours / limit:>8.2f}  of the limit")
    print(f"{f'tutorial, DataLoader + PIL, {args.workers} workers, fp32':<44} {tutorial:>10,.0f} "
          f"{ours / tutorial:>8.2f}  ours / tutorial (first epoch {tutorial_first:.1f} s)")
    print("peak host RSS %d MB" % result["peak_rss_mb"]
          + (f", peak GPU memory {result['peak_gpu_mb']} MB" if on_gpu else ""))
    if args.main_epochs:
        print(f"main.py, {args.main_epochs} epoch(s) of the full training set: "
              f"{result['main_seconds']} s, peak RSS {result['main_peak_rss_mb']} MB")
    if args.recipe:
        recipe = recipe_rates(args, device, autocast_dtype)
        plain = recipe["plain"]
        result["recipe"] = {
            name: {"images_per_s": round(rate), "over_plain": round(rate / plain, 3),
                   "over_limit": round(rate / limit, 3)} for name, rate in recipe.items()}
        print(f"{'the pipeline with each recipe feature':<44} {'images/s':>10} "
              f"{'/ plain':>8} {'/ limit':>8}")
        for name, rate in recipe.items():
            print(f"{name:<44} {rate:>10,.0f} {rate / plain:>8.2f} {rate / limit:>8.2f}")
    path = os.path.join(args.output,
                        f"throughput_{device.type}_{args.model}_{args.batch_size}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
