"""Measure the LR finder's rules (optim_module.LR_RULES): run `--find-lr` once per dataset, read
every rule's LR off the one recorded curve, train at each distinct LR and at main.py's default LR
for the same epochs, and print the test accuracies as a table (the curves go to curves.json).

  nice -n 10 python benchmarks/lr_finder_rules.py --data-dir /work/shared/data --out /tmp/lrrules
"""

import argparse
import contextlib
import json
import os
import pickle
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import main  # noqa: E402
import optim_module  # noqa: E402


def make_photos(cifar_dir: str, folder: str, train: int = 100, test: int = 50,
                size: int = 64) -> str:
    """A small photo folder from CIFAR-10's test images (never its training images): `train` and
    `test` JPEGs a class under train/<class>/ and test/<class>/, upscaled to size pixels."""
    from PIL import Image

    if os.path.isdir(folder):
        return folder
    batches = os.path.join(cifar_dir, "cifar-10-batches-py")
    with open(os.path.join(batches, "batches.meta"), "rb") as f:
        names = pickle.load(f, encoding="latin1")["label_names"]
    with open(os.path.join(batches, "test_batch"), "rb") as f:  # the project's own data files
        batch = pickle.load(f, encoding="latin1")
    images = batch["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    seen = [0] * len(names)
    for image, label in zip(images, batch["labels"]):
        index, seen[label] = seen[label], seen[label] + 1
        if index >= train + test:
            continue
        split = "train" if index < train else "test"
        os.makedirs(os.path.join(folder, split, names[label]), exist_ok=True)
        Image.fromarray(image).resize((size, size), Image.BICUBIC).save(
            os.path.join(folder, split, names[label], f"{index:04d}.jpg"), quality=90)
    return folder


def datasets(data_dir: str, photos: str) -> dict[str, list[str]]:
    """Each dataset's flags (the epochs included) for main.py."""
    cifar = ["--data-dir", data_dir, "--download", "false"]
    return {
        "photos (1,000 64-px JPEGs, 10 classes)": ["--dataset", "folder", "--data-dir", photos,
                                                   "--image-size", "32", "--epochs", "6"],
        "CIFAR-10, 2,000 images": [*cifar, "--train-subset", "2000", "--val-split", "500",
                                   "--epochs", "6"],
        "CIFAR-10, 5,000 images": [*cifar, "--train-subset", "5000", "--val-split", "500",
                                   "--epochs", "4"],
    }


def find_curve(argv: list[str]) -> tuple[list[float], list[float]]:
    """The LR finder's curve, as `python main.py ARGV --find-lr` records it."""
    curves, real = [], optim_module.find_lr

    def recording(*args, **kwargs):
        result = real(*args, **kwargs)
        curves.append(result[:2])
        return result

    optim_module.find_lr = recording
    try:
        assert main.run_main([*argv, "--find-lr"]).status == 0
    finally:
        optim_module.find_lr = real
    return curves[0]


def train(argv: list[str], lr: float) -> tuple[float, int]:
    """The test accuracy of `python main.py ARGV --lr LR`, and the epochs it ran."""
    outcome = main.run_main([*argv, "--lr", f"{lr:.2g}"])
    assert outcome.status == 0, outcome.status
    return outcome.test["acc"], len(outcome.history)


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="holds cifar-10-batches-py/")
    parser.add_argument("--out", required=True, help="a scratch folder for the runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="*", help="dataset names starting with these words")
    args = parser.parse_args()
    photos = make_photos(args.data_dir, os.path.join(args.out, "photos"))
    curves_path, records = os.path.join(args.out, "curves.json"), {}
    if os.path.exists(curves_path):
        with open(curves_path) as f:
            records = json.load(f)
    print("| dataset | seed | rule | suggested LR | test acc | epochs | default LR "
          f"{main.LR} acc |", flush=True)
    for number, (name, flags) in enumerate(datasets(args.data_dir, photos).items()):
        if args.only and not any(name.startswith(word) for word in args.only):
            continue
        for seed in args.seeds:
            run = 0

            def argv() -> list[str]:
                nonlocal run
                run += 1
                out = os.path.join(args.out, f"{number}-{seed}-{run}")
                return [*flags, "--seed", str(seed), "--ask-epoch", "none", "--output-dir", out,
                        "--cache-dir", os.path.join(args.out, "cache")]

            started = time.perf_counter()
            with open(os.path.join(args.out, "log.txt"), "a") as log, \
                    contextlib.redirect_stdout(log):
                key = f"{name} seed {seed}"
                if key not in records:  # a curve recorded by an earlier, stopped run is kept
                    records[key] = dict(zip(("lrs", "losses"), find_curve(argv())))
                lrs, losses = records[key]["lrs"], records[key]["losses"]
                with open(curves_path, "w") as f:
                    json.dump(records, f)
                rules = {rule: float(f"{function(lrs, losses):.2g}")
                         for rule, (function, _) in optim_module.LR_RULES.items()}
                accuracy = {main.LR: train(argv(), main.LR)}
                for lr in sorted(set(rules.values()) - set(accuracy)):
                    accuracy[lr] = train(argv(), lr)
            default = accuracy[main.LR][0]
            for rule, lr in rules.items():
                acc, epochs = accuracy[lr]
                print(f"| {name} | {seed} | {rule} | {lr:.2g} | {100 * acc:.1f}% | {epochs} | "
                      f"{100 * default:.1f}% |", flush=True)
            print(f"({name}, seed {seed}: {time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main_()
