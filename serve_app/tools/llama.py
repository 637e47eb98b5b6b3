"""A minimal Llama decoder in pure torch, saved as a Hugging Face checkpoint and exported to ONNX.

Parameter names match `transformers.LlamaForCausalLM`, so a checkpoint written here loads there
unchanged, and the ONNX graph uses the decoder-with-past layout of `optimum-cli export onnx
--task text-generation-with-past`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from serve_app.tools.onnx_export import (
    KVCache,
    export_decoder_with_past,
    verify_decoder_with_past,
)

# Finite rather than -inf: a row with every key masked (a left pad attending only to pads) then
# softmaxes to a uniform row instead of NaN, so pad positions keep finite K/V.
MASK_VALUE = torch.finfo(torch.float32).min


@dataclass(frozen=True)
class DecoderConfig:
    """Architecture hyper-parameters, named as in Hugging Face's `LlamaConfig`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 0
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` contents `transformers` expects for this architecture."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            # transformers >= 5 reads rope_parameters; older versions read rope_theta above.
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
            "torch_dtype": "float32",
        }

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> DecoderConfig:
        """Read a Hugging Face Llama `config.json` dict."""
        rope = data.get("rope_parameters") or {}
        return cls(
            vocab_size=data["vocab_size"],
            hidden_size=data["hidden_size"],
            intermediate_size=data["intermediate_size"],
            num_hidden_layers=data["num_hidden_layers"],
            num_attention_heads=data["num_attention_heads"],
            num_key_value_heads=data.get("num_key_value_heads", data["num_attention_heads"]),
            max_position_embeddings=data["max_position_embeddings"],
            rope_theta=float(rope.get("rope_theta", data.get("rope_theta", 10000.0))),
            rms_norm_eps=data.get("rms_norm_eps", 1e-5),
            tie_word_embeddings=data.get("tie_word_embeddings", False),
            bos_token_id=data.get("bos_token_id", 0),
            eos_token_id=data.get("eos_token_id", 0),
            pad_token_id=data.get("pad_token_id", 0),
        )


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension."""
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding tables, computed from position ids (Llama's half-split form)."""

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        self.register_buffer("inv_freq", 1.0 / (theta**exponents), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape [batch, 1, seq, head_dim] for the given positions."""
        freqs = position_ids[..., None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]
        return angles.cos(), angles.sin()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Grouped-query self-attention with an optional key/value cache."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        kv_width = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        allowed: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Attend; `allowed` is a [batch, q, k] bool mask, None meaning plain causal, no past."""
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        if allowed is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            out = self._masked_attention(q, k, v, allowed)
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.o_proj(out), (k, v)

    def _masked_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
    ) -> torch.Tensor:
        # Grouping query heads under their shared KV head lets matmul broadcast instead of
        # materialising repeated K/V, and exports as plain MatMul.
        batch, _, seq, _ = q.shape
        group = self.num_heads // self.num_kv_heads
        q = q.reshape(batch, self.num_kv_heads, group, seq, self.head_dim)
        scores = torch.matmul(q, k.unsqueeze(2).transpose(-1, -2)) / math.sqrt(self.head_dim)
        scores = torch.where(allowed[:, None, None], scores, MASK_VALUE)
        out = torch.matmul(scores.softmax(dim=-1), v.unsqueeze(2))
        return out.reshape(batch, self.num_heads, seq, self.head_dim)


class MLP(nn.Module):
    """SwiGLU feed-forward block."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the gated projection."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """One pre-norm transformer block."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        allowed: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Attention then MLP, each with a residual connection."""
        attn_out, present = self.self_attn(self.input_layernorm(x), cos, sin, allowed, past)
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x)), present


class LlamaBackbone(nn.Module):
    """Embeddings, blocks and final norm: Hugging Face's `LlamaModel` (the `model.` prefix)."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)


class LlamaDecoder(nn.Module):
    """Causal language model whose `state_dict` matches `transformers.LlamaForCausalLM`."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaBackbone(config)
        self.lm_head: nn.Linear | None = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) for every projection and embedding; norms start at one."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Logits [batch, seq, vocab] and the updated cache.

        `attention_mask` covers past and current tokens ([batch, past + seq], 0 at pads). With
        neither mask nor cache the fast causal kernel is used (training).
        """
        batch, seq = input_ids.shape
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq).expand(batch, seq)
        allowed = None
        if attention_mask is not None or past_key_values is not None:
            if attention_mask is None:
                attention_mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
            allowed = _allowed_keys(attention_mask, seq)
        cos, sin = self.model.rotary_emb(position_ids)
        hidden = self.model.embed_tokens(input_ids)
        presents: KVCache = []
        for i, layer in enumerate(self.model.layers):
            past = None if past_key_values is None else past_key_values[i]
            hidden, present = layer(hidden, cos, sin, allowed, past)
            presents.append(present)
        hidden = self.model.norm(hidden)
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, head), presents


def _allowed_keys(attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
    """[batch, seq, total] bool: causal over absolute positions, and never onto a pad."""
    total = attention_mask.shape[1]
    key_index = torch.arange(total)
    query_index = torch.arange(seq) + (total - seq)
    causal = key_index[None, :] <= query_index[:, None]
    return causal[None] & attention_mask[:, None, :].bool()


@torch.no_grad()
def greedy_generate(
    model: LlamaDecoder, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int
) -> list[int]:
    """Greedy continuation of one prompt through the KV cache; returns the new token ids."""
    model.eval()
    logits, cache = model(torch.tensor([prompt_ids]), past_key_values=None)
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        if token == eos_token_id:
            break
        out.append(token)
        logits, cache = model(torch.tensor([[token]]), past_key_values=cache)
    return out


def write_generation_config(
    config: DecoderConfig, out_dir: Path, eos_token_ids: list[int] | None = None
) -> None:
    """Write `generation_config.json`; `eos_token_ids` adds stop tokens such as `<|im_end|>`."""
    eos: int | list[int] = eos_token_ids or config.eos_token_id
    data = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": config.pad_token_id,
        "max_length": config.max_position_embeddings,
        "do_sample": False,
    }
    (out_dir / "generation_config.json").write_text(json.dumps(data, indent=2) + "\n")


def write_config(config: DecoderConfig, out_dir: Path) -> None:
    """Write the Hugging Face `config.json`."""
    (out_dir / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")


def save_hf_checkpoint(
    model: LlamaDecoder,
    config: DecoderConfig,
    out_dir: Path,
    eos_token_ids: list[int] | None = None,
) -> None:
    """Write `config.json`, `generation_config.json` and `model.safetensors` to `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    write_config(config, out_dir)
    write_generation_config(config, out_dir, eos_token_ids)


def compare_with_transformers(model: LlamaDecoder, hf_dir: Path, seed: int = 0) -> float:
    """Max abs logit difference between `model` and `transformers` loading `hf_dir`."""
    from transformers import LlamaForCausalLM  # only the export extra ships transformers

    reference = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=generator)
    model.eval()
    with torch.no_grad():
        ours, _ = model(input_ids)
        theirs = reference(input_ids=input_ids).logits
    return float((ours - theirs).abs().max())


def export_onnx(
    model: LlamaDecoder,
    config: DecoderConfig,
    out_dir: Path,
    eos_token_ids: list[int] | None = None,
) -> dict[str, float]:
    """Export `out_dir/model.onnx` (decoder with past) plus `config.json` and generation config.

    Returns the `verify_decoder_with_past` self-check diffs; raises if the graph disagrees with
    torch.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    export_decoder_with_past(model, path)
    write_config(config, out_dir)
    write_generation_config(config, out_dir, eos_token_ids)
    return verify_decoder_with_past(model, path)
