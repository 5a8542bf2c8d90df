"""The CTC Conformer encoder of the Granite Speech family.

Macaron Conformer blocks with block-local attention (Shaw relative positions), a depthwise
convolution module and a self-conditioned CTC branch in the middle layer. The three model types
share these blocks: `granite_speech` runs them as they are, `granite_speech_plus` concatenates
some layers' outputs (`ConformerEncoder.layer_outputs`), and `granite_speech5` adds subsampling
blocks (`subsample_layers`: a stride-2 convolution beside a mean-pooled residual halves time)
and keeps its BatchNorm in float32.

Compile notes: every shape below is derived from tensor sizes with integer arithmetic, so a
single graph compiled with a dynamic time axis serves every length. Padding is handled with
masks built from `feature_lengths`, never with Python branches on data. With subsampling, time is
first padded to `n * 2**len(subsample_layers)` frames (n >= 2), so each halving divides an even
length and every later length is a product (`2n`, `n`) rather than a chain of floor divisions.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from fms.modules.feedforward import FeedForwardBlock
from fms.utils.config import ModelConfig

from fms_speech.models.layout import leading_positions


@dataclass
class ConformerConfig(ModelConfig):
    input_dim: int = 160
    num_layers: int = 16
    hidden_dim: int = 1024
    feedforward_mult: int = 4
    num_heads: int = 8
    dim_head: int = 128
    output_dim: int = 256
    context_size: int = 200
    max_pos_emb: int = 512
    conv_kernel_size: int = 15
    conv_expansion_factor: int = 2
    layer_norm_eps: float = 1e-5
    # granite_speech5: blocks (0-based) that halve time, biases of the feed-forward linears,
    # BatchNorm parameters and statistics kept in float32 whatever the model's dtype
    subsample_layers: tuple[int, ...] = ()
    feedforward_bias: bool = True
    float32_batch_norm: bool = False
    # the block attention (scores, softmax, values) in float32 whatever the model's dtype:
    # granite_speech's reference runs it on SDPA's math kernel, which computes bf16/fp16 inputs
    # in float32; granite_speech5's reference runs it in the model's dtype (False)
    float32_attention: bool = True

    def __post_init__(self):
        self.subsample_layers = tuple(self.subsample_layers)  # a JSON round trip gives a list


def full_lengths(input_features: torch.Tensor) -> torch.Tensor:
    """feature_lengths for an unpadded batch: every clip uses all T frames."""
    batch, num_frames = input_features.shape[:2]
    return torch.full((batch,), num_frames, dtype=torch.long, device=input_features.device)


def frame_mask(feature_lengths: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, num_frames) bool: True where a frame belongs to its clip."""
    positions = torch.arange(num_frames, device=feature_lengths.device)
    return positions[None, :] < feature_lengths[:, None]


class ConformerFeedForward(nn.Module):
    def __init__(self, config: ConformerConfig):
        super().__init__()
        self.pre_norm = nn.LayerNorm(config.hidden_dim, eps=config.layer_norm_eps)
        self.mlp = FeedForwardBlock(
            config.hidden_dim,
            hidden_grow_factor=config.feedforward_mult,
            activation_fn=nn.SiLU(),
            p_dropout=0.0,
            use_bias=config.feedforward_bias,
        )

    def reset_parameters(self):
        self.pre_norm.reset_parameters()
        self.mlp.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pre_norm(x))


