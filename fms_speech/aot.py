"""Ahead-of-time compiled artifacts: a compiled model in a new process in about a second.

`prepare(model)` exports the model's two call types as `fms_speech.generation` makes them (an
audio prefill that returns the last position's logits and FMS's KV cache, and a one-token decode
step on that cache) with `torch.export`, with the batch, prompt, audio and cache lengths
dynamic, and compiles each with AOTInductor into a package whose weights stay out of the shared
library. `load(model)` finds the packages made for this model, hands them the model's own
weight tensors (no copy) and returns a `PrecompiledModel`, which `generate` calls like the
model: the packages serve the calls they cover, and any other call (a text-only prompt, a shape
outside the exported ranges, other keyword arguments) runs on `compile_model(model)`, compiled
just in time. No dynamo tracing, no guards and no inductor compile happen in a process that
loads packages, which is what a warm `torch.compile` process still pays (docs/compile-efficiency.md).

The packages live in `<cache>/aot/<digest>/`, the digest of a key holding everything that
decides the compiled code: this package's model and compile source, torch and ibm-fms versions,
the model config, dtype, device type and kind (CPU model and vector ISA; GPU name and compute
capability) and the CPU thread count (inductor writes it into its CPU kernels). The key is
stored beside the packages and compared in full when they load, so an artifact is used only for
the key it was made for; anything else is a miss and the JIT path. Weights are not part of the
key: they are read from the live model at every load.
"""

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from fms.utils import generation as fms_generation
from safetensors.torch import load_file, save_file

from fms_speech._compat import (
    aoti_compile_and_package,
    aoti_load_package,
    extend_padding_kwargs,
    fx_config,
)
from fms_speech.compile import SYMBOLIC_SHAPE_SETTINGS, compile_model, cpu_inductor_settings
from fms_speech.models.granite_speech import GraniteSpeech

logger = logging.getLogger(__name__)

# bump when the exported signatures or the key change
FORMAT = 1
PACKAGES = ("prefill", "decode")
KEY_FILE = "key.json"
# the smallest sizes the packages take (FMS's attention asks whether a prompt is one token, the
# encoder whether a clip is one frame): smaller calls go to the JIT path
MIN_PROMPT_TOKENS = 2
MIN_FRAMES = 2
# files whose code decides what is compiled
_SOURCES = ("models", "aot.py", "compile.py", "_compat.py")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $FMS_SPEECH_CACHE, else $XDG_CACHE_HOME/fms-speech (~/.cache/...)."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("FMS_SPEECH_CACHE"):
        return Path(os.environ["FMS_SPEECH_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "fms-speech"


def _source_digest() -> str:
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for name in _SOURCES:
        path = root / name
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.relative_to(root).as_posix().encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def _device_kind(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)}, sm_{major}{minor}, CUDA {torch.version.cuda}"
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            name = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}"


def _model_tensor(model: torch.nn.Module) -> torch.Tensor:
    return next(model.parameters())


def artifact_key(model: torch.nn.Module) -> dict:
    """Everything that decides the compiled code of `model` on its device (see the docstring)."""
    weight = _model_tensor(model)
    return {
        "format": FORMAT,
        "fms_speech_source": _source_digest(),
        "torch": torch.__version__,
        "ibm_fms": metadata.version("ibm-fms"),
        "config": json.loads(json.dumps(model.config.as_dict(), sort_keys=True, default=str)),
        "dtype": str(weight.dtype),
        "device": weight.device.type,
        "device_kind": _device_kind(weight.device),
        "threads": torch.get_num_threads() if weight.device.type == "cpu" else None,
    }


def artifact_dir(model: torch.nn.Module, cache_dir: str | Path | None = None) -> Path:
    """Where the packages of `model` (config, dtype, device, versions) live."""
    text = json.dumps(artifact_key(model), sort_keys=True)
    return cache_root(cache_dir) / "aot" / hashlib.sha256(text.encode()).hexdigest()[:24]


# ---- the two call types as modules with explicit signatures (export cannot take **kwargs)


class _Prefill(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, input_features, feature_lengths, position_ids, mask, lora_gate):
        return self.model(
            input_ids,
            input_features=input_features,
            feature_lengths=feature_lengths,
            position_ids=position_ids,
            use_cache=True,
            lora_gate=lora_gate,
            last_n_tokens=1,
            mask=mask,
        )


class _Decode(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, mask, lora_gate, cache):
        return self.model(
            input_ids,
            position_ids=position_ids,
            past_key_value_states=cache,
            use_cache=True,
            lora_gate=lora_gate,
            last_n_tokens=1,
            mask=mask,
        )


