"""The leading positions of a padded sequence, in a form `torch.export` accepts.

`x[:, :n]` clamps n to the size; where the size is a padded length such as C * (T // C + 2),
the symbolic reasoning cannot prove n <= size, and `torch.export` (fms_speech.aot) refuses the
guard. An index_select asks nothing; compiled, it fuses with the op that produced the sequence.
"""

import torch


def leading_positions(tensor: torch.Tensor, count) -> torch.Tensor:
    """`tensor[:, :count]` (count <= tensor.shape[1]) as a new contiguous tensor.

    Use it where a padded sequence is cut back to its real length (see the module docstring).
    """
    return tensor.index_select(1, torch.arange(count, device=tensor.device))
