"""`fms-speech bench` for a CTC checkpoint (granite_speech5): `--model DIR` or `--variant 5.0-470m`.

The same systems and weights as the LLM bench, with the CTC model's stages: features, encoder
(the whole forward: encoder and CTC head) and decode (greedy CTC decoding and the tokenizer's
text; for fms-speech also the word timestamps), then end to end and the real-time factor.
- reference eager: transformers' `GraniteSpeech5ForCTC` with its `generate` decoding (argmax,
  padded frames made blank) and `batch_decode` (merge repeats, drop blanks);
- fms eager / fms compiled: `GraniteSpeech5` (one compiled graph for every shape) and
  `fms_speech.ctc` (decoding on tensors, one host transfer per batch).
Every system gets the features of `fms_speech.audio.log_mel_deltas` (the reference's extractor
needs torchaudio); the features stage is timed for each all the same. With `--variant`, the
checkpoint has the published shapes, transformers' random initialisation and a CTC tokenizer of
the published vocabulary size; the reference saves it and both implementations load it.
Writes bench.json and bench.md to --output-dir, and prints the table.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from fms.models import get_model
from transformers import AutoTokenizer

from fms_speech.audio import SAMPLE_RATE, log_mel_deltas
from fms_speech.bench.inputs import speech_clip
from fms_speech.bench.measure import counts_since, fresh_dynamo, summary, synchronize
from fms_speech.bench.results import _device_name
from fms_speech.bench.settings import ClipShape, Settings
from fms_speech.checkpoint import CTC_MODEL_TYPES, checkpoint_model_type
from fms_speech.compile import compile_model
from fms_speech.ctc import WordSplitter, greedy_decode
from fms_speech.models.granite_speech5 import GraniteSpeech5
from fms_speech.testing.reference import (
    hf_config_from_fms,
    make_speech5_reference,
    save_ctc_tokenizer,
)

SYSTEMS = ("reference eager", "fms eager", "fms compiled")
STAGES = ("features", "encoder", "decode", "end_to_end")


def is_ctc_run(args: argparse.Namespace) -> bool:
    """Whether the bench's model is a CTC one: a granite_speech5 variant or checkpoint."""
    if args.model:
        return checkpoint_model_type(args.model) in CTC_MODEL_TYPES
    return bool(args.variant) and args.variant in _ctc_variants()


def _ctc_variants() -> list[str]:
    from fms.models import list_variants

    return list_variants("granite_speech5")


def load_models(args, work: Path, dtype: torch.dtype, device: torch.device):
    """(reference, fms model, tokenizer, description) from --model DIR or a built checkpoint."""
    from transformers import GraniteSpeech5ForCTC

    if args.model:
        directory = Path(args.model)
        described = f"checkpoint {directory}"
    else:
        overrides = {"encoder_config": {"num_layers": args.encoder_layers}}
        model = get_model(
            "granite_speech5",
            args.variant,
            device_type="meta",
            **(overrides if args.encoder_layers else {}),
        )
        config = hf_config_from_fms(model.config)
        directory = work / "checkpoint"
        # transformers' own initialisation: magnitudes that stay finite at the published widths
        reference = make_speech5_reference(config, weight_scale=None)
        reference.save_pretrained(directory)
        save_ctc_tokenizer(directory, config.vocab_size)
        layers = model.config.encoder_config.num_layers
        described = f"{args.variant} shapes ({layers} encoder layers), random weights"
    reference = GraniteSpeech5ForCTC.from_pretrained(str(directory), dtype=dtype).to(device)
    fms_model = get_model(
        "hf_pretrained", model_path=str(directory), device_type=device.type, data_type=dtype
    )
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    return reference.eval(), fms_model.eval(), tokenizer, described


