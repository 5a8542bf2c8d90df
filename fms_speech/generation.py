"""Token generation: one audio prefill, then one-token decode steps on FMS's KV cache.

gpt-fast style: the model call is the same every step (input (B, 1), growing cache, mask and
position ids extended by FMS's own helpers), so a compiled model reuses one decode graph for
every step, batch size and prompt length. All search logic (greedy or beam) runs on tensors
outside the model call; the only per-step host sync is the "everyone done?" check.

Beam search reproduces transformers' `_beam_search` (5.x, early_stopping=False): 2K candidates
per row from the accumulated log-probs, the best K that did not stop continue, the best K that
stopped (eos or length limit) among the top K candidates are kept, scored with the length
penalty, and a row stops improving once its best running beam cannot beat its worst finished
one. Log-probs are those of our logits, which are already divided by logits_scaling.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from fms.utils import generation as fms_generation

from fms_speech._compat import extend_padding_kwargs

# transformers' "impossible" score: added to beams that may not be chosen
_EXCLUDED = -1.0e9


@dataclass
class GenerationOutput:
    sequences: list[list[int]]  # generated ids per input row, prompt and eos excluded
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int  # decode forward calls
    # per row: the mean log-probability of the generated tokens, eos included (the sequence
    # score with length_penalty 1), and the probability that the first token is eos
    mean_logprobs: list[float]
    first_eos_probs: list[float]


class _Greedy:
    """Argmax per row; a finished row is fed pad tokens so the batch keeps its shape."""

    def __init__(self, batch: int, max_new_tokens: int, eos: int, pad: int, device):
        self.eos, self.pad = eos, pad
        self.tokens = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.logprob_sums = torch.zeros(batch, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.steps = 0

    def advance(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Next input token per row, and None: no beam reordering."""
        best = logits.argmax(dim=-1)
        logprobs = F.log_softmax(logits.float(), dim=-1).gather(1, best[:, None])[:, 0]
        running = ~self.finished
        self.logprob_sums += torch.where(running, logprobs, 0.0)
        self.lengths += running.long()
        chosen = torch.where(self.finished, self.pad, best)
        self.tokens[:, self.steps] = chosen
        self.finished |= chosen == self.eos
        self.steps += 1
        return chosen, None

    def mean_logprobs(self) -> list[float]:
        return (self.logprob_sums / self.lengths.clamp(min=1)).tolist()

    def done(self) -> bool:
        return self.steps == self.tokens.shape[1] or bool(self.finished.all())

    def sequences(self) -> list[list[int]]:
        return [_until_eos(row, self.eos) for row in self.tokens[:, : self.steps].tolist()]


