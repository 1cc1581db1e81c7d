"""environment: CPU model, ISA flags and cores as reports record them; the integer kernel path."""

from __future__ import annotations

import json

from onnxopt.runtime import environment
from onnxopt.runtime.environment import CpuInfo

X86_VNNI = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse4_1 sse4_2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni avx512_bf16 xsave

processor\t: 1
model name\t: AMD EPYC 9R14
flags\t\t: fpu
"""
X86_AVX2 = """processor\t: 0
model name\t: Intel(R) Xeon(R) CPU E5-2673 v4 @ 2.30GHz
flags\t\t: fpu sse4_1 sse4_2 avx avx2 fma f16c
"""
ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp i8mm bf16 sve
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""


def _cpu(text: str, arch: str) -> CpuInfo:
    model, flags = environment._from_proc(text, arch)
    order = {f: i for i, f in enumerate((*environment._X86_FLAGS, *environment._ARM_FLAGS))}
    kept = tuple(sorted(flags & set(order), key=order.__getitem__))
    return CpuInfo(model, arch, 2, kept, bool(flags), "/proc/cpuinfo")


def test_proc_cpuinfo_is_read_per_architecture():
    vnni = _cpu(X86_VNNI, "x86_64")
    assert vnni.model == "AMD EPYC 9R14"  # first processor only
    assert vnni.flags == ("sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw",
                          "avx512vl", "avx512_vnni", "avx512_bf16")
    assert not vnni.int8_dot_saturates and "VNNI" in vnni.int8_dot
    avx2 = _cpu(X86_AVX2, "x86_64")
    assert avx2.int8_dot_saturates and "vpmaddubsw" in avx2.int8_dot
    arm = _cpu(ARM, "aarch64")
    assert arm.flags == ("asimd", "asimdhp", "asimddp", "i8mm", "bf16", "sve")
    assert arm.model == "ARM CPU implementer 0x41 part 0xd40" and not arm.int8_dot_saturates
    unknown = CpuInfo("x86", "AMD64", 4, (), False, "platform")
    assert unknown.int8_dot_saturates and "flags unknown" in unknown.describe()  # the safe assumption


def test_environment_is_cached_and_json_ready():
    env = environment.environment()
    assert environment.environment() is env and environment.cpu_info() is environment.cpu_info()
    assert json.loads(json.dumps(env)) == env
    assert env["cpu"]["cores"] >= 1 and env["versions"]["onnxruntime"] and env["versions"]["numpy"]
    assert "CPUExecutionProvider" in env["onnxruntime_providers"]
    line = environment.summary()
    assert environment.cpu_info().model in line and f"onnxruntime {env['versions']['onnxruntime']}" in line
