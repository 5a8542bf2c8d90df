"""Reading lessons (fms_speech.reading): the spoken-slot format, the lesson batches, and that a
small LLM learns from them to copy what its audio positions hold."""

import math
import random

import pytest
import torch

from fms_speech import demo_recipe
from fms_speech.prompts import chat_text, instruction
from fms_speech.reading import lesson_batch, lesson_loss, spoken_slots, teach_reading
from fms_speech.train import new_model
from fms_speech.train_data import IGNORE_INDEX

WORDS = ("one", "two", "three", "four", "five", "red", "green", "blue", "seven", "eight")


@pytest.fixture(scope="module")
def tokenizer():
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 20
    # large enough for one token per word, as in the demo recipe
    return demo_recipe.build_tokenizer(texts + ["user assistant", instruction()], 2048)


def _collapsed(slots, pad):
    return [t for i, t in enumerate(slots) if t != pad and (i == 0 or t != slots[i - 1])]


def test_spoken_slots_hold_each_word_over_its_duration(tokenizer):
    rng = random.Random(0)
    text = "seven red green one"
    slots = spoken_slots(tokenizer, text, rng)
    pad = tokenizer.pad_token_id
    words = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(words) == 4
    assert _collapsed(slots, pad) == words  # in order, each word once
    inner = slots[next(i for i, t in enumerate(slots) if t != pad) :]
    runs = [sum(1 for t in inner if t == word) for word in words]
    assert all(run >= 1 for run in runs) and max(runs) > 1  # words last several positions
    assert len(slots) >= sum(runs)


def test_lesson_batch_puts_the_slots_in_the_audio_positions(tokenizer):
    template = chat_text(tokenizer, instruction())
    texts = ["one two", "blue green red five"]
    input_ids, labels = lesson_batch(tokenizer, template, texts, random.Random(1))
    audio_id = tokenizer.convert_tokens_to_ids("<|audio|>")
    assert not bool((input_ids == audio_id).any())  # every placeholder became a slot
    for row, text in enumerate(texts):
        answer = tokenizer(text, add_special_tokens=False)["input_ids"]
        targets = labels[row][labels[row] != IGNORE_INDEX].tolist()
        assert targets == answer + [tokenizer.eos_token_id]
        # the row's prompt carries the spoken words before the answer
        first_label = int((labels[row] != IGNORE_INDEX).nonzero()[0])
        prompt = input_ids[row, : first_label + 1].tolist()
        assert _collapsed([t for t in prompt if t in answer], -1) == answer


def test_lessons_teach_a_small_llm_to_copy(tokenizer):
    """The recipe's model (2 LLM layers) on a ten-word language: the cross-entropy of the
    answers falls far below the level of guessing the words (ln 10 = 2.3 per word)."""
    config = demo_recipe.model_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<|audio|>"))
    model = new_model(config, seed=0)
    template = chat_text(tokenizer, instruction())

    def text_source(rng):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6)))

    losses = teach_reading(model, tokenizer, template, text_source, 300, 8, 2e-3, seed=0)
    rng = random.Random("held-out")
    batch = lesson_batch(tokenizer, template, [text_source(rng) for _ in range(16)], rng)
    model.eval()
    with torch.no_grad():
        loss = float(lesson_loss(model, *batch))
    # measured: 1.09 after 300 steps (the first step: the whole vocabulary, above 4)
    assert losses[0] > 4.0
    assert loss < 0.7 * math.log(len(WORDS)), (loss, losses[-10:])
