"""The distillation engine: the student's feeds, ONNX -> torch evaluation and training (torch optional)."""