class BlockRelativeAttention(nn.Module):
    """Self-attention inside blocks of `context_size` frames, with Shaw relative positions.

    The positional term q_i . E[i - j] is added to the scores as a float bias. Keys beyond a
    clip's length are masked, which covers both the right padding up to a block multiple (as
    the reference does) and the padding of shorter clips in a batch (which the reference leaks).
    """

    def __init__(self, config: ConformerConfig):
        super().__init__()
        if not 0 < config.context_size <= config.max_pos_emb:
            raise ValueError(
                f"context_size must be in (0, max_pos_emb={config.max_pos_emb}], "
                f"got {config.context_size}"
            )
        self.num_heads = config.num_heads
        self.dim_head = config.dim_head
        self.context_size = config.context_size
        self.max_pos_emb = config.max_pos_emb
        self.scale = config.dim_head**-0.5
        self.float32_attention = config.float32_attention
        inner_dim = config.num_heads * config.dim_head
        self.pre_norm = nn.LayerNorm(config.hidden_dim, eps=config.layer_norm_eps)
        self.to_q = nn.Linear(config.hidden_dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(config.hidden_dim, 2 * inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, config.hidden_dim)
        self.rel_pos_emb = nn.Embedding(2 * config.max_pos_emb + 1, config.dim_head)

    def reset_parameters(self):
        self.pre_norm.reset_parameters()
        for linear in (self.to_q, self.to_kv, self.to_out):
            nn.init.trunc_normal_(linear.weight, std=0.02)
        nn.init.zeros_(self.to_out.bias)
        nn.init.normal_(self.rel_pos_emb.weight, std=0.02)

    def _positional_scores(self, q: torch.Tensor) -> torch.Tensor:
        """scale * q_i . rel_pos_emb[clamp(i - j, -C, C) + max_pos_emb] for each (i, j) in a block.

        Scores against the 2C+1 distinct offsets, then a gather: cheaper than materialising the
        (C, C, dim_head) embedding table per layer, and free of size-1 broadcasting branches.
        """
        block = self.context_size
        table = self.rel_pos_emb.weight[self.max_pos_emb - block : self.max_pos_emb + block + 1]
        scores = F.linear(q, table) * self.scale  # (..., C, 2C + 1), column k is offset k - C
        offsets = torch.arange(block, device=q.device)
        column = offsets[:, None] - offsets[None, :] + block  # i - j + C, in [1, 2C - 1]
        return torch.gather(scores, -1, column.expand(*scores.shape[:-1], block))

    def forward(self, x: torch.Tensor, frame_valid: torch.Tensor) -> torch.Tensor:
        batch, num_frames, _ = x.shape
        block = self.context_size
        # T // C + 2 blocks: the ceil(T / C) the clip needs plus one or two fully masked ones.
        # Never a single block, so no batch ever has B * blocks == 1, a size-1 case on which
        # the symbolic shapes branch (a recompile); blocks are made with unflatten/flatten of
        # a length written as blocks * C, so no guard varies with T or B.
        num_blocks = num_frames // block + 2
        pad = num_blocks * block - num_frames
        x = F.pad(self.pre_norm(x), (0, 0, 0, pad))

        def blocks(t: torch.Tensor) -> torch.Tensor:
            t = t.unflatten(1, (num_blocks, block)).flatten(0, 1)
            return t.unflatten(-1, (self.num_heads, self.dim_head)).transpose(1, 2)

        q = blocks(self.to_q(x))
        k, v = (blocks(t) for t in self.to_kv(x).chunk(2, dim=-1))
        bias = self._positional_scores(q)
        # finfo.min rather than -inf: a block with no valid key (padding of a short clip in a
        # batch) then softmaxes to finite garbage that is dropped later, never to NaN.
        key_valid = F.pad(frame_valid, (0, pad)).unflatten(1, (num_blocks, block)).flatten(0, 1)
        bias = bias.masked_fill(~key_valid[:, None, None, :], torch.finfo(bias.dtype).min)
        dtype = q.dtype
        if self.float32_attention:
            # as the reference's math kernel does; a fused kernel would round the softmax's
            # probabilities to bf16 before they weigh the values
            q, k, v, bias = q.float(), k.float(), v.float(), bias.float()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = out.to(dtype)
        out = out.transpose(1, 2).flatten(2).unflatten(0, (batch, num_blocks)).flatten(1, 2)
        # the real frames as a new tensor, not a slice (fms_speech.models.layout)
        return self.to_out(leading_positions(out, num_frames))


class Float32BatchNorm1d(nn.BatchNorm1d):
    """A BatchNorm whose parameters and statistics stay float32 in a model of any dtype.

    granite_speech5 keeps its BatchNorm in float32 (transformers' `_keep_in_fp32_modules_strict`).
    FMS's loader builds each tensor of the model in the load dtype and copies the checkpoint into
    it; here every floating tensor set on the module becomes float32 first, so the checkpoint's
    values arrive unrounded. `.to(dtype)` casts are turned back to float32 too (a value that a
    cast already rounded stays rounded: load in the dtype you run).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps=eps, dtype=torch.float32)

    def __setattr__(self, name, value):
        super().__setattr__(name, _as_float32(value))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for tensors in (self._parameters, self._buffers):
            for name, tensor in tensors.items():
                tensors[name] = _as_float32(tensor)
        return self


def _as_float32(value):
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return value
    if value.dtype == torch.float32:
        return value
    if isinstance(value, nn.Parameter):
        return nn.Parameter(value.detach().to(torch.float32), requires_grad=value.requires_grad)
    return value.to(torch.float32)


class ConformerConvModule(nn.Module):
    """LayerNorm, pointwise GLU, depthwise conv (stride 1 or 2), BatchNorm, SiLU, pointwise."""

    def __init__(self, config: ConformerConfig, stride: int = 1):
        super().__init__()
        inner_dim = config.hidden_dim * config.conv_expansion_factor
        kernel = config.conv_kernel_size
        self.stride = stride
        self.norm = nn.LayerNorm(config.hidden_dim, eps=config.layer_norm_eps)
        self.up_conv = nn.Conv1d(config.hidden_dim, 2 * inner_dim, 1)
        # 'same' padding, one frame shorter on the right for even kernels (as the reference)
        self.padding = (kernel // 2, kernel // 2 - (kernel + 1) % 2)
        self.depth_conv = nn.Conv1d(inner_dim, inner_dim, kernel, groups=inner_dim, bias=False)
        # the depthwise convolution as a product over sliding windows (set by the compiled
        # training step): torch 2.13 inductor's lowering of the convolution's backward turns the
        # input gradient's strides into integers, so a compiled step specialised the frame
        # count and recompiled for every length; the windows' backward is indexing and sums.
        # Inference keeps F.conv1d, the reference's kernel.
        self.windowed = False
        if config.float32_batch_norm:
            self.batch_norm = Float32BatchNorm1d(inner_dim)
        else:
            self.batch_norm = nn.BatchNorm1d(inner_dim)
        self.down_conv = nn.Conv1d(inner_dim, config.hidden_dim, 1)

    def reset_parameters(self):
        self.norm.reset_parameters()
        for conv in (self.up_conv, self.depth_conv, self.down_conv):
            conv.reset_parameters()
        self.batch_norm.reset_parameters()

    def forward(self, x: torch.Tensor, frame_valid: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        # pointwise convolutions as matrix products on the (B, T, C) layout
        x = F.linear(x, self.up_conv.weight.squeeze(-1), self.up_conv.bias)
        x = F.glu(x, dim=-1)
        # padded frames of a short clip must look like the zero padding it gets alone
        x = x * frame_valid.unsqueeze(-1).to(x.dtype)
        x = F.pad(x.transpose(1, 2), self.padding)
        weight = self.depth_conv.weight  # (C, 1, kernel)
        if self.windowed:
            windows = x.unfold(-1, weight.shape[-1], self.stride)  # (B, C, frames, kernel)
            x = (windows * weight).sum(-1)
        else:
            x = F.conv1d(x, weight, stride=self.stride, groups=weight.shape[0])
        bn = self.batch_norm
        # inference semantics always: running statistics, whatever the module's mode; in the
        # BatchNorm's own dtype (float32 for granite_speech5)
        x = F.batch_norm(
            x.to(bn.weight.dtype),
            bn.running_mean,
            bn.running_var,
            bn.weight,
            bn.bias,
            training=False,
            eps=bn.eps,
        ).to(x.dtype)
        # contiguous: on a transposed (strided) 3-D input, F.linear is a matmul and a separate
        # bias add, rounded to bf16 twice; on a contiguous one a single addmm rounds once, as
        # the reference's Conv1d does (the matmul copied the strided input anyway)
        x = F.silu(x).transpose(1, 2).contiguous()
        return F.linear(x, self.down_conv.weight.squeeze(-1), self.down_conv.bias)


class ConformerBlock(nn.Module):
    """A macaron Conformer block; with `subsample`, it halves time (granite_speech5): its
    convolution has stride 2 and the residual around it is the mean of each pair of frames."""

    def __init__(self, config: ConformerConfig, subsample: bool = False):
        super().__init__()
        self.subsample = subsample
        self.ff1 = ConformerFeedForward(config)
        self.attn = BlockRelativeAttention(config)
        self.conv = ConformerConvModule(config, stride=2 if subsample else 1)
        self.ff2 = ConformerFeedForward(config)
        self.post_norm = nn.LayerNorm(config.hidden_dim, eps=config.layer_norm_eps)

    def reset_parameters(self):
        for module in (self.ff1, self.attn, self.conv, self.ff2, self.post_norm):
            module.reset_parameters()

    def forward(self, x: torch.Tensor, frame_valid: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ff1(x)
        x = x + self.attn(x, frame_valid)
        if self.subsample:
            # the length is even (the encoder pads it): pairs of frames, as a product
            pooled = x.unflatten(1, (x.shape[1] // 2, 2)).mean(dim=2)
            x = pooled + self.conv(x, frame_valid)
        else:
            x = x + self.conv(x, frame_valid)
        x = x + 0.5 * self.ff2(x)
        return self.post_norm(x)


class ConformerEncoder(nn.Module):
    """log-mel features (B, T, input_dim) -> hidden states (B, T', hidden_dim).

    T' = T without subsampling; with k subsampling blocks, T' = T // 2**k + 2 rows of which a
    clip of L frames owns the first L // 2**k (`output_lengths`), as in the reference; the rest
    is padding.
    """

    def __init__(self, config: ConformerConfig | None = None, **kwargs):
        super().__init__()
        self.config = (config or ConformerConfig()).updated(**kwargs)
        c = self.config
        subsample = c.subsample_layers
        if len(set(subsample)) != len(subsample) or not all(
            0 <= i < c.num_layers for i in subsample
        ):
            raise ValueError(
                f"subsample_layers {list(subsample)} must be distinct block indices in "
                f"[0, {c.num_layers})"
            )
        if subsample and c.conv_kernel_size % 2 == 0:
            raise ValueError(
                f"subsampling blocks need an odd conv_kernel_size, got {c.conv_kernel_size}"
            )
        self.input_linear = nn.Linear(c.input_dim, c.hidden_dim)
        self.layers = nn.ModuleList(
            [ConformerBlock(c, subsample=index in subsample) for index in range(c.num_layers)]
        )
        self.out = nn.Linear(c.hidden_dim, c.output_dim)
        self.out_mid = nn.Linear(c.output_dim, c.hidden_dim)

    def reset_parameters(self):
        for linear in (self.input_linear, self.out, self.out_mid):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
        for layer in self.layers:
            layer.reset_parameters()

    def output_lengths(self, feature_lengths: torch.Tensor) -> torch.Tensor:
        """Rows of the output that belong to each clip: a frame pair is kept only when whole."""
        return feature_lengths // 2 ** len(self.config.subsample_layers)

    def forward(
        self, input_features: torch.Tensor, feature_lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._run_layers(input_features, feature_lengths)[0][-1]

    def forward_with_ctc(
        self, input_features: torch.Tensor, feature_lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states and the mid-layer CTC logits (`out` head; None with one layer)."""
        states, mid_logits = self._run_layers(input_features, feature_lengths)
        return states[-1], mid_logits

    def layer_outputs(
        self,
        input_features: torch.Tensor,
        feature_lengths: torch.Tensor | None = None,
        export: tuple[int, ...] = (),
    ) -> list[torch.Tensor]:
        """[the states after each layer listed in `export`, in layer order; the output].

        Index 0 is `input_linear`'s output, index i block i's (counting from 1), with the
        mid-layer CTC update included for block num_layers // 2 (the reference's in-place
        update does the same to the copy granite_speech_plus concatenates).
        """
        return self._run_layers(input_features, feature_lengths, export)[0]

    def _run_layers(
        self,
        input_features: torch.Tensor,
        feature_lengths: torch.Tensor | None,
        export: tuple[int, ...] = (),
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """([exported states..., output], the mid-layer CTC logits or None)."""
        if feature_lengths is None:
            feature_lengths = full_lengths(input_features)
        x = self.input_linear(input_features)
        factor = 2 ** len(self.config.subsample_layers)
        if factor > 1:
            # T // factor + 2 groups of `factor` frames: the ceil(T / factor) the clip needs and
            # one or two fully padded ones, so the shortest length is never 1 (a size-1 case on
            # which the symbolic shapes branch: a recompile), as the attention's blocks
            groups = x.shape[1] // factor + 2
            x = F.pad(x, (0, 0, 0, groups * factor - x.shape[1]))
        lengths = feature_lengths
        frame_valid = frame_mask(lengths, x.shape[1])
        exported = [x] if 0 in export else []
        # self-conditioned CTC after block num_layers // 2 (1-based), as trained
        mid_layer = self.config.num_layers // 2 - 1
        mid_logits = None
        for index, layer in enumerate(self.layers):
            x = layer(x, frame_valid)
            if layer.subsample:
                lengths = lengths // 2
                frame_valid = frame_mask(lengths, x.shape[1])
            if index == mid_layer:
                mid_logits = self.out(x)
                x = x + self.out_mid(torch.softmax(mid_logits, dim=-1))
            if index + 1 in export:
                exported.append(x)
        return [*exported, x], mid_logits
