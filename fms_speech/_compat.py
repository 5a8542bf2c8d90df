"""Every private name of FMS or torch that fms-speech uses, in one place.

None has a public equivalent in the versions checked (ibm-fms 1.13.1, torch 2.13.0); each says
why it is needed. docs/upstream.md proposes the public API FMS could offer instead. The rest of
fms_speech uses public APIs only.
"""

import inspect

import torch._dynamo
import torch._inductor
from fms.models import granite as _fms_granite
from fms.models.hf import config_utils as _fms_config_utils
from fms.utils import generation as _fms_generation
from torch._dynamo import eval_frame as _dynamo_eval_frame
from torch._dynamo.utils import counters as _dynamo_counters
from torch.fx.experimental import _config as _torch_fx_config

# torch's symbolic-shape settings (`backed_size_oblivious`, `use_duck_shape`) that keep one
# dynamic graph for every length and batch (fms_speech.compile); torch 2.13 has no public switch.
fx_config = _torch_fx_config

# Marking an input dimension dynamic before dynamo traces a call (the model's forward pre-hook):
# documented in torch's dynamic-shapes guide, but only under torch._dynamo in 2.13.
maybe_mark_dynamic = torch._dynamo.maybe_mark_dynamic
# ... and marking it unbacked (no size hint, never specialised to 0 or 1: compile_model's batch)
mark_unbacked = torch._dynamo.decorators.mark_unbacked
# Whether compile_model can make the batch unbacked (fms_speech.compile): torch 2.13's
# mark_unbacked takes a lower bound; torch 2.11's (the GPU image's) does not, and its SDPA then
# guards on the unbacked batch being 1 ("Could not guard on data-dependent expression"), so
# there the batch stays a backed dynamic size (a first batch of 1 is a graph of its own).
UNBACKED_BATCH_WORKS = "min" in inspect.signature(mark_unbacked).parameters

# inductor's settings (fms_speech.compile), process-wide like the symbolic-shape ones
inductor_config = torch._inductor.config


# Whether ATen runs bf16 matrix products on oneDNN's bf16 kernels (a CPU with AVX512-BF16 or AMX)
# rather than on a fallback that is 6-30x slower than float32 on an AVX2 CPU (measured here;
# fms_speech.compile); torch 2.13 exposes the check only as this op.
def cpu_has_bf16_matmul() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


# Runs a function's frame outside dynamo when it is the frame dynamo would compile, yet lets
# dynamo inline it when traced from an enclosing compiled frame (unlike torch.compiler.disable,
# which would be a graph break there): the model's forward pre-hook above.
run_frame_eagerly = _dynamo_eval_frame.skip_code

# AOTInductor's entry points (fms_speech.aot): documented in torch's AOTInductor guide, but
# only under torch._inductor in 2.13.
aoti_compile_and_package = torch._inductor.aoti_compile_and_package
aoti_load_package = torch._inductor.aoti_load_package

# The permutation FMS applies to HF q/k rows for its RoPE layout: the audio LoRA's q B matrix
# must be permuted alike. ibm-fms 1.13.1 only registers it as a step of the whole Granite
# adapter, which also fuses q/k/v and cannot take a lone LoRA tensor.
granite_hf_to_fms_rope = _fms_granite._hf_to_fms_rope

# FMS's per-step update of the padding kwargs (extends the attention mask by one key, advances
# position ids): the generation loop needs it to drive FMS's KV cache one token at a time.
# `fms.utils.generation.generate` uses it but ibm-fms 1.13.1 does not export it.
extend_padding_kwargs = _fms_generation.__update_padding_kwargs

# Registering a transformers architecture for `get_model("hf_pretrained", ...)`: ibm-fms 1.13.1
# keeps the registry module-private and fills it with in-tree models only.
register_hf_architecture = _fms_config_utils._FMS_MODEL_CONFIG_REGISTRY.register_model_arch_info


# How many graphs dynamo has compiled in this process: the server reports it on /metrics to show
# that no request compiles after the start-up warm-up. torch 2.13 keeps the count in a private
# module (the same counter torch's own tests read).
def compiled_graph_count() -> int:
    return _dynamo_counters["stats"]["unique_graphs"]
