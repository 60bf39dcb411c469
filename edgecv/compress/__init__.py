"""Compression: structured pruning, distillation and INT8 quantization (fake-quant, calibration, Q/DQ placement)."""
