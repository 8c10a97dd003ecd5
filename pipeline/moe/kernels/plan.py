"""`Plan`: where the routing prologue put every assignment, the layout the GEMMs read.

Legend: E experts, K experts per token, A = T*K slots (``a = t*K + k``), N = A rows sorted
by expert.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Plan(NamedTuple):
    counts_E: Tensor  # (E,) int32 rows of each expert
    offsets_E: Tensor  # (E,) int32 cumulative ends of the segments (torch._grouped_mm's offs)
    row_slot_N: Tensor  # (N,) int32 the slot t*K + k that sorted row r holds
    slot_row_A: Tensor  # (A,) int32 the sorted row that holds slot a
