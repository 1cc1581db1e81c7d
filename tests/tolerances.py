"""One table of numerical tolerances (rtol, atol), quoted in each pass docstring.

All assume fp32 outputs of order 1 on onnxruntime CPU with ORT_DISABLE_ALL (scale the weights of a
test model so that its outputs are, or scale atol with max |output|).

What another correct CPU can move, and why each row holds there:
- float32 (exact, reassociate_fp32): a K-term dot product is rounded ~sqrt(K) times at
  u = 6e-8; SIMD width (SSE/AVX2/AVX-512/NEON), FMA and thread count change the order, so two
  CPUs differ by ~sqrt(K) * u * |terms|: 1e-6 for K ~ 300 and outputs of order 1. onnxruntime's
  own floor on the bundled models (opt level disable vs all, 1 vs 2 threads) is 1.4e-6 (digits
  transformer) and 3.1e-6 (digits CNN, logits up to 5.6). "exact" (1e-5 / 1e-6) is for rewrites
  that leave the arithmetic alone (bit-identical on one CPU); "reassociate_fp32" (1e-4 / 1e-5)
  leaves ~10x over the float noise of a changed summation order.
- fp16 (1e-2 / 1e-3): float16's u = 4.9e-4. x86 CPUs compute float16 ops in float32 and round
  each stored output (a few u per op); ARM64 with FP16 arithmetic also accumulates in float16
  (~sqrt(K) more roundings). Small test graphs (K <= 16, 2-3 layers) stay within ~10 u = 5e-3.
- INT8 has no row: its bound is derived per test from the scales in the quantized model (worst
  case, every rounding at its maximum), which no CPU's integer kernels can exceed except by
  int16 saturation on x86 without VNNI, which reduce_range=auto measures and avoids.
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
