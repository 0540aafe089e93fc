"""A Llama-style decoder run over key/value buffers the caller owns (DESIGN.md §7).

The serving engine does not go through the model's ``forward``: it calls the model's own
submodules (embeddings, norms, projections, rotary embedding, MLPs, LM head) and does only the
attention itself, so that

- every key/value lives in a preallocated buffer (no cache object grows or is copied);
- a beam attends to its request's prompt keys *in place* (one copy of the prompt per request,
  never per beam) plus its own few generated tokens, through a softmax over both key sets;
- shapes are fixed per bucket, and nothing synchronises with the host (CUDA graphs).

Attention over one key set (the prompt pass) is torch's fused scaled-dot-product attention, as
transformers' default; over two key sets (a beam's prompt and its own tokens) it follows
transformers' eager implementation: scores in the model's dtype, softmax in float32,
probabilities cast back (a float32 model gives the eager model's numbers up to rounding). Supported: decoders whose layers have ``self_attn.{q,k,v,o}_proj`` (optional
``q_norm``/``k_norm``), ``mlp``, ``input_layernorm`` and ``post_attention_layernorm``, with a
final ``norm`` and a ``rotary_emb`` (Llama / SmolLM2, Mistral, Qwen2, Qwen3).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["DecoderRunner", "KeySet", "attend", "SUPPORTED"]

SUPPORTED = ("Llama-style decoders (Llama / SmolLM2, Mistral, Qwen2, Qwen3): layers with "
             "self_attn.{q,k,v,o}_proj, mlp, input_layernorm, post_attention_layernorm, a final "
             "norm and rotary_emb")


@dataclass
class KeySet:
    """One set of keys a query row attends to.

    ``k``, ``v``: [G, kv_heads, T, head_dim]. ``groups``: None when row r of the queries reads
    row r of ``k`` (G == rows), or g when g consecutive query rows share one key row (G ==
    rows / g: the beams of one request share its prompt). ``mask``: additive float mask
    broadcastable to [G, 1, Lq, T] for groups=None and to [G, 1, 1, T] otherwise (0 = attend,
    a large negative number = do not).
    """

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None = None
    groups: int | None = None


def _scores(q: torch.Tensor, keys: KeySet, scaling: float, nrep: int) -> torch.Tensor:
    """Scaled, masked scores of q [rows, H, Lq, d] against keys.k -> [rows, H, Lq, T]."""
    rows, heads, lq, d = q.shape
    g, kvh, t, _ = keys.k.shape
    if keys.groups is None:
        qg = q.reshape(rows, kvh, nrep * lq, d)  # head h reads kv head h // nrep
        s = torch.matmul(qg, keys.k.transpose(-1, -2)) * scaling
        if keys.mask is not None:
            s = s.view(rows, kvh, nrep, lq, t) + keys.mask.unsqueeze(1)
        return s.reshape(rows, heads, lq, t)
    w = keys.groups
    qg = q.reshape(g, w, kvh, nrep, lq, d).permute(0, 2, 1, 3, 4, 5)
    qg = qg.reshape(g, kvh, w * nrep * lq, d)
    s = torch.matmul(qg, keys.k.transpose(-1, -2)) * scaling  # [G, kvh, w*nrep*lq, T]
    if keys.mask is not None:
        s = s + keys.mask
    return s.view(g, kvh, w, nrep, lq, t).permute(0, 2, 1, 3, 4, 5).reshape(rows, heads, lq, t)


def _values(p: torch.Tensor, keys: KeySet, nrep: int) -> torch.Tensor:
    """Probabilities p [rows, H, Lq, T] times keys.v -> [rows, H, Lq, d]."""
    rows, heads, lq, t = p.shape
    g, kvh, _, d = keys.v.shape
    if keys.groups is None:
        o = torch.matmul(p.reshape(rows, kvh, nrep * lq, t), keys.v)
        return o.reshape(rows, heads, lq, d)
    w = keys.groups
    pg = p.reshape(g, w, kvh, nrep, lq, t).permute(0, 2, 1, 3, 4, 5)
    pg = pg.reshape(g, kvh, w * nrep * lq, t)
    o = torch.matmul(pg, keys.v)  # [G, kvh, w*nrep*lq, d]
    return o.view(g, kvh, w, nrep, lq, d).permute(0, 2, 1, 3, 4, 5).reshape(rows, heads, lq, d)


def attend(q: torch.Tensor, key_sets: list[KeySet], scaling: float, nrep: int) -> torch.Tensor:
    """Attention of q [rows, H, Lq, d] over the union of ``key_sets``: one softmax over all
    their keys (as if they were concatenated), without concatenating keys or values.
    Returns [rows, H, Lq, d] in q's dtype."""
    if len(key_sets) == 1 and key_sets[0].groups is None:  # one key set: the fused kernel
        ks = key_sets[0]
        return F.scaled_dot_product_attention(q, ks.k, ks.v, attn_mask=ks.mask, scale=scaling,
                                              enable_gqa=nrep > 1)
    scores = [_scores(q, ks, scaling, nrep) for ks in key_sets]
    s = scores[0] if len(scores) == 1 else torch.cat(scores, dim=-1)
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    out, start = None, 0
    for ks, part in zip(key_sets, scores):
        t = part.shape[-1]
        o = _values(p[..., start:start + t], ks, nrep)
        out = o if out is None else out + o
        start += t
    return out


