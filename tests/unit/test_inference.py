"""mod_train.inference: KV-cache decoding with causal MoD routing equals the full-sequence causal forward;
batched equals one prompt at a time; sampling by seed, nucleus, validated sampling choices."""

import pytest
import torch

from mod_train.config.load import compose, to_config
from mod_train.config.validate import validate
from mod_train.inference.decoder import KVCacheDecoder, full_forward_logits, mlp_half
from mod_train.inference.errors import InferenceError
from mod_train.inference.generation import GenerationResult, generate, generate_batch
from mod_train.inference.sampling import Sampling, nucleus_mask, sample_token
from mod_train.model.build import build_model_chunks
from mod_train.model.mod import MoDTransformerLayer

V = 128
ATOL = 1e-4


def build(*overrides, seed: int = 0):
    cfg = to_config(compose([f"model.vocab_size={V}", *overrides]))
    derived = validate(cfg, world_size=1, check_files=False, has_cuda=False)
    torch.manual_seed(seed)
    model = build_model_chunks(cfg, derived)[0]
    model.eval()
    return model, cfg


def mod_layers(model):
    return [(i, layer) for i, layer in enumerate(model.decoder.layers) if isinstance(layer, MoDTransformerLayer)]


def capture_input(layer, store, key):
    """Record the hidden states a layer is called with (the TransformerBlock passes them by name)."""
    def hook(mod, args, kwargs):
        store[key] = (args[0] if args else kwargs["hidden_states"]).detach()
    return layer.register_forward_pre_hook(hook, with_kwargs=True)


def causal_decisions(model, ids):
    """Per MoD layer index: the [s] bool causal decisions of the full causal forward."""
    seen = {}
    hooks = [capture_input(layer, seen, i) for i, layer in mod_layers(model)]
    try:
        full_forward_logits(model, ids)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for i, layer in mod_layers(model):
        x = seen[i]
        out[i] = (layer.router.causal_logits(x, layer.router.scores(x)) > 0)[0]
    return out


def sharpen_routers(model, ids):
    """Large router logits (clear-cut decisions, non-trivial sigmoid weights); predictor biases
    set so that about half the tokens of ``ids`` are routed in every MoD layer."""
    with torch.no_grad():
        for i, layer in mod_layers(model):
            layer.router.linear.weight.mul_(50.0)
            if layer.router.predictor is not None:
                last = layer.router.predictor[-1]
                last.weight.mul_(50.0)
                x = {}
                h = capture_input(layer, x, "x")
                full_forward_logits(model, ids)
                h.remove()
                logits = layer.router.causal_logits(x["x"], None)[0]
                last.bias.sub_(logits.median() - 1e-3)


