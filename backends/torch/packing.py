"""Where the valid tokens of a padded batch go on the fast path (:mod:`.fast`).

The position-wise layers (projections, feed-forward network, add & norm, dropout) run on the
valid tokens only, as rows of a ``(tokens, hidden)`` matrix. Attention runs per group of
examples of similar length: the examples are sorted by length and split into groups, each
padded to its longest example only. A group's Q, K and V are gathered into a position-major
``(group length * group size, hidden)`` buffer, where head ``h`` of example ``j`` is the
``(length, head_size)`` matrix at column offset ``(j * heads + h) * head_size``: all heads of
the group are one ``(size * heads, length, head_size)`` strided view that the batched GEMMs
read in place. The packed rows are in the buffers' slot order. :func:`select` is the layout of
a sparse last layer, whose queries are only the positions the loss reads and ``<cls>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .model import MASK_VALUE

#: examples per attention group at least (fewer, larger groups cost less in per-op overhead)
MIN_GROUP_SIZE = 32
#: attention groups at most: 4 saves 30% of the attention's work on WikiText-2 (8: 36%), and
#: every group adds ~20 small operations per layer (on a loaded machine each parallel operation
#: can wait a scheduler time slice for a preempted thread)
MAX_GROUPS = 4


class Packing(NamedTuple):
    """Where the valid tokens of a padded ``(batch, length)`` batch are, for the packed path."""

    batch_size: int
    length: int
    #: per attention group: (number of examples, group length, first slot)
    groups: tuple[tuple[int, int, int], ...]
    #: per group, ``(examples, 1, 1, group length)``: 0 for valid keys, MASK_VALUE for padding
    key_masks: tuple[torch.Tensor, ...]
    #: the slot of every packed row (slots: the groups' position-major padded buffers, in turn)
    rows: torch.Tensor
    #: the packed row of every slot (a padded slot: row 0)
    sources: torch.Tensor
    #: ``example * length + position`` of every packed row (its place in the padded batch)
    padded_rows: torch.Tensor
    #: the position of every packed row
    positions: torch.Tensor
    #: the packed row of every example's first token
    cls_rows: torch.Tensor
    #: the examples, group by group (the first ``groups[0][0]`` form group 0, ...)
    order: torch.Tensor
    #: the row of the layer's input that every slot gathers (a padded slot: some valid row)
    gather: torch.Tensor
    #: the row of the layer's input of every packed row; None: row ``i`` is input row ``i``
    inputs: torch.Tensor | None = None

    @property
    def num_slots(self) -> int:
        return self.sources.shape[0]

    def row_of(self) -> torch.Tensor:
        """The packed row of every position ``example * length + position``; -1 where no row
        holds it (padding; with :func:`select`, positions not asked for)."""
        row_of = torch.full((self.batch_size * self.length,), -1, dtype=torch.int64,
                            device=self.rows.device)
        row_of[self.padded_rows] = torch.arange(self.rows.shape[0], device=self.rows.device)
        return row_of


def pack(valid_lens: torch.Tensor, batch_size: int, length: int) -> Packing:
    """The :class:`Packing` of a batch whose example ``i`` has ``valid_lens[i]`` (at least one)
    valid tokens (the number of attention groups: :data:`MAX_GROUPS` at most, of
    :data:`MIN_GROUP_SIZE` examples at least)."""
    device = valid_lens.device
    lens = valid_lens.reshape(-1).to(torch.int64).clamp_(1, length)
    order = torch.argsort(lens, descending=True, stable=True)
    num_groups = max(1, min(MAX_GROUPS, batch_size // MIN_GROUP_SIZE))
    bounds = [batch_size * g // num_groups for g in range(num_groups + 1)]
    group_lens = lens[order[bounds[:-1]]].tolist()  # each group's longest example
    groups, key_masks, valid_slots, slot_examples, offset = [], [], [], [], 0
    for g in range(num_groups):
        members = order[bounds[g]:bounds[g + 1]]
        size, n = len(members), max(1, group_lens[g])
        valid = torch.arange(n, device=device).unsqueeze(0) < lens[members].unsqueeze(1)
        key_mask = torch.zeros(valid.shape, dtype=torch.float32, device=device)
        key_masks.append(key_mask.masked_fill_(~valid, MASK_VALUE).view(size, 1, 1, n))
        valid_slots.append(valid.t().reshape(-1))           # slot l * size + j
        slot_examples.append(members.repeat(n))
        groups.append((size, n, offset))
        offset += size * n
    valid_slots, slot_examples = torch.cat(valid_slots), torch.cat(slot_examples)
    rows = torch.nonzero(valid_slots).reshape(-1)
    sources = torch.zeros(offset, dtype=torch.int64, device=device)
    sources[rows] = torch.arange(rows.shape[0], device=device)
    examples = slot_examples[rows]
    slot_positions = torch.cat([torch.arange(n, device=device).repeat_interleave(size)
                                for size, n, _ in groups])
    positions = slot_positions[rows]
    first_slots = torch.empty(batch_size, dtype=torch.int64, device=device)
    for g, (size, _, start) in enumerate(groups):  # position 0: the group's first slots
        first_slots[order[bounds[g]:bounds[g + 1]]] = torch.arange(start, start + size,
                                                                    device=device)
    return Packing(batch_size, length, tuple(groups), tuple(key_masks), rows, sources,
                   examples * length + positions, positions, sources[first_slots], order,
                   sources)


def select(packing: Packing, valid_lens: torch.Tensor, output_rows: torch.Tensor) -> Packing:
    """The layout of the queries that a last layer computes when only the encodings at
    ``output_rows`` (indices ``example * length + position``) and the ``<cls>`` tokens are
    read: the same attention groups, each padded to its example with the most such queries;
    its packed rows are those tokens (``inputs``: their rows among all of ``packing``'s)."""
    b, n = packing.batch_size, packing.length
    device = packing.rows.device
    lens = valid_lens.reshape(-1).to(torch.int64).clamp(1, n)
    need = torch.zeros(b * n, dtype=torch.bool, device=device)
    need[output_rows.reshape(-1).to(torch.int64)] = True
    need = need.view(b, n)
    need[:, 0] = True
    need &= torch.arange(n, device=device).unsqueeze(0) < lens.unsqueeze(1)
    counts = need.sum(1)
    group_of = torch.empty(b, dtype=torch.int64, device=device)
    local = torch.empty(b, dtype=torch.int64, device=device)
    groups, first, start = [], 0, 0
    for g, (size, _, _) in enumerate(packing.groups):
        members = packing.order[first:first + size]
        group_of[members] = g
        local[members] = torch.arange(size, device=device)
        m = int(counts[members].max())
        groups.append((size, m, start))
        first, start = first + size, start + size * m
    flat = torch.nonzero(need.reshape(-1)).reshape(-1)  # example by example, by position
    example, pos = torch.div(flat, n, rounding_mode="floor"), flat % n
    rank = (need.cumsum(1) - 1).reshape(-1)[flat]
    starts = torch.tensor([g[2] for g in groups], device=device)
    sizes = torch.tensor([g[0] for g in groups], device=device)
    slots = starts[group_of[example]] + rank * sizes[group_of[example]] + local[example]
    sources = torch.zeros(start, dtype=torch.int64, device=device)
    sources[slots] = torch.arange(flat.shape[0], device=device)
    inputs = packing.row_of()[flat]
    return Packing(b, n, tuple(groups), packing.key_masks, slots, sources, flat, pos,
                   torch.cumsum(counts, 0) - counts, packing.order, inputs[sources], inputs)


def group_views(buffer: torch.Tensor, packing: Packing, num_heads: int
                 ) -> list[torch.Tensor]:
    """Each group's ``(size * heads, length, head_size)`` view of a slots buffer."""
    return [buffer[start:start + size * n].view(n, size * num_heads, -1).transpose(0, 1)
            for size, n, start in packing.groups]


def heads_to_slots(heads: Sequence[torch.Tensor], packing: Packing, num_heads: int
                    ) -> torch.Tensor:
    """Every group's ``(size * heads, length, head_size)`` heads as slot rows (zero gradients
    at the padded slots stay zero; other values there are whatever the heads hold)."""
    buffer = heads[0].new_empty(packing.num_slots, heads[0].shape[-1] * num_heads)
    for o, (size, n, start) in zip(heads, packing.groups):
        buffer[start:start + size * n].view(n, size, num_heads, -1).copy_(
            o.reshape(size, num_heads, n, -1).permute(2, 0, 1, 3))
    return buffer


def heads_to_rows(heads: Sequence[torch.Tensor], packing: Packing, num_heads: int
                   ) -> torch.Tensor:
    """The packed rows ``(tokens, hidden)`` of every group's ``(size * heads, length, d)``."""
    return heads_to_slots(heads, packing, num_heads).index_select(0, packing.rows)


def rows_to_heads(x: torch.Tensor, packing: Packing, num_heads: int) -> list[torch.Tensor]:
    """Packed rows as every group's ``(size * heads, length, head_size)`` view of zero-padded
    slots."""
    buffer = x.new_zeros(packing.num_slots, x.shape[1]).index_copy_(0, packing.rows, x)
    return group_views(buffer, packing, num_heads)

