"""A mod-train model (Mixture-of-Depths, MoE, MoDE, or a dense model no stock class matches) for
Hugging Face ``transformers``, with causal MoD routing and a KV cache so ``generate()`` works.

Shipped inside the exported directory and registered through ``auto_map``; load it offline with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``. Self-contained (torch and
transformers only). Parameter names and layouts are megatron-core's (``decoder.layers.3.
self_attention.linear_qkv.weight`` in megatron's grouped [q..., k, v] per query group layout), so
the exported tensors are the trained ones, bit for bit.

What the model computes is mod-train's *causal* forward (``mod_train.model.mod.causal_routing``,
what ``mod-generate`` samples with), not the top-k routing of training (top-k looks at the whole
sequence, so it cannot be used token by token):

* a MoD layer routes each token by its own decision ``causal_logit > causal_threshold`` (the
  router's logit, or the predictor MLP's, against the threshold calibrated during training);
  a routed token runs the block (attention over the earlier tokens routed to this layer, rotary
  embedding at its absolute position, then the MLP) and its update is weighted by the router
  (``x + sigmoid(logit) * (block(x) - x)``); the others pass unchanged and add nothing to the
  layer's KV cache;
* an MoE MLP is megatron's top-k router (softmax over the top-k logits, or the top-k of a softmax
  over all experts for ``pre_softmax``), with no-op columns (integrated MoDE) contributing nothing
  and an optional shared expert added.

Each sequence of a batch routes on its own, so the cache (:class:`ModTrainCache`) is per sequence.
Left-padded batches are not supported (an attention mask with zeros raises).
"""

import inspect
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_mod_train import ModTrainConfig


class ModTrainCache:
    """Per layer, per sequence: the K/V of the tokens that layer processed and their absolute positions."""

    def __init__(self, num_layers: int, batch: int):
        self.k: List[List[Optional[torch.Tensor]]] = [[None] * batch for _ in range(num_layers)]
        self.v: List[List[Optional[torch.Tensor]]] = [[None] * batch for _ in range(num_layers)]
        self.pos: List[List[Optional[torch.Tensor]]] = [[None] * batch for _ in range(num_layers)]
        self.seen = 0  # tokens consumed per sequence

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def layer_sizes(self, row: int = 0) -> List[int]:
        """K/V entries each layer holds for sequence ``row`` (a MoD layer: the tokens it routed)."""
        return [0 if p[row] is None else int(p[row].numel()) for p in self.pos]

    def update(self, layer: int, row: int, k, v, pos):
        if self.k[layer][row] is not None:
            k = torch.cat([self.k[layer][row], k])
            v = torch.cat([self.v[layer][row], v])
            pos = torch.cat([self.pos[layer][row], pos])
        self.k[layer][row], self.v[layer][row], self.pos[layer][row] = k, v, pos
        return k, v, pos


# Recent transformers releases pass the cache to the model and read it back as `cache`, earlier
# ones as `past_key_values`; the output carries it under the name this release uses.
CACHE_NAME = ("cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
              else "past_key_values")


