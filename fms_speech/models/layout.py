"""Positions of a sequence as a new tensor (index_select), in a form `torch.export` accepts.

Two things a slice of a sequence does under symbolic shapes, which `torch.export`
(fms_speech.aot) refuses for a batch or length exported as dynamic:
- `x[:, :n]` clamps n to the size; where the size is a padded length such as C * (T // C + 2),
  the symbolic reasoning cannot prove n <= size;
- `F.linear` on a strided 3-D view (the last positions, `x[:, -n:]`) goes through torch's
  matmul decomposition, which asks whether the view folds into a matrix without a copy: with a
  symbolic batch the answer depends on whether it is 1 (measured: "Constraints violated
  (batch)"); a `.clone()` of the view instead trips an assertion in inductor's slice lowering
  when n is a symbolic int.
An index_select asks nothing; compiled, it fuses with the op that produced the sequence.
"""

import torch


def leading_positions(tensor: torch.Tensor, count) -> torch.Tensor:
    """`tensor[:, :count]` (count <= tensor.shape[1]) as a new contiguous tensor.

    Use it where a padded sequence is cut back to its real length (see the module docstring).
    """
    return tensor.index_select(1, torch.arange(count, device=tensor.device))


def trailing_positions(tensor: torch.Tensor, count) -> torch.Tensor:
    """`tensor[:, -count:]` (count <= tensor.shape[1]) as a new contiguous tensor."""
    length = tensor.shape[1]
    return tensor.index_select(1, torch.arange(length - count, length, device=tensor.device))
