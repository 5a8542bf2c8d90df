"""`fms-speech train`: a tiny model's loss falls, resuming replays the same batches, the saved
hub-layout checkpoint loads in fms-speech and in the reference (transformers + peft) with equal
logits (1e-4); the compiled step's graph count (a strict expected failure for now).
"""

import json
import random

import peft
import pytest
import torch
import torch.nn.functional as F
from fms.models import get_model
from fms.models.granite import GraniteConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch._dynamo.utils import counters
from transformers import AutoTokenizer, GraniteSpeechForConditionalGeneration

from fms_speech import demo_recipe
from fms_speech import train as train_module
from fms_speech.export import save_pretrained
from fms_speech.models.conformer import ConformerConfig
from fms_speech.models.granite_speech import GraniteSpeechConfig
from fms_speech.models.qformer import QFormerConfig
from fms_speech.prompts import chat_text, instruction, prompt_ids
from fms_speech.reading import transcript_audio_ids, word_slot_loss
from fms_speech.testing.reference import relative_error
from fms_speech.train import (
    TrainingObjective,
    TrainOptions,
    batch_loss,
    compile_training_step,
    new_model,
    train,
)
from fms_speech.train_data import (
    CTC_ALPHABET,
    Augmentation,
    BatchMaker,
    BucketedBatches,
    SynthesizedSpeech,
    Voices,
)

TOLERANCE = 1e-4
WORDS = ("one", "two", "three", "four", "five", "red", "green", "blue")


def tiny_config(vocab_size: int, audio_token_index: int) -> GraniteSpeechConfig:
    return GraniteSpeechConfig(
        encoder_config=ConformerConfig(
            num_layers=2,
            hidden_dim=32,
            feedforward_mult=2,
            num_heads=2,
            dim_head=16,
            output_dim=len(CTC_ALPHABET) + 1,
            context_size=20,
            max_pos_emb=20,
            conv_kernel_size=5,
        ),
        projector_config=QFormerConfig(
            hidden_size=32,
            num_layers=1,
            num_heads=2,
            intermediate_size=64,
            encoder_hidden_size=32,
            output_size=48,
        ),
        text_config=GraniteConfig(
            src_vocab_size=vocab_size,
            emb_dim=48,
            nheads=4,
            head_dim=12,
            kvheads=2,
            nlayers=2,
            hidden_grow_factor=2.0,
            multiple_of=1,
            max_expected_seq_len=1024,
            rope_theta=10_000.0,
            tie_heads=False,
            embedding_multiplier=2.0,
            logits_scaling=4.0,
            residual_multiplier=0.5,
            attention_multiplier=12**-0.5,
        ),
        audio_token_index=audio_token_index,
        lora_rank=4,
        lora_alpha=8.0,
    )


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(4)) for _ in range(200)]
    return demo_recipe.build_tokenizer(texts + ["user assistant", instruction()], vocab_size=96)


def _source():
    def text(rng):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))

    voices = Voices(voices=("en", "en-US+f2"), rate=(260, 320))
    return SynthesizedSpeech(text, voices, Augmentation(pad_seconds=(0.0, 0.1)), seed=3)


@pytest.fixture(scope="module")
def trained(tokenizer, tmp_path_factory):
    """A tiny model trained for 30 compiled steps; (model, result, output dir, graphs compiled,
    the (features, tokens) shapes of its batches)."""
    directory = tmp_path_factory.mktemp("trained")
    config = tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<|audio|>"))
    model = new_model(config, seed=0)
    options = TrainOptions(
        steps=30,
        batch_size=4,
        learning_rate=3e-3,
        warmup_steps=5,
        save_every=10,
        workers=0,
        pool_batches=4,
        compile=True,
        word_slot_weight=1.0,  # the demo recipe's reading aids, so that their path is run
        transcript_audio=0.25,
        reading_steps=10,
    )
    shapes = []

    def recorded(step_fn, batch, *args):
        shapes.append((tuple(batch.features.shape), tuple(batch.input_ids.shape)))
        return batch_loss(step_fn, batch, *args)

    before = counters["stats"]["unique_graphs"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "batch_loss", recorded)
        result = train(model, tokenizer, _source(), options, directory, progress=False)
    graphs = counters["stats"]["unique_graphs"] - before
    return model, result, directory, graphs, shapes


