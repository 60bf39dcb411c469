"""The quantization targets: one PlacementProfile per backend, registered by name (a new target is one entry)."""

from __future__ import annotations

from edgecv.compress.quantize.placer import PlacementProfile
from edgecv.compress.quantize.targets.ort import place_onnxruntime
from edgecv.compress.quantize.targets.trt import place_tensorrt
from edgecv.registry import Registry

PROFILES: Registry[PlacementProfile] = Registry("quantization target")
PROFILES.register(
    "onnxruntime",
    PlacementProfile(
        "onnxruntime", False, place_onnxruntime, True,
        "ONNX Runtime CPU: BN folded, uint8 asymmetric activations quantized once, int8 per-channel weights",
    ),
)  # fmt: skip
PROFILES.register(
    "tensorrt",
    PlacementProfile(
        "tensorrt", True, place_tensorrt, False,
        "TensorRT: int8 symmetric Q/DQ on Conv/Linear, pool, Mul inputs and residual Adds' skip inputs",
    ),
)  # fmt: skip
