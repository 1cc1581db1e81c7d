"""The machine and library versions a result was measured on: CPU model, ISA flags, cores, versions.

Quantized models and every measured figure (latency, the reduce_range check, fidelity through
integer kernels) depend on the CPU's instruction set: onnxruntime's u8 x s8 kernels add product
pairs in int16 and saturate on x86 without VNNI, and are exact with VNNI, AMX or on ARM. Reports
record :func:`environment` so a number can be traced to the machine that produced it.

Sources: ``/proc/cpuinfo`` on Linux (x86 ``flags``, ARM ``Features``), ``sysctl`` on macOS,
``IsProcessorFeaturePresent`` on Windows; ``platform`` where nothing else answers (flags unknown).
Everything is read once per process.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import logging
import os
import pathlib
import platform
import subprocess
import sys
from typing import Any

__all__ = ["CpuInfo", "cpu_info", "environment", "summary"]

logger = logging.getLogger(__name__)

# Flags that matter to onnxruntime's CPU kernels, in the order they are listed.
_X86_FLAGS = (
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c",
    "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx_vnni_int8",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "amx_fp16",
)
_ARM_FLAGS = ("asimd", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2", "sme")
_X86_MACHINES = ("x86_64", "amd64", "i386", "i686", "x86")
_ARM_MACHINES = ("aarch64", "arm64", "armv8l", "armv7l")
# macOS: sysctl names -> the Linux flag names used here.
_MAC_ARM = {
    "hw.optional.neon": "asimd", "hw.optional.arm.FEAT_FP16": "asimdhp",
    "hw.optional.arm.FEAT_DotProd": "asimddp", "hw.optional.arm.FEAT_I8MM": "i8mm",
    "hw.optional.arm.FEAT_BF16": "bf16", "hw.optional.arm.FEAT_SME": "sme",
}
_MAC_X86 = {"AVX1.0": "avx", "AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "SSE4.1": "sse4_1",
            "SSE4.2": "sse4_2", "AVX512F": "avx512f", "AVX512BW": "avx512bw", "AVX512VL": "avx512vl",
            "AVX512VNNI": "avx512_vnni"}
# Windows IsProcessorFeaturePresent constants (winnt.h).
_WIN_FEATURES = {
    "sse4_1": 37, "sse4_2": 38, "avx": 39, "avx2": 40, "avx512f": 41,
    "asimd": 19, "asimddp": 43,
}


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    """What the CPU offers onnxruntime.

    Attributes:
        model: the CPU's name (``model name`` in /proc/cpuinfo, the brand string on macOS).
        arch: ``platform.machine()`` (x86_64, aarch64, arm64, AMD64).
        cores: logical CPUs this process may run on.
        flags: the ISA extensions onnxruntime's kernels use that this CPU has (Linux names:
            avx2, avx512_vnni, amx_int8, asimddp, i8mm, sve, ...).
        flags_known: False where the flags could not be read (then ``flags`` is empty).
        source: where the answer came from (/proc/cpuinfo, sysctl, IsProcessorFeaturePresent, platform).

    """

    model: str
    arch: str
    cores: int
    flags: tuple[str, ...]
    flags_known: bool
    source: str

    @property
    def is_x86(self) -> bool:
        """Whether the CPU is x86 (32 or 64 bit)."""
        return self.arch.lower() in _X86_MACHINES

    def _int8_path(self) -> tuple[str, bool]:
        flags = set(self.flags)
        if not self.is_x86:
            if self.arch.lower() in _ARM_MACHINES or flags & set(_ARM_FLAGS):
                return "ARM: int32 accumulation (sdot/udot/i8mm or 16-bit products), exact", False
            return f"{self.arch}: portable kernels, exact", False
        if "amx_int8" in flags:
            return "AMX: int32 accumulation, exact", False
        if flags & {"avx512_vnni", "avx_vnni"}:
            return "VNNI (vpdpbusd): int32 accumulation, exact", False
        if not self.flags_known:
            return "x86, flags unknown: assumed without VNNI (int16 pair sums saturate)", True
        if flags & {"avx2", "avx512bw"}:
            return "no VNNI (vpmaddubsw): u8 x s8 product pairs summed in int16, saturating", True
        return "x86 without AVX2: 16-bit products summed in int32, exact", False

    @property
    def int8_dot(self) -> str:
        """How onnxruntime's u8 x s8 kernels multiply-add on this CPU, in a few words."""
        return self._int8_path()[0]

    @property
    def int8_dot_saturates(self) -> bool:
        """Whether onnxruntime's u8 x s8 kernels saturate here (x86 without VNNI/AMX; unknown x86 flags)."""
        return self._int8_path()[1]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict, with the integer kernel path."""
        return {**dataclasses.asdict(self), "flags": list(self.flags), "int8_dot": self.int8_dot}

    def describe(self) -> str:
        """One line: ``AMD EPYC (x86_64, 2 cores; avx2 avx512f avx512_vnni)``."""
        flags = " ".join(self.flags) if self.flags_known else "flags unknown"
        return f"{self.model} ({self.arch}, {self.cores} cores; {flags or 'none of the listed flags'})"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _from_proc(text: str, arch: str) -> tuple[str, set[str]]:
    """Model name and flags from /proc/cpuinfo text (first processor; x86 ``flags``, ARM ``Features``)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # first processor only
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    model = fields.get("model name") or fields.get("hardware") or fields.get("processor") or ""
    if arch.lower() in _ARM_MACHINES and not fields.get("model name"):
        part = fields.get("cpu part")
        model = f"ARM CPU implementer {fields.get('cpu implementer', '?')} part {part}" if part else model
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    return model, flags


