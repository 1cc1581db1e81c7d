"""Which nodes have a kernel in an onnxruntime execution provider of the installed build.

onnxruntime exposes its kernel registry (every registered kernel: op, domain, provider, the
opset range it implements and its type constraints) as
``onnxruntime.capi._pybind_state.get_all_opkernel_def()``; only the providers compiled into the
installed build are listed. A node is supported when some kernel of the provider has its op
and domain, covers the version of the op's schema at the model's opset, and allows the known
dtype of every input typed by a type variable (contrib ops, which onnx has no schema for, are
checked by op and version only). onnxruntime may still fuse or rewrite a node at load time; this is
the check a deployment engineer runs before shipping to a runtime with fewer kernels.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any

import onnx
import onnx_ir as ir

from onnxopt.errors import ProviderError
from onnxopt.runtime import sessions as runtime

__all__ = ["KernelSupport", "has_kernel", "kernel_support", "registry_providers"]

_DEFAULT_DOMAINS = ("", "ai.onnx")
# onnxruntime turns these into initializers when it loads the model; they need no kernel.
_NO_KERNEL_NEEDED = frozenset({"Constant"})
_HALF = frozenset({"tensor(float16)", "tensor(bfloat16)"})
_FP32 = "tensor(float)"
# onnxruntime registers a kernel without an end version with this end version.
_OPEN_END = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class _Kernel:
    low: int
    high: int
    types: dict[str, frozenset[str]]  # type variable -> allowed types

    def covers(self, version: int) -> bool:
        """Return True if this kernel serves a node whose schema starts at ``version``.

        As onnxruntime's lookup (``KernelRegistry::VerifyKernelDef``): a kernel without an end
        version matches only the version it starts at (a later schema version may change the
        op); a closed range matches every version inside it.
        """
        return self.low == version or (self.low < version <= self.high and self.high != _OPEN_END)

    def span(self) -> str:
        """Return the versions this kernel serves as text: ``13-18``, or ``25 only`` if open-ended."""
        return f"{self.low} only" if self.high == _OPEN_END else f"{self.low}-{self.high}"

    def allows(self, typed_inputs: list[tuple[str, str]]) -> bool:
        """Return True if every (type variable, dtype) pair is allowed (unknown variables pass)."""
        return all(var not in self.types or t in self.types[var] for var, t in typed_inputs)


@functools.lru_cache(maxsize=1)
def _registry() -> dict[tuple[str, str, str], list[_Kernel]]:
    """Read (provider, domain, op) -> kernels once from onnxruntime."""
    from onnxruntime.capi import _pybind_state

    table: dict[tuple[str, str, str], list[_Kernel]] = collections.defaultdict(list)
    for k in _pybind_state.get_all_opkernel_def():
        domain = "" if k.domain in _DEFAULT_DOMAINS else k.domain
        types = {var: frozenset(allowed) for var, allowed in k.type_constraints.items()}
        table[(k.provider, domain, k.op_name)].append(_Kernel(k.version_range[0], k.version_range[1], types))
    return dict(table)


def registry_providers() -> list[str]:
    """List the providers whose kernels the installed onnxruntime build registers."""
    return sorted({key[0] for key in _registry()})


def has_kernel(op_type: str, version: int, provider: str = "CPUExecutionProvider", domain: str = "") -> bool:
    """Return True if ``provider`` registers a kernel for ``op_type`` at schema ``version``.

    As onnxruntime's own lookup: a kernel without an end version (``2**31 - 1``) matches only
    the version it starts at; a closed range matches every version inside it.
    """
    domain = "" if domain in _DEFAULT_DOMAINS else domain
    return any(k.covers(version) for k in _registry().get((provider, domain, op_type), []))


@dataclasses.dataclass
class KernelSupport:
    """Result of :func:`kernel_support` for one provider."""

    provider: str
    checked: bool  # False: the provider is not in this onnxruntime build, nothing was checked
    nodes: int = 0
    unsupported: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # CPU only: float16/bfloat16 nodes without a half kernel; onnxruntime inserts Casts to float32.
    cast_fallback: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def all_supported(self) -> bool | None:
        """True/False when checked; None when the provider is not in this build."""
        return (not self.unsupported) if self.checked else None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (the ``ep_support`` entries of ``inspect --json``)."""
        return {
            "provider": self.provider,
            "checked": self.checked,
            "all_supported": self.all_supported,
            "nodes": self.nodes,
            "unsupported": self.unsupported,
            "cast_fallback": self.cast_fallback,
        }


def _schema(op_type: str, domain: str, opset: int) -> onnx.defs.OpSchema | None:
    """Return the op's schema at ``opset``, or None where onnx lacks it (contrib/custom ops)."""
    try:
        return onnx.defs.get_schema(op_type, opset, domain)
    except onnx.defs.SchemaError:
        return None


