"""Training options: learning rate for the global batch, step schedule, RMSprop, gradient accumulation,
EMA, channels_last, SyncBatchNorm conversion, and what each epoch logs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from nets import no_batchnorm

from edgecv.data.config import DataConfig
from edgecv.data.datasets import build_data
from edgecv.errors import EdgecvError
from edgecv.recipe import validate
from edgecv.train.config import TrainConfig, TrainOverrides
from edgecv.train.loop import fit
from edgecv.train.optim import build_optimizer, build_scheduler, lr_factor, scaled_lr

DATA = {"dataset": "synthetic", "image_size": 12, "num_classes": 4, "train_size": 48, "val_size": 16,
        "augment": False}


def _data(batch: int):
    return build_data(DataConfig(**DATA, batch_size=batch, eval_batch_size=16))


def _trained(cfg: TrainConfig, batch: int, tmp_path=None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = no_batchnorm(4)
    data = _data(batch)
    fit(model, data.train, data.val, cfg, log_path=(tmp_path / "log.jsonl") if tmp_path else None)
    return model


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("rule, expected", [("none", 0.1), ("linear", 0.4), ("sqrt", 0.2)])
def test_lr_follows_the_global_batch(rule, expected):
    cfg = TrainConfig(lr=0.1, lr_scale=rule, lr_reference_batch=256)
    assert scaled_lr(cfg, 1024) == pytest.approx(expected)


def test_the_start_of_training_logs_the_global_batch_and_its_lr(tmp_path):
    _trained(TrainConfig(epochs=1, lr=0.1, lr_scale="linear", lr_reference_batch=24, grad_accum=2), 6, tmp_path)
    start = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["global_batch"] == 12 and start["lr"] == pytest.approx(0.05)


def test_step_schedule_decays_every_n_epochs():
    factors = [lr_factor(s, 100, 0, "step", steps_per_epoch=10, step_epochs=3, gamma=0.1) for s in range(100)]
    assert factors[29] == 1.0 and factors[30] == pytest.approx(0.1) and factors[60] == pytest.approx(0.01)
    fractional = [lr_factor(s, 100, 0, "step", steps_per_epoch=10, step_epochs=2.4, gamma=0.97) for s in (23, 24)]
    assert fractional == [1.0, pytest.approx(0.97)]


@pytest.mark.parametrize("schedule, extra", [("cosine", {}), ("onecycle", {}), ("step", {"step_epochs": 1.5}),
                                             ("constant", {"warmup_epochs": 1.0})])
def test_a_schedule_resumed_at_another_step_count_continues_where_it_was(schedule, extra):
    """A state written with 2 processes (10 steps per epoch) resumed by 1 (20 steps per epoch): after
    2 of 4 epochs both schedules are at the same point."""
    cfg = TrainConfig(epochs=4, lr=0.1, schedule=schedule, **extra)

    def lr_after(steps_per_epoch: int, epochs_done: int, replay: bool) -> float:
        opt = build_optimizer(torch.nn.Linear(2, 2), cfg)
        if replay:
            sched = build_scheduler(opt, cfg, steps_per_epoch)
            for _ in range(epochs_done * steps_per_epoch):
                opt.step()
                sched.step()
        else:
            build_scheduler(opt, cfg, steps_per_epoch, start_step=epochs_done * steps_per_epoch)
        return opt.param_groups[0]["lr"]

    # OneCycleLR places its phase ends on whole steps (pct_start * total - 1): one step of quantization
    rel = 0.05 if schedule == "onecycle" else 1e-9
    assert lr_after(20, 2, replay=False) == pytest.approx(lr_after(10, 2, replay=True), rel=rel)
    assert lr_after(20, 2, replay=False) == pytest.approx(lr_after(20, 2, replay=True))


def test_rmsprop_is_torchvisions():
    opt = build_optimizer(torch.nn.Linear(2, 2), TrainConfig(optimizer="rmsprop", lr=0.064, momentum=0.9))
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.RMSprop) and (group["alpha"], group["eps"], group["momentum"]) == (0.9, 0.0316, 0.9)


@pytest.mark.parametrize("raw, message", [
    ({"train": {"schedule": "step"}}, "schedule 'step' needs step_epochs"),
    ({"train": {"schedule": "cosine", "step_epochs": 2}}, "step_epochs: only schedule 'step' takes it"),
    ({"train": {"amp_dtype": "float8"}}, "train.amp_dtype"),
    ({"train": {"lr_scale": "quadratic"}}, "train.lr_scale"),
])
def test_training_option_mistakes_are_one_line(raw, message):
    with pytest.raises(EdgecvError) as err:
        validate({"name": "r", "model": {"name": "edgecv:resnet8"}, **raw})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_stage_with_its_own_schedule_drops_the_base_step_interval():
    base = TrainConfig(schedule="step", step_epochs=30)
    assert TrainOverrides(schedule="cosine").merged(base).step_epochs is None
    assert TrainOverrides(lr=0.01).merged(base).step_epochs == 30


def test_gradient_accumulation_equals_the_large_batch():
    """2 batches of 6 with accumulation make the same updates as batches of 12 (a net without BatchNorm)."""
    big = _trained(TrainConfig(epochs=2, lr=0.1, schedule="constant"), 12)
    accumulated = _trained(TrainConfig(epochs=2, lr=0.1, schedule="constant", grad_accum=2), 6)
    plain_small = _trained(TrainConfig(epochs=2, lr=0.1, schedule="constant"), 6)
    assert _max_diff(big, accumulated) < 1e-5
    assert _max_diff(big, plain_small) > 1e-3  # the comparison can tell the difference


def test_ema_weights_are_evaluated_and_kept():
    """With a decay near 1 the average barely leaves the starting weights, while the trained ones move."""
    torch.manual_seed(0)
    start = no_batchnorm(4).state_dict()
    trained = _trained(TrainConfig(epochs=2, lr=0.1, schedule="constant"), 6)
    averaged = _trained(TrainConfig(epochs=2, lr=0.1, schedule="constant", ema_decay=0.999), 6)
    moved = lambda m: max(float((v - start[k]).abs().max()) for k, v in m.state_dict().items())  # noqa: E731
    assert moved(averaged) < 0.05 * moved(trained)


def test_grad_clip_bounds_each_update_and_zero_is_off():
    """A tiny gradient-norm bound keeps the weights near where they started; 0 trains as without it."""
    torch.manual_seed(0)
    start = no_batchnorm(4).state_dict()
    moved = lambda m: max(float((v - start[k]).abs().max()) for k, v in m.state_dict().items())  # noqa: E731
    plain = _trained(TrainConfig(epochs=1, lr=0.1, schedule="constant"), 6)
    clipped = _trained(TrainConfig(epochs=1, lr=0.1, schedule="constant", grad_clip=1e-4), 6)
    off = _trained(TrainConfig(epochs=1, lr=0.1, schedule="constant", grad_clip=0), 6)
    assert moved(clipped) < 0.05 * moved(plain)
    assert _max_diff(plain, off) == 0


def test_channels_last_trains_the_same_weights_in_nhwc():
    plain = _trained(TrainConfig(epochs=1, lr=0.1, schedule="constant"), 12)
    nhwc = _trained(TrainConfig(epochs=1, lr=0.1, schedule="constant", channels_last=True), 12)
    assert nhwc[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert _max_diff(plain, nhwc) < 1e-4


def test_amp_is_ignored_on_the_cpu(tmp_path):
    """AMP is a CUDA feature here: on the CPU training runs in float32 with no scaler."""
    _trained(TrainConfig(epochs=1, amp=True, amp_dtype="float16"), 12, tmp_path)
    start = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert start["amp"] == "off"


def test_each_epoch_logs_speed_and_time(tmp_path):
    _trained(TrainConfig(epochs=1), 12, tmp_path)
    epoch = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()][-1]
    assert epoch["event"] == "epoch" and epoch["images_per_s"] > 0 and 0 < epoch["train_s"] <= epoch["epoch_s"]
    assert epoch["skipped_images"] == 0 and "gpu_mem_mb" not in epoch  # GPU memory is logged on CUDA


def test_grad_accum_larger_than_an_epoch_is_one_line():
    with pytest.raises(EdgecvError, match="train.grad_accum 9 is more than the 4 batches"):
        _trained(TrainConfig(epochs=1, grad_accum=9), 12)


def test_sync_batchnorm_conversion_is_undone_with_the_trained_values():
    from torchvision.models import resnet18

    from edgecv.train.distributed import convert_sync_batchnorm, revert_sync_batchnorm

    model = resnet18(num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    replaced = convert_sync_batchnorm(model)
    assert len(replaced) == 20 and isinstance(model.bn1, torch.nn.SyncBatchNorm)
    model.bn1.running_mean.add_(0.5)
    revert_sync_batchnorm(model, replaced)
    assert type(model.bn1) is torch.nn.BatchNorm2d and not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    assert float(model.bn1.running_mean.mean()) == pytest.approx(0.5)
    model.bn1.running_mean.sub_(0.5)
    assert torch.allclose(model(x), before)


@pytest.mark.slow
def test_torch_compile_trains_on_the_cpu():
    plain = _trained(TrainConfig(epochs=1, lr=0.1, schedule="constant"), 12)
    compiled = _trained(TrainConfig(epochs=1, lr=0.1, schedule="constant", compile=True), 12)
    assert _max_diff(plain, compiled) < 1e-4
    assert math.isfinite(float(compiled[0].weight.sum()))
