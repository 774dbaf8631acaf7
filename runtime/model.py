"""A small GPT whose feed-forward blocks are dropless top-k MoE layers.

Dense parameters (embeddings, attention, norms, routers) are ordinary module parameters and are
trained as in data parallelism. Experts are not module parameters: each MoE layer's experts are a
`runtime.layer.FlexMoE` (the public layer any model can use), whose slots the trainer's
`FlexMoERuntime` binds, so where an expert runs is the placement's business and never changes
what the layer computes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cost_models.files import InputError, finite_number, whole_number
from runtime.data import VOCAB
from runtime.experts import GeluFFN
from runtime.layer import FlexMoE


@dataclass
class ModelConfig:
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256  # expert hidden size
    num_experts: int = 8
    top_k: int = 2
    seq_len: int = 64
    aux_coef: float = 0.01
    router_skew: float = 0.0  # a fixed router bias favouring low expert ids: skewed routing for benchmarks

    def check(self) -> "ModelConfig":
        for name in ("d_model", "n_layers", "n_heads", "d_ff", "num_experts", "top_k", "seq_len"):
            whole_number(getattr(self, name), name, None, minimum=1, maximum=2**16)
        finite_number(self.aux_coef, "aux_coef", None, minimum=0.0, maximum=1e6)
        finite_number(self.router_skew, "router_skew", None, minimum=-1e6, maximum=1e6)
        if self.d_model % self.n_heads:
            raise InputError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if self.top_k > self.num_experts:
            raise InputError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MoELayer(nn.Module):
    """Router plus experts: a user of the public layer (`runtime.layer.FlexMoE`), which holds the
    experts in slots and dispatches; `runtime.layer.FlexMoERuntime` attaches and places them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        skew = cfg.router_skew * torch.linspace(1.0, -1.0, cfg.num_experts)
        self.register_buffer("router_bias", skew, persistent=False)
        self.experts = FlexMoE(cfg.num_experts, cfg.d_model, GeluFFN(cfg.d_model, cfg.d_ff))

    @property
    def last_counts(self) -> np.ndarray | None:
        return self.experts.last_counts

    @property
    def last_share(self) -> np.ndarray | None:
        return self.experts.last_share

    def forward(self, x):
        b, t, d = x.shape
        h = x.reshape(-1, d)
        probs = torch.softmax(self.router(h) + self.router_bias, dim=-1)
        gate, idx = probs.topk(self.cfg.top_k, dim=-1)
        if self.cfg.top_k > 1:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        e = self.cfg.num_experts
        frac = torch.bincount(idx.reshape(-1), minlength=e).to(probs.dtype) / idx.numel()
        aux = e * (frac * probs.mean(dim=0)).sum()
        return self.experts(h, idx, gate).view(b, t, d), aux


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.moe = MoELayer(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        y, aux = self.moe(self.ln2(x))
        return x + y, aux


class MoEGPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.check()
        self.tok = nn.Embedding(VOCAB, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, VOCAB, bias=False)

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [b.moe for b in self.blocks]

    def forward(self, tokens, targets):
        """(total loss, language-model loss): the mean over this rank's tokens."""
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        aux = x.new_zeros(())
        for block in self.blocks:
            x, a = block(x)
            aux = aux + a
        logits = self.head(self.ln(x))
        lm = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        return lm + self.cfg.aux_coef * aux / len(self.blocks), lm
