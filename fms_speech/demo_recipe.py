"""The demo model's recipe: its configuration, tokenizer, texts, voices and training options.

`fms-speech train --recipe demo --output DIR` rebuilds the model shipped in
fms_speech/assets/demo (see docs/demo-model.md). Texts are random sentences over the English
word list of Faker's `en_US` lorem provider (971 common words); the held-out set for evaluation
draws its sentences from another seed and is spoken by a voice variant never used in training.
"""

import random
from pathlib import Path

from fms.models.granite import GraniteConfig

from fms_speech.models.conformer import ConformerConfig
from fms_speech.models.granite_speech import GraniteSpeechConfig
from fms_speech.models.qformer import QFormerConfig
from fms_speech.prompts import CHAT_TEMPLATE
from fms_speech.train_data import CTC_ALPHABET, Augmentation, Voices

EOS, PAD, UNK, START_ROLE, END_ROLE, AUDIO = (
    "<|end_of_text|>",
    "<|pad|>",
    "<|unk|>",
    "<|start_of_role|>",
    "<|end_of_role|>",
    "<|audio|>",
)
SPECIAL_TOKENS = [EOS, PAD, UNK, START_ROLE, END_ROLE, AUDIO]
# large enough that every word of the list is one token (1,952 are used): each word then has
# one token for the audio vectors that speak it to write (the word-slot loss, fms_speech.train)
VOCAB_SIZE = 2048

