"""Reading lessons: the LLM learns to copy a transcript out of its audio positions, before any
audio is heard.

A small LLM trained from scratch beside an untrained encoder learns the text prior and then
ignores the audio vectors (docs/demo-model.md). The lessons give it the skill first, cheaply
(no encoder, no synthesis): prompts whose audio positions hold the tokens of a sentence as it
would be spoken, each token repeated over the positions its word would last, pad tokens for
the silence around it (the format the word-slot loss then teaches the projector to write, see
fms_speech.train), and the transcript as the answer. The LLM and its audio LoRA train on them.
"""

import math
import random

import torch
import torch.nn.functional as F

from fms_speech.models.granite_speech import GraniteSpeech
from fms_speech.prompts import AUDIO_PLACEHOLDER, prompt_ids
from fms_speech.train_data import IGNORE_INDEX, Batch, padded_rows

# audio vectors per character of a word: 10 vectors a second at 150-230 words a minute
VECTORS_PER_CHARACTER = (0.35, 0.8)


def spoken_slots(tokenizer, text: str, rng: random.Random) -> list[int]:
    """The tokens of `text` as the audio vectors of its speech would carry them: each word's
    tokens over the positions the word lasts (at a speaking rate drawn per sentence), pad
    tokens before and after."""
    pad = tokenizer.pad_token_id
    rate = rng.uniform(*VECTORS_PER_CHARACTER)
    slots = [pad] * rng.randint(0, 4)
    for word in text.split():
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        length = max(len(pieces), round(len(word) * rate * rng.uniform(0.7, 1.3)))
        slots += [pieces[i * len(pieces) // length] for i in range(length)]
    return slots + [pad] * rng.randint(0, 4)


def lesson_batch(tokenizer, template: str, texts: list[str], rng: random.Random):
    """(input ids, labels), right-padded: prompts with the spoken slots in place of the audio."""
    audio_id = tokenizer.convert_tokens_to_ids(AUDIO_PLACEHOLDER)
    rows, label_rows = [], []
    for text in texts:
        slots = spoken_slots(tokenizer, text, rng)
        prompt = prompt_ids(tokenizer, template, len(slots))
        first = prompt.index(audio_id)
        prompt[first : first + len(slots)] = slots
        answer = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        label_rows.append([IGNORE_INDEX] * (len(prompt) - 1) + answer + [IGNORE_INDEX])
    return padded_rows(rows, label_rows, tokenizer.pad_token_id)


def answer_loss(model: GraniteSpeech, embeds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The LLM's cross-entropy on the labelled tokens of `embeds`, its audio LoRA on (every
    training prompt carries audio, or stands for it)."""
    llm = model.language_model
    gate = model._adapter_gate
    if gate is not None:
        gate.value = torch.ones(embeds.shape[0], device=embeds.device)
    try:
        logits, _ = llm(embeds, use_cache=True)
    finally:
        if gate is not None:
            gate.value = None
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX
    )


def lesson_loss(model: GraniteSpeech, input_ids, labels) -> torch.Tensor:
    """The cross-entropy on a lesson's answer: its prompt is all token embeddings."""
    return answer_loss(model, model.language_model.base_model.embedding(input_ids), labels)


def teach_reading(
    model: GraniteSpeech,
    tokenizer,
    template: str,
    text_source,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int = 0,
    on_step=None,
) -> list[float]:
    """Train the LLM and its LoRA on `steps` lesson batches; returns the losses."""
    parameters = [
        p for name, p in model.named_parameters() if not name.startswith(("encoder.", "projector."))
    ]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, betas=(0.9, 0.98), fused=True)
    warmup = max(1, min(100, steps // 10))
    losses = []
    model.train()
    for step in range(steps):
        rng = random.Random(f"{seed}/reading/{step}")
        texts = [text_source(rng) for _ in range(batch_size)]
        # linear warm-up, then cosine decay to a tenth
        decay = 0.55 + 0.45 * math.cos(math.pi * max(0, step - warmup) / max(1, steps - warmup))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * min((step + 1) / warmup, decay)
        loss = lesson_loss(model, *lesson_batch(tokenizer, template, texts, rng))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
    return losses


# ---- during training: transcript rows and the word-slot loss (fms_speech.train)


def transcript_audio_ids(batch: Batch, share: float, rng: random.Random) -> torch.Tensor:
    """(B, audio vectors): for about `share` of the rows with word timing, the token spoken at
    each audio vector (pad in silence); -1 for the other rows and past a row's vectors."""
    counts = (batch.input_ids == batch.audio_token_index).sum(dim=1).tolist()
    ids = torch.full((len(counts), max(counts)), -1, dtype=torch.long)
    if batch.slot_tokens is None:
        return ids
    for row, count in enumerate(counts):
        spoken = batch.slot_tokens[row, :count]
        if bool((spoken != IGNORE_INDEX).all()) and rng.random() < share:
            ids[row, :count] = spoken
    return ids


def word_slot_loss(slot_logits, batch: Batch, audio_ids) -> torch.Tensor:
    """Cross-entropy of the audio vectors' token logits (B, T, V) against the token spoken at
    each one's time, over the rows whose audio was not replaced."""
    targets = batch.slot_tokens
    if targets is None:
        return slot_logits.sum() * 0
    if audio_ids is not None:
        targets = targets.masked_fill((audio_ids >= 0).any(dim=1, keepdim=True), IGNORE_INDEX)
    if not bool((targets != IGNORE_INDEX).any()):
        return slot_logits.sum() * 0
    return F.cross_entropy(
        slot_logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
    )


def transcript_audio(embedding, audio, audio_ids):
    """`audio` with the rows of `audio_ids` >= 0 replaced by those tokens' embeddings: what
    the reading lessons put there."""
    replaced = (audio_ids >= 0).any(dim=1)[:, None, None]
    return torch.where(replaced, embedding(audio_ids.clamp(min=0)).to(audio.dtype), audio)
