"""Time to accuracy: the fast preset through main.py's normal path, and airbench94 (when the
`airbench` package is installed) on the same data in the same process. Prints accuracies, times and
their ratio, and writes JSON. Needs a GPU for meaningful times (airbench runs only on CUDA).

    python benchmarks/time_to_accuracy.py --data-dir ./data --runs 3 --airbench-runs 3

Times, as airbench measures its own: airbench94's printed total (whitening set-up, training, final
test-time-augmented evaluation). Ours: the training epochs (each epoch's train_seconds) plus the
final evaluation, and separately the whole of fit (which adds per-epoch validation, LRA and the
checkpoint files). Both runs warm up first. Last, each program runs cold as a command, start to
exit, --cold-runs times in turn: `python main.py --preset fast` and (when installed, on CUDA)
airbench94's train94() in a fresh process.
"""

import argparse
import contextlib
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import cifar_module  # noqa: E402
import main as pipeline  # noqa: E402


def run_ours(args, seed: int, epochs: int | None = None) -> dict:
    """One `main.py --preset fast` run in this process; accuracy and times."""
    out = tempfile.mkdtemp(prefix="fast_")
    argv = ["--preset", "fast", "--data-dir", args.data_dir, "--output-dir", out, "--seed", str(
        seed)]
    if epochs:
        argv += ["--epochs", str(epochs)]
    argv += args.main_args.split()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        started = time.perf_counter()
        outcome = pipeline.run_main(argv)
        total = time.perf_counter() - started
    if outcome.status != 0:
        raise SystemExit(f"main.py --preset fast failed ({outcome.status}):\n{printed.getvalue()}")
    training = sum(row["train_seconds"] for row in outcome.history)
    final_eval = outcome.test["seconds"]
    return {"seed": seed, "epochs": epochs or pipeline.PRESETS["fast"]["EPOCHS"],
            "test_acc": 100 * outcome.test["acc"],
            "train_plus_final_eval_s": round(training + final_eval, 3),
            "fit_plus_final_eval_s": round(outcome.fit_seconds + final_eval, 3),
            "in_process_total_s": round(total, 2)}


def write_airbench_data(data_dir: str, folder: str) -> None:
    """airbench's loader reads ./cifar10/train.pt and test.pt: dicts of uint8 N x 32 x 32 x 3
    images, int64 labels and class names. Written from the same files the pipeline reads."""
    train_images, train_labels, test_images, test_labels, classes = cifar_module.read_cifar10(
        data_dir, False)
    os.makedirs(os.path.join(folder, "cifar10"), exist_ok=True)
    for name, images, labels in (("train", train_images, train_labels),
                                 ("test", test_images, test_labels)):
        torch.save({"images": images.contiguous(), "labels": labels, "classes": classes},
                   os.path.join(folder, "cifar10", f"{name}.pt"))


def run_airbench(airbench, runs: int) -> list[dict]:
    """airbench94 runs (after its warm-up), parsed from the table it prints."""
    results = []
    with contextlib.redirect_stdout(io.StringIO()):
        airbench.warmup94()
    for run in range(runs):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            airbench.train94()
        for line in printed.getvalue().splitlines():
            fields = [field.strip() for field in line.split("|")]
            if len(fields) > 7 and fields[2] == "eval":
                results.append({"run": run, "test_acc": 100 * float(fields[6]), "seconds": float(
                    fields[7])})
    return results