def _example_calls(model: torch.nn.Module) -> tuple[tuple, tuple]:
    """(prefill args, decode args) as `generate` makes them: two clips of several attention
    blocks and windows, prompts of different lengths (left padding)."""
    weight = _model_tensor(model)
    config = model.config
    block = config.encoder_config.context_size
    frames = torch.tensor([2 * block + 7, block + 3])
    features = torch.randn(2, int(frames.max()), config.encoder_config.input_dim)
    features = features.to(weight)
    counts = model.audio_token_counts(features, frames).tolist()
    audio = config.audio_token_index
    prompts = [[1] * (3 + row) + [audio] * n + [2] * 4 for row, n in enumerate(counts)]
    ids, padding = fms_generation.pad_input_ids(
        [torch.tensor(p, device=weight.device) for p in prompts]
    )
    gate = torch.ones(2, device=weight.device)
    frames = frames.to(weight.device)
    prefill = (ids, features, frames, padding["position_ids"], padding["mask"], gate)
    with torch.no_grad():
        _, cache = model(
            ids,
            input_features=features,
            feature_lengths=frames,
            use_cache=True,
            lora_gate=gate,
            last_n_tokens=1,
            **padding,
        )
    cache = [tuple(t.contiguous() for t in layer) for layer in cache]
    step = extend_padding_kwargs(True, dict(padding))
    next_ids = torch.full((2, 1), 3, device=weight.device)
    decode = (next_ids, step["position_ids"], step["mask"], gate, cache)
    return prefill, decode


def _dynamic_shapes(num_layers: int) -> tuple[dict, dict]:
    from torch.export import Dim

    batch = Dim("batch", min=1)
    tokens = Dim("tokens", min=MIN_PROMPT_TOKENS)
    frames = Dim("frames", min=MIN_FRAMES)
    past = Dim("past", min=1)
    prefill = {
        "input_ids": {0: batch, 1: tokens},
        "input_features": {0: batch, 1: frames},
        "feature_lengths": {0: batch},
        "position_ids": {0: batch, 1: tokens},
        "mask": {0: batch, 1: tokens, 2: tokens},
        "lora_gate": {0: batch},
    }
    decode = {
        "input_ids": {0: batch},
        "position_ids": {0: batch},
        "mask": {0: batch, 2: past + 1},
        "lora_gate": {0: batch},
        "cache": [({0: batch, 2: past}, {0: batch, 2: past}) for _ in range(num_layers)],
    }
    return prefill, decode


def _named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the names the wrappers give them (tied ones under each)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return {f"model.{name}": tensor.detach() for name, tensor in named.items()}


@dataclass
class PrepareReport:
    directory: Path
    seconds: dict[str, float]  # export / compile / check time per package
    reused: bool  # the artifacts were there already


# beside the packages: the tensors they need that are not the model's weights
CONSTANTS_FILE = "constants.safetensors"
CONSTANTS_MAP = "constants.json"  # {package: {constant name in the package: tensor key}}


def prepare(
    model: torch.nn.Module, cache_dir: str | Path | None = None, force: bool = False
) -> PrepareReport:
    """Export and compile the prefill and decode packages of `model` (minutes) into the cache.

    Each package is checked against the eager model on the example calls before it is kept
    (RuntimeError if it differs). Artifacts already there for the same key are kept unless
    `force`.
    """
    if type(model) is not GraniteSpeech:
        raise ValueError(
            f"only granite_speech checkpoints are precompiled ({type(model).__name__} is "
            "compiled just in time by --compile)"
        )
    directory = artifact_dir(model, cache_dir)
    key = artifact_key(model)
    if not force and _stored_key(directory) == key:
        return PrepareReport(directory, {}, reused=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    seconds, constants, constants_map = {}, {}, {}
    named = _named_tensors(model)
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=".building-") as work:
        work = Path(work)
        calls = dict(zip(PACKAGES, _example_calls(model), strict=True))
        shapes = dict(zip(PACKAGES, _dynamic_shapes(len(calls["decode"][-1])), strict=True))
        wrappers = {"prefill": _Prefill(model), "decode": _Decode(model)}
        for name in PACKAGES:
            started = time.perf_counter()
            with torch.no_grad(), fx_config.patch(SYMBOLIC_SHAPE_SETTINGS):
                program = torch.export.export(
                    wrappers[name], calls[name], dynamic_shapes=shapes[name]
                )
            exported = time.perf_counter()
            path = str(work / f"{name}.pt2")
            aoti_compile_and_package(
                program,
                package_path=path,
                inductor_configs={
                    "aot_inductor.package_constants_in_so": False,
                    **cpu_inductor_settings(),
                },
            )
            compiled = time.perf_counter()
            package = aoti_load_package(path)
            extra = _match_constants(package.get_constant_fqns(), named, program)
            constants_map[name] = {fqn: f"{id(t):x}" for fqn, t in extra.items()}
            constants.update((f"{id(t):x}", t.contiguous()) for t in extra.values())
            package.load_constants(
                {fqn: named.get(fqn, extra.get(fqn)) for fqn in package.get_constant_fqns()},
                check_full_update=True,
                user_managed=True,
            )
            _check_package(name, package, wrappers[name], calls[name])
            seconds[f"{name} export"] = exported - started
            seconds[f"{name} compile"] = compiled - exported
            seconds[f"{name} check"] = time.perf_counter() - compiled
        save_file(constants, str(work / CONSTANTS_FILE))
        (work / CONSTANTS_MAP).write_text(json.dumps(constants_map, indent=1))
        (work / KEY_FILE).write_text(json.dumps(key, indent=1, sort_keys=True))  # written last
        if directory.exists():
            shutil.rmtree(directory)
        work.rename(directory)
        work.mkdir()  # for TemporaryDirectory's cleanup
    return PrepareReport(directory, seconds, reused=False)


