"""Reference checkpoints and inputs for the tests, the bench and its experiments.

`fms_speech.testing.reference` builds Granite Speech checkpoints with the reference
implementation (transformers + a peft LoRA), saved in the hub layout, and the small tokenizer
that goes with them; `fms_speech.testing.graphs` counts the graphs inductor compiles per
phase. `peft` and `tokenizers` are test/bench dependencies: they are imported by
the functions that need them, so importing this package works without them.
"""
