"""Padding-free forward passes: a model's outputs at chosen positions of a padded batch, computed
without the padding.

A PPO batch is mostly padding once the student has learnt to stop at eos: prompts are
left-padded and responses right-padded to the longest in the batch (tnd/batching.py), so one
long sample widens every row.
`forward_at` lays the real tokens of each row back to back into packed rows no wider than the
batch (first fit: a short sequence fills a gap left in an earlier row), with position ids
that restart at 0 for every sequence and no attention mask. transformers then builds a
block-diagonal causal mask from the position ids (`masking_utils.find_packed_sequence_indices`),
so each sequence attends to itself only, and the outputs equal the padded batch's up to float
rounding. No packed row is wider than the padded batch, so attention never costs more than
with padding, and everything else runs on the real tokens (plus the tail of each packed row).

The packed path also runs the output head (`get_output_embeddings`) on the requested positions
only, after the body (`base_model`): a PPO mini-batch needs logits at the response tokens, about
half of the real ones, and the [tokens, vocab] head is the largest matmul of a small model, in the
forward and twice in the backward.

A model whose attention ignores packed position ids would silently mix sequences, and one whose
logits are more than head(body(x)) (a logit scale or soft-cap) would lose that, so the trainer
asks `supports_packing` once per model (two sequences packed into one row against the same two
run apart through the whole model) and runs a model that fails on the padded batch instead.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from tnd.batching import positions


def _place(used: list[int], n: int, width: int) -> int:
    """First fit: the first row of `used` (tokens taken per packed row) with room for n more tokens,
    a new row when none has; the row's count grows by n. Returns the row."""
    row = next((r for r, u in enumerate(used) if u + n <= width), len(used))
    if row == len(used):
        used.append(0)
    used[row] += n
    return row


def layout(lengths: list[int], width: int) -> tuple[list[int], list[int], list[int]]:
    """Sequences of `lengths` laid into packed rows of `width` tokens, first fit in order (a short
    sequence may go back to an earlier row with room): the packed row of each sequence, its offset
    in that row, and the tokens used in each packed row."""
    row_of, offset_of, used = [], [], []
    for n in lengths:
        row = _place(used, n, width)
        row_of.append(row)
        offset_of.append(used[row] - n)
    return row_of, offset_of, used


def pack(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Where the real tokens of a [B, T] batch (contiguous in each row) go in the packed [R, T] grid.

    Returns (dest [N]: the flat grid index of each of the N real tokens, in row-major order, i.e.
    the order of `x[attention_mask.bool()]`; packed_positions [R, T]; R). A packed row's unused
    tail gets positions 0, 1, ... of its own, so it forms one more (ignored) sequence that no real
    token can see. Built in Python: a handful of small lists costs less than a dozen tensor ops.
    """
    width = attention_mask.shape[1]
    lengths = attention_mask.bool().sum(1).tolist()
    row_of, offset_of, used = layout(lengths, width)
    dest = [row * width + offset + j for row, offset, n in zip(row_of, offset_of, lengths) for j in range(n)]
    grid = [[0] * width for _ in used]
    for row, offset, n in zip(row_of, offset_of, lengths):
        grid[row][offset : offset + n] = range(n)
    for row, n in zip(grid, used):
        row[n:] = range(width - n)  # the tail
    device = attention_mask.device
    return torch.tensor(dest, device=device), torch.tensor(grid, device=device), len(used)


def chunks(attention_mask: torch.Tensor, max_rows: int, packed: bool) -> list[slice]:
    """The batch cut into consecutive slices that each run in at most `max_rows` rows of its width
    (packed: as many sequences as `layout` fits there; padded: `max_rows` sequences), so a chunk's
    activations never outgrow those of `max_rows` padded rows."""
    size = attention_mask.shape[0]
    if not packed:
        return [slice(i, min(i + max_rows, size)) for i in range(0, size, max_rows)]
    width = attention_mask.shape[1]
    bounds, used = [], []
    for i, n in enumerate(attention_mask.bool().sum(1).tolist()):
        _place(used, n, width)  # as `layout` places it, first fit being incremental
        if len(used) > max_rows:  # sequence i starts the next chunk
            bounds.append(i)
            used = []
            _place(used, n, width)
    return [slice(a, b) for a, b in zip([0] + bounds, bounds + [size])]


def forward_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    at: torch.Tensor,
    packed: bool,
    hidden: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`model`'s logits [M, V] (and last hidden states [M, H] when `hidden`) at the M positions where
    `at` [B, T] is True, in row-major order. `at` must lie on real tokens (attention_mask 1).

    packed: the real tokens run packed, and the head at the M positions only (see the module
    docstring); otherwise the padded batch runs through the whole model as it is. Either way the
    outputs are the same up to float rounding for a model that passes `supports_packing`.
    """
    if packed:
        keep = attention_mask.bool()
        if bool((at & ~keep).any()):
            raise ValueError("forward_at: `at` marks a padding position")
        body, head = model.base_model, model.get_output_embeddings()
        if body is model or head is None:
            raise ValueError(f"forward_at: {type(model).__name__} has no separate body and output head")
        dest, packed_positions, n_rows = pack(attention_mask)
        ids = input_ids.new_zeros(n_rows * input_ids.shape[1]).index_put((dest,), input_ids[keep])
        out = body(input_ids=ids.view(n_rows, -1), position_ids=packed_positions, use_cache=False)
        states = out.last_hidden_state.flatten(0, 1)[dest[at[keep]]]
        logits = head(states)
        states = states if hidden else None
    else:
        out = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
            use_cache=False, output_hidden_states=hidden,
        )
        logits = out.logits[at]
        states = out.hidden_states[-1][at] if hidden else None
    return logits, states


@torch.no_grad()
def supports_packing(model: nn.Module) -> bool:
    """Whether `model` runs padding-free correctly: two sequences in one packed row (and a padding
    tail), through its body and then its head, give the logits the whole model gives them run apart.
    A model that raises on the packed call fails too."""
    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    ids = (torch.arange(1, 13, device=device).view(2, 6) * 7919) % vocab
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], device=device)  # packs as 3 + 2 + a tail of 1
    at = mask.bool()
    try:
        packed, _ = forward_at(model, ids, mask, at, packed=True)
    except Exception:  # noqa: BLE001 - any failure means: run this model padded
        return False
    apart = torch.cat([forward_at(model, ids[i : i + 1], mask[i : i + 1], at[i : i + 1], packed=False)[0] for i in range(2)])
    # mixed sequences differ by a large fraction of the logits' scale; rounding (even bf16's) does not
    scale = apart.float().abs().max().clamp_min(1e-6)
    return bool((packed.float() - apart.float()).abs().max() / scale < 1e-2)