def test_training_loss_falls_and_saves(trained):
    _, result, directory, _, _ = trained
    assert result.steps == 30
    first, last = result.losses[:5], result.losses[-5:]
    # measured with the demo recipe's reading aids (lessons, word slots, transcript rows): the
    # last five steps average 0.69 of the first five (11.07 -> 7.66; 0.75 without them)
    assert sum(last) / 5 < 0.85 * sum(first) / 5, result.losses
    assert sum(result.cross_entropy[-5:]) < sum(result.cross_entropy[:5])
    assert sum(result.ctc[-5:]) < sum(result.ctc[:5])
    assert (directory / "training_state.pt").is_file()
    assert json.loads((directory / "adapter_config.json").read_text())["r"] == 4


def test_compiled_training_step_is_one_graph(trained):
    """30 compiled steps on batches of many audio and token lengths: one graph (its forward
    and backward), and the model is left with inference's convolution kernel."""
    model, _, _, graphs, shapes = trained
    assert len(shapes) == 30
    assert len({features[1] for features, _ in shapes}) >= 5, shapes
    assert len({tokens[1] for _, tokens in shapes}) >= 5, shapes
    assert graphs == 1, f"{graphs} graphs compiled"
    assert not any(getattr(module, "windowed", False) for module in model.modules())


def test_compiled_step_equals_eager(tokenizer):
    """The compiled objective's losses and gradients are the eager ones on the same batches."""
    config = tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<|audio|>"))
    template = chat_text(tokenizer, instruction())
    c = config.projector_config
    maker = BatchMaker(tokenizer, template, c.window_size, c.downsample_rate)
    batches = list(BucketedBatches(_source(), maker, 4, start=0, stop=2, pool_batches=2, seed=5))
    options = TrainOptions(word_slot_weight=1.0, transcript_audio=0.25)
    runs = []
    for compiled in (False, True):
        model = new_model(config, seed=0)
        model.train()
        objective = TrainingObjective(model, with_ctc=True, with_slot_logits=True)
        step_fn = compile_training_step(objective) if compiled else objective
        losses, grads = [], []
        for index, batch in enumerate(batches):
            model.zero_grad()
            loss, cross_entropy, ctc = batch_loss(step_fn, batch, options, random.Random(index))
            loss.backward()
            losses.append(torch.stack([loss, cross_entropy, ctc]).detach())
            grads.append(torch.cat([_grad(p).flatten() for p in model.parameters()]))
        runs.append((losses, grads))
    (eager_losses, eager_grads), (compiled_losses, compiled_grads) = runs
    for eager, compiled in zip(
        eager_losses + eager_grads, compiled_losses + compiled_grads, strict=True
    ):
        # float32; inductor fuses and reorders sums, so not bit-equal (the losses' difference
        # was not recorded; the recipe's model gave the same losses to 4 decimals)
        assert relative_error(compiled, eager) < 1e-4


def _grad(parameter: torch.nn.Parameter) -> torch.Tensor:
    return torch.zeros_like(parameter) if parameter.grad is None else parameter.grad


def _resumed_losses(tokenizer, directory, steps, resume):
    config = tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<|audio|>"))
    model = new_model(config, seed=0)
    options = TrainOptions(
        steps=steps,
        batch_size=3,
        warmup_steps=2,
        save_every=2,
        compile=False,
        workers=0,
        pool_batches=2,
    )
    return train(model, tokenizer, _source(), options, directory, resume=resume, progress=False)


