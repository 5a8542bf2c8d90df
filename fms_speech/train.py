"""`fms-speech train`: train a Granite Speech model on (audio, text) pairs.

The loss is the LLM's cross-entropy on the transcript tokens (the prompt carries the audio at
its `<|audio|>` placeholders, as in inference), plus optionally CTC on the encoder's own `out`
head (characters, after the last layer and at the self-conditioned middle layer), as IBM trained
the encoder. What trains is chosen by part (encoder, projector, lora, llm). AdamW, linear
warm-up then cosine decay, gradient clipping; batches by length (fms_speech.train_data).

The training step (forward + backward) runs under torch.compile with dynamic shapes: one graph
for every audio length, prompt length and transcript length (fms_speech.compile). Every
`save_every` steps the run saves `training_state.pt` (weights, optimizer, schedule, step, RNG
states) in the output directory; `--resume` continues from it with the same batches. At the end
the output directory holds a hub-layout checkpoint (fms_speech.export).
"""

import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fms_speech._compat import fx_config
from fms_speech.audio import FRAMES_PER_SECOND
from fms_speech.models.conformer import ConformerConvModule, frame_mask
from fms_speech.models.granite_speech import GraniteSpeech, GraniteSpeechConfig
from fms_speech.prompts import chat_text, instruction
from fms_speech.reading import (
    answer_loss,
    teach_reading,
    transcript_audio,
    transcript_audio_ids,
    word_slot_loss,
)
from fms_speech.train_data import (
    CTC_ALPHABET,
    CTC_BLANK,
    Batch,
    BatchMaker,
    BucketedBatches,
    batch_loader,
)

PARTS = ("encoder", "projector", "lora", "llm")
STATE_FILE = "training_state.pt"


@dataclass(frozen=True)
class TrainOptions:
    steps: int = 1000
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    final_lr_ratio: float = 0.05  # the cosine decays to learning_rate * this
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    parts: tuple[str, ...] = PARTS  # what trains; IBM trained encoder, projector and lora
    ctc_weight: float = 0.5  # 0: the LLM's cross-entropy alone
    # cross-entropy of each audio vector read through the LLM's norm and head against the
    # token spoken at its time (synthesised speech's word timing; pad in silence): teaches the
    # projector to write the words where they are spoken, in the LLM's own embedding space
    word_slot_weight: float = 0.0
    # share of rows whose audio vectors are replaced by those spoken tokens' embeddings: a
    # reading lesson for the LLM that needs no trained encoder (docs/demo-model.md)
    transcript_audio: float = 0.0
    # reading lessons (fms_speech.reading) for the LLM before the first step of a fresh run
    reading_steps: int = 0
    compile: bool = True
    save_every: int = 200
    seed: int = 0
    pool_batches: int = 16
    workers: int = 1  # background processes making batches (0: in the training process)

    def __post_init__(self):
        unknown = set(self.parts) - set(PARTS)
        if unknown or not self.parts:
            raise ValueError(f"--train takes parts among {', '.join(PARTS)}, not {unknown or '{}'}")
        if self.steps < 1 or self.batch_size < 1 or self.save_every < 1:
            raise ValueError("steps, batch_size and save_every must be at least 1")
        if self.ctc_weight < 0 or self.word_slot_weight < 0 or self.learning_rate <= 0:
            raise ValueError("the loss weights must be >= 0 and the learning rate > 0")
        if not 0 <= self.transcript_audio < 1:
            raise ValueError("--transcript-audio is a share of rows: at least 0, below 1")


