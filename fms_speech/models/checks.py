"""Checks shared by the family's `hf` adapters and `post_init`s: nothing is left at a random value.

- `check_shapes`: every tensor an adapter produces names a tensor of the model, with its shape;
- `check_loaded`: after `get_model` loads a checkpoint, no parameter or buffer is still on the
  meta device (it was in no checkpoint file).
"""

import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch
from fms.utils.config import ModelConfig


@lru_cache(maxsize=8)
def _expected_shapes(model_class: type, config_class: type, config_json: str) -> dict:
    config = config_class._load_from_dict(json.loads(config_json))
    with torch.device("meta"):
        model = model_class(config)
    return {n: t.shape for n, t in [*model.named_parameters(), *model.named_buffers()]}


def check_shapes(sd: Mapping[str, Any], model_class: type, config: ModelConfig) -> None:
    """ValueError naming the first key of `sd` that `model_class(config)` lacks or shapes apart."""
    config_json = json.dumps(config.as_dict(), sort_keys=True)
    expected = _expected_shapes(model_class, type(config), config_json)
    for name, tensor in sd.items():
        if name not in expected:
            raise ValueError(f"unexpected key in the checkpoint: {name}")
        if tuple(tensor.shape) != tuple(expected[name]):
            raise ValueError(
                f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, "
                f"model {tuple(expected[name])}"
            )


def check_loaded(model: torch.nn.Module) -> None:
    """ValueError listing the weights still on meta, unless the whole model is (no checkpoint)."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    missing = sorted(n for n, t in tensors.items() if t.is_meta)
    if missing and len(missing) < len(tensors):
        shown = ", ".join(missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        raise ValueError(f"checkpoint is missing {len(missing)} weights: {shown}")
