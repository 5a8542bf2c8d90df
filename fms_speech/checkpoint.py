"""Reading Hugging Face checkpoint directories: the shards the index names, and the PEFT adapter.

FMS's `serialization.load_state_dict` globs every `*.safetensors` in a directory. That breaks
on repositories that keep an orphaned older shard set beside the current one (the published
granite-speech-3.3-2b does) and it would read `adapter_model.safetensors` as base weights. The
index file is the checkpoint's own statement of which shards belong to it, so the fix belongs
in the loader: `install()` wraps FMS's loader so a directory with `model.safetensors.index.json`
loads exactly the shards it names (for every FMS model), and a Granite Speech directory also
brings its PEFT adapter, with the adapter's own scaling (alpha / r) folded into its B matrices.
"""

import json
from collections import ChainMap
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import torch
from fms.utils import serialization
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


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


def _adapter_config(model_dir: Path) -> dict | None:
    path = model_dir / ADAPTER_CONFIG
    if not (path.is_file() and (model_dir / ADAPTER_WEIGHTS).is_file()):
        return None
    return json.loads(path.read_text())


def adapter_rank(model_dir: str | Path) -> int:
    """LoRA rank of the adapter in `model_dir`; 0 when there is none."""
    config = _adapter_config(Path(model_dir))
    return int(config["r"]) if config else 0


def load_adapter(model_dir: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the base model's key names, B already times alpha / r."""
    config = _adapter_config(model_dir)
    if config is None:
        return {}
    scaling = config["lora_alpha"] / config["r"]
    tensors = {}
    with safe_open(model_dir / ADAPTER_WEIGHTS, framework="pt") as adapter:
        for key in adapter.keys():  # noqa: SIM118 (safe_open is not iterable)
            tensor = adapter.get_tensor(key)
            name = key.removeprefix(_PEFT_PREFIX)
            if ".lora_B." in name:
                tensor = tensor * scaling
            tensors[name] = tensor
    return tensors


def _is_granite_speech(model_dir: Path) -> bool:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        return False
    return json.loads(config_path.read_text()).get("model_type") == "granite_speech"


_fms_load_state_dict = serialization.load_state_dict


def load_state_dict(model_path, **kwargs) -> MutableMapping[str, Any]:
    """FMS's `load_state_dict`, honouring the shard index and the Granite Speech adapter."""
    initial_device = kwargs.get("initial_device", torch.device("cpu"))
    path = Path(model_path).expanduser() if isinstance(model_path, (str, Path)) else None
    if path is None or "*" in str(model_path) or not path.is_dir() or initial_device.type == "meta":
        return _fms_load_state_dict(model_path, **kwargs)
    shards = indexed_shards(path)
    granite_speech = _is_granite_speech(path)
    if shards is None and granite_speech:
        shards = sorted(p for p in path.glob("*.safetensors") if p.name != ADAPTER_WEIGHTS)
    if shards is None:
        return _fms_load_state_dict(model_path, **kwargs)
    if not shards:
        raise FileNotFoundError(f"no safetensors weights in {path}")
    parts = [serialization._load_safetensors_state_dict(s, initial_device) for s in shards]
    if granite_speech:
        parts.append(load_adapter(path))
    return ChainMap(*parts)


def install() -> None:
    """Route FMS's checkpoint loading through `load_state_dict` above (idempotent)."""
    serialization.load_state_dict = load_state_dict
