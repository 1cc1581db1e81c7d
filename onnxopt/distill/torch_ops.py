"""ONNX operators as differentiable torch functions (the op set the distill pass trains through).

Each entry of :data:`OPS` builds, from a node's attributes, a function ``(inputs) -> outputs``
on torch tensors with ONNX semantics (default domain, opset 13+ input forms; older attribute
forms of ``axes``/``split`` are accepted too). A node whose attributes fall outside what is
implemented (e.g. ``auto_pad=SAME_UPPER``) raises :class:`UnsupportedOpError` when it is built,
so a model fails to convert before any training starts. Importing this module imports torch:
only :mod:`onnxopt.distill.torch_graph` does, and only inside the distill pass's ``call``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias

from onnxopt.errors import OnnxOptError

__all__ = ["OPS", "OpFn", "UnsupportedOpError", "build_op", "torch_dtype"]

OpFn = Callable[[Sequence[Any]], list[Any]]
Builder = Callable[[dict[str, Any], int], OpFn]

# 2-D convolutions run in torch's channels-last layout (oneDNN's NHWC kernels) and Clip with
# constant bounds clamps by Python scalars (a cheaper backward than tensor bounds): together a
# training step (forward + backward, batch 32, 2 threads) took 0.60-0.67x the time on PP-OCR rec
# and 0.74-0.75x on PP-OCR cls in two runs (benchmarks/bench_distill_steps.py). False: the plain forms.
FAST_PATHS = True


class UnsupportedOpError(OnnxOptError):
    """A node cannot be converted to torch for training (op type or attribute not supported)."""


def torch_dtype(dtype: ir.DataType) -> torch.dtype:
    """The torch dtype of an ONNX data type."""
    return torch.from_numpy(np.zeros(0, dtype=dtype.numpy())).dtype


def _attrs(node: ir.Node) -> dict[str, Any]:
    out = {}
    for key, attr in node.attributes.items():
        value = attr.value
        if isinstance(value, ir.TensorProtocol):
            value = torch.from_numpy(np.array(value.numpy()))
        elif isinstance(value, Sequence) and not isinstance(value, str):
            value = list(value)
        out[key] = value
    return out


def build_op(node: ir.Node, opset: int) -> OpFn:
    """The torch function of ``node``.

    Raises:
        UnsupportedOpError: the op type, domain or an attribute value is not supported.

    """
    where = f"{node.op_type} node {node.name or '(unnamed)'!r}"
    if node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
        domain = f" (domain {node.domain!r})" if node.domain not in ("", "ai.onnx") else ""
        raise UnsupportedOpError(f"distill: cannot train through {where}{domain}: op not supported")
    try:
        return OPS[node.op_type](_attrs(node), opset)
    except _UnsupportedError as err:
        raise UnsupportedOpError(f"distill: cannot train through {where}: {err}") from None


class _UnsupportedError(ValueError):
    """An attribute or input form outside what is implemented (wrapped with op and node)."""


def _unary(fn: Callable[[Any], Any]) -> Builder:
    return lambda a, o: lambda x: [fn(x[0])]


def _binary(fn: Callable[[Any, Any], Any]) -> Builder:
    return lambda a, o: lambda x: [fn(x[0], x[1])]


def _ints(t: Any) -> list[int]:
    return [int(v) for v in (t.tolist() if hasattr(t, "tolist") else t)]


def _axes(a: dict[str, Any], x: Sequence[Any], index: int) -> list[int] | None:
    if len(x) > index and x[index] is not None:
        return _ints(x[index])
    return a.get("axes")


def _div(x: Any, y: Any) -> Any:
    if x.dtype.is_floating_point:
        return x / y
    return torch.div(x, y, rounding_mode="trunc")


def _mod(a: dict[str, Any], o: int) -> OpFn:
    fmod = a.get("fmod", 0)
    return lambda x: [torch.fmod(x[0], x[1]) if fmod else torch.remainder(x[0], x[1])]


def _pads(a: dict[str, Any], rank: int) -> list[int]:
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise _UnsupportedError(f"auto_pad={a['auto_pad']} is not supported (use explicit pads)")
    pads = a.get("pads") or [0] * (2 * rank)
    if a.get("auto_pad") == "VALID":
        pads = [0] * (2 * rank)
    return pads


def _pad_input(x: Any, pads: list[int], value: float = 0.0) -> tuple[Any, list[int]]:
    """Symmetric pads go to the torch op; asymmetric ones are applied with F.pad first."""
    rank = len(pads) // 2
    begin, end = pads[:rank], pads[rank:]
    if begin == end:
        return x, begin
    torch_pads: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        torch_pads += [b, e]
    return F.pad(x, torch_pads, value=value), [0] * rank


def _conv(a: dict[str, Any], o: int) -> OpFn:
    fns = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
    a.get("auto_pad") and _pads(a, 1)  # reject SAME_* early

    def run(x: Sequence[Any]) -> list[Any]:
        rank = x[1].dim() - 2
        if rank not in fns:
            raise _UnsupportedError(f"{rank}-D convolution")
        inp, pads = _pad_input(x[0], _pads(a, rank))
        weight = x[1]
        if FAST_PATHS and rank == 2:
            inp = inp.contiguous(memory_format=torch.channels_last)
            weight = weight.contiguous(memory_format=torch.channels_last)
        bias = x[2] if len(x) > 2 else None
        return [fns[rank](inp, weight, bias, a.get("strides", [1] * rank), pads, a.get("dilations", [1] * rank), a.get("group", 1))]

    return run


def _pool(kind: str) -> Builder:
    def build(a: dict[str, Any], o: int) -> OpFn:
        kernel = a["kernel_shape"]
        rank = len(kernel)
        if rank not in (1, 2, 3):
            raise _UnsupportedError(f"{rank}-D pooling")
        if kind == "max" and (a.get("storage_order", 0) or any(d != 1 for d in a.get("dilations", [1]))):
            raise _UnsupportedError("dilations/storage_order are not supported")
        pads = _pads(a, rank)
        strides = a.get("strides", [1] * rank)
        ceil = bool(a.get("ceil_mode", 0))
        fn = {"max": (F.max_pool1d, F.max_pool2d, F.max_pool3d), "avg": (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)}

        def run(x: Sequence[Any]) -> list[Any]:
            if kind == "max":
                inp, p = _pad_input(x[0], pads, -math.inf)
                return [fn["max"][rank - 1](inp, kernel, strides, p, 1, ceil)]
            include = bool(a.get("count_include_pad", 0))
            inp, p = x[0], pads[:rank]
            if pads[:rank] != pads[rank:] or (not include and any(pads)):
                if include:
                    inp, p = _pad_input(x[0], pads)
                else:
                    raise _UnsupportedError("AveragePool with asymmetric pads and count_include_pad=0")
            return [fn["avg"][rank - 1](inp, kernel, strides, p, ceil, include)]

        return run

    return build


def _gemm(a: dict[str, Any], o: int) -> OpFn:
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)

    def run(x: Sequence[Any]) -> list[Any]:
        m = x[0].T if a.get("transA", 0) else x[0]
        w = x[1].T if a.get("transB", 0) else x[1]
        y = alpha * (m @ w)
        if len(x) > 2 and x[2] is not None:
            y = y + beta * x[2]
        return [y]

    return run


def _batchnorm(a: dict[str, Any], o: int) -> OpFn:
    if a.get("training_mode", 0):
        raise _UnsupportedError("training_mode=1 is not supported")
    eps = a.get("epsilon", 1e-5)

    def run(x: Sequence[Any]) -> list[Any]:
        shape = [1, -1] + [1] * (x[0].dim() - 2)
        scale = x[1] / torch.sqrt(x[4] + eps)
        return [(x[0] - x[3].reshape(shape)) * scale.reshape(shape) + x[2].reshape(shape)]

    return run


def _layernorm(a: dict[str, Any], o: int) -> OpFn:
    axis, eps = a.get("axis", -1), a.get("epsilon", 1e-5)

    def run(x: Sequence[Any]) -> list[Any]:
        dims = tuple(range(axis % x[0].dim(), x[0].dim()))
        mean = x[0].mean(dim=dims, keepdim=True)
        var = ((x[0] - mean) ** 2).mean(dim=dims, keepdim=True)
        y = (x[0] - mean) / torch.sqrt(var + eps) * x[1]
        return [y + x[2] if len(x) > 2 and x[2] is not None else y]

    return run


def _softmax(log: bool) -> Builder:
    def build(a: dict[str, Any], o: int) -> OpFn:
        axis = a.get("axis", -1 if o >= 13 else 1)
        fn = torch.log_softmax if log else torch.softmax

        def run(x: Sequence[Any]) -> list[Any]:
            if o >= 13:
                return [fn(x[0], dim=axis)]
            flat = x[0].reshape(int(np.prod(x[0].shape[: axis % x[0].dim()])), -1)
            return [fn(flat, dim=1).reshape(x[0].shape)]

        return run

    return build


def _reduce(fn: Callable[..., Any]) -> Builder:
    def build(a: dict[str, Any], o: int) -> OpFn:
        keep = bool(a.get("keepdims", 1))

        def run(x: Sequence[Any]) -> list[Any]:
            axes = _axes(a, x, 1)
            if not axes:
                if a.get("noop_with_empty_axes", 0):
                    return [x[0]]
                axes = list(range(x[0].dim()))
            return [fn(x[0], dim=tuple(axes), keepdim=keep)]

        return run

    return build


def _reshape(a: dict[str, Any], o: int) -> OpFn:
    def run(x: Sequence[Any]) -> list[Any]:
        shape = _ints(x[1])
        if not a.get("allowzero", 0):
            shape = [x[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return [x[0].reshape(shape)]

    return run


def _flatten(a: dict[str, Any], o: int) -> OpFn:
    axis = a.get("axis", 1)
    # axis may equal the rank (ONNX allows [-r, r]): everything goes to the outer dimension
    return lambda x: [x[0].reshape(int(np.prod(x[0].shape[: axis if axis >= 0 else axis + x[0].dim()])), -1)]


def _squeeze(a: dict[str, Any], o: int) -> OpFn:
    def run(x: Sequence[Any]) -> list[Any]:
        axes = _axes(a, x, 1)
        return [x[0].squeeze() if axes is None else x[0].squeeze(tuple(v % x[0].dim() for v in axes))]

    return run


def _unsqueeze(a: dict[str, Any], o: int) -> OpFn:
    def run(x: Sequence[Any]) -> list[Any]:
        y = x[0]
        axes = _axes(a, x, 1) or []
        rank = y.dim() + len(axes)
        for ax in sorted(v % rank for v in axes):
            y = y.unsqueeze(ax)
        return [y]

    return run


def _slice(a: dict[str, Any], o: int) -> OpFn:
    def run(x: Sequence[Any]) -> list[Any]:
        starts, ends = _ints(x[1]), _ints(x[2])
        axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
        steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
        y = x[0]
        index: list[Any] = [slice(None)] * y.dim()
        for s, e, ax, st in zip(starts, ends, axes, steps, strict=True):
            if st == 0:
                raise _UnsupportedError("a zero step is not allowed")
            n = y.shape[ax]
            if st > 0:
                index[ax % y.dim()] = slice(s, min(e, n), st)
                continue
            # negative step (torch slices cannot): ONNX's clamping, then the positions gathered
            s, e = s + n if s < 0 else s, e + n if e < 0 else e
            positions = torch.arange(min(max(s, 0), n - 1), min(max(e, -1), n - 1), st)
            y = torch.index_select(y, ax % y.dim(), positions)
        return [y[tuple(index)]]

    return run


def _gather(a: dict[str, Any], o: int) -> OpFn:
    axis = a.get("axis", 0)

    def run(x: Sequence[Any]) -> list[Any]:
        idx = x[1].long()
        idx = torch.where(idx < 0, idx + x[0].shape[axis], idx)
        out = torch.index_select(x[0], axis, idx.reshape(-1))
        shape = list(x[0].shape[:axis % x[0].dim()]) + list(idx.shape) + list(x[0].shape[axis % x[0].dim() + 1 :])
        return [out.reshape(shape)]

    return run


def _gather_elements(a: dict[str, Any], o: int) -> OpFn:
    axis = a.get("axis", 0)
    return lambda x: [torch.gather(x[0], axis, torch.where(x[1] < 0, x[1] + x[0].shape[axis], x[1]).long())]


def _cast(a: dict[str, Any], o: int) -> OpFn:
    dtype = torch_dtype(ir.DataType(a["to"]))
    return lambda x: [x[0].to(dtype)]


def _constant(a: dict[str, Any], o: int) -> OpFn:
    if "value" in a:
        value = a["value"]
    elif "value_float" in a or "value_floats" in a:
        value = torch.tensor(a.get("value_float", a.get("value_floats")), dtype=torch.float32)
    elif "value_int" in a or "value_ints" in a:
        value = torch.tensor(a.get("value_int", a.get("value_ints")), dtype=torch.int64)
    else:
        raise _UnsupportedError(f"Constant attribute {sorted(a)} is not supported")
    return lambda x: [value]


def _split(a: dict[str, Any], o: int) -> OpFn:
    axis = a.get("axis", 0)

    def run(x: Sequence[Any]) -> list[Any]:
        sizes = _ints(x[1]) if len(x) > 1 and x[1] is not None else a.get("split")
        if sizes is None:
            n = a.get("num_outputs")
            if n is None:
                raise _UnsupportedError("Split without sizes or num_outputs")
            sizes = math.ceil(x[0].shape[axis] / n)
        return list(torch.split(x[0], sizes, dim=axis))

    return run


def _as_scalar(bound: Any) -> Any:
    """A one-element bound that needs no gradient as a Python number; anything else as it is."""
    if isinstance(bound, torch.Tensor) and bound.numel() == 1 and not bound.requires_grad:
        return bound.item()
    return bound


def _clip(a: dict[str, Any], o: int) -> OpFn:
    def run(x: Sequence[Any]) -> list[Any]:
        lo = x[1] if len(x) > 1 and x[1] is not None else a.get("min")
        hi = x[2] if len(x) > 2 and x[2] is not None else a.get("max")
        if FAST_PATHS:
            scalars = _as_scalar(lo), _as_scalar(hi)
            if not any(isinstance(b, torch.Tensor) for b in scalars):  # clamp takes two numbers or two tensors
                lo, hi = scalars
        return [torch.clamp(x[0], lo, hi)]

    return run


def _gelu(a: dict[str, Any], o: int) -> OpFn:
    approx = a.get("approximate", "none")
    return lambda x: [F.gelu(x[0], approximate=approx)]


def _constant_of_shape(a: dict[str, Any], o: int) -> OpFn:
    value = a["value"].reshape(()) if "value" in a else torch.zeros((), dtype=torch.float32)
    return lambda x: [torch.full(_ints(x[0]), value.item(), dtype=value.dtype)]


def _pad_index(n: int, begin: int, end: int, mode: str) -> Any:
    """Source positions of an axis of length ``n`` padded by ``begin``/``end`` (>= 0) in ``mode``."""
    i = torch.arange(-begin, n + end)
    if mode == "edge":
        return i.clamp(0, n - 1)
    if mode == "wrap":
        return i.remainder(n)
    if n == 1:  # reflect of one element: ONNX repeats it
        return torch.zeros_like(i)
    i = i.remainder(2 * n - 2)
    return torch.where(i >= n, 2 * n - 2 - i, i)


def _pad(a: dict[str, Any], o: int) -> OpFn:
    """Pad (opset 11+ inputs: pads, constant_value, axes; opset 2: attributes); negative pads crop.

    Constant padding is F.pad; reflect, edge and wrap gather source positions axis by axis
    (F.pad's other modes take only the last 1-3 axes of a batched tensor).
    """
    mode = a.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise _UnsupportedError(f"mode={mode!r} is not supported")

    def run(x: Sequence[Any]) -> list[Any]:
        y, rank = x[0], x[0].dim()
        pads = _ints(x[1]) if len(x) > 1 and x[1] is not None else list(a.get("pads", [0] * 2 * rank))
        value = x[2] if len(x) > 2 and x[2] is not None else a.get("value", 0.0)
        value = float(value.reshape(()).item()) if isinstance(value, torch.Tensor) else float(value)
        axes = [ax % rank for ax in _ints(x[3])] if len(x) > 3 and x[3] is not None else list(range(rank))
        if mode == "constant":
            torch_pads = [0] * (2 * rank)
            for i, ax in enumerate(axes):
                torch_pads[2 * (rank - 1 - ax)], torch_pads[2 * (rank - 1 - ax) + 1] = pads[i], pads[i + len(axes)]
            return [F.pad(y, torch_pads, value=value)]
        for i, ax in enumerate(axes):
            begin, end = pads[i], pads[i + len(axes)]
            y = y.narrow(ax, max(-begin, 0), y.shape[ax] - max(-begin, 0) - max(-end, 0))  # crops first
            if begin > 0 or end > 0:
                y = torch.index_select(y, ax, _pad_index(y.shape[ax], max(begin, 0), max(end, 0), mode))
        return [y]

    return run


def _cumsum(a: dict[str, Any], o: int) -> OpFn:
    """CumSum along the axis given as an input; ``exclusive`` shifts by one, ``reverse`` runs from the end."""
    def run(x: Sequence[Any]) -> list[Any]:
        v, axis = x[0], int(x[1].item())
        if a.get("reverse", 0):
            v = v.flip(axis)
        out = torch.cumsum(v, dim=axis)
        if a.get("exclusive", 0):  # shifted rather than out - v: exact for floats too
            out = torch.cat([torch.zeros_like(v.narrow(axis, 0, 1)), out.narrow(axis, 0, v.shape[axis] - 1)], dim=axis)
        return [out.flip(axis) if a.get("reverse", 0) else out]
    return run


OPS: dict[str, Builder] = {
    "Identity": _unary(lambda v: v),
    "Dropout": lambda a, o: lambda x: [x[0]],
    "Relu": _unary(torch.relu),
    "LeakyRelu": lambda a, o: lambda x: [F.leaky_relu(x[0], a.get("alpha", 0.01))],
    "Sigmoid": _unary(torch.sigmoid),
    "HardSigmoid": lambda a, o: lambda x: [torch.clamp(a.get("alpha", 0.2) * x[0] + a.get("beta", 0.5), 0, 1)],
    "HardSwish": _unary(F.hardswish),
    "Tanh": _unary(torch.tanh),
    "Erf": _unary(torch.erf),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Sqrt": _unary(torch.sqrt),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Reciprocal": _unary(torch.reciprocal),
    "Gelu": _gelu,
    "Clip": _clip,
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(_div),
    "Pow": _binary(torch.pow),
    "Mod": _mod,
    "Max": lambda a, o: lambda x: [torch.stack(torch.broadcast_tensors(*x)).amax(0)],
    "Min": lambda a, o: lambda x: [torch.stack(torch.broadcast_tensors(*x)).amin(0)],
    "Where": lambda a, o: lambda x: [torch.where(x[0].bool(), x[1], x[2])],
    "MatMul": _binary(torch.matmul),
    "Gemm": _gemm,
    "Conv": _conv,
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda a, o: lambda x: [x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True)],
    "GlobalMaxPool": lambda a, o: lambda x: [x[0].amax(dim=tuple(range(2, x[0].dim())), keepdim=True)],
    "BatchNormalization": _batchnorm,
    "LayerNormalization": _layernorm,
    "Softmax": _softmax(False),
    "LogSoftmax": _softmax(True),
    "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(torch.amax),
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Transpose": lambda a, o: lambda x: [x[0].permute(a["perm"]) if "perm" in a else x[0].permute(*reversed(range(x[0].dim())))],
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Concat": lambda a, o: lambda x: [torch.cat([v for v in x if v is not None], dim=a["axis"])],
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "GatherElements": _gather_elements,
    "Cast": _cast,
    "Shape": lambda a, o: lambda x: [torch.tensor(x[0].shape[a.get("start", 0) : a.get("end")], dtype=torch.int64)],
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "CumSum": _cumsum,
    "Pad": _pad,
    "Range": lambda a, o: lambda x: [torch.arange(x[0].item(), x[1].item(), x[2].item(), dtype=x[0].dtype)],
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "Not": _unary(torch.logical_not),
    "IsNaN": _unary(torch.isnan),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Expand": lambda a, o: lambda x: [x[0] * torch.ones(_ints(x[1]), dtype=x[0].dtype)],
}