class TrainingObjective(nn.Module):
    """GraniteSpeech's forward for training: the LLM's cross-entropy and the CTC logits.

    Returns (cross-entropy, CTC log-probs after the encoder's last layer, at its middle layer or
    None, the audio vectors' token logits or None), log-probs (T, B, classes), logits (B, audio
    vectors, vocabulary). The CTC loss itself runs eagerly on them (`ctc_loss`): its output
    shape depends on data, which torch.compile cannot trace. `audio_ids` (B, audio vectors),
    where given, holds token ids for the rows whose audio vectors are to be replaced by those
    tokens' embeddings, -1 elsewhere.
    """

    def __init__(self, model: GraniteSpeech, with_ctc: bool, with_slot_logits: bool = False):
        super().__init__()
        self.model = model
        self.with_ctc = with_ctc
        self.with_slot_logits = with_slot_logits

    def forward(self, tokens, features, feature_lengths, audio_ids=None):
        # tokens (2, B, L): input ids and labels in one tensor, so that both have the same
        # symbolic length (passed apart, dynamo specialised the labels' length and recompiled
        # for every batch)
        input_ids, labels = tokens.unbind(0)
        model = self.model
        llm = model.language_model
        hidden, mid_logits = model.encoder.forward_with_ctc(features, feature_lengths)
        audio = model.projector(hidden, frame_mask(feature_lengths, features.shape[1]))
        slot_logits = None
        if self.with_slot_logits:
            slot_logits = llm.head(llm.base_model.dec_norm(audio))
        if audio_ids is not None:
            audio = transcript_audio(llm.base_model.embedding, audio, audio_ids)
        is_audio = input_ids == model.config.audio_token_index
        text_ids = torch.where(is_audio, torch.zeros_like(input_ids), input_ids)
        embeds = llm.base_model.embedding(text_ids)
        embeds = model._merge_audio(input_ids, embeds, audio)
        cross_entropy = answer_loss(model, embeds, labels)
        if not self.with_ctc:
            return cross_entropy, None, None, slot_logits
        final = _log_probs(model.encoder.out(hidden))
        mid = _log_probs(mid_logits) if mid_logits is not None else None
        return cross_entropy, final, mid, slot_logits


def compile_training_step(objective: TrainingObjective) -> Callable[..., tuple]:
    """The objective under compile_model, one graph (forward and backward) for every length.

    Two things differ from inference, both because the backward would otherwise turn the
    first batch's lengths into constants and recompile for every batch: the encoder's
    depthwise convolutions run as products over windows (`ConformerConvModule.windowed`), and
    shapes are not reasoned about size-obliviously while it compiles (with it, AOTAutograd
    cannot prove a saved activation's symbolic strides equal to the integer strides inductor
    reports for it, and gives the backward those integers). Training batches are never 1
    long, which is what inference needs the size-oblivious rules for.
    """
    from fms_speech.compile import compile_model

    windowed_convolutions(objective, True)
    compiled = compile_model(objective)

    def step(*args):
        with fx_config.patch(backed_size_oblivious=False):
            return compiled(*args)

    return step


def windowed_convolutions(module: nn.Module, windowed: bool) -> None:
    for conv in module.modules():
        if isinstance(conv, ConformerConvModule):
            conv.windowed = windowed


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().log_softmax(-1).transpose(0, 1)  # (T, B, C)


def ctc_loss(log_probs, feature_lengths, targets, target_lengths) -> torch.Tensor:
    return F.ctc_loss(
        log_probs,
        targets,
        feature_lengths,
        target_lengths,
        blank=CTC_BLANK,
        reduction="mean",
        zero_infinity=True,
    )


def batch_loss(step_fn, batch: Batch, options: TrainOptions, rng: random.Random | None = None):
    """(loss, cross-entropy, ctc) of a batch; ctc averages the encoder's last and middle layers
    (the word-slot loss, where asked for, is in the loss but not in the ctc value)."""
    tokens = torch.stack([batch.input_ids, batch.labels])
    audio_ids = None
    if options.transcript_audio > 0:
        audio_ids = transcript_audio_ids(batch, options.transcript_audio, rng or random.Random())
    cross_entropy, final, mid, slot_logits = step_fn(
        tokens, batch.features, batch.feature_lengths, audio_ids
    )
    loss = cross_entropy
    ctc = torch.zeros_like(cross_entropy)
    if final is not None:
        lengths, targets, target_lengths = (
            batch.feature_lengths,
            batch.ctc_targets,
            batch.ctc_lengths,
        )
        ctc = ctc_loss(final, lengths, targets, target_lengths)
        if mid is not None:
            ctc = (ctc + ctc_loss(mid, lengths, targets, target_lengths)) / 2
        loss = loss + options.ctc_weight * ctc
    if slot_logits is not None:
        loss = loss + options.word_slot_weight * word_slot_loss(slot_logits, batch, audio_ids)
    return loss, cross_entropy, ctc


