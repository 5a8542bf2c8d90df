"""The four systems a bench run compares: transformers' model and fms-speech's, each eager or
under torch.compile, behind one interface (`generate`, `encode`, `project`)."""

import time
from dataclasses import dataclass

import torch
from fms.utils import generation as fms_generation
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from fms_speech import aot
from fms_speech.bench.checkpoints import PAD_TOKEN
from fms_speech.bench.inputs import Batch, audio_features_mask, features_of, left_pad
from fms_speech.bench.measure import synchronize, timed
from fms_speech.compile import compile_model
from fms_speech.generation import generate


@dataclass
class Generated:
    sequences: list[list[int]]
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    features_seconds: float = 0.0
    first_logits: torch.Tensor | None = None  # (B, vocab) float32, divided by logits_scaling


class _StepClock(LogitsProcessor):
    """Timestamps every generation step of transformers' generate and keeps the first logits."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []
        self.first_scores: torch.Tensor | None = None

    def __call__(self, input_ids, scores):
        synchronize(self.device)
        self.times.append(time.perf_counter())
        if self.first_scores is None:
            self.first_scores = scores.detach().float().clone()
        return scores


class ReferenceSystem:
    """transformers' model: eager, or with its forward under torch.compile (transformers' recipe)."""

    def __init__(self, model, compiled: bool, device: torch.device, compile_options: dict):
        self.model, self.compiled, self.device = model, compiled, device
        self.name = "reference compiled" if compiled else "reference eager"
        self.compile_options = compile_options
        self.logits_scaling = model.config.text_config.logits_scaling
        self.encoder, self.projector = model.model.encoder, model.model.projector

    def __enter__(self):
        if self.compiled:
            self.model.forward = torch.compile(self.model.forward, **self.compile_options)
        return self

    def __exit__(self, *exc):
        if self.compiled:
            del self.model.forward  # back to the class's method

    def compile_modules(self):
        self.encoder = torch.compile(self.model.model.encoder, **self.compile_options)
        self.projector = torch.compile(self.model.model.projector, **self.compile_options)

    def encode(self, features, lengths):
        return self.encoder(features).last_hidden_state

    def project(self, encoder_states, lengths):
        return self.projector(encoder_states)

    def generate(self, batch: Batch, max_new_tokens: int, eos: int | None) -> Generated:
        features_seconds, (features, _) = timed(
            lambda: features_of(batch, self.device), self.device
        )
        input_ids, attention_mask = left_pad(batch.prompts, self.device)
        clock = _StepClock(self.device)
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos,
            pad_token_id=PAD_TOKEN,
        )
        start = time.perf_counter()
        with torch.no_grad():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                input_features=features.to(self.model.dtype),
                input_features_mask=audio_features_mask(
                    input_ids, self.model.config.audio_token_index
                ),
                generation_config=config,
                logits_processor=LogitsProcessorList([clock]),
            )
        new_tokens = output[:, input_ids.shape[1] :].tolist()
        sequences = [_until_eos(row, eos) for row in new_tokens]
        return Generated(
            sequences,
            prefill_seconds=clock.times[0] - start,
            decode_seconds=clock.times[-1] - clock.times[0],
            decode_steps=len(clock.times) - 1,
            features_seconds=features_seconds,
            first_logits=clock.first_scores / self.logits_scaling,
        )


class FmsSystem:
    """fms-speech's model, eager or under `compile_model`, driven by `fms_speech.generation`."""

    def __init__(
        self,
        model,
        compiled: bool,
        device: torch.device,
        compile_options: dict,
        name: str | None = None,
    ):
        self.model, self.compiled, self.device = model, compiled, device
        self.name = name or ("fms compiled" if compiled else "fms eager")
        self.compile_options = compile_options
        self.runner = model
        self.encoder, self.projector = model.encoder, model.projector

    def __enter__(self):
        if self.compiled:
            self.runner = compile_model(self.model, **self.compile_options)
        return self

    def __exit__(self, *exc):
        self.runner = self.model

    def compile_modules(self):
        self.encoder = compile_model(self.model.encoder, **self.compile_options)
        self.projector = compile_model(self.model.projector, **self.compile_options)

    def encode(self, features, lengths):
        return self.encoder(features, lengths)

    def project(self, encoder_states, lengths):
        frames = torch.arange(encoder_states.shape[1], device=lengths.device)
        return self.projector(encoder_states, frames[None, :] < lengths[:, None])

    def generate(self, batch: Batch, max_new_tokens: int, eos: int | None) -> Generated:
        features_seconds, (features, lengths) = timed(
            lambda: features_of(batch, self.device), self.device
        )
        output = generate(
            self.runner,
            batch.prompts,
            features.to(model_dtype(self.model)),
            lengths,
            max_new_tokens=max_new_tokens,
            eos_token_id=-1 if eos is None else eos,  # -1: no token ends a sequence
            pad_token_id=PAD_TOKEN,
        )
        return Generated(
            output.sequences,
            output.prefill_seconds,
            output.decode_seconds,
            output.decode_steps,
            features_seconds,
        )

    def first_logits(self, batch: Batch) -> torch.Tensor:
        """Last-position logits of the prefill, called exactly as `generate` calls it."""
        features, lengths = features_of(batch, self.device)
        prompts = [torch.tensor(p, device=self.device) for p in batch.prompts]
        input_ids, padding = fms_generation.pad_input_ids(prompts, pad_token_id=PAD_TOKEN)
        gate = torch.ones(len(prompts), device=self.device)
        with torch.no_grad():
            logits, _ = self.runner(
                input_ids,
                input_features=features.to(model_dtype(self.model)),
                feature_lengths=lengths,
                past_key_value_states=None,
                use_cache=True,
                lora_gate=gate,
                last_n_tokens=1,
                **padding,
            )
        return logits[:, -1].float()


class PrecompiledSystem(FmsSystem):
    """fms-speech's model on the artifacts of `fms-speech compile` (fms_speech.aot)."""

    def __init__(self, model, device: torch.device, cache_dir: str):
        super().__init__(model, True, device, {}, name="fms precompiled")
        self.cache_dir = cache_dir
        self.load_seconds = None
        self.precompiled = None

    def __enter__(self):
        started = time.perf_counter()
        runner = aot.load(self.model, self.cache_dir)
        if runner is None:
            raise RuntimeError(f"no precompiled artifacts for this model in {self.cache_dir}")
        self.load_seconds = time.perf_counter() - started
        self.runner = self.precompiled = runner  # (__exit__ resets runner)
        return self


def make_system(name: str, reference, fms_model, device: torch.device, options: dict):
    """One of settings.SYSTEMS by name; `options`: {'reference': ..., 'fms': ...} compile kwargs."""
    compiled = "compiled" in name
    if name.startswith("reference"):
        return ReferenceSystem(reference, compiled, device, options["reference"])
    if name.endswith("cuda-graphs"):  # CUDA graphs for every graph, the decode step's included
        return FmsSystem(
            fms_model, True, device, {**options["fms"], "mode": "reduce-overhead"}, name
        )
    return FmsSystem(fms_model, compiled, device, options["fms"])


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _until_eos(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[: tokens.index(eos)] if eos is not None and eos in tokens else tokens
