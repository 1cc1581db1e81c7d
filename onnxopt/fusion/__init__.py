"""Graph fusions: attention geometry and form for onnxruntime's transformer fusions (the fuse pass), and
written-out activations as single ONNX ops (activations: HardSwish, used by the quantizer)."""
