"""One table of numerical tolerances (rtol, atol), quoted in each pass docstring.

All assume fp32 outputs of order 1 on onnxruntime CPU with ORT_DISABLE_ALL.
"""

from __future__ import annotations

TOL = {
    "exact": {"rtol": 1e-5, "atol": 1e-6},  # clean-ups, renames
    "reassociate_fp32": {"rtol": 1e-4, "atol": 1e-5},  # folding, low rank on rank-deficient W
    "fp16": {"rtol": 1e-2, "atol": 1e-3},  # also assert no inf/nan
}
# INT8 QDQ static: atol = 2 x output scale (computed per test).
# Real models in models/ (slow): cosine >= 0.99 and the same top-1 on seeded inputs.
REAL_MODEL_MIN_COSINE = 0.99