def _typed_inputs(node: ir.Node, schema: onnx.defs.OpSchema | None) -> list[tuple[str, str]]:
    """(type variable, dtype) for each input whose dtype is known and whose schema type is a variable."""
    if schema is None or not schema.inputs:
        return []
    out = []
    for i, value in enumerate(node.inputs):
        t = _onnx_type(value.dtype) if value is not None else None
        if t is None:
            continue
        formal = schema.inputs[min(i, len(schema.inputs) - 1)]
        out.append((formal.type_str, t))
    return out


def _onnx_type(dtype: ir.DataType | None) -> str | None:
    if dtype is None:
        return None
    names = {
        ir.DataType.FLOAT: "tensor(float)", ir.DataType.FLOAT16: "tensor(float16)",
        ir.DataType.BFLOAT16: "tensor(bfloat16)", ir.DataType.DOUBLE: "tensor(double)",
        ir.DataType.INT8: "tensor(int8)", ir.DataType.UINT8: "tensor(uint8)",
        ir.DataType.INT16: "tensor(int16)", ir.DataType.UINT16: "tensor(uint16)",
        ir.DataType.INT32: "tensor(int32)", ir.DataType.UINT32: "tensor(uint32)",
        ir.DataType.INT64: "tensor(int64)", ir.DataType.UINT64: "tensor(uint64)",
        ir.DataType.BOOL: "tensor(bool)", ir.DataType.STRING: "tensor(string)",
        ir.DataType.INT4: "tensor(int4)", ir.DataType.UINT4: "tensor(uint4)",
    }
    return names.get(dtype)


def kernel_support(model: ir.Model, provider: str = "cpu") -> KernelSupport:
    """Check every node of ``model`` (main graph and subgraphs) against ``provider``'s kernels.

    Args:
        model: the model.
        provider: a provider name or short alias (cpu, cuda, ...).

    Raises:
        ProviderError: ``provider`` is not an execution provider name.

    Returns:
        The nodes without a kernel, grouped by (domain, op, version, dtypes) with a count
        and a reason.
    """
    full = runtime.PROVIDER_ALIASES.get(provider.lower(), provider)
    if not full.endswith("ExecutionProvider"):
        raise ProviderError(f"unknown execution provider {provider!r}; use one of {', '.join(runtime.PROVIDER_ALIASES)}")
    if full not in registry_providers():
        return KernelSupport(full, checked=False)
    registry = _registry()
    opsets = dict(model.opset_imports)
    missing: collections.Counter[tuple[str, str, int, tuple[str, ...], str]] = collections.Counter()
    examples: dict[tuple, str] = {}
    fallback: collections.Counter[tuple[str, str, int, tuple[str, ...]]] = collections.Counter()
    total = 0
    for node in model.graph.all_nodes():
        total += 1
        domain = "" if node.domain in _DEFAULT_DOMAINS else node.domain
        opset = opsets.get(domain, opsets.get("ai.onnx", 1) if domain == "" else 1)
        schema = _schema(node.op_type, domain, opset)
        version = schema.since_version if schema is not None else opset
        typed = _typed_inputs(node, schema)
        dtypes = tuple(sorted({t for _, t in typed}))
        if domain == "" and node.op_type in _NO_KERNEL_NEEDED:
            continue
        kernels = registry.get((full, domain, node.op_type), [])
        reason = ""
        if not kernels:
            reason = "no kernel for this op"
        else:
            in_range = [k for k in kernels if k.covers(version)]
            if not in_range:
                spans = {(k.low, k.span()) for k in kernels}
                ranges = ", ".join(span for _, span in sorted(spans))
                reason = f"no kernel for opset version {version} (kernels cover {ranges})"
            elif typed and not any(k.allows(typed) for k in in_range):
                as_fp32 = [(var, _FP32 if t in _HALF else t) for var, t in typed]
                if full == "CPUExecutionProvider" and any(k.allows(as_fp32) for k in in_range):
                    fallback[(domain or "ai.onnx", node.op_type, version, dtypes)] += 1
                    continue
                reason = f"no kernel for input types {', '.join(dtypes)}"
        if reason:
            key = (domain or "ai.onnx", node.op_type, version, dtypes, reason)
            missing[key] += 1
            examples.setdefault(key, node.name or "")
    unsupported = [
        {"domain": d, "op_type": op, "version": v, "input_types": list(t), "reason": r, "count": n,
         "example_node": examples[(d, op, v, t, r)]}
        for (d, op, v, t, r), n in sorted(missing.items())
    ]
    cast_fallback = [
        {"domain": d, "op_type": op, "version": v, "input_types": list(t), "count": n}
        for (d, op, v, t), n in sorted(fallback.items())
    ]
    return KernelSupport(full, checked=True, nodes=total, unsupported=unsupported, cast_fallback=cast_fallback)
