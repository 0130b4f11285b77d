"""A plain-PyTorch GPT of the same shape as a mod-train model preset, trained on random tokens: the
reference that bench/throughput.py holds our dense training step against.

nanoGPT-style, one file, no megatron-core or DeepSpeed: token embedding, pre-norm blocks of
(RMSNorm or LayerNorm) -> causal self-attention through ``F.scaled_dot_product_attention`` (flash
kernels on GPU) with rotary embeddings -> SwiGLU or GELU MLP, a final norm and an untied output
layer; AdamW (fused on CUDA), gradient clipping at 1.0, bf16 autocast over fp32 weights on GPU and
``torch.compile`` on GPU unless --no-compile.

    python bench/reference_gpt.py --model gpt_350m --micro-batch 4 --steps 20 --warmup 5

Prints one ``RESULT {json}`` line: median step time, tokens/s, peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int, swiglu: bool, norm: type):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = norm(hidden), norm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.proj = nn.Linear(hidden, hidden, bias=False)
        self.swiglu = swiglu
        self.up = nn.Linear(hidden, (2 if swiglu else 1) * ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, h // self.heads).transpose(1, 3).unbind(2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # [b, heads, s, d]
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, h))
        up = self.up(self.norm2(x))
        if self.swiglu:
            gate, val = up.chunk(2, dim=-1)
            up = F.silu(gate) * val
        else:
            up = F.gelu(up)
        return x + self.down(up)


def rotary_tables(seq: int, dim: int, base: float, device) -> tuple:
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv)
    angles = torch.cat([angles, angles], dim=-1)  # megatron's (non-interleaved) rotate-half layout
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class ReferenceGPT(nn.Module):
    def __init__(self, vocab: int, layers: int, hidden: int, heads: int, ffn: int, swiglu: bool, rms: bool,
                 seq: int, rotary_base: float):
        super().__init__()
        norm = nn.RMSNorm if rms else nn.LayerNorm
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads, ffn, swiglu, norm) for _ in range(layers))
        self.norm = norm(hidden)
        self.out = nn.Linear(hidden, vocab, bias=False)
        cos, sin = rotary_tables(seq, hidden // heads, rotary_base, "cpu")
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        logits = self.out(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1))


def from_preset(model_preset: str, vocab: int, overrides=()) -> tuple:
    """(ReferenceGPT, mod-train Config, Derived) for a conf/model preset, shapes as mod-train builds them."""
    from mod_train.config.load import compose, to_config
    from mod_train.config.validate import validate

    cfg = to_config(compose([f"model={model_preset}", "data=mock", f"model.vocab_size={vocab}", *overrides]))
    d = validate(cfg, world_size=1, check_files=False, has_cuda=torch.cuda.is_available())
    m = cfg.model
    if m.mod.enabled or m.moe.num_experts:
        raise SystemExit(f"reference_gpt: {model_preset} is not a dense model")
    if (m.num_query_groups or m.num_attention_heads) != m.num_attention_heads or m.position_embedding != "rope" \
            or m.tie_embeddings:
        raise SystemExit(f"reference_gpt: {model_preset} uses a feature the reference lacks (GQA, learned "
                         f"positions or tied embeddings)")
    model = ReferenceGPT(d.padded_vocab_size, m.num_layers, m.hidden_size, m.num_attention_heads,
                         d.ffn_hidden_size, m.activation == "swiglu", m.normalization == "RMSNorm", m.seq_length,
                         m.rotary_base)
    return model, cfg, d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="a conf/model preset (dense)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (always skipped on CPU)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the model, e.g. model.seq_length=1024")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    model, cfg, _ = from_preset(args.model, args.vocab, args.overrides)
    model = model.to(device)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)
    step_model = torch.compile(model) if cuda and not args.no_compile else model
    seq = cfg.model.seq_length
    gen = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        for _ in range(args.grad_accum):
            data = torch.randint(0, args.vocab, (args.micro_batch, seq + 1), device=device, generator=gen)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = step_model(data[:, :-1], data[:, 1:]) / args.grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)

    times = []
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    seconds = times[len(times) // 2]
    tokens = args.micro_batch * args.grad_accum * seq
    print("RESULT " + json.dumps({
        "model": args.model, "ms_per_step": seconds * 1e3, "tokens_per_s": tokens / seconds,
        "params": sum(p.numel() for p in model.parameters()), "compiled": step_model is not model,
        "memory_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None}), flush=True)


if __name__ == "__main__":
    main()