def reference_greedy(model, prompt, n):
    """Greedy continuation by re-running the full causal forward (no cache) for every token."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(full_forward_logits(model, seq)[-1, :V].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("variant", [
    (),
    ("model.num_query_groups=2",),  # grouped-query attention: megatron's grouped QKV layout
    ("model.moe.num_experts=4",),  # MoE MLPs run through the layer's public mlp / mlp_bda
], ids=["mha", "gqa", "moe"])
def test_dense_kv_cache_matches_full_forward(megatron_tp1, variant):
    model, cfg = build("model=tiny", *variant)
    ids = torch.randint(0, V, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    want = full_forward_logits(model, ids)
    dec = KVCacheDecoder(model)
    got = torch.stack([dec.step(t) for t in ids])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert dec.cache_sizes() == [len(ids)] * cfg.model.num_layers

    prompt = ids[:6]
    result = generate(model, cfg, prompt, 16, greedy=True)
    new, per_step = result.tokens[0], result.logits[0]
    assert len(new) == 16 and per_step.shape == (16, want.size(1))
    full = full_forward_logits(model, prompt + new)
    torch.testing.assert_close(per_step, full[len(prompt) - 1: -1], atol=ATOL, rtol=0)
    assert new == reference_greedy(model, prompt, 16)


@pytest.mark.parametrize("preset", ["tiny_mode_staged", "tiny_mode_integrated"])
def test_mode_kv_cache_matches_causal_full_forward(megatron_tp1, preset):
    """MoDE: staged (MoD routing around an MoE layer) and integrated (a no-op expert) decode with
    the KV cache exactly like the full causal forward."""
    model, cfg = build(f"model={preset}")
    ids = torch.randint(0, V, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    if mod_layers(model):
        sharpen_routers(model, ids)
    want = full_forward_logits(model, ids)
    dec = KVCacheDecoder(model)
    got = torch.stack([dec.step(t) for t in ids])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    prompt = ids[:6]
    result = generate(model, cfg, prompt, 12, greedy=True)
    new, per_step = result.tokens[0], result.logits[0]
    full = full_forward_logits(model, prompt + new)
    torch.testing.assert_close(per_step, full[len(prompt) - 1: -1], atol=ATOL, rtol=0)
    assert new == reference_greedy(model, prompt, 12)


@pytest.mark.parametrize("causal", ["aux_loss", "predictor"])
def test_mod_kv_cache_matches_causal_full_forward(megatron_tp1, causal):
    model, cfg = build("model=tiny_mod", f"model.mod.causal={causal}")
    ids = torch.randint(0, V, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    sharpen_routers(model, ids)
    assert [i for i, _ in mod_layers(model)] == [1, 3]

    want = full_forward_logits(model, ids)
    dec = KVCacheDecoder(model)
    got = torch.stack([dec.step(t) for t in ids])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # Routing differs from the dense path: the model under causal routing is not a dense model.
    assert all(m.routing == "topk" for _, m in mod_layers(model))  # restored after the reference

    decisions = causal_decisions(model, ids)
    sizes = dec.cache_sizes()
    for i, layer in enumerate(model.decoder.layers):
        if i in decisions:
            routed = decisions[i].nonzero().squeeze(-1).tolist()
            assert dec.decisions[i][0] == decisions[i].tolist()
            assert dec.caches[i].positions[0] == routed  # exactly the routed tokens, in order
            assert sizes[i] == len(routed)
            assert 0 < sizes[i] < len(ids), (i, sizes[i])
        else:
            assert sizes[i] == len(ids)

    prompt = ids[:6]
    final = generate(model, cfg, prompt, 16, greedy=True)
    new, per_step = final.tokens[0], final.logits[0]
    full = full_forward_logits(model, prompt + new)
    torch.testing.assert_close(per_step, full[len(prompt) - 1: -1], atol=ATOL, rtol=0)
    assert new == reference_greedy(model, prompt, 16)
    assert final.positions == len(prompt) + len(new) - 1  # the last sampled token is never fed back
    assert all(0 < final.cache_sizes[0][i] < final.positions for i in decisions)
    # The result says which layers route and how many tokens each took (what --show-routing prints).
    assert final.routed_counts(0) == {i + 1: final.cache_sizes[0][i] for i in decisions}
    assert [d is not None for d in final.decisions] == [i in decisions for i in range(len(model.decoder.layers))]
    assert all(len(final.decisions[i][0]) == final.positions for i in decisions)


@pytest.mark.parametrize("preset", ["tiny_mod", "tiny_mode_staged"])
def test_batched_generation_equals_one_prompt_at_a_time(megatron_tp1, preset):
    """A batch decodes like its prompts one by one, though each sequence's MoD layers route
    different tokens (their caches fill at different rates; attention masks the shorter ones)."""
    model, cfg = build(f"model={preset}", "model.num_query_groups=2")
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, V, (6,), generator=gen).tolist() for _ in range(4)]
    sharpen_routers(model, sum(prompts, []))
    batched = generate_batch(model, cfg, prompts, 12, greedy=True)
    assert isinstance(batched, GenerationResult)
    mod = [i for i, _ in mod_layers(model)]
    sizes = batched.cache_sizes
    assert len({tuple(s[i] for i in mod) for s in sizes}) > 1  # the sequences were routed differently
    for b, prompt in enumerate(prompts):
        one = generate(model, cfg, prompt, 12, greedy=True)
        assert batched.tokens[b] == one.tokens[0]
        torch.testing.assert_close(batched.logits[b], one.logits[0], atol=ATOL, rtol=0)
        assert sizes[b] == one.cache_sizes[0]
        assert [batched.decisions[i][b] for i in mod] == [one.decisions[i][0] for i in mod]


def test_batched_generation_stops_each_sequence_at_its_eod(megatron_tp1):
    model, cfg = build("model=tiny")
    prompts = [[5, 6, 7], [9, 10, 11]]
    greedy = generate_batch(model, cfg, prompts, 8, greedy=True).tokens
    eod = greedy[0][2]  # sequence 0 samples it as its 3rd token
    result = generate_batch(model, cfg, prompts, 8, greedy=True, eod=eod)
    stopped, logits = result.tokens, result.logits
    assert stopped[0] == greedy[0][:3] and logits[0].size(0) == 3
    cut = greedy[1].index(eod) + 1 if eod in greedy[1] else 8
    assert stopped[1] == greedy[1][:cut]
    with pytest.raises(InferenceError, match="prompts of one length"):
        generate_batch(model, cfg, [[1, 2], [3]], 4)


def test_nucleus_and_sampling_by_seed(megatron_tp1):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert nucleus_mask(logits, 0.7).tolist() == [True, True, False, False]
    assert nucleus_mask(logits, 0.85).tolist() == [True, True, True, False]
    assert nucleus_mask(logits, 0.4).tolist() == [True, False, False, False]
    assert nucleus_mask(logits, 1.0).all()
    g = torch.Generator().manual_seed(0)
    drawn = {sample_token(logits, Sampling(greedy=False, temperature=1.0, top_p=0.7), g) for _ in range(300)}
    assert drawn == {0, 1}

    model, cfg = build("model=tiny_mod")
    with torch.no_grad():
        model.output_layer.weight.mul_(40.0)  # peaked distributions, so the nucleus is a real subset
    prompt = [5, 17, 3]
    kw = dict(greedy=False, temperature=0.8, top_p=0.6)
    ra, rb = (generate(model, cfg, prompt, 20, seed=7, **kw) for _ in range(2))
    (a, la), (b, lb) = (ra.tokens[0], ra.logits[0]), (rb.tokens[0], rb.logits[0])
    assert a == b and torch.equal(la, lb)
    others = [generate(model, cfg, prompt, 20, seed=s, **kw).tokens[0] for s in (8, 9)]
    assert any(o != a for o in others)
    sizes = []
    for tok, step_logits in zip(a, la):
        mask = nucleus_mask(step_logits[:V] / 0.8, 0.6)
        sizes.append(int(mask.sum()))
        assert mask[tok], "sampled a token outside the nucleus"
    assert min(sizes) < V  # the nucleus excluded something

    # Padded vocabulary rows are never sampled.
    small = generate(model, cfg, prompt, 20, greedy=False, temperature=5.0, seed=1, vocab_size=10).tokens[0]
    assert all(t < 10 for t in small)


@pytest.mark.parametrize("bad, match", [
    (dict(greedy=False, temperature=-1.0), r"temperature must be a number > 0, got -1.0; .*--greedy"),
    (dict(greedy=False, temperature=0.0), r"temperature must be a number > 0, got 0.0"),
    (dict(greedy=False, temperature=float("nan")), r"temperature must be a number > 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
])
def test_bad_sampling_choices_are_rejected_not_turned_into_greedy(bad, match):
    with pytest.raises(InferenceError, match=match):
        Sampling(**bad)


def test_generation_rejects_a_negative_temperature_before_decoding(megatron_tp1):
    model, cfg = build("model=tiny")
    with pytest.raises(InferenceError, match="temperature must be a number > 0, got -1"):
        generate(model, cfg, [1, 2, 3], 4, greedy=False, temperature=-1.0)


@pytest.mark.parametrize("preset", ["tiny", "tiny_mode_staged"])
def test_public_mlp_half_equals_megatrons_forward_mlp(megatron_tp1, preset):
    """Upstream check of the one place the decoder rebuilds a megatron method from public pieces:
    pre_mlp_layernorm -> mlp -> mlp_bda must equal ``TransformerLayer._forward_mlp`` in eval mode
    (dense and MoE MLPs). A megatron release that changes the MLP half fails here."""
    model, _ = build(f"model={preset}", "model.num_query_groups=2")
    x = torch.randn(5, 2, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in model.decoder.layers:
            torch.testing.assert_close(mlp_half(layer, x), layer._forward_mlp(x), atol=0, rtol=0)