def _sysctl(name: str) -> str | None:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _from_macos(arch: str) -> tuple[str, set[str], bool]:
    model = _sysctl("machdep.cpu.brand_string") or platform.processor()
    flags: set[str] = set()
    if arch.lower() in _ARM_MACHINES:
        known = False
        for name, flag in _MAC_ARM.items():
            value = _sysctl(name)
            if value is not None:
                known = True
                if value == "1":
                    flags.add(flag)
        return model, flags, known
    words = " ".join(filter(None, (_sysctl("machdep.cpu.features"), _sysctl("machdep.cpu.leaf7_features")))).split()
    flags = {_MAC_X86[w] for w in words if w in _MAC_X86}
    return model, flags, bool(words)


def _from_windows() -> tuple[str, set[str], bool]:
    model = platform.processor()
    try:
        import ctypes

        present = ctypes.windll.kernel32.IsProcessorFeaturePresent  # type: ignore[attr-defined]
    except (ImportError, AttributeError, OSError):
        return model, set(), False
    return model, {flag for flag, code in _WIN_FEATURES.items() if present(code)}, True


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """Read the CPU's model, ISA flags and cores once (cached for the process)."""
    arch = platform.machine() or "unknown"
    wanted = set(_X86_FLAGS) | set(_ARM_FLAGS)
    model, flags, known, source = platform.processor() or arch, set(), False, "platform"
    if sys.platform.startswith("linux"):
        try:
            text = pathlib.Path("/proc/cpuinfo").read_text()
        except OSError as err:
            logger.debug("cannot read /proc/cpuinfo: %s", err)
        else:
            model, flags = _from_proc(text, arch)
            model = model or platform.processor() or arch
            known, source = bool(flags), "/proc/cpuinfo"
    elif sys.platform == "darwin":
        model, flags, known = _from_macos(arch)
        source = "sysctl"
    elif sys.platform == "win32":
        model, flags, known = _from_windows()
        source = "IsProcessorFeaturePresent" if known else "platform"
    order = {f: i for i, f in enumerate((*_X86_FLAGS, *_ARM_FLAGS))}
    kept = tuple(sorted(flags & wanted, key=order.__getitem__))
    return CpuInfo(model=model or arch, arch=arch, cores=_cores(), flags=kept, flags_known=known, source=source)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def environment() -> dict[str, Any]:
    """Return the CPU, OS, Python and library versions, for reports (cached for the process)."""
    versions = {name: _version(name) for name in ("onnxopt", "onnxruntime", "onnx", "onnx-ir", "numpy")}
    if versions["onnxruntime"] is None:  # onnxruntime-gpu, onnxruntime-openvino, ... builds
        try:
            import onnxruntime

            versions["onnxruntime"] = onnxruntime.__version__
        except ImportError:
            pass
    try:
        import onnxruntime

        providers = list(onnxruntime.get_available_providers())
    except ImportError:
        providers = []
    return {
        "cpu": cpu_info().to_json(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "onnxruntime_providers": providers,
    }


def summary() -> str:
    """One line for a README table or a log: CPU, its flags and cores, onnxruntime version, OS."""
    env = environment()
    return f"{cpu_info().describe()}, onnxruntime {env['versions']['onnxruntime']}, {platform.system()}"
