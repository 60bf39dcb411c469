"""Measure models where they will run: latency, throughput, accuracy, memory and energy per backend.

`edgecv.bench.measure.measure` is the one entry point (rows of `BenchRow`). Importing this package needs
neither torch, onnxruntime nor TensorRT: each runner imports its library itself.
"""