class _BeamSearch:
    """transformers' beam search on (rows, beams) tensors; see the module docstring."""

    def __init__(
        self,
        batch: int,
        num_beams: int,
        max_new_tokens: int,
        eos: int,
        length_penalty: float,
        device,
    ):
        self.batch, self.num_beams, self.max_new_tokens = batch, num_beams, max_new_tokens
        self.eos, self.length_penalty = eos, length_penalty
        self.num_candidates = 2 * num_beams  # enough to keep K running when K stop at once
        self.top_beams = torch.arange(self.num_candidates, device=device) < num_beams
        shape = (batch, num_beams)
        self.running_tokens = torch.zeros((*shape, max_new_tokens), dtype=torch.long, device=device)
        # only the first beam's continuations count on the first step: the beams are identical
        self.running_scores = torch.zeros(shape, device=device)
        self.running_scores[:, 1:] = _EXCLUDED
        self.finished_tokens = self.running_tokens.clone()
        self.finished_scores = torch.full(shape, _EXCLUDED, device=device)
        self.finished_lengths = torch.zeros(shape, dtype=torch.long, device=device)
        self.is_finished = torch.zeros(shape, dtype=torch.bool, device=device)
        self.improvable = torch.ones((batch, 1), dtype=torch.bool, device=device)
        self.all_stopped = False
        self.row_offsets = torch.arange(batch, device=device)[:, None] * num_beams
        self.steps = 0

    def advance(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next input token per beam (B*K,), and the flat beam each continues (cache order)."""
        vocab = logits.shape[-1]
        log_probs = F.log_softmax(logits.float(), dim=-1).view(self.batch, self.num_beams, vocab)
        accumulated = (log_probs + self.running_scores[:, :, None]).view(self.batch, -1)
        scores, flat_index = torch.topk(accumulated, k=self.num_candidates)
        source = flat_index // vocab
        new_tokens = flat_index % vocab
        tokens = _gather_beams(self.running_tokens, source)
        tokens[:, :, self.steps] = new_tokens
        length = self.steps + 1
        stopped = (new_tokens == self.eos) | (length >= self.max_new_tokens)

        running_scores = scores + stopped.float() * _EXCLUDED
        keep = torch.topk(running_scores, k=self.num_beams)[1]
        self.running_tokens = _gather_beams(tokens, keep)
        self.running_scores = _gather_beams(running_scores, keep)
        source = _gather_beams(source, keep)

        self._update_finished(tokens, scores, stopped, length)
        self._update_improvable(length)
        self.all_stopped = bool(stopped.all())
        self.steps = length
        flat_source = (source + self.row_offsets).view(-1)
        return self.running_tokens[:, :, self.steps - 1].reshape(-1), flat_source

    def _update_finished(self, tokens, scores, stopped, length: int):
        # only the top K candidates may finish; the rest are a reserve of running beams
        just_finished = stopped & self.top_beams[None, :]
        final_scores = scores / (length**self.length_penalty)
        final_scores = final_scores + (~self.improvable).float() * _EXCLUDED
        final_scores = final_scores + (~just_finished) * _EXCLUDED
        merged_scores = torch.cat((self.finished_scores, final_scores), dim=1)
        best = torch.topk(merged_scores, k=self.num_beams)[1]
        lengths = torch.full_like(scores, length, dtype=torch.long)
        self.finished_scores = _gather_beams(merged_scores, best)
        self.finished_tokens = _gather_beams(torch.cat((self.finished_tokens, tokens), 1), best)
        self.finished_lengths = _gather_beams(torch.cat((self.finished_lengths, lengths), 1), best)
        self.is_finished = _gather_beams(torch.cat((self.is_finished, just_finished), 1), best)

    def _update_improvable(self, length: int):
        # transformers' early_stopping=False heuristic: the best running beam at its current length
        best_running = self.running_scores[:, :1] / (length**self.length_penalty)
        worst_finished = torch.where(
            self.is_finished, self.finished_scores.min(dim=1, keepdim=True)[0], _EXCLUDED
        )
        can_improve = (best_running > worst_finished).any(dim=-1, keepdim=True)
        self.improvable = self.improvable & can_improve

    def done(self) -> bool:
        return self.all_stopped or not bool(self.improvable.any())

    def mean_logprobs(self) -> list[float]:
        # a finished score is sum(log p) / length ** length_penalty
        lengths = self.finished_lengths[:, 0].float()
        return (self.finished_scores[:, 0] * lengths ** (self.length_penalty - 1)).tolist()

    def sequences(self) -> list[list[int]]:
        best_tokens = self.finished_tokens[:, 0].tolist()
        lengths = self.finished_lengths[:, 0].tolist()
        return [_until_eos(t[:n], self.eos) for t, n in zip(best_tokens, lengths, strict=True)]


def _gather_beams(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor (B, N, ...) -> (B, M, ...) picking index (B, M) along the beam dimension."""
    index = index.view(*index.shape, *([1] * (tensor.dim() - index.dim())))
    return torch.take_along_dim(tensor, index, dim=1)


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def _select_rows(cache: list, rows: torch.Tensor) -> list:
    return [tuple(t.index_select(0, rows) for t in layer) for layer in cache]


def _synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int] | torch.Tensor],
    input_features: torch.Tensor | None = None,
    feature_lengths: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 200,
    eos_token_id: int,
    pad_token_id: int = 0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    on_tokens: Callable[[list[int]], None] | None = None,
) -> GenerationOutput:
    """Generate up to max_new_tokens per prompt: greedy, or beam search with num_beams > 1.

    model: a GraniteSpeech, or `fms_speech.compile.compile_model(model)`. prompts: token ids
    with the `<|audio|>` placeholders already expanded; row b's clip is input_features[b]
    (feature_lengths[b] valid frames). The audio LoRA is on for every row when features are
    given, off otherwise. on_tokens (greedy only): called after each step with the token chosen
    per row (pad for rows already finished), e.g. to stream text as it is written.
    """
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError("num_beams and max_new_tokens must be at least 1")
    if on_tokens is not None and num_beams > 1:
        raise ValueError("on_tokens reports greedy steps; beams are only known at the end")
    device = _model_device(model)
    prompt_tensors = [torch.as_tensor(p, dtype=torch.long, device=device) for p in prompts]
    input_ids, padding_kwargs = fms_generation.pad_input_ids(
        prompt_tensors, pad_token_id=pad_token_id
    )
    batch = input_ids.shape[0]
    gate = 1.0 if input_features is not None else 0.0
    lora_gate = torch.full((batch,), gate, device=device)

    with torch.no_grad():
        start = time.perf_counter()
        logits, cache = model(
            input_ids,
            input_features=input_features,
            feature_lengths=feature_lengths,
            use_cache=True,
            lora_gate=lora_gate,
            last_n_tokens=1,
            **padding_kwargs,
        )
        _synchronize(device)
        prefill_seconds = time.perf_counter() - start
        first_eos_probs = (
            F.softmax(logits[:, -1].float(), dim=-1)[:, eos_token_id].tolist()
            if eos_token_id >= 0  # -1: no token ends a sequence
            else [0.0] * batch
        )

        start = time.perf_counter()
        # one row per beam; the copy also gives the cache the layout of every later step (the
        # prefill's keys/values are transposed views): one compiled decode graph for all steps
        beam_rows = torch.arange(batch, device=device).repeat_interleave(num_beams)
        cache = _select_rows(cache, beam_rows)
        if num_beams == 1:
            search = _Greedy(batch, max_new_tokens, eos_token_id, pad_token_id, device)
        else:
            search = _BeamSearch(
                batch, num_beams, max_new_tokens, eos_token_id, length_penalty, device
            )
            logits = logits.index_select(0, beam_rows)
            lora_gate = lora_gate.index_select(0, beam_rows)
            padding_kwargs = {k: v.index_select(0, beam_rows) for k, v in padding_kwargs.items()}
        decode_steps = _decode(model, search, logits, cache, lora_gate, padding_kwargs, on_tokens)
        _synchronize(device)
        decode_seconds = time.perf_counter() - start
    return GenerationOutput(
        search.sequences(),
        prefill_seconds,
        decode_seconds,
        decode_steps,
        search.mean_logprobs(),
        first_eos_probs,
    )


def _decode(model, search, logits, cache, lora_gate, padding_kwargs, on_tokens) -> int:
    """One-token steps until the search is done; returns the number of model calls."""
    steps = 0
    while True:
        tokens, beam_source = search.advance(logits[:, -1])
        if on_tokens is not None:
            on_tokens(tokens.tolist())
        if search.done():
            return steps
        if beam_source is not None:
            cache = _select_rows(cache, beam_source)
        padding_kwargs = extend_padding_kwargs(True, padding_kwargs)
        # a fresh (N, 1) tensor: dynamo guards on the base of a view, which differs by search
        next_ids = tokens.view(-1, 1).clone()
        logits, cache = model(
            next_ids,
            past_key_value_states=cache,
            use_cache=True,
            lora_gate=lora_gate,
            last_n_tokens=1,
            **padding_kwargs,
        )
        steps += 1
