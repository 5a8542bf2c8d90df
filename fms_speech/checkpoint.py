"""Hugging Face checkpoint directories: what they must hold, their PEFT adapter, their shard index.

FMS's own loader reads every `*.safetensors` of a directory. For a Granite Speech directory that
includes the PEFT adapter (`adapter_model.safetensors`), which the model's `hf` adapter maps onto
the audio LoRA with the scaling that `adapter_config.json` gives. It also includes any orphaned
older shard set kept beside the current one (the published granite-speech-3.3-2b has one), which
fails on a shape conflict. `index_aware_loading()` is the explicit fix for that: within it, a
directory with `model.safetensors.index.json` loads exactly the shards the index names (and the
adapter). `Transcriber.from_pretrained` loads through it; docs/upstream.md has the FMS patch.
"""

import json
from collections import ChainMap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fms.utils import serialization

INDEX_FILE = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The model types fms-speech runs, as config.json names them (granite_speech5's is its CTC one)
MODEL_TYPES = ("granite_speech", "granite_speech_plus", "granite_speech5_ctc")
# those without an LLM: CTC decoding, no prompt
CTC_MODEL_TYPES = ("granite_speech5_ctc",)


class CheckpointError(ValueError):
    """A checkpoint directory that fms-speech cannot run; the message is one sentence."""


def check_checkpoint(model_dir: str | Path) -> Path:
    """The directory, if it holds a config of a model type we run, weights and a tokenizer."""
    directory = Path(model_dir)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    model_type = checkpoint_model_type(directory)
    if model_type not in MODEL_TYPES:
        known = ", ".join(repr(name) for name in MODEL_TYPES)
        raise CheckpointError(f"{directory} holds a {model_type!r} model; fms-speech runs {known}")
    weights = [p for p in directory.glob("*.safetensors") if p.name != ADAPTER_WEIGHTS]
    if not weights:
        raise CheckpointError(f"{directory} has no model weights (*.safetensors)")
    if not any(
        (directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")
    ):
        raise CheckpointError(f"{directory} has no tokenizer (tokenizer.json)")
    return directory


def checkpoint_model_type(model_dir: str | Path) -> str | None:
    """config.json's model_type; CheckpointError if there is no readable config.json."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json: not a checkpoint directory")
    try:
        return json.loads(config_path.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise CheckpointError(f"{config_path} is not a valid JSON config") from None


def indexed_shards(model_dir: Path) -> list[Path] | None:
    """The shard files `model.safetensors.index.json` names, or None without an index."""
    index_path = model_dir / INDEX_FILE
    if not index_path.is_file():
        return None
    weight_map = json.loads(index_path.read_text())["weight_map"]
    shards = [model_dir / name for name in sorted(set(weight_map.values()))]
    missing = [shard.name for shard in shards if not shard.is_file()]
    if missing:
        raise FileNotFoundError(f"{index_path} names shards that are absent: {', '.join(missing)}")
    return shards


def adapter_settings(model_dir: str | Path) -> tuple[int, float]:
    """(rank, alpha) of the PEFT adapter in `model_dir`; (0, 0.0) when there is none."""
    directory = Path(model_dir)
    path = directory / ADAPTER_CONFIG
    if not (path.is_file() and (directory / ADAPTER_WEIGHTS).is_file()):
        return 0, 0.0
    config = json.loads(path.read_text())
    return int(config["r"]), float(config["lora_alpha"])


@contextmanager
def index_aware_loading() -> Iterator[None]:
    """Within this block, FMS loads an indexed directory from the shards its index names.

    `fms.models.get_model(..., model_path=DIR)` otherwise reads every `*.safetensors` in DIR.
    With `model.safetensors.index.json` present, only the shards it names are read (plus the
    PEFT adapter, which no index lists); a shard the index names but the directory lacks is a
    FileNotFoundError naming it. Directories without an index load as FMS loads them.
    """
    fms_load_state_dict = serialization.load_state_dict

    def load_state_dict(model_path, **kwargs):
        path = Path(model_path).expanduser() if isinstance(model_path, (str, Path)) else None
        plain = path is None or "*" in str(model_path) or not path.is_dir()
        if plain or kwargs.get("checkpoint_sharding") is not None:
            return fms_load_state_dict(model_path, **kwargs)
        shards = indexed_shards(path)
        if shards is None:
            return fms_load_state_dict(model_path, **kwargs)
        if (path / ADAPTER_WEIGHTS).is_file():
            shards.append(path / ADAPTER_WEIGHTS)
        # each file through FMS's own loader (a file path loads just that file, lazily)
        parts = [fms_load_state_dict(shard, **kwargs) for shard in shards]
        return ChainMap(*(part for chain in parts for part in getattr(chain, "maps", [chain])))

    serialization.load_state_dict = load_state_dict
    try:
        yield
    finally:
        serialization.load_state_dict = fms_load_state_dict
