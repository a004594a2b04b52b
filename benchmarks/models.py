"""Architectures side by side: parameters, and training images/s (forward, backward and SGD step on
a fixed batch) at 64 and 224 pixels, on this machine's device. For choosing a MODEL for your own
photos.

    python benchmarks/models.py                        # the README's list
    python benchmarks/models.py --models resnet18 vit_b_16 --sizes 64 224 --batch-size 16
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import model_module  # noqa: E402
import utils  # noqa: E402
import common  # noqa: E402  (benchmarks/common.py, beside this script)

MODELS = ["cnn", "mobilenet_v3_small", "squeezenet1_1", "regnet_y_400mf", "efficientnet_b0",
          "resnet18", "mobilenet_v3_large", "resnet50", "convnext_tiny", "swin_t", "vit_b_16"]


def step_rate(name: str, size: int, batch_size: int, steps: int, device: torch.device,
              autocast_dtype: torch.dtype | None) -> float:
    """Best images/s over `steps` timed training steps on one random batch, after one warm-up
    step."""
    torch.manual_seed(0)
    model = model_module.get_model(name, 10, image_size=size).to(device,
                                                                 memory_format=torch.channels_last)
    images = torch.randn(batch_size, 3, size, size, device=device).contiguous(
        memory_format=torch.channels_last)
    targets = torch.randint(0, 10, (batch_size,), device=device)
    return common.bare_step_rate(model, images, targets, steps_per_pass=1, repeats=steps,
                                 autocast_dtype=autocast_dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 224])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3,
                        help="timed steps per model and size, best kept")
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    device = utils.get_device()
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    where = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"training images/s, batch {args.batch_size}, on {where}")
    print(f"{'model':<20} {'parameters':>11}" + "".join(f" {f'{s} px':>9}" for s in args.sizes))
    rows = []
    for name in args.models:
        parameters = sum(p.numel() for p in model_module.get_model(name, 10, image_size=args.sizes[
            0]).parameters())
        rates = {size: step_rate(name, size, args.batch_size, args.steps, device, autocast_dtype)
                 for size in args.sizes}
        rows.append({"model": name, "parameters": parameters,
                     **{f"images_per_s_{s}": round(r, 1) for s, r in rates.items()}})
        print(f"{name:<20} {parameters / 1e6:>10.1f}M" + "".join(f" {rates[s]:>9.1f}"
                                                                 for s in args.sizes), flush=True)
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, f"models_{device.type}.json")
    with open(path, "w") as f:
        json.dump({"device": where, "batch_size": args.batch_size, "rows": rows}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