@dataclass
class ModTrainCausalLMOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    cache: Optional[ModTrainCache] = None
    past_key_values: Optional[ModTrainCache] = None


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(config: ModTrainConfig) -> nn.Module:
    if config.normalization == "RMSNorm":
        return RMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(t: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """t [n, heads, d] at absolute positions pos [n] (megatron's non-interleaved rotary embedding)."""
    d = t.size(-1)
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=t.device) / d))
    freqs = torch.outer(pos.to(torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    return t * emb.cos().to(t.dtype) + rotate_half(t) * emb.sin().to(t.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModTrainConfig):
        super().__init__()
        self.heads, self.groups, self.d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.rope_theta = config.rope_theta if config.position_embedding == "rope" else None
        self.linear_qkv = nn.Linear(config.hidden_size, (self.heads + 2 * self.groups) * self.d, bias=False)
        self.linear_proj = nn.Linear(self.heads * self.d, config.hidden_size, bias=False)

    def forward(self, x, pos, cache: Optional[ModTrainCache], layer: int, row: int):
        n, per_group = x.size(0), self.heads // self.groups
        qkv = self.linear_qkv(x).view(n, self.groups, per_group + 2, self.d)  # megatron's grouped layout
        q = qkv[:, :, :per_group].reshape(n, self.heads, self.d)
        k, v = qkv[:, :, per_group], qkv[:, :, per_group + 1]  # [n, groups, d]
        if self.rope_theta is not None:
            q, k = apply_rope(q, pos, self.rope_theta), apply_rope(k, pos, self.rope_theta)
        keys_pos = pos
        if cache is not None:
            k, v, keys_pos = cache.update(layer, row, k, v, pos)
        mask = keys_pos[None, :] <= pos[:, None]  # [n, L]: earlier (or own) tokens of this layer
        k = k.transpose(0, 1).repeat_interleave(per_group, dim=0)  # [heads, L, d]
        v = v.transpose(0, 1).repeat_interleave(per_group, dim=0)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=self.d ** -0.5)
        return self.linear_proj(out.transpose(0, 1).reshape(n, self.heads * self.d))


class MLP(nn.Module):
    def __init__(self, config: ModTrainConfig, ffn: int):
        super().__init__()
        self.gated = config.activation == "swiglu"
        self.linear_fc1 = nn.Linear(config.hidden_size, ffn * (2 if self.gated else 1), bias=False)
        self.linear_fc2 = nn.Linear(ffn, config.hidden_size, bias=False)

    def forward(self, x):
        h = self.linear_fc1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)  # megatron's GLU: the first half goes through the activation
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.linear_fc2(h)


class Experts(nn.Module):
    def __init__(self, config: ModTrainConfig, count: int, ffn: int):
        super().__init__()
        self.local_experts = nn.ModuleList([MLP(config, ffn) for _ in range(count)])


class MoEMLP(nn.Module):
    """megatron's MoE layer in eval: top-k router (fp32), experts, no-op columns, shared expert."""

    class Router(nn.Module):
        def __init__(self, columns: int, hidden: int):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(columns, hidden))

    def __init__(self, config: ModTrainConfig, moe: dict):
        super().__init__()
        self.num_experts, self.top_k = moe["num_experts"], moe["top_k"]
        self.pre_softmax = bool(moe.get("pre_softmax"))
        noop = int(moe.get("num_noop_experts") or 0)
        self.router = self.Router(self.num_experts + noop, config.hidden_size)
        self.experts = Experts(config, self.num_experts, moe["ffn_hidden_size"])
        shared = moe.get("shared_ffn_hidden_size")
        self.shared_experts = MLP(config, shared) if shared else None

    def forward(self, x):
        logits = F.linear(x.float(), self.router.weight.float())  # [n, E + noop]
        if self.pre_softmax:
            probs, idx = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
        else:
            top, idx = torch.topk(logits, self.top_k, dim=-1)
            probs = torch.softmax(top, dim=-1)
        out = torch.zeros_like(x)
        for e in range(self.num_experts):  # slots on no-op columns (>= num_experts) add nothing
            hit = idx == e
            rows = hit.any(dim=-1).nonzero().squeeze(-1)
            if rows.numel() == 0:
                continue
            weight = (probs * hit).sum(dim=-1)[rows].to(x.dtype)
            out = out.index_add(0, rows, self.experts.local_experts[e](x[rows]) * weight[:, None])
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class MoDRouter(nn.Module):
    def __init__(self, config: ModTrainConfig, mod: dict):
        super().__init__()
        self.weight_kind = mod.get("router_weight", "sigmoid")
        self.linear = nn.Linear(config.hidden_size, 1, bias=False)
        self.predictor = None
        if mod.get("causal") == "predictor":
            ph = mod["predictor_hidden"]
            self.predictor = nn.Sequential(nn.Linear(config.hidden_size, ph), nn.SiLU(), nn.Linear(ph, 1))
        self.register_buffer("causal_threshold", torch.zeros((), dtype=torch.float32))

    def scores(self, x):
        return F.linear(x.float(), self.linear.weight.float()).squeeze(-1)  # [n] fp32

    def causal_logits(self, x, logits):
        if self.predictor is None:
            return logits
        first, act, last = self.predictor
        hidden = act(F.linear(x.float(), first.weight.float(), first.bias.float()))
        return F.linear(hidden, last.weight.float(), last.bias.float()).squeeze(-1)

    def block_weight(self, logits):
        if self.weight_kind == "sigmoid":
            return torch.sigmoid(logits)
        if self.weight_kind == "logit":
            return logits
        return None