def test_resume_continues_with_the_same_batches_and_weights(tokenizer, tmp_path):
    whole = _resumed_losses(tokenizer, tmp_path / "whole", 4, resume=False)
    _resumed_losses(tokenizer, tmp_path / "cut", 2, resume=False)
    # the interrupted run saved its state at step 2; continue it to step 4
    state = torch.load(tmp_path / "cut" / "training_state.pt", weights_only=False)
    state["options"]["steps"] = 4
    torch.save(state, tmp_path / "cut" / "training_state.pt")
    rest = _resumed_losses(tokenizer, tmp_path / "cut", 4, resume=True)
    assert rest.steps == 2
    # not bit-exact: eSpeak NG's output for the same text varies with what the engine spoke
    # before (checked: "one two three" twice, with a sentence between, differs in length), here
    # 2.7e-5 relative; other batches or weights differ by far more (~10% between batches)
    assert rest.losses == pytest.approx(whole.losses[2:], rel=1e-3)


def _reference(directory):
    """transformers' model; its PEFT integration loads the adapter beside config.json."""
    model, info = GraniteSpeechForConditionalGeneration.from_pretrained(
        directory, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    assert list(model.peft_config) == ["default"]
    assert isinstance(model.peft_config["default"], peft.LoraConfig)
    return model.eval()


def test_saved_checkpoint_loads_in_fms_and_reference_with_equal_logits(tokenizer, tmp_path):
    config = tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<|audio|>"))
    model = new_model(config, seed=1)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # non-trivial values everywhere, the LoRA's zero B included
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and "rot_emb" not in name:
                tensor.add_(0.2 * torch.randn(tensor.shape, generator=generator))
        batch_norm = model.encoder.layers[0].conv.batch_norm
        batch_norm.running_var.uniform_(0.5, 1.5, generator=generator)
    model.eval()
    save_pretrained(model, tokenizer, tmp_path)
    for name in ("config.json", "model.safetensors", "adapter_config.json"):
        assert (tmp_path / name).is_file()
    assert "GraniteSpeechFeatureExtractor" in (tmp_path / "preprocessor_config.json").read_text()
    loaded = get_model("hf_pretrained", model_path=str(tmp_path)).eval()
    reference = _reference(tmp_path)
    saved_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    template = chat_text(saved_tokenizer, instruction())
    scaling = config.text_config.logits_scaling
    for frames in (7, 40, 61):
        features = torch.randn(1, frames, 160, generator=generator)
        count = int(model.audio_token_counts(features).item())
        ids = torch.tensor([prompt_ids(saved_tokenizer, template, count)])
        with torch.no_grad():
            ours = model(ids, input_features=features)
            fms = loaded(ids, input_features=features)
            theirs = reference(input_ids=ids, input_features=features).logits / scaling
        assert relative_error(fms, ours) <= TOLERANCE
        assert relative_error(theirs, ours) <= TOLERANCE
    text_ids = torch.tensor([saved_tokenizer("one two three")["input_ids"]])
    # the LoRA off, through peft's layers (transformers' disable_adapters() wants peft >= 0.22)
    for module in reference.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(False)
    with torch.no_grad():
        theirs = reference(input_ids=text_ids).logits / scaling
        ours = model(text_ids)
    assert relative_error(theirs, ours) <= TOLERANCE


def _maker(tokenizer):
    from fms_speech.train_data import BatchMaker

    config = tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<|audio|>"))
    c = config.projector_config
    return BatchMaker(
        tokenizer, chat_text(tokenizer, instruction()), c.window_size, c.downsample_rate
    )


def _batch(tokenizer, texts, timed=True):
    """A batch of noise clips (2 s and longer) with these transcripts, their words spoken 0.8 s
    apart from 0.2 s on (where timed)."""
    generator = torch.Generator().manual_seed(0)
    examples = []
    for i, text in enumerate(texts):
        waveform = 0.1 * torch.randn(32000 + 8000 * i, generator=generator)
        starts = [0.2 + 0.8 * k for k in range(len(text.split()))]
        examples.append((waveform, text, (starts, starts[-1] + 0.8)) if timed else (waveform, text))
    return _maker(tokenizer)(examples)


def test_spoken_tokens_follow_the_word_timing(tokenizer):
    maker = _maker(tokenizer)
    # vector s sits at (s + 0.5) * 0.1 s (downsample 5 of 50 frames a second)
    tokens = maker.spoken_tokens("one two three", [0.1, 0.5, 0.9], 1.5, 17).tolist()
    one, two = (tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("one", "two"))
    three = tokenizer("three", add_special_tokens=False)["input_ids"]
    assert len(one) == len(two) == 1 < len(three)  # the tiny tokenizer splits "three"
    pad = tokenizer.pad_token_id
    assert tokens[:5] == [pad] + one * 4  # 0.05 s: silence; 0.15-0.45 s: "one"
    assert tokens[5:9] == two * 4
    # "three" (0.9-1.5 s, six vectors) shares its time among its pieces, in order
    assert [t for i, t in enumerate(tokens[9:15]) if i == 0 or t != tokens[8 + i]] == three
    assert tokens[15:] == [pad, pad]
    # a timing with another number of words than the text teaches nothing
    assert set(maker.spoken_tokens("one two three", [0.1, 0.5], 1.5, 17).tolist()) == {-100}


def test_transcript_audio_reads_the_spoken_tokens_in_place_of_the_audio(tokenizer):
    texts = ["one two", "red", "green one red", "blue green", "two", "red blue one two"]
    batch = _batch(tokenizer, texts)
    counts = (batch.input_ids == batch.audio_token_index).sum(dim=1).tolist()
    ids = transcript_audio_ids(batch, 0.5, random.Random(0))
    assert ids.shape == (len(texts), max(counts))
    replaced = [row for row in range(len(texts)) if bool((ids[row] >= 0).any())]
    assert 0 < len(replaced) < len(texts)  # rows are drawn, about half of them
    for row in range(len(texts)):
        expected = batch.slot_tokens[row, : counts[row]] if row in replaced else -1
        assert bool((ids[row, : counts[row]] == expected).all())
        assert bool((ids[row, counts[row] :] == -1).all())
    # the transcript's tokens are what the replaced rows read, in order
    row = replaced[0]
    spoken = ids[row, : counts[row]].tolist()
    words = [
        t for i, t in enumerate(spoken) if t != batch.pad_id and (i == 0 or t != spoken[i - 1])
    ]
    assert words == tokenizer(texts[row], add_special_tokens=False)["input_ids"]
    # rows without word timing (a manifest's) are never replaced
    untimed = _batch(tokenizer, texts, timed=False)
    assert bool((transcript_audio_ids(untimed, 0.99, random.Random(4)) == -1).all())


def test_word_slot_loss_prefers_the_spoken_tokens_and_skips_replaced_rows(tokenizer):
    batch = _batch(tokenizer, ["one two", "red blue", "green one red"])
    rows, steps = batch.slot_tokens.shape
    targets = batch.slot_tokens.clamp(min=0)
    right = 20.0 * F.one_hot(targets, len(tokenizer)).float()
    wrong = 20.0 * F.one_hot(targets.roll(3, dims=1), len(tokenizer)).float()
    assert (
        float(word_slot_loss(right, batch, None))
        < 1e-3
        < 1.0
        < float(word_slot_loss(wrong, batch, None))
    )
    mixed = right.clone()
    mixed[2] = wrong[2]
    audio_ids = torch.full((rows, steps), -1)
    audio_ids[2, 0] = 5  # row 2 read its transcript: its vectors are not judged
    assert float(word_slot_loss(mixed, batch, audio_ids)) < 1e-3
