"""Tensor parallelism of the LLM through FMS's own strategy: which world sizes fit, and a load
check that no sharded weight is left unloaded.

FMS's `TensorParallelStrategy` swaps each Granite block's attention and feed-forward for
`TPMultiHeadAttention` / `TPGatedLinearUnit` (query heads, KV heads and the feed-forward width
split over the ranks; the embedding, the norms and the LM head stay whole). Two gaps of
ibm-fms 1.13.1 are closed here:
- the world size is checked by `assert`s deep in module constructors: `check_world_size` says
  which sizes the checkpoint allows, in one sentence, before any weight is read;
- FMS moves a tensor-parallel module off the meta device (`torch.empty`) before its
  `load_weights` runs, and swallows a `load_weights` that does not find a weight (a warning
  about unused keys): the weight stays uninitialised memory and the logits come out wrong or
  NaN. `LoadRecord` notes what each tensor-parallel module really loaded, so that the model's
  `post_init` can name every weight that was not.
"""

from collections.abc import Callable

import torch.nn as nn
from fms.models.granite import GraniteConfig
from fms.modules.tp import TPModule


def _local_hidden(config: GraniteConfig, world_size: int) -> int:
    # what TPGatedLinearUnit builds on each rank (hidden_grow_factor / world, then multiple_of)
    hidden = int(config.hidden_grow_factor / world_size * config.emb_dim)
    if config.multiple_of:
        hidden = config.multiple_of * ((hidden + config.multiple_of - 1) // config.multiple_of)
    return hidden


def _full_hidden(config: GraniteConfig) -> int:
    return _local_hidden(config, 1)


def world_size_problem(config: GraniteConfig, world_size: int) -> str | None:
    """Why the LLM of `config` cannot be split over `world_size` ranks; None if it can."""
    if config.nheads % world_size:
        return f"its {config.nheads} query heads do not split evenly"
    kv = config.kvheads or config.nheads
    if not (kv % world_size == 0 or world_size % kv == 0):
        # FMS shards KV heads, or replicates them when there are fewer than ranks
        return f"its {kv} key/value heads neither split evenly nor divide the world size"
    if _local_hidden(config, world_size) * world_size != _full_hidden(config):
        return f"its feed-forward width {_full_hidden(config)} does not split evenly"
    return None


def tensor_parallel_sizes(config: GraniteConfig) -> list[int]:
    """Every world size (up to the number of query heads) the LLM can be split over."""
    return [n for n in range(1, config.nheads + 1) if world_size_problem(config, n) is None]


def check_world_size(config: GraniteConfig, world_size: int) -> None:
    """ValueError, one sentence, if tensor parallelism over `world_size` ranks cannot work."""
    problem = world_size_problem(config, world_size)
    if problem is not None:
        sizes = ", ".join(map(str, tensor_parallel_sizes(config)))
        raise ValueError(
            f"tensor parallelism over {world_size} ranks does not fit this model: {problem} "
            f"over {world_size} ranks (world sizes that fit: {sizes})"
        )


class LoadRecord:
    """Which tensors each tensor-parallel module of a model loaded from the checkpoint.

    `watch` wraps the `load_weights` of every TPModule; a call that returns records the names
    it was given minus those it reports unused; a call that raises records nothing but its
    error (FMS goes on past it). `unloaded` names each tensor of a module that was given weights but did not
    load them all. Modules never given weights are still on the meta device, which the model's
    own check catches.
    """

    def __init__(self):
        self.loaded: dict[TPModule, set[str]] = {}
        self.errors: list[str] = []  # what the failed load_weights calls raised
        self._originals: dict[TPModule, Callable] = {}
        self._prefixes: dict[TPModule, str] = {}

    def watch(self, model: nn.Module) -> "LoadRecord":
        for prefix, module in model.named_modules():
            if isinstance(module, TPModule):
                self._prefixes[module] = prefix
                self._originals[module] = module.load_weights
                module.load_weights = self._recording(module)
        return self

    def _recording(self, module: TPModule) -> Callable:
        original = self._originals[module]

        def load_weights(tensor_values: dict):
            given = set(tensor_values)  # load_weights may pop from the dict
            self.loaded.setdefault(module, set())
            try:
                unused = original(tensor_values)
            except Exception as error:  # FMS logs it as unused keys and goes on: keep the why
                self.errors.append(f"{type(error).__name__}: {str(error).splitlines()[0]}")
                raise
            self.loaded[module] |= given - set(unused or ())
            return unused

        return load_weights

    def unloaded(self) -> list[str]:
        """Full names of the tensors of loaded-into modules that no load_weights call filled."""
        missing = []
        for module, loaded in self.loaded.items():
            prefix = self._prefixes[module]
            tensors = [*module.named_parameters(), *module.named_buffers()]
            missing += [f"{prefix}.{n}" for n, _ in tensors if f"{prefix}.{n}" not in loaded]
        return sorted(missing)

    def release(self) -> None:
        """Give each module its own load_weights back (loading is over)."""
        for module in self._originals:
            del module.load_weights
        self._originals.clear()
