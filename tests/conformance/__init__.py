"""Conformance harness: every pass over the ONNX backend test cases (see harness.py)."""
