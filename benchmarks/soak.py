"""A long run stays flat: train many short epochs on a small subset, as main.py does (its epoch
files, the CSV, LRA's table), and compare the process's peak resident memory, open file descriptors
and threads at an early epoch with the last. Linux only (it reads /proc/self). Prints the figures
and the growth, and writes JSON.

    python benchmarks/soak.py --data-dir ./data                 # 200 epochs of 256 images
    python benchmarks/soak.py --data-dir ./data --epochs 30 --early 5
"""

import argparse
import contextlib
import io
import json
import os
import resource
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import main  # noqa: E402
import run_module  # noqa: E402
import train_module  # noqa: E402
import utils  # noqa: E402


def sample() -> dict[str, float]:
    """Peak resident memory so far (MB), open file descriptors and threads of this process."""
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "fds": len(os.listdir("/proc/self/fd")), "threads": threading.active_count(),
            "os_threads": len(os.listdir("/proc/self/task"))}


def soak(args) -> dict:
    """Train args.epochs epochs and sample after args.early and after the last."""
    with tempfile.TemporaryDirectory() as output_dir:
        values, _ = main.parse_config(["--data-dir", args.data_dir, "--train-subset",
                                       str(args.images), "--val-split", str(args.val), "--epochs",
                                       str(args.epochs), "--ask-epoch", "none", "--patience",
                                       "1000", "--stop-patience", "1000", "--download", "false",
                                       "--output-dir", output_dir])
        run = run_module.setup(main.build_config(values), rank=0, world_size=1, local_rank=0,
                               account=utils.TimeAccount(time.perf_counter()))
        samples = {}

        def on_epoch(row: dict) -> None:
            if row["epoch"] in (args.early, args.epochs):
                samples[row["epoch"]] = sample()
        with contextlib.redirect_stdout(io.StringIO()):  # LRA's table: 200 rows nobody reads
            train_module.fit(run.state, run.data, run.fit, on_epoch=on_epoch)
    early, last = samples[args.early], samples[args.epochs]
    growth = {key: (last[key] / early[key] if early[key] else float("nan")) for key in early}
    return {"epochs": args.epochs, "images": args.images, f"epoch_{args.early}": early,
            f"epoch_{args.epochs}": last, "growth": growth}


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="the folder holding cifar-10-batches-py/")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--early", type=int, default=10,
                        help="the epoch to compare the last one with")
    parser.add_argument("--images", type=int, default=256, help="training images per epoch")
    parser.add_argument("--val", type=int, default=128, help="validation images")
    parser.add_argument("--output", help="a folder for soak.json")
    args = parser.parse_args()
    result = soak(args)
    early, last = result[f"epoch_{args.early}"], result[f"epoch_{args.epochs}"]
    print(f"{'':>16} | {'epoch ' + str(args.early):>10} | "
          f"{'epoch ' + str(args.epochs):>10} | growth")
    for key in early:
        print(f"{key:>16} | {early[key]:>10.1f} | {last[key]:>10.1f} | "
              f"{result['growth'][key]:.3f}x")
    flat = result["growth"]["peak_rss_mb"] <= 1.02 and all(last[k] <= early[k]
                                                           for k in ("fds", "os_threads"))
    print(f"flat (RSS within 2%, no more descriptors or threads): {'yes' if flat else 'NO'}")
    if args.output:
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, "soak.json"), "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main_()