class Layer(nn.Module):
    def __init__(self, config: ModTrainConfig, index: int):
        super().__init__()
        spec = config.layers[index]
        self.index = index
        self.input_layernorm = make_norm(config)
        self.self_attention = Attention(config)
        self.pre_mlp_layernorm = make_norm(config)
        self.mlp = MoEMLP(config, spec["moe"]) if spec.get("moe") else MLP(config, config.intermediate_size)
        self.router = MoDRouter(config, spec["mod"]) if spec.get("mod") else None

    def block(self, x, pos, cache, row):
        x = x + self.self_attention(self.input_layernorm(x), pos, cache, self.index, row)
        return x + self.mlp(self.pre_mlp_layernorm(x))

    def forward(self, x, pos, cache, row):
        """x [s, h]: one sequence's new tokens at absolute positions pos [s]."""
        if self.router is None:
            return self.block(x, pos, cache, row)
        logits = self.router.scores(x)
        routed = (self.router.causal_logits(x, logits) > self.router.causal_threshold).nonzero().squeeze(-1)
        if routed.numel() == 0:
            return x  # around the layer: nothing enters its cache
        selected = x[routed]
        out = self.block(selected, pos[routed], cache, row)
        weight = self.router.block_weight(logits[routed])
        if weight is not None:
            out = selected + (out - selected) * weight[:, None].to(out.dtype)
        return x.index_copy(0, routed, out)


class Embedding(nn.Module):
    def __init__(self, config: ModTrainConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = (nn.Embedding(config.max_position_embeddings, config.hidden_size)
                                    if config.position_embedding == "learned_absolute" else None)

    def forward(self, ids, pos):
        x = self.word_embeddings(ids)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(pos)[None]
        return x


class Decoder(nn.Module):
    def __init__(self, config: ModTrainConfig):
        super().__init__()
        self.layers = nn.ModuleList([Layer(config, i) for i in range(config.num_hidden_layers)])
        self.final_layernorm = make_norm(config)


class ModTrainPreTrainedModel(PreTrainedModel):
    config_class = ModTrainConfig
    base_model_prefix = "mod_train"
    _no_split_modules = ["Layer"]

    def _init_weights(self, module):
        # Exported models always come with every weight; this only runs for a fresh model.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class ModTrainForCausalLM(ModTrainPreTrainedModel, GenerationMixin):
    def __init__(self, config: ModTrainConfig):
        super().__init__(config)
        self.embedding = Embedding(config)
        self.decoder = Decoder(config)
        self.output_layer = (None if config.tie_word_embeddings
                             else nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is per sequence (MoD layers route each sequence on its own)

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    def get_output_embeddings(self):
        return self.output_layer

    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None, attention_mask=None,
                                      use_cache=True, **kwargs):
        c = cache if cache is not None else past_key_values
        if c is not None and c.seen > 0:
            input_ids = input_ids[:, c.seen:]
        return {"input_ids": input_ids, CACHE_NAME: c, "attention_mask": attention_mask, "use_cache": use_cache}

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                use_cache=None, labels=None, inputs_embeds=None, return_dict=None, **kwargs) -> ModTrainCausalLMOutput:
        if inputs_embeds is not None:
            raise ValueError("mod-train models take input_ids, not inputs_embeds")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("padded batches are not supported by mod-train models (each sequence routes on its "
                             "own): pass sequences of one length, or one at a time")
        c = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        batch, s = input_ids.shape
        if c is None and use_cache:
            c = ModTrainCache(self.config.num_hidden_layers, batch)
        past = c.seen if c is not None else 0
        pos = torch.arange(past, past + s, device=input_ids.device)
        x = self.embedding(input_ids, pos)  # [b, s, h]
        rows = []
        for row in range(batch):
            h = x[row]
            for layer in self.decoder.layers:
                h = layer(h, pos, c, row)
            rows.append(h)
        h = self.decoder.final_layernorm(torch.stack(rows))
        weight = self.embedding.word_embeddings.weight if self.output_layer is None else self.output_layer.weight
        logits = F.linear(h, weight).float()
        if c is not None:
            c.seen += s
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        c = c if use_cache else None
        output = ModTrainCausalLMOutput(loss=loss, logits=logits)
        if c is not None:
            output[CACHE_NAME] = c
        return output
