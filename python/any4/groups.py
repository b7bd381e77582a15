"""Group size of a quantized weight from K and its number of scale groups (shared by the gemm
entry points and the GPU packer, so neither imports the other)."""

from __future__ import annotations


def infer_group_size(K: int, n_groups: int) -> int:
    """Group size from K and the number of scale groups.

    K divisible by n_groups gives K / n_groups. Otherwise the last group is short and several
    multiples of 8 may fit (K=576 with 5 groups: 120, 128 or 136); the power of two among them
    is taken when there is exactly one, else pass ``group_size=`` explicitly.
    """
    if n_groups < 1:
        raise ValueError("scales must have at least one group")
    if K % n_groups == 0 and (K // n_groups) % 8 == 0:
        return K // n_groups
    candidates = [g for g in range(8, K + 8, 8) if -(-K // g) == n_groups]
    pow2 = [g for g in candidates if g & (g - 1) == 0]
    if len(candidates) == 1:
        return candidates[0]
    if len(pow2) == 1:
        return pow2[0]
    raise ValueError(
        f"cannot infer the group size from K={K} and {n_groups} scale groups; pass group_size="
    )