TRAIN_VOICES = Voices(
    voices=tuple(
        f"{language}{variant}"
        for language in ("en", "en-US", "en-GB-x-rp")
        for variant in ("", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6", "+f1", "+f2", "+f3", "+f4")
    ),
)
# evaluation: a voice variant (male7) that training never hears, at eSpeak's default settings
HELD_OUT_VOICE = "en-US+m7"
TRAIN_SEED, HELD_OUT_SEED = 0, 1_000_003
AUGMENTATION = Augmentation()

# training: what `--recipe demo` runs (fms_speech.train.TrainOptions fields)
TRAIN_OPTIONS = dict(
    steps=8500,
    batch_size=8,
    learning_rate=2e-3,
    warmup_steps=200,
    ctc_weight=0.5,
    word_slot_weight=0.5,
    reading_steps=4000,
    transcript_audio=0.25,
    save_every=500,
    seed=TRAIN_SEED,
    pool_batches=32,
    compile=True,  # one graph for every batch; 1.1x the eager loop (docs/demo-model.md)
)


def word_list() -> tuple[str, ...]:
    from faker.providers.lorem.en_US import Provider

    return tuple(dict.fromkeys(word.lower() for word in Provider.word_list))


def sentence(rng: random.Random, words: tuple[str, ...] | None = None) -> str:
    """3 to 10 random words, lower case (the transcript style the model learns)."""
    words = words or _words()
    return " ".join(rng.choice(words) for _ in range(rng.randint(3, 10)))


_WORDS: tuple[str, ...] = ()


def _words() -> tuple[str, ...]:
    global _WORDS
    if not _WORDS:
        _WORDS = word_list()
    return _WORDS


def held_out_sentences(count: int) -> list[str]:
    """The evaluation sentences: another seed than any training example."""
    rng = random.Random(f"held-out/{HELD_OUT_SEED}")
    return [sentence(rng) for _ in range(count)]


def model_config(vocab_size: int = VOCAB_SIZE, audio_token_index: int = 5) -> GraniteSpeechConfig:
    encoder = ConformerConfig(
        num_layers=5,
        hidden_dim=96,
        feedforward_mult=4,
        num_heads=2,
        dim_head=48,
        output_dim=len(CTC_ALPHABET) + 1,  # characters + the CTC blank
        context_size=100,
        max_pos_emb=100,
        conv_kernel_size=15,
        conv_expansion_factor=2,
    )
    projector = QFormerConfig(
        hidden_size=96,
        num_layers=2,
        num_heads=2,
        intermediate_size=384,
        cross_attention_frequency=1,
        encoder_hidden_size=96,
        window_size=15,
        downsample_rate=5,
        output_size=128,
    )
    text = GraniteConfig(
        src_vocab_size=vocab_size,
        emb_dim=128,
        norm_eps=1e-5,
        nheads=4,
        head_dim=32,
        kvheads=2,
        nlayers=2,
        hidden_grow_factor=384 / 128,
        multiple_of=1,
        max_expected_seq_len=4096,
        rope_theta=10_000.0,
        p_dropout=0.0,
        tie_heads=True,
        embedding_multiplier=1.0,
        logits_scaling=1.0,
        residual_multiplier=1.0,
        attention_multiplier=32**-0.5,
        activation_fn="silu",
    )
    return GraniteSpeechConfig(
        encoder_config=encoder,
        projector_config=projector,
        text_config=text,
        audio_token_index=audio_token_index,
        lora_rank=8,
        lora_alpha=16.0,
    )


def build_tokenizer(texts, vocab_size: int = VOCAB_SIZE):
    """A byte-pair tokenizer learned from `texts`, with Granite's special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[START_ROLE, END_ROLE, AUDIO],
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tokenizer_texts(count: int = 20000) -> list[str]:
    """What the tokenizer learns from: training-stream sentences and the prompt's words."""
    from fms_speech.prompts import TRANSCRIBE_INSTRUCTION

    rng = random.Random(f"tokenizer/{TRAIN_SEED}")
    return [sentence(rng) for _ in range(count)] + ["user assistant", TRANSCRIBE_INSTRUCTION] * 100


def text_source(rng: random.Random) -> str:
    return sentence(rng)


def save_tokenizer(directory: Path):
    tokenizer = build_tokenizer(tokenizer_texts())
    tokenizer.save_pretrained(directory)
    return tokenizer


def speak(text: str, voice: str = HELD_OUT_VOICE, **settings):
    """16 kHz float32 samples of eSpeak NG speaking `text` (rate, pitch... as keywords)."""
    from fms_speech.audio import prepare_waveform
    from fms_speech.synthesis import synthesize

    samples, sample_rate = synthesize(text, voice, **settings)
    return prepare_waveform(samples, sample_rate).numpy()


def speech_bounds(samples, threshold: float = 1e-3) -> tuple[int, int]:
    """First and last sample louder than `threshold`: eSpeak NG pads its output with silence."""
    import numpy as np

    loud = np.flatnonzero(np.abs(samples) > threshold)
    return (int(loud[0]), int(loud[-1]) + 1) if len(loud) else (0, 0)


def passage(sentences, voice: str = HELD_OUT_VOICE, pauses=(0.6, 1.4), seed: int = 0):
    """Sentences spoken one after another with silent pauses between them.

    Returns (16 kHz samples, [(speech start, speech end) in seconds per sentence]): the true
    pauses lie between one sentence's end and the next one's start.
    """
    import numpy as np

    from fms_speech.audio import SAMPLE_RATE

    rng = random.Random(f"passage/{seed}")
    parts, spans, cursor = [], [], 0
    for index, text in enumerate(sentences):
        samples = speak(text, voice)
        start, end = speech_bounds(samples)
        samples = samples[start:end]
        if index:
            gap = np.zeros(int(rng.uniform(*pauses) * SAMPLE_RATE), np.float32)
            parts.append(gap)
            cursor += len(gap)
        spans.append((cursor / SAMPLE_RATE, (cursor + len(samples)) / SAMPLE_RATE))
        parts.append(samples)
        cursor += len(samples)
    return np.concatenate(parts), spans


def write_held_out(directory: Path, count: int, voice: str = HELD_OUT_VOICE) -> Path:
    """`count` held-out sentences as wav files and a manifest.jsonl; returns the manifest."""
    import json

    from fms_speech.synthesis import write_audio

    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, text in enumerate(held_out_sentences(count)):
        path = directory / f"{index:03d}.wav"
        write_audio(path, speak(text, voice), 16000, "wav")
        lines.append(json.dumps({"audio": path.name, "text": text}))
    manifest = directory / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def write_passage(directory: Path, seconds: float, first: int = 100) -> Path:
    """Held-out sentences from number `first` on, joined with pauses, at least `seconds` long:
    passage.wav, a one-line manifest.jsonl, spans.json (each sentence's speech in seconds) and
    sentences.jsonl (the same sentences one by one, trimmed as in the passage)."""
    import json

    from fms_speech.synthesis import write_audio

    directory.mkdir(parents=True, exist_ok=True)
    count = 8
    while True:
        sentences = held_out_sentences(first + count)[first:]
        samples, spans = passage(sentences, seed=first)
        if len(samples) / 16000 >= seconds:
            break
        count = int(count * 1.05 * seconds / (len(samples) / 16000)) + 1
    write_audio(directory / "passage.wav", samples, 16000, "wav")
    text = " ".join(sentences)
    (directory / "manifest.jsonl").write_text(
        json.dumps({"audio": "passage.wav", "text": text}) + "\n"
    )
    (directory / "spans.json").write_text(json.dumps(spans) + "\n")
    lines = []
    for index, sentence in enumerate(sentences):
        clip = speak(sentence)
        start, end = speech_bounds(clip)
        write_audio(directory / f"sentence{index:03d}.wav", clip[start:end], 16000, "wav")
        lines.append(json.dumps({"audio": f"sentence{index:03d}.wav", "text": sentence}))
    (directory / "sentences.jsonl").write_text("\n".join(lines) + "\n")
    return directory / "manifest.jsonl"


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="the demo model's evaluation audio")
    parser.add_argument("what", choices=["held-out", "passage"])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--count", type=int, default=100, help="held-out sentences")
    parser.add_argument("--seconds", type=float, default=300.0, help="passage length")
    args = parser.parse_args()
    if args.what == "held-out":
        print(write_held_out(args.directory, args.count))
    else:
        print(write_passage(args.directory, args.seconds))
