"""Static INT8 quantization in QDQ form, from calibration data.

Algebra: every quantized tensor x is replaced by ``DQ(Q(x)) = s * (clip(round(x / s) + z) - z)``,
an error of at most ``s / 2`` inside the calibrated range. onnxruntime (CPU) and TensorRT fuse
``DQ -> op -> Q`` into integer kernels, where ``sum(q_x * q_w)`` is accumulated in int32 together
with the int32 bias (scale ``s_x * s_w``), so the fused model computes what the QDQ model says.
The engine, its steps and its config are :mod:`onnxopt.quant.static`.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from onnxopt.pass_base import OptPass, PassReport, register
from onnxopt.quant import insert as qdq_insert
from onnxopt.quant import static
from onnxopt.quant.static import QuantizeConfig

__all__ = ["QuantizeConfig", "QuantizePass"]

logger = logging.getLogger(__name__)


@register("quantize")
class QuantizePass(OptPass[QuantizeConfig]):
    """Static INT8 QDQ: int8 per-channel weights, uint8/int8 activations, int32 biases.

    Changes: inserts QuantizeLinear/DequantizeLinear pairs on activations of Conv, ConvTranspose,
        MatMul, Gemm, Add, Mul, Concat, pooling and data-movement ops; replaces their float
        weights by int8 initializers (``<W>_quantized``) and biases by int32; upgrades the default
        opset to 13 when it is lower (onnx.version_converter). LayerNorm outputs with outlier
        channels are smoothed first (SmoothQuant: LayerNorm gamma/beta, or an inserted float Mul,
        divided by per-channel factors that multiply the rows of the MatMul/Gemm weights reading
        them); so are Conv (-> Relu) -> Conv pairs (cross-layer equalisation).
    Preserves: graph input/output names, dtypes and shapes; dynamic dimensions; subgraphs (their
        nodes stay float, with the reason in the report); Softmax/LayerNorm/GELU stay float.
    Guarantees: never quantizes a tensor whose range reaches ``mask_threshold`` (additive attention
        masks); every node left float has a reason in ``report.skipped``; layer-wise SQNR (worst
        first) in ``report.records``; a note when INT8 is measured slower than FP32 on CPU.
    Dynamic INT8 (``activations=dynamic``, or ``auto`` on a transformer, or the nodes named in
        ``dynamic_nodes``): MatMul/Gemm with constant weights become onnxruntime
        MatMulIntegerToFloat kernels on activations quantized at run time (per token or per
        tensor, ``dynamic_scales``; :mod:`onnxopt.quant.dynamic`), fused com.microsoft Attention
        is split into Q/K/V MatMuls + MultiHeadAttention first; Gather tables of >= 1024 rows
        become int8 with a scale per row (``embeddings``, :mod:`onnxopt.quant.embedding`).
    Not exact: output error ~ the output scale; tests use atol = 2 x output scale (static);
        dynamic INT8 and int8 embeddings: the worst-case bounds derived in
        tests/passes/test_quantize_dynamic.py.
    """

    config_class = QuantizeConfig
    needs_calibration = True

    def needs_data(self) -> bool:
        """Calibration data is optional with ``activations=dynamic`` (run-time scales)."""
        return self.config.activations != "dynamic"

    def requires(self, model: ir.Model) -> None:
        """Check the opset, the node names in the config and that calibration is available."""
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        if opset < 10:
            raise ir.passes.PreconditionError(f"quantize needs default opset >= 10, model has {opset}")
        problem = qdq_insert.unsupported_qdq_opset(max(opset, static.MIN_OPSET))
        if problem:
            raise ir.passes.PreconditionError(f"quantize: {problem}")
        names = {n.name for n in model.graph.all_nodes()}
        for field in ("include_nodes", "exclude_nodes", "dynamic_nodes"):
            missing = sorted(getattr(self.config, field) - names)
            if missing:
                raise ir.passes.PreconditionError(f"{field}: no node named {missing[0]!r} in the model")
        if self.config.activations == "dynamic":
            return  # run-time scales: calibration data only for SmoothQuant (skipped with a note without it)
        if not self.config.calib_table and self.context.calibration is None:
            raise ir.passes.PreconditionError("quantize needs calibration data (--calib) or calib_table")

    def call(self, model: ir.Model) -> PassReport:
        """Quantize ``model`` in place; see the class docstring."""
        report = self.new_report(model)
        ctx = self.context
        report.absorb(static.quantize(
            model, self.config, calibration=ctx.calibration, target=ctx.target, cache=ctx.cache,
            quiet=ctx.quiet, pass_name=self.name,
        ))  # fmt: skip
        return report
