from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from onnxopt.config import describe, from_dict, option, parse_options


@dataclasses.dataclass(frozen=True)
class Cfg:
    rank_ratio: float = option(0.25, "kept fraction")
    min_elements: int = option(4096, "smallest weight")
    per_channel: bool = option(True, "per channel")
    method: Literal["minmax", "entropy"] = option("minmax", "calibration")
    ops: frozenset[str] = option(factory=frozenset, help="op types")
    limit: int | None = option(None, "optional")

    def __post_init__(self) -> None:
        if not 0.0 < self.rank_ratio <= 1.0:
            raise ValueError(f"rank_ratio must be in (0, 1], got {self.rank_ratio}")


def test_strings_are_converted_to_field_types():
    cfg = from_dict(
        Cfg,
        {"rank_ratio": "0.5", "min_elements": "10", "per_channel": "false", "method": "entropy",
         "ops": "[MatMul,Gemm]", "limit": "none"},
    )
    assert cfg == Cfg(0.5, 10, False, "entropy", frozenset({"MatMul", "Gemm"}), None)


def test_unknown_key_lists_valid_options():
    with pytest.raises(ValueError) as err:
        from_dict(Cfg, {"rank_ration": 0.5}, owner="lowrank")
    assert str(err.value) == (
        "unknown option 'rank_ration' for lowrank; valid: rank_ratio, min_elements, per_channel, "
        "method, ops, limit"
    )


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"min_elements": "ten"}, "expected an integer"),
        ({"min_elements": 1.5}, "expected an integer"),
        ({"per_channel": "maybe"}, "expected true/false"),
        ({"method": "kl"}, "expected one of 'minmax', 'entropy'"),
        ({"rank_ratio": "2"}, "rank_ratio must be in (0, 1]"),
    ],
)
def test_bad_values_are_rejected(values, needle):
    with pytest.raises(ValueError, match=None) as err:
        from_dict(Cfg, values)
    assert needle in str(err.value)


def test_parse_options_keeps_brackets_together():
    assert parse_options("clusters=16,ops=[Conv,Gemm],pack=true") == {
        "clusters": "16", "ops": "[Conv,Gemm]", "pack": "true"}
    with pytest.raises(ValueError, match="expected key=value"):
        parse_options("clusters")


def test_describe_lists_defaults_and_help():
    rows = {r["name"]: r for r in describe(Cfg)}
    assert rows["rank_ratio"]["default"] == "0.25" and rows["rank_ratio"]["help"] == "kept fraction"
