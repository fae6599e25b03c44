"""Sparsity patterns: unstructured, or N:M (at most N nonzeros in every M consecutive inputs)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from peakc.errors import PeakcError

_NM = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class Pattern:
    """`n == m == 0` is unstructured; otherwise keep at most `n` of every `m` weights in a row.

    N:M follows the sparse tensor core convention (2:4 keeps 2 of 4), so its sparsity is
    1 − N/M and the pass's `sparsity` option applies to unstructured pruning only.
    """

    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"


def parse_pattern(text: str) -> Pattern:
    """'unstructured' or 'N:M' with 0 < N < M; raise PeakcError naming the option otherwise."""
    if text == "unstructured":
        return Pattern()
    match = _NM.match(text)
    if not match:
        raise PeakcError(
            f"pass 'prune': option 'pattern' expects unstructured or N:M, got '{text}'"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise PeakcError(f"pass 'prune': option 'pattern' needs 0 < N < M, got {n}:{m}")
    return Pattern(n, m)


def check_divides(pattern: Pattern, in_features: int, layer: str) -> None:
    """An N:M pattern must tile each row of the layer's weight exactly."""
    if pattern.structured and in_features % pattern.m:
        raise PeakcError(
            f"prune: pattern {pattern} does not divide layer {layer}'s input size {in_features}"
        )
