"""Export: ONNX (float and Q/DQ INT8), parity checks against torch, and graph inspection per backend."""