class DecoderRunner:
    """The layers of a Hugging Face Llama-style causal LM, run with caller-owned attention.

    ``forward(h, positions, attention)``: input embeddings [rows, Lq, hidden] and their position
    ids [rows, Lq] -> final normed hidden states [rows, Lq, hidden]; per layer,
    ``attention(layer, q, k, v)`` receives the new queries [rows, H, Lq, d] and keys/values
    [rows, kv_heads, Lq, d] (rotary embedding applied), stores the keys/values where the
    caller's plan keeps them and returns the attention output [rows, H, Lq, d].
    """

    def __init__(self, causal_lm):
        base = getattr(causal_lm, "model", None)
        if base is None or not hasattr(base, "layers"):
            base = getattr(causal_lm, "base_model", None)
        config = causal_lm.config
        layers = getattr(base, "layers", None)
        missing = [] if layers is not None else ["model.layers"]
        for name in ("norm", "rotary_emb", "embed_tokens"):
            if not hasattr(base, name):
                missing.append(f"model.{name}")
        if layers is not None:
            layers = list(layers[: config.num_hidden_layers])
            need = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp", "input_layernorm", "post_attention_layernorm")
            for part in need:
                obj = layers[0]
                for attr in part.split("."):
                    obj = getattr(obj, attr, None)
                if obj is None:
                    missing.append(f"layers[0].{part}")
        if missing or not layers:
            raise NotImplementedError(f"the serving engine runs {SUPPORTED}; "
                                      f"{type(causal_lm).__name__} lacks {missing}")
        self.model = causal_lm
        self.config = config
        self.layers = layers
        self.norm = base.norm
        self.rotary = base.rotary_emb
        self.embed_tokens = base.embed_tokens
        self.head = causal_lm.get_output_embeddings()
        attn = layers[0].self_attn
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(attn, "head_dim", None)
                            or config.hidden_size // self.num_heads)
        self.nrep = self.num_heads // self.num_kv_heads
        self.scaling = float(getattr(attn, "scaling", self.head_dim ** -0.5))
        self.hidden_size = int(config.hidden_size)
        window = getattr(config, "sliding_window", None)
        uses_window = window and (getattr(config, "use_sliding_window", True) is not False)
        self.max_positions = int(window) if uses_window else None
        module = importlib.import_module(type(attn).__module__)
        self._rope = getattr(module, "apply_rotary_pos_emb", None)
        if self._rope is None:
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

            self._rope = apply_rotary_pos_emb

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def _qkv(self, layer, x, cos, sin):
        attn = layer.self_attn
        shape = (*x.shape[:-1], -1, self.head_dim)
        q = attn.q_proj(x).view(shape)
        k = attn.k_proj(x).view(shape)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3: RMSNorm over each head
            q, k = attn.q_norm(q), attn.k_norm(k)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = self._rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q, k, v

    def forward(self, h: torch.Tensor, positions: torch.Tensor,
                attention: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
                ) -> torch.Tensor:
        cos, sin = self.rotary(h, position_ids=positions)
        for i, layer in enumerate(self.layers):
            x = layer.input_layernorm(h)
            q, k, v = self._qkv(layer, x, cos, sin)
            o = attention(i, q, k, v)
            o = o.transpose(1, 2).reshape(*h.shape[:-1], -1)
            h = h + layer.self_attn.o_proj(o)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.norm(h)

    def head_rows(self, hidden: torch.Tensor, rows: slice) -> torch.Tensor:
        """Logits of the LM head's vocabulary rows ``rows`` (a view of the weight, no copy)."""
        logits = hidden @ self.head.weight[rows].T
        bias = getattr(self.head, "bias", None)
        return logits + bias[rows] if bias is not None else logits
