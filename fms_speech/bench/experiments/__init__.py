"""Measurements beyond `fms-speech bench`, each `python -m fms_speech.bench.experiments.NAME`:

- `encoder`: the encoder alone at a variant's shapes, compiled several ways (inductor options
  and rewrites of its attention and convolution), against its matrix products and the reference;
- `shapes`: compile time and graph count over clip shapes; dynamic shapes against static
  per-shape graphs (buckets) and eager;
- `decode`: prefill and per-token decode, eager against compiled, greedy and beams, with the
  graphs of each phase;
- `decode_gemv`: an experimental inductor pass (not adopted) that routes batch-1 products to
  `torch.mv`;
- `transcribe`: `Transcriber` over mixed-length files (compilations) and peak memory on 10 and
  60 minutes of audio.

They time with the bench's tools (`fms_speech.bench.measure`) and build models with random
weights (`random_weights`) or the tests' reference checkpoints (`fms_speech.testing`).
"""
