"""Training throughput of edgecv's own training step (edgecv.train.loop: the session, train_one_epoch)
on synthetic data already on the device, so the figure is the GPU's, not the data loader's.

    python benchmarks/train_throughput.py --model resnet50 --batch 256 --amp bfloat16 --channels-last
    python benchmarks/train_throughput.py --model resnet50 --batch 256 --amp bfloat16 --channels-last --compile

One warm-up epoch (cuDNN autotuning, and compiling with --compile), then a timed epoch; prints one JSON
object (images/s, ms per step, peak GPU memory, warm-up seconds). Reference: NVIDIA's
DeepLearningExamples report 2,470 images/s for ResNet-50 with AMP on one A100-80GB.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgecv.console import make_progress  # noqa: E402
from edgecv.device import is_cuda, resolve_device  # noqa: E402
from edgecv.train.config import TrainConfig  # noqa: E402
from edgecv.train.distributed import DistInfo  # noqa: E402
from edgecv.train.loop import finish_session, start_session, train_one_epoch, wrap_for_training  # noqa: E402
from edgecv.train.optim import build_scheduler  # noqa: E402


class SameBatch:
    """`steps` copies of one random batch that lives on the device (no loading, no copies)."""

    def __init__(self, batch: int, image_size: int, classes: int, steps: int, device: str) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, image_size, image_size, generator=g).to(device)
        self.y = torch.randint(0, classes, (batch,), generator=g).to(device)
        self.batch_size, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.x, self.y


def measure(model_name: str, batch: int, image_size: int, steps: int, warmup: int, device: str, amp: str,
            channels_last: bool, compile_model: bool) -> dict:
    """images/s of the timed epoch; the warm-up epoch's seconds are reported as warmup_s."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, num_classes=1000)
    cfg = TrainConfig(epochs=2, lr=0.1, schedule="constant", weight_decay=1e-4, amp=amp != "none",
                      amp_dtype=amp if amp != "none" else "bfloat16", channels_last=channels_last,
                      compile=compile_model)
    warm = SameBatch(batch, image_size, 1000, warmup, device)
    timed = SameBatch(batch, image_size, 1000, steps, device)
    session = start_session(model, timed, cfg, device, DistInfo(device=device), None)
    session.scheduler = build_scheduler(session.optimizer, cfg, steps)
    wrap_for_training(session)
    try:
        with make_progress(disable=True) as progress:
            session.steps_per_epoch = warmup
            t0 = time.perf_counter()
            train_one_epoch(session, warm, 0, progress, "warm-up")
            warmup_s = time.perf_counter() - t0
            if is_cuda(device):
                torch.cuda.reset_peak_memory_stats(device)
            session.steps_per_epoch = steps
            epoch = train_one_epoch(session, timed, 1, progress, "timed")
    finally:
        finish_session(session, success=False)
    result = {
        "model": model_name, "batch": batch, "image_size": image_size, "device": device,
        "device_name": torch.cuda.get_device_name(device) if is_cuda(device) else "cpu",
        "amp": amp if is_cuda(device) else "none (CPU)", "channels_last": channels_last, "compile": compile_model,
        "steps": steps, "images_per_s": round(epoch["images"] / epoch["seconds"], 1),
        "ms_per_step": round(1000 * epoch["seconds"] / steps, 2), "warmup_s": round(warmup_s, 1),
        "final_loss": round(epoch["loss"], 4), "torch": torch.__version__,
    }  # fmt: skip
    if is_cuda(device):
        result["gpu_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50", help="a torchvision classification builder")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps (compiling happens here)")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=["bfloat16", "float16", "none"], default="bfloat16")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--json", type=Path, help="also write the result to this file")
    args = p.parse_args(argv)
    result = measure(args.model, args.batch, args.image_size, args.steps, args.warmup, resolve_device(args.device),
                     args.amp, args.channels_last, args.compile)
    text = json.dumps(result)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
