"""The number formats: each one is a table entry, not a code path (SPEC §1).

A format is (bits, table, affine rule):
- ``table``: the fixed values (normalised domain), or ``None`` for a table learned per row by
  weighted k-means (the anyK formats).
- ``absmax``: scale = max|w| of the group and zero = 0 (the table lives in [-1, 1]); otherwise
  min-max affine: scale = (max - min) / (2^bits - 1), zero = min, table in [0, 2^bits - 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

# NormalFloat-4 (QLoRA): quantiles of N(0, 1) normalised to [-1, 1], with an exact zero.
NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

# FP4 e2m1: +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}, normalised by 6 (sorted; -0 and +0 both present).
FP4_TABLE = tuple(
    sorted(
        [-v / 6.0 for v in (0, 0.5, 1, 1.5, 2, 3, 4, 6)]
        + [v / 6.0 for v in (0, 0.5, 1, 1.5, 2, 3, 4, 6)]
    )
)


@dataclass(frozen=True)
class Format:
    name: str
    bits: int
    table: Optional[tuple]  # None: learned per row
    absmax: bool

    def __post_init__(self) -> None:
        # A custom Format reaches C++ code that reads 2^bits table entries: check it here.
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a format needs a name, got {self.name!r}")
        if isinstance(self.bits, bool) or self.bits not in (2, 3, 4):
            raise ValueError(f"format {self.name}: bits must be 2, 3 or 4, got {self.bits!r}")
        if self.table is not None:
            table = tuple(self.table)
            if len(table) != 1 << self.bits:
                raise ValueError(
                    f"format {self.name}: a {self.bits}-bit table needs {1 << self.bits} "
                    f"values, got {len(table)}"
                )
            try:
                values = tuple(float(v) for v in table)
            except (TypeError, ValueError) as e:
                raise TypeError(f"format {self.name}: table values must be real numbers") from e
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"format {self.name}: table values must be finite")
            object.__setattr__(self, "table", values)

    @property
    def levels(self) -> int:
        return 1 << self.bits

    @property
    def learned(self) -> bool:
        return self.table is None


FORMATS = {
    "int4": Format("int4", 4, tuple(float(i) for i in range(16)), False),
    "int3": Format("int3", 3, tuple(float(i) for i in range(8)), False),
    "int2": Format("int2", 2, tuple(float(i) for i in range(4)), False),
    "nf4": Format("nf4", 4, NF4_TABLE, True),
    "fp4": Format("fp4", 4, FP4_TABLE, True),
    "any4": Format("any4", 4, None, False),
    "any3": Format("any3", 3, None, False),
    "any2": Format("any2", 2, None, False),
}


def get_format(fmt: str | Format) -> Format:
    """Look a format up by name (case-insensitive); Format objects pass through."""
    if isinstance(fmt, Format):
        return fmt
    if not isinstance(fmt, str) or fmt.lower() not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    return FORMATS[fmt.lower()]
