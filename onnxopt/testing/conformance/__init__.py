"""The conformance harness: onnx backend cases run through every pass and recipe in worker processes."""
