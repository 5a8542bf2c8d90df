"""The windowed Q-Former projector of Granite Speech.

The encoder output is cut into windows of `window_size` frames; a BLIP-2 style Q-Former
(post-LayerNorm BERT layers) lets `window_size // downsample_rate` learned queries attend to
each window, and a linear layer maps the query outputs to the LLM's hidden size.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from fms.modules.feedforward import FeedForwardBlock
from fms.utils.config import ModelConfig

from fms_speech.models.layout import leading_positions


@dataclass
class QFormerConfig(ModelConfig):
    hidden_size: int = 1024
    num_layers: int = 2
    num_heads: int = 16
    intermediate_size: int = 4096
    cross_attention_frequency: int = 1
    encoder_hidden_size: int = 1024
    layer_norm_eps: float = 1e-12
    window_size: int = 15
    downsample_rate: int = 5
    output_size: int = 2048  # the LLM's hidden size


class QFormerAttention(nn.Module):
    """Multi-head attention followed by dense + residual + LayerNorm (BERT's post-norm)."""

    def __init__(self, config: QFormerConfig, kv_dim: int):
        super().__init__()
        self.num_heads = config.num_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_dim, config.hidden_size)
        self.value = nn.Linear(kv_dim, config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def reset_parameters(self):
        for linear in (self.query, self.key, self.value, self.dense):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
        self.layer_norm.reset_parameters()

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = (
            self._heads(self.query(x)),
            self._heads(self.key(context)),
            self._heads(self.value(context)),
        )
        # the learned queries (batch 1) meet N windows: broadcast (a no-op once they are N)
        q = q.expand(k.shape[0], -1, -1, -1)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.layer_norm(self.dense(attn) + x)


class QFormerLayer(nn.Module):
    def __init__(self, config: QFormerConfig, has_cross_attention: bool):
        super().__init__()
        self.self_attention = QFormerAttention(config, config.hidden_size)
        self.cross_attention = (
            QFormerAttention(config, config.encoder_hidden_size) if has_cross_attention else None
        )
        self.mlp = FeedForwardBlock(
            config.hidden_size,
            hidden_grow_factor=config.intermediate_size / config.hidden_size,
            activation_fn=nn.GELU(),
            p_dropout=0.0,
            use_bias=True,
        )
        if self.mlp.hidden_dim != config.intermediate_size:  # float rounding in FMS's block
            raise ValueError(f"intermediate_size {config.intermediate_size} is not representable")
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def reset_parameters(self):
        self.self_attention.reset_parameters()
        if self.cross_attention is not None:
            self.cross_attention.reset_parameters()
        self.mlp.reset_parameters()
        self.mlp_norm.reset_parameters()

    def forward(self, queries: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        queries = self.self_attention(queries, queries)
        if self.cross_attention is not None:
            queries = self.cross_attention(queries, windows)
        return self.mlp_norm(self.mlp(queries) + queries)


class QFormerProjector(nn.Module):
    """Encoder states (B, T, encoder_hidden) -> audio vectors (B, Q * ceil(T / W), output_size)."""

    def __init__(self, config: QFormerConfig | None = None, **kwargs):
        super().__init__()
        self.config = (config or QFormerConfig()).updated(**kwargs)
        c = self.config
        self.num_queries = c.window_size // c.downsample_rate
        self.query = nn.Parameter(torch.empty(1, self.num_queries, c.hidden_size))
        self.query_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(
            [QFormerLayer(c, i % c.cross_attention_frequency == 0) for i in range(c.num_layers)]
        )
        self.linear = nn.Linear(c.hidden_size, c.output_size)

    def reset_parameters(self):
        nn.init.normal_(self.query)
        self.query_norm.reset_parameters()
        for layer in self.layers:
            layer.reset_parameters()
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(
        self, encoder_states: torch.Tensor, frame_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        batch, num_frames, dim = encoder_states.shape
        window = self.config.window_size
        if frame_valid is not None:
            # a clip's last window sees zeros past its end, exactly as when it runs alone
            encoder_states = encoder_states * frame_valid.unsqueeze(-1).to(encoder_states.dtype)
        # T // W + 2 windows, at least two (see BlockRelativeAttention), cut to ceil(T / W) below
        num_windows = num_frames // window + 2
        pad = num_windows * window - num_frames
        windows = F.pad(encoder_states, (0, 0, 0, pad)).unflatten(1, (num_windows, window))
        windows = windows.flatten(0, 1)  # (B * num_windows, window, dim)
        # the learned queries are the same for every window: keep them at batch 1 until the
        # first cross-attention makes them differ
        queries = self.query_norm(self.query.to(windows.dtype))
        for layer in self.layers:
            queries = layer(queries, windows)
        queries = queries.expand(windows.shape[0], -1, -1).unflatten(0, (batch, num_windows))
        num_vectors = num_audio_tokens(num_frames, window, self.config.downsample_rate)
        # the clip's vectors as a new tensor, not a slice (fms_speech.models.layout)
        return self.linear(leading_positions(queries.flatten(1, 2), num_vectors))


def num_audio_tokens(feature_lengths, window_size: int, downsample_rate: int):
    """Audio vectors per clip, (window // downsample) * ceil(frames / window); tensor or int."""
    num_windows = (feature_lengths + window_size - 1) // window_size
    return num_windows * (window_size // downsample_rate)
