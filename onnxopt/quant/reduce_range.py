"""The reduce_range decision of static INT8 quantization: 8-bit or 7-bit weights.

x86 CPUs without VNNI run onnxruntime's u8 x s8 kernels with ``vpmaddubsw``, which adds pairs
of products in int16 and saturates; the QDQ graph's arithmetic does not. 7-bit weights
(``reduce_range``) avoid the saturation at the cost of a coarser weight grid. Which of the two
costs more depends on the model, so on such a CPU ``auto`` builds both and measures them
(:func:`reduced_is_closer`). Every decision is recorded with the CPU it was made on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt.outcome import Outcome
from onnxopt.quant import deploy_check, scales
from onnxopt.runtime import environment

__all__ = ["CHECK_FEEDS", "decide", "reduced_is_closer"]

logger = logging.getLogger(__name__)

CHECK_FEEDS = 2  # calibration feeds that decide reduce_range=auto
_REDUCED_NOTE = ("reduce_range on (7-bit weights): this CPU has no VNNI, and onnxruntime's u8s8 kernels "
                 "saturate without it; pass reduce_range=false for a VNNI or ARM deployment machine")
_FULL_NOTE = ("reduce_range off (8-bit weights): onnxruntime's u8s8 kernels are exact on this CPU ({how}); "
              "on an x86 CPU without VNNI they sum product pairs in int16 and saturate with 8-bit weights: "
              "pass reduce_range=true (or quantize there) for such a deployment machine")


def decide(
    setting: Literal["auto", "true", "false"], target: str, *, can_measure: bool, outcome: Outcome
) -> bool | None:
    """Decide 8- or 7-bit weights: the config's choice, or auto's; None where auto must measure.

    Every decision is recorded (a ``reduce_range`` record) with the CPU it was made on: its
    model, cores and ISA flags, and how onnxruntime's u8 x s8 kernels multiply-add there. None
    records nothing: :func:`reduced_is_closer` records the measurement.

    Args:
        setting: the config's ``reduce_range``.
        target: where the model will run (cpu, cuda, tensorrt).
        can_measure: whether calibration data is there to measure both choices with.
        outcome: receives the record and, for auto, a note.

    Returns:
        True for 7-bit weights, False for 8-bit ones, None where both must be built and
        measured (auto, target cpu, integer kernels that saturate here, data to measure with).

    """
    cpu = environment.cpu_info()
    seen = {"cpu": cpu.describe(), "int8_dot": cpu.int8_dot}
    if setting != "auto":
        chosen = setting == "true"
        outcome.record("reduce_range", reduce_range=chosen, how="set in the config", **seen)
        return chosen
    if target != "cpu":
        outcome.record("reduce_range", reduce_range=False, how=f"auto, target {target}", **seen)
        return False
    if not scales.int8_dot_saturates():
        outcome.record("reduce_range", reduce_range=False, how="auto: integer kernels do not saturate here", **seen)
        outcome.note(_FULL_NOTE.format(how=cpu.int8_dot))
        return False
    if not can_measure:  # nothing to measure with: the safe choice
        outcome.record("reduce_range", reduce_range=True, how="auto: saturating kernels, no data to measure", **seen)
        outcome.note(_REDUCED_NOTE)
        return True
    return None


def reduced_is_closer(
    float_model: ir.Model,
    full: ir.Model,
    reduced: ir.Model,
    feeds: Sequence[Mapping[str, np.ndarray]],
    outcome: Outcome,
) -> bool:
    """Whether 7-bit weights give outputs closer to FP32 than 8-bit ones, as onnxruntime deploys them.

    Both INT8 models run on ``feeds`` (the first :data:`CHECK_FEEDS` calibration feeds) with
    onnxruntime's optimisations on (the fused integer kernels) and are compared with FP32 by
    relative L2 over all outputs. The measurement and the CPU it ran on are recorded, and a
    note says which way it went.
    """
    ref = deploy_check.run_flat(float_model, feeds, "all")
    err_full = scales.relative_l2(ref, deploy_check.run_flat(full, feeds, "all"))
    err_reduced = scales.relative_l2(ref, deploy_check.run_flat(reduced, feeds, "all"))
    chosen = err_reduced < err_full
    cpu = environment.cpu_info()
    outcome.record("reduce_range", reduce_range=chosen, how="auto: measured through this CPU's integer kernels",
                   cpu=cpu.describe(), int8_dot=cpu.int8_dot, rel_l2_8bit_weights=round(err_full, 6),
                   rel_l2_7bit_weights=round(err_reduced, 6), feeds=len(feeds))
    verdict = "on (7-bit weights)" if chosen else "off (8-bit weights)"
    outcome.note(f"reduce_range {verdict}: this CPU lacks VNNI; as deployed, output error vs FP32 on a "
                 f"calibration feed is {err_full:.3g} relative L2 with 8-bit weights, {err_reduced:.3g} with 7-bit")
    return chosen