def trainable_parameters(model: GraniteSpeech, parts) -> dict[str, list[nn.Parameter]]:
    """Parameters by part; those of parts not chosen get requires_grad False."""
    groups = {part: [] for part in PARTS}
    for name, parameter in model.named_parameters():
        if name.startswith("encoder."):
            part = "encoder"
        elif name.startswith("projector."):
            part = "projector"
        elif ".lora_" in name:
            part = "lora"
        else:
            part = "llm"
        parameter.requires_grad_(part in parts)
        groups[part].append(parameter)
    return {part: params for part, params in groups.items() if part in parts}


def make_optimizer(model: GraniteSpeech, options: TrainOptions):
    decay, no_decay, seen = [], [], set()
    for params in trainable_parameters(model, options.parts).values():
        for parameter in params:
            if id(parameter) in seen:  # tied embedding and head
                continue
            seen.add(id(parameter))
            # matrices decay; norms, biases, embeddings' 1-D cousins do not
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": options.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=options.learning_rate,
        betas=(0.9, 0.98),
        eps=1e-8,
        fused=True,  # one kernel for all parameters: 5-10% of the demo recipe's CPU step
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, options))
    return optimizer, schedule


def lr_factor(step: int, options: TrainOptions) -> float:
    """Linear warm-up to 1, then cosine decay to final_lr_ratio at the last step."""
    if step < options.warmup_steps:
        return (step + 1) / options.warmup_steps
    progress = (step - options.warmup_steps) / max(1, options.steps - options.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return options.final_lr_ratio + (1 - options.final_lr_ratio) * cosine


def new_model(config: GraniteSpeechConfig, seed: int) -> GraniteSpeech:
    torch.manual_seed(seed)
    model = GraniteSpeech(config)
    model.reset_parameters()
    model.post_init()  # ties the LM head to the embedding where configured
    return model


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_state(path: Path, model, optimizer, schedule, step: int, options: TrainOptions) -> None:
    """The resumable state, written whole (temporary file, then rename)."""
    temporary = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "config": model.config.as_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "step": step,
            "rng": _rng_state(),
            "options": dataclasses.asdict(options),
        },
        temporary,
    )
    temporary.replace(path)


@dataclass
class TrainResult:
    steps: int  # steps run by this call
    losses: list[float]  # per step run
    cross_entropy: list[float]
    ctc: list[float]
    seconds: float
    audio_seconds: float  # of speech seen