def _match_constants(fqns: list[str], named: dict, program) -> dict[str, torch.Tensor]:
    """The package's constants that are not the model's weights, by their name in the package.

    Export lifts tensors the model computes once and keeps (FMS's rotary table) under one
    name, AOTInductor re-traces and renames them `_tensor_constant<i>`: with one such tensor the
    pair is certain; with several, nothing says which is which, and this refuses.
    """
    lifted = {**program.constants, **program.state_dict}
    lifted = {k: v for k, v in lifted.items() if k not in named and isinstance(v, torch.Tensor)}
    unnamed = [fqn for fqn in fqns if fqn not in named]
    extra = {fqn: lifted.pop(fqn) for fqn in unnamed if fqn in lifted}
    rest = [fqn for fqn in unnamed if fqn not in extra]
    unique = list({id(t): t for t in lifted.values()}.values())
    if len(rest) > 1 or len(rest) > len(unique) or (rest and len(unique) != 1):
        raise RuntimeError(
            f"cannot tell which tensors the package's constants {rest} are "
            f"({len(unique)} candidates)"
        )
    extra.update((fqn, unique[0]) for fqn in rest)
    return extra


def _check_package(name: str, package, wrapper: torch.nn.Module, args: tuple) -> None:
    """The package's logits on the example call against the eager model's (RuntimeError)."""
    with torch.no_grad():
        expected, _ = wrapper(*args)
        actual, _ = package(*args)
    tolerance = 1e-3 if expected.dtype == torch.float32 else 5e-2
    error = ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
    if not error <= tolerance:
        raise RuntimeError(
            f"the {name} package differs from the eager model by {error:.2e} (relative), "
            f"more than {tolerance:g}"
        )


def _stored_key(directory: Path) -> dict | None:
    try:
        return json.loads((directory / KEY_FILE).read_text())
    except (OSError, ValueError):
        return None


def load(model: torch.nn.Module, cache_dir: str | Path | None = None) -> "PrecompiledModel | None":
    """A PrecompiledModel on the cached packages of `model`, or None when there are none for
    its key (or they cannot be loaded: a warning says why)."""
    directory = artifact_dir(model, cache_dir)
    stored = _stored_key(directory)
    if stored is None:
        logger.info("no precompiled artifacts in %s", directory)
        return None
    if stored != artifact_key(model):
        logger.warning("%s holds artifacts of another model or setup: not used", directory)
        return None
    started = time.perf_counter()
    named = _named_tensors(model)
    packages = {}
    try:
        device = _model_tensor(model).device
        stored_constants = load_file(str(directory / CONSTANTS_FILE), device=str(device))
        constants_map = json.loads((directory / CONSTANTS_MAP).read_text())
        for name in PACKAGES:
            package = aoti_load_package(str(directory / f"{name}.pt2"))
            extra = {fqn: stored_constants[k] for fqn, k in constants_map[name].items()}
            wanted = package.get_constant_fqns()
            missing = [fqn for fqn in wanted if fqn not in named and fqn not in extra]
            if missing:
                raise ValueError(f"the package needs tensors the model lacks: {missing[:3]}")
            tensors = {fqn: named[fqn] if fqn in named else extra[fqn] for fqn in wanted}
            package.load_constants(tensors, check_full_update=True, user_managed=True)
            packages[name] = (package, extra)  # the constants must outlive the package
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        logger.warning("cannot load the precompiled artifacts in %s: %s", directory, first_line)
        return None
    return PrecompiledModel(model, packages, time.perf_counter() - started)