class ReferenceCTC:
    name = "reference eager"

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def encode(self, features, lengths):
        mask = (torch.arange(features.shape[1], device=lengths.device) < lengths[:, None]).long()
        return self.model(input_features=features, attention_mask=mask).logits, mask

    def decode(self, encoded):
        logits, mask = encoded
        # generate()'s decoding, on the logits already computed
        sequences = logits.argmax(dim=-1)
        valid = self.model._get_output_attention_mask(mask, target_length=sequences.shape[1])
        sequences[~valid] = self.model.config.pad_token_id
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=True)


class FmsCTC:
    def __init__(self, model: GraniteSpeech5, tokenizer, compiled: bool, options: dict):
        self.model = model
        self.name = "fms compiled" if compiled else "fms eager"
        self.runner = compile_model(model, **options) if compiled else model
        subsampling = 2 ** len(model.config.encoder_config.subsample_layers)
        self.splitter = WordSplitter(tokenizer, subsampling / 50)

    def encode(self, features, lengths):
        return self.runner(features, lengths), lengths

    def decode(self, encoded):
        logits, lengths = encoded
        tokens = greedy_decode(
            logits, self.model.output_lengths(lengths), self.model.config.blank_token_id
        )
        decoded = [self.splitter.window_words(clip) for clip in tokens]
        return [self.splitter.text(d.token_ids) for d in decoded]


def _stages(system, waveforms, device, dtype) -> tuple[dict[str, float], list[str]]:
    seconds = {}
    synchronize(device)
    start = time.perf_counter()
    features, lengths = log_mel_deltas([w.to(device) for w in waveforms])
    features = features.to(dtype)
    synchronize(device)
    seconds["features"] = time.perf_counter() - start
    start = time.perf_counter()
    with torch.inference_mode():
        encoded = system.encode(features, lengths)
        synchronize(device)
        seconds["encoder"] = time.perf_counter() - start
        start = time.perf_counter()
        texts = system.decode(encoded)
    seconds["decode"] = time.perf_counter() - start
    seconds["end_to_end"] = seconds["features"] + seconds["encoder"] + seconds["decode"]
    return seconds, texts


def measure(system, shapes: dict, settings: Settings, device, dtype) -> dict:
    record = {}
    for shape, waveforms in shapes.items():
        first, _ = _stages(system, waveforms, device, dtype)
        for _ in range(settings.warmup - 1):
            _stages(system, waveforms, device, dtype)
        runs = [_stages(system, waveforms, device, dtype) for _ in range(settings.repeats)]
        audio = sum(w.shape[0] for w in waveforms) / SAMPLE_RATE
        entry = {stage: summary([r[0][stage] for r in runs]) for stage in STAGES}
        entry["first_call"] = first["end_to_end"]
        entry["audio_seconds"] = audio
        entry["rtf"] = audio / entry["end_to_end"]["median"]
        entry["texts"] = runs[-1][1]
        record[shape.key] = entry
    return record


