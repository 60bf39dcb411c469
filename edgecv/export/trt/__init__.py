"""TensorRT engines: built on the device, with a metadata file that is checked before any deserialization.

An engine only runs on the GPU model and TensorRT version that built it. Every engine edgecv builds gets
`<engine>.json` next to it: TensorRT version, compute capability and device (from the CUDA runtime),
JetPack/L4T, the precision asked for and the precisions TensorRT actually chose per layer (read back with
the engine inspector), builder warnings, input profile, ONNX hash, device memory, and the equivalent
`trtexec` command line. The runner refuses a mismatch with one clear line instead of a TensorRT crash; a
fact that was unknown at build time is never held against an engine, and an engine without metadata
(built by trtexec) runs under TensorRT's own check.

INT8 comes from the Q/DQ nodes of the ONNX graph (explicit quantization). The FP16/INT8 builder flags are
deprecated in TensorRT 10 and removed in 11, where networks are strongly typed: FP16 then needs an FP16
graph, which edgecv writes next to the ONNX file (`<name>.fp16.onnx`). Every decision (flags, profile,
DLA, trtexec line, precision shares) is a plain function; the TensorRT calls are thin and few. `tensorrt`
and `onnxruntime` are imported lazily.

Modules, lowest first: `metadata` (`<engine>.json`, TensorRT versions, device compatibility), `graph` (the
ONNX file: input, Q/DQ, the FP16 copy), `options` (builder decisions without TensorRT), `engine` (reading an
engine: import, deserialize, I/O, per-layer precisions), `build` (plan and build). The package is not named
`tensorrt`: that would shadow the bindings it imports.
"""