def train(
    model: GraniteSpeech,
    tokenizer,
    source,
    options: TrainOptions,
    output_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step=None,
) -> TrainResult:
    """Train `model` in place on `source` (fms_speech.train_data); saves into output_dir.

    With resume, the state in output_dir/training_state.pt (same options) is restored first.
    The hub-layout checkpoint is written into output_dir when the last step is done.
    """
    from tqdm import tqdm

    from fms_speech.export import save_pretrained

    classes = model.config.encoder_config.output_dim
    if options.ctc_weight > 0 and classes != len(CTC_ALPHABET) + 1:
        raise ValueError(
            f"the encoder's out head has {classes} classes, not the {len(CTC_ALPHABET) + 1} of "
            "the CTC characters: train it with --ctc-weight 0"
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.train()
    optimizer, schedule = make_optimizer(model, options)
    start = 0
    state_path = output_dir / STATE_FILE
    if resume and state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        saved = {**state["options"], "parts": tuple(state["options"]["parts"])}
        if saved != dataclasses.asdict(options) | {"parts": tuple(options.parts)}:
            raise ValueError(f"{state_path} was saved with other training options: {saved}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        _set_rng_state(state["rng"])
        start = state["step"]
    else:
        torch.manual_seed(options.seed)
    c = model.config.projector_config
    template = chat_text(tokenizer, instruction())
    maker = BatchMaker(tokenizer, template, c.window_size, c.downsample_rate)
    dataset = BucketedBatches(
        source,
        maker,
        options.batch_size,
        start=start,
        stop=options.steps,
        pool_batches=options.pool_batches,
        seed=options.seed,
    )
    if start == 0 and options.reading_steps > 0:
        _teach_reading(model, tokenizer, template, source, options, progress)
    objective = TrainingObjective(
        model, with_ctc=options.ctc_weight > 0, with_slot_logits=options.word_slot_weight > 0
    )
    step_fn = compile_training_step(objective) if options.compile else objective
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    result = TrainResult(0, [], [], [], 0.0, 0.0)
    bar = tqdm(
        total=options.steps,
        initial=start,
        disable=not progress,
        file=sys.stderr,
        unit="step",
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    step = start
    for batch in batch_loader(dataset, options.workers):
        rng = random.Random(f"{options.seed}/transcript-audio/{step}")
        loss, cross_entropy, ctc = batch_loss(step_fn, batch, options, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, options.grad_clip)
        optimizer.step()
        schedule.step()
        step += 1
        values = (loss.item(), cross_entropy.item(), ctc.item())
        if not all(math.isfinite(v) for v in values):
            raise FloatingPointError(f"the loss is {values[0]} at step {step}: training diverged")
        result.losses.append(values[0])
        result.cross_entropy.append(values[1])
        result.ctc.append(values[2])
        result.steps += 1
        seconds = float(batch.feature_lengths.sum()) / FRAMES_PER_SECOND
        result.audio_seconds += seconds
        elapsed = time.perf_counter() - started
        bar.set_postfix(
            loss=f"{values[0]:.3f}",
            ce=f"{values[1]:.3f}",
            ctc=f"{values[2]:.3f}",
            lr=f"{schedule.get_last_lr()[0]:.1e}",
            audio_x=f"{result.audio_seconds / elapsed:.1f}",
        )
        bar.update(1)
        if on_step is not None:
            on_step(step, values)
        if step % options.save_every == 0 or step == options.steps:
            save_state(state_path, model, optimizer, schedule, step, options)
    bar.close()
    result.seconds = time.perf_counter() - started
    model.eval()
    windowed_convolutions(model, False)  # inference's kernel again
    save_pretrained(model, tokenizer, output_dir)
    return result


def _teach_reading(model, tokenizer, template, source, options: TrainOptions, progress: bool):
    from tqdm import tqdm

    if hasattr(source, "text_source"):
        text_source = source.text_source
    elif hasattr(source, "entries"):  # a manifest: its own transcripts
        texts = [text for _, text in source.entries]
        text_source = lambda rng: rng.choice(texts)  # noqa: E731
    else:
        raise ValueError(
            "reading lessons need the training texts: a synthesised or manifest source"
        )
    bar = tqdm(total=options.reading_steps, disable=not progress, file=sys.stderr, unit="lesson")

    def on_step(step, loss):
        bar.set_postfix(ce=f"{loss:.3f}")
        bar.update(1)

    teach_reading(
        model,
        tokenizer,
        template,
        text_source,
        options.reading_steps,
        options.batch_size,
        options.learning_rate,
        options.seed,
        on_step,
    )
    bar.close()


# ---- the command line


def add_train_arguments(parser) -> None:
    parser.add_argument("--output", required=True, type=Path, metavar="DIR", help="output dir")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--recipe", choices=["demo"], help="a built-in recipe: model, data, options"
    )
    source.add_argument("--init", metavar="DIR", help="start from this checkpoint directory")
    parser.add_argument("--manifest", type=Path, help="JSON lines of {audio, text} (with --init)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--ctc-weight", type=float)
    parser.add_argument(
        "--word-slot-weight", type=float, help="audio vectors' loss against the spoken words"
    )
    parser.add_argument(
        "--reading-steps", type=int, help="reading lessons for the LLM before training"
    )
    parser.add_argument(
        "--transcript-audio", type=float, help="share of rows reading their transcript as audio"
    )
    parser.add_argument("--train", dest="parts", help=f"comma-separated parts: {','.join(PARTS)}")
    parser.add_argument("--save-every", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--workers", type=int, choices=[0, 1])
    compiled = parser.add_mutually_exclusive_group()
    compiled.add_argument("--compile", action="store_true", help="compile the training step")
    compiled.add_argument("--no-compile", action="store_true", help="train eagerly")
    parser.add_argument("--resume", action="store_true", help="continue from DIR's saved state")
    parser.add_argument(
        "--export-state",
        action="store_true",
        help="write the hub-layout checkpoint of DIR's saved state (an unfinished run) and exit",
    )
    parser.add_argument("--no-progress", action="store_true")


def options_from(args, defaults: dict) -> TrainOptions:
    values = dict(defaults)
    for field in dataclasses.fields(TrainOptions):
        value = getattr(args, field.name, None)
        if value is not None:
            values[field.name] = value
    if isinstance(values.get("parts"), str):
        values["parts"] = tuple(part.strip() for part in values["parts"].split(","))
    if args.no_compile or args.compile:
        values["compile"] = bool(args.compile)
    return TrainOptions(**values)


def run_train(args) -> int:
    """The `train` command; returns the exit code."""
    from fms_speech import demo_recipe
    from fms_speech.train_data import ManifestError, ManifestSpeech, SynthesizedSpeech

    def fail(message: str) -> int:
        print(f"fms-speech: error: {message}", file=sys.stderr)
        return 2

    if args.export_state:
        try:
            step = export_state(args.output)
        except (OSError, ValueError) as error:
            return fail(str(error).splitlines()[0])
        print(
            f"fms-speech: wrote the checkpoint of step {step} into {args.output}", file=sys.stderr
        )
        return 0
    try:
        if args.recipe == "demo":
            options = options_from(args, demo_recipe.TRAIN_OPTIONS)
            tokenizer = _recipe_tokenizer(args.output, args.resume)
            config = demo_recipe.model_config(
                len(tokenizer), tokenizer.convert_tokens_to_ids(demo_recipe.AUDIO)
            )
            model = new_model(config, options.seed)
        else:
            if args.manifest is None:
                return fail("--init needs a --manifest of the audio and texts to train on")
            from fms_speech.transcribe import Transcriber

            options = options_from(args, {})
            loaded = Transcriber.from_pretrained(args.init)
            model, tokenizer = loaded.model, loaded.tokenizer
        if args.manifest is not None:
            source = ManifestSpeech(args.manifest, seed=options.seed)
        else:  # only the recipe: --init without a manifest was refused above
            source = SynthesizedSpeech(
                demo_recipe.text_source,
                demo_recipe.TRAIN_VOICES,
                demo_recipe.AUGMENTATION,
                seed=options.seed,
            )
    except (ValueError, OSError, ManifestError) as error:
        return fail(str(error).splitlines()[0])
    started = time.perf_counter()
    try:
        result = train(
            model,
            tokenizer,
            source,
            options,
            args.output,
            resume=args.resume,
            progress=not args.no_progress,
        )
    except (ValueError, FloatingPointError) as error:
        return fail(str(error).splitlines()[0])
    summary = {
        "steps": result.steps,
        "seconds": round(time.perf_counter() - started, 1),
        "final_loss": _mean_tail(result.losses),
        "final_cross_entropy": _mean_tail(result.cross_entropy),
        "final_ctc": _mean_tail(result.ctc),
        "audio_hours": round(result.audio_seconds / 3600, 2),
    }
    (Path(args.output) / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), file=sys.stderr)
    return 0


def export_state(directory: str | Path) -> int:
    """Write the hub-layout checkpoint of directory/training_state.pt; returns its step."""
    from transformers import AutoTokenizer

    from fms_speech.export import save_pretrained

    directory = Path(directory)
    path = directory / STATE_FILE
    if not path.is_file():
        raise ValueError(f"{directory} has no {STATE_FILE} to export")
    state = torch.load(path, weights_only=False)
    config = GraniteSpeechConfig._load_from_dict(state["config"])
    model = GraniteSpeech(config)
    model.load_state_dict(state["model"])
    save_pretrained(model.eval(), AutoTokenizer.from_pretrained(str(directory)), directory)
    return state["step"]


def _mean_tail(values: list[float], count: int = 50) -> float | None:
    tail = values[-count:]
    return round(sum(tail) / len(tail), 4) if tail else None


def _recipe_tokenizer(output: Path, resume: bool):
    """The recipe's tokenizer: rebuilt, or the one saved with the state when resuming."""
    from transformers import AutoTokenizer

    from fms_speech import demo_recipe

    output = Path(output)
    if resume and (output / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(output))
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = demo_recipe.build_tokenizer(demo_recipe.tokenizer_texts())
    tokenizer.save_pretrained(output)
    return tokenizer
