"""`fms-speech bench`: the reference against fms-speech, eager against compiled, measured.

The modules, in the order they import each other:
- `settings`: systems, dtypes, parts, clip shapes (`ClipShape`), repeat counts; `cli`: the
  options and the entry point (light: the command line imports it for every command);
- `checkpoints`: the model both implementations load; `inputs`: speech clips, prompts, batches;
- `measure`: timers, peak memory, compile counters, profiles; `systems`: the four systems;
  `roofline`: the machine's rates and the model's FLOPs and weight bytes;
- `parts`: what is measured per system; `run`: the whole run and its warm-cache process;
- `results`, `targets`, `markdown`, `plots`, `report`: what is written;
- `experiments`: measurements beyond the bench, each `python -m fms_speech.bench.experiments.X`.
"""