def cold_runs(args, airbench_folder: str | None) -> dict[str, list[dict]]:
    """Each program run --cold-runs times as a fresh process, start to exit, in turn (ours,
    airbench94, ours, ...): `python main.py --preset fast`, and airbench94's train94() run from the
    folder its data is in."""
    commands = {"python main.py --preset fast": (None, [
        sys.executable, os.path.join(ROOT, "main.py"), "--preset", "fast", "--data-dir",
        args.data_dir,
        *args.main_args.split()])}
    if airbench_folder:
        commands["airbench94"] = (airbench_folder, [sys.executable, "-c",
                                                    "import airbench; airbench.train94()"])
    runs = {program: [] for program in commands}
    for _ in range(args.cold_runs):
        for program, (cwd, command) in commands.items():
            with tempfile.TemporaryDirectory() as out:
                extra = ["--output-dir", out] if cwd is None else []
                started = time.perf_counter()
                result = subprocess.run(command + extra, cwd=cwd, capture_output=True, text=True)
                seconds = time.perf_counter() - started
            tested = next((line for line in result.stdout.splitlines() if "Test accuracy" in line),
                          "")
            runs[program].append({"seconds": round(seconds, 2), "status": result.returncode,
                                  "test_line": tested,
                                  "stderr_tail": result.stderr[-300:] if result.returncode else ""})
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--runs", type=int, default=5,
                        help="runs of the fast preset (seeds 0, 1, ...)")
    parser.add_argument("--epochs", type=int, nargs="*", default=[None],
                        help="preset EPOCHS to try (default: the preset's own)")
    parser.add_argument("--airbench-runs", type=int, default=5)
    parser.add_argument("--cold-runs", type=int, default=2,
                        help="start-to-exit runs of each program")
    parser.add_argument("--main-args", default="",
                        help="more main.py flags, e.g. '--train-subset 512' for a quick "
                             "check on the CPU")
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    args.data_dir = os.path.abspath(args.data_dir)
    os.makedirs(args.output, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"time to accuracy on {device}")

    run_ours(args, seed=100, epochs=1)  # warm-up: CUDA context, cudnn autotuning
    ours = {}
    for epochs in args.epochs:
        runs = [run_ours(args, seed, epochs) for seed in range(args.runs)]
        ours[str(epochs or pipeline.PRESETS["fast"]["EPOCHS"])] = runs
        for r in runs:
            print(f"  ours    epochs {r['epochs']:>2} seed {r['seed']}: {r['test_acc']:.2f}%  "
                  f"train+final eval {r['train_plus_final_eval_s']:.2f} s  fit+final eval "
                  f"{r['fit_plus_final_eval_s']:.2f} s")

    airbench_runs, work = [], None
    try:
        import airbench
    except ImportError:
        print("  airbench is not installed (pip install airbench==0.1.8): no comparison")
    else:
        if not torch.cuda.is_available():
            print("  airbench needs CUDA: no comparison")
        else:
            work = tempfile.mkdtemp(prefix="airbench_")
            write_airbench_data(args.data_dir, work)
            here = os.getcwd()
            os.chdir(work)
            try:
                airbench_runs = run_airbench(airbench, args.airbench_runs)
            finally:
                os.chdir(here)
            for r in airbench_runs:
                print(f"  airbench94 run {r['run']}: {r['test_acc']:.2f}%  {r['seconds']:.2f} s")

    summary = {"device": device, "ours": ours, "airbench94": airbench_runs}
    print(f"\n{'':<26} {'mean acc':>9} {'min acc':>8} {'time (s)':>9} {'fit time':>9} {'ratio':>6}")
    base = statistics.mean(r["seconds"] for r in airbench_runs) if airbench_runs else None
    if airbench_runs:
        accs = [r["test_acc"] for r in airbench_runs]
        print(f"{'airbench94':<26} {statistics.mean(accs):>8.2f}% {min(accs):>7.2f}% {base:>9.2f} "
              f"{'':>9} {1:>6.2f}")
    for epochs, runs in ours.items():
        accs = [r["test_acc"] for r in runs]
        seconds = statistics.mean(r["train_plus_final_eval_s"] for r in runs)
        fit = statistics.mean(r["fit_plus_final_eval_s"] for r in runs)
        ratio = f"{seconds / base:>6.2f}" if base else "     -"
        print(f"{f'fast preset, {epochs} epochs':<26} {statistics.mean(accs):>8.2f}% "
              f"{min(accs):>7.2f}% {seconds:>9.2f} {fit:>9.2f} {ratio}")
        summary[f"ratio_{epochs}"] = seconds / base if base else None
        summary[f"fit_ratio_{epochs}"] = fit / base if base else None

    summary["cold"] = cold_runs(args, work)
    if work:
        shutil.rmtree(work)  # airbench's copy of CIFAR-10
    for program, runs in summary["cold"].items():
        times = ", ".join(f"{r['seconds']:.1f} s" + (f" (status {r['status']})" if r["status"]
                                                     else "") for r in runs)
        print(f"{program + ', cold process, start to exit:':<46} {times}")
    summary["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if torch.cuda.is_available():
        summary["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    print(f"peak host RSS {summary['peak_rss_mb']} MB" +
          (f", peak GPU memory {summary['peak_gpu_mb']} MB" if "peak_gpu_mb" in summary else ""))
    path = os.path.join(args.output, "time_to_accuracy.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