class PrecompiledModel(torch.nn.Module):
    """`model` as `fms_speech.generation` calls it, on precompiled packages.

    Calls the packages do not cover run on `compile_model(model)`, compiled on first use.
    `calls` counts the calls per path (prefill, decode, jit). Built for the model's weights as
    they are when loaded: after `model.to(...)`, load again.
    """

    def __init__(self, model: torch.nn.Module, packages: dict, load_seconds: float):
        super().__init__()
        self.model = model
        self._packages = packages
        self._jit = None
        self.load_seconds = load_seconds
        self.calls = Counter()
        self._num_layers = model.config.text_config.nlayers
        # FMS's rotary table (a package constant) has this many rows; eager indexes past it
        # with an IndexError, a package would read past it
        self._max_positions = model.config.text_config.max_expected_seq_len

    def forward(
        self,
        input_ids: torch.Tensor,
        input_features: torch.Tensor | None = None,
        feature_lengths: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_value_states: list | None = None,
        use_cache: bool = False,
        lora_gate: torch.Tensor | None = None,
        last_n_tokens: int = 0,
        **attn_kwargs,
    ):
        mask = attn_kwargs.get("mask")
        route = self._route(
            input_ids, input_features, feature_lengths, position_ids, past_key_value_states
        )
        covered = (
            use_cache
            and last_n_tokens == 1
            and set(attn_kwargs) == {"mask"}
            and _is(mask, torch.float32, 3)
            and _is(position_ids, torch.long, 2)
            and _is(lora_gate, torch.float32, 1)
            and not torch.is_grad_enabled()
            and int(position_ids.max()) < self._max_positions
        )
        if covered and route == "prefill":
            self.model._check_placeholders(input_ids, input_features, feature_lengths)
            args = (input_ids, input_features, feature_lengths, position_ids, mask, lora_gate)
            return self._run("prefill", args)
        if (
            covered
            and route == "decode"
            and mask.shape[2] == past_key_value_states[0][0].shape[2] + 1
        ):
            return self._run(
                "decode", (input_ids, position_ids, mask, lora_gate, past_key_value_states)
            )
        return self._jit_call(
            input_ids,
            input_features=input_features,
            feature_lengths=feature_lengths,
            position_ids=position_ids,
            past_key_value_states=past_key_value_states,
            use_cache=use_cache,
            lora_gate=lora_gate,
            last_n_tokens=last_n_tokens,
            **attn_kwargs,
        )

    def _route(self, input_ids, input_features, feature_lengths, position_ids, cache) -> str | None:
        """'prefill' or 'decode' if the call has the shapes and types a package takes."""
        weight = _model_tensor(self.model)
        if not _is(input_ids, torch.long, 2) or input_ids.device != weight.device:
            return None
        if input_features is not None and cache is None:
            fits = (
                _is(input_features, weight.dtype, 3)
                and _is(feature_lengths, torch.long, 1)
                and input_ids.shape[1] >= MIN_PROMPT_TOKENS
                and input_features.shape[1] >= MIN_FRAMES
            )
            return "prefill" if fits else None
        if input_features is None and cache is not None:
            fits = (
                input_ids.shape[1] == 1
                and len(cache) == self._num_layers
                and all(
                    len(layer) == 2 and _is(t, weight.dtype, 4) for layer in cache for t in layer
                )
            )
            return "decode" if fits else None
        return None

    def _run(self, name: str, args: tuple):
        self.calls[name] += 1
        package, _ = self._packages[name]
        # the packages read their inputs with the strides of the example calls: contiguous
        *tensors, last = args
        tensors = [t.contiguous() for t in tensors]
        if name == "decode":
            last = [tuple(t.contiguous() for t in layer) for layer in last]
        else:
            last = last.contiguous()
        logits, cache = package(*tensors, last)
        return logits, [tuple(layer) for layer in cache]

    def _jit_call(self, *args, **kwargs):
        if self._jit is None:
            logger.info("a call the precompiled packages do not cover: compiling it just in time")
            self._jit = compile_model(self.model)
        self.calls["jit"] += 1
        return self._jit(*args, **kwargs)


def _is(tensor, dtype: torch.dtype, dims: int) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.dtype == dtype and tensor.dim() == dims


def compiled_runner(model: torch.nn.Module, cache_dir: str | Path | None = None):
    """The precompiled model when its artifacts are in the cache, else `compile_model(model)`."""
    return load(model, cache_dir) or compile_model(model)
