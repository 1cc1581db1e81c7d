"""The quantization engine: calibration, scales, Q/DQ rules and insertion, smoothing, bias correction,
the deploy check, float16, sensitivity and the precision planner.

Engines never import ``pass_base`` or ``context``: they take plain arguments and return results."""