def run_ctc_bench(args, settings: Settings, device, dtypes, options: dict, work: Path) -> dict:
    """Every system in every dtype on every clip shape; the results dict (bench.json)."""
    models_dtype = dtypes[0]
    reference, fms_model, tokenizer, described = load_models(args, work, models_dtype, device)
    shapes = {
        ClipShape(seconds, batch): [speech_clip(seconds, seed=100 * i + 7) for i in range(batch)]
        for seconds in settings.lengths
        for batch in sorted(set(settings.batch_sizes) | set(settings.compiled_batch_sizes))
    }
    encoder = fms_model.config.encoder_config
    results = {
        "meta": {
            "model": described,
            "shapes": (
                f"encoder {encoder.num_layers} x {encoder.hidden_dim}, vocabulary "
                f"{encoder.output_dim}, subsampling blocks {list(encoder.subsample_layers)}"
            ),
            "device": _device_name(device),
            "threads": torch.get_num_threads(),
            "settings": settings.to_dict(),
            "load_average_start": os.getloadavg(),
            "features_note": "every system uses fms_speech.audio.log_mel_deltas",
        },
        "runs": {},
    }
    features, lengths = log_mel_deltas(next(iter(shapes.values())))
    explanation = torch._dynamo.explain(fms_model)(features.to(models_dtype), lengths)
    results["explain"] = {
        "graphs": explanation.graph_count,
        "graph_breaks": explanation.graph_break_count,
    }
    for dtype in dtypes:
        reference.to(dtype)
        fms_model.to(dtype)
        runs = results["runs"].setdefault(str(dtype).removeprefix("torch."), {})
        for name in args.systems_ctc:
            start_counts = fresh_dynamo()
            if name == "reference eager":
                system = ReferenceCTC(reference, tokenizer)
            else:
                system = FmsCTC(fms_model, tokenizer, name == "fms compiled", options)
            started = time.perf_counter()
            runs[name] = {"e2e": measure(system, shapes, settings, device, dtype)}
            runs[name]["compiles"] = counts_since(start_counts)
            runs[name]["seconds"] = time.perf_counter() - started
            print(f"bench: {name}, {dtype}: {runs[name]['seconds']:.0f} s", file=sys.stderr)
    results["agreement"] = _agreement(results)
    results["meta"]["load_average_end"] = os.getloadavg()
    return results


def _agreement(results: dict) -> dict:
    """Whether every system wrote the same texts, per dtype and shape."""
    agree = {}
    for dtype, systems in results["runs"].items():
        texts = {
            name: {k: v["texts"] for k, v in run["e2e"].items()} for name, run in systems.items()
        }
        agree[dtype] = len({json.dumps(t, sort_keys=True) for t in texts.values()}) == 1
    return agree


def table(results: dict) -> str:
    """Markdown: per dtype and shape, each stage's median per system, and the RTF."""
    lines = [
        f"# fms-speech bench: {results['meta']['model']}",
        "",
        f"{results['meta']['shapes']}; {results['meta']['device']}, "
        f"{results['meta']['threads']} threads; load average "
        f"{_load(results['meta']['load_average_start'])} at start, "
        f"{_load(results['meta']['load_average_end'])} at end (a shared machine: compare "
        "systems side by side, not across runs). "
        f"fms forward: {results['explain']['graphs']} graph, "
        f"{results['explain']['graph_breaks']} graph breaks.",
    ]
    for dtype, systems in results["runs"].items():
        lines += [
            "",
            f"## {dtype} (texts agree: {results['agreement'][dtype]})",
            "",
            "| shape | system | features | encoder | decode | end to end | audio s / s | "
            "vs reference |",
            "|---|---|---|---|---|---|---|---|",
        ]
        reference = systems.get("reference eager", {}).get("e2e", {})
        for shape in next(iter(systems.values()))["e2e"]:
            for name, run in systems.items():
                entry = run["e2e"][shape]
                cells = [f"{1000 * entry[s]['median']:.1f} ms" for s in STAGES]
                ratio = ""
                if shape in reference:
                    ratio = f"{reference[shape]['end_to_end']['median'] / entry['end_to_end']['median']:.2f}x"
                lines.append(
                    f"| {shape} | {name} | {' | '.join(cells)} | {entry['rtf']:.1f} | {ratio} |"
                )
        compiled = systems.get("fms compiled")
        if compiled:
            counts = compiled["compiles"]
            lines.append(
                f"\nfms compiled: {counts['graphs']} graphs, {counts['graph_breaks']} graph breaks, "
                f"{counts['recompiles']} recompiles over {len(compiled['e2e'])} shapes."
            )
    return "\n".join(lines) + "\n"


def _load(values) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def write(results: dict, out_dir: Path) -> None:
    (out_dir / "bench.json").write_text(json.dumps(results, indent=1, default=str))
    markdown = table(results)
    (out_dir / "bench.md").write_text(markdown)
    print(markdown)
    print(f"wrote {out_dir / 'bench.json'} and {out_dir / 'bench.md'}")
