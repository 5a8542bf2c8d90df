"""Tensor layouts that keep one compiled graph for every batch size and length.

Two things a plain slice of a sequence does under symbolic shapes:
- `F.linear` on a strided 3-D view (a slice along the sequence) goes through torch's matmul
  decomposition, which asks whether the view folds into a matrix without a copy; with symbolic
  sizes the answer depends on whether the batch is 1, so dynamo guards on it and a first call
  with one clip compiles a batch-1 graph, the next batch size a second one (`.contiguous()` asks
  the same question);
- `x[:, :n]` clamps n to the size; where the size is a padded length such as C * (T // C + 2),
  the symbolic reasoning cannot prove n <= size, and `torch.export` refuses the guard.
A copy made unconditionally, or an index_select, asks neither.
"""

import torch


def contiguous_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `tensor`, made without asking whether it already is contiguous."""
    return tensor.clone(memory_format=torch.contiguous_format)


def leading_positions(tensor: torch.Tensor, count) -> torch.Tensor:
    """`tensor[:, :count]` (count <= tensor.shape[1]) as a new contiguous tensor.

    Use it on a padded sequence before a linear layer (see the module docstring); compiled, the
    index_select fuses with the op that produced the sequence.
    """
    return tensor.index_select(1, torch.arange(count, device=tensor.device))
