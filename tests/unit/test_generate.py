"""mod-generate: KV-cache decoding with causal MoD routing equals the full-sequence causal forward."""

import pytest
import torch

from mod_train.config.load import compose, to_config, to_plain_dict
from mod_train.config.validate import validate
from mod_train.generate import (
    GenerateError,
    KVCacheDecoder,
    full_forward_logits,
    generate,
    generate_batch,
    main,
    nucleus_mask,
    sample_token,
)
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
    ("model.moe.num_experts=4",),  # MoE MLPs run through the layer's own _forward_mlp
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
    new, per_step = generate(model, cfg, prompt, 16, greedy=True)
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
    new, per_step = generate(model, cfg, prompt, 12, greedy=True)
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
    new, per_step = generate(model, cfg, prompt, 16, greedy=True)
    full = full_forward_logits(model, prompt + new)
    torch.testing.assert_close(per_step, full[len(prompt) - 1: -1], atol=ATOL, rtol=0)
    assert new == reference_greedy(model, prompt, 16)
    final = generate.last_decoder
    assert final.pos == len(prompt) + len(new) - 1  # the last sampled token is never fed back
    assert all(0 < final.cache_sizes()[i] < final.pos for i in decisions)


@pytest.mark.parametrize("preset", ["tiny_mod", "tiny_mode_staged"])
def test_batched_generation_equals_one_prompt_at_a_time(megatron_tp1, preset):
    """A batch decodes like its prompts one by one, though each sequence's MoD layers route
    different tokens (their caches fill at different rates; attention masks the shorter ones)."""
    model, cfg = build(f"model={preset}", "model.num_query_groups=2")
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, V, (6,), generator=gen).tolist() for _ in range(4)]
    sharpen_routers(model, sum(prompts, []))
    new, per_step = generate_batch(model, cfg, prompts, 12, greedy=True)
    dec = generate_batch.last_decoder
    mod = [i for i, _ in mod_layers(model)]
    sizes = [dec.cache_sizes(b) for b in range(4)]
    assert len({tuple(s[i] for i in mod) for s in sizes}) > 1  # the sequences were routed differently
    for b, prompt in enumerate(prompts):
        one, one_logits = generate(model, cfg, prompt, 12, greedy=True)
        assert new[b] == one
        torch.testing.assert_close(per_step[b], one_logits, atol=ATOL, rtol=0)
        assert sizes[b] == generate.last_decoder.cache_sizes()
        assert [dec.decisions[i][b] for i in mod] == [generate.last_decoder.decisions[i][0] for i in mod]


def test_batched_generation_stops_each_sequence_at_its_eod(megatron_tp1):
    model, cfg = build("model=tiny")
    prompts = [[5, 6, 7], [9, 10, 11]]
    greedy, _ = generate_batch(model, cfg, prompts, 8, greedy=True)
    eod = greedy[0][2]  # sequence 0 samples it as its 3rd token
    stopped, logits = generate_batch(model, cfg, prompts, 8, greedy=True, eod=eod)
    assert stopped[0] == greedy[0][:3] and logits[0].size(0) == 3
    cut = greedy[1].index(eod) + 1 if eod in greedy[1] else 8
    assert stopped[1] == greedy[1][:cut]
    with pytest.raises(GenerateError, match="prompts of one length"):
        generate_batch(model, cfg, [[1, 2], [3]], 4)


def test_nucleus_and_sampling_by_seed(megatron_tp1):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert nucleus_mask(logits, 0.7).tolist() == [True, True, False, False]
    assert nucleus_mask(logits, 0.85).tolist() == [True, True, True, False]
    assert nucleus_mask(logits, 0.4).tolist() == [True, False, False, False]
    assert nucleus_mask(logits, 1.0).all()
    g = torch.Generator().manual_seed(0)
    drawn = {sample_token(logits, False, 1.0, 0.7, g) for _ in range(300)}
    assert drawn == {0, 1}

    model, cfg = build("model=tiny_mod")
    with torch.no_grad():
        model.output_layer.weight.mul_(40.0)  # peaked distributions, so the nucleus is a real subset
    prompt = [5, 17, 3]
    kw = dict(greedy=False, temperature=0.8, top_p=0.6)
    a, la = generate(model, cfg, prompt, 20, seed=7, **kw)
    b, lb = generate(model, cfg, prompt, 20, seed=7, **kw)
    assert a == b and torch.equal(la, lb)
    others = [generate(model, cfg, prompt, 20, seed=s, **kw)[0] for s in (8, 9)]
    assert any(o != a for o in others)
    sizes = []
    for tok, step_logits in zip(a, la):
        mask = nucleus_mask(step_logits[:V] / 0.8, 0.6)
        sizes.append(int(mask.sum()))
        assert mask[tok], "sampled a token outside the nucleus"
    assert min(sizes) < V  # the nucleus excluded something

    # Padded vocabulary rows are never sampled.
    small, _ = generate(model, cfg, prompt, 20, greedy=False, temperature=5.0, seed=1, vocab_size=10)
    assert all(t < 10 for t in small)


# ----------------------------------------------------------------------------- CLI / checkpoints
def _tokenizer(tmp_path):
    import sentencepiece as spm

    text = tmp_path / "corpus.txt"
    lines = ["once upon a time there was a small robot who liked to read",
             "the quick brown fox jumps over the lazy dog near the river",
             "a tiny model learns to write short stories about the sea"]
    text.write_text("\n".join(lines * 20) + "\n")
    # byte_fallback needs the 256 byte pieces in the vocabulary, hence 300 (padded to 384 rows).
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "tok"), vocab_size=300,
                                   byte_fallback=True, model_type="bpe", minloglevel=2)
    return tmp_path / "tok.model"


def _save_fake_checkpoint(root, step, cfg, model):
    from mod_train.checkpoint.layout import CheckpointDir
    from mod_train.engine.step import ModelChunks

    ckpt = CheckpointDir(root)
    staging = ckpt.begin(step)
    (staging / "state").mkdir()
    torch.save({"module": ModelChunks([model]).state_dict()}, staging / "state" / "mp_rank_00_model_states.pt")
    return ckpt.commit(step, {"config": to_plain_dict(cfg)})


def test_cli_end_to_end(megatron_tp1, tmp_path, capsys):
    from mod_train.data.tokenizer import load_tokenizer

    tok_path = _tokenizer(tmp_path)
    model, cfg = build("model=tiny_mod", "model.vocab_size=300", f"data.tokenizer_model={tok_path}")
    root = tmp_path / "checkpoints"
    _save_fake_checkpoint(root, 5, cfg, model)

    tok = load_tokenizer(str(tok_path))
    prompt = "once upon a time"
    prompt_ids = list(tok.tokenize(prompt))
    new, _ = generate(model, cfg, prompt_ids, 12, greedy=True, eod=tok.eod)
    shown = new[:-1] if new and new[-1] == tok.eod else new
    expected = tok.detokenize(prompt_ids + shown)

    assert main(["--checkpoint", str(root), "--prompt", prompt, "--max-new-tokens", "12", "--greedy"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == expected.strip() and out.startswith(prompt) and len(out) > len(prompt)

    argv = ["--checkpoint", str(root), "--iter", "5", "--prompt", prompt, "--max-new-tokens", "8",
            "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]
    main(argv)
    first = capsys.readouterr().out
    main(argv)
    assert capsys.readouterr().out == first and first.startswith(prompt)

    # An iter_* directory works as well; an empty prompt starts from the end-of-document token.
    main(["--checkpoint", str(root / "iter_0000005"), "--max-new-tokens", "4"])
    capsys.readouterr()

    # Several prompts: the two of one token length decode as one batch; each output is the same as
    # its prompt alone (greedy), in the order given.
    others = ["upon a time once", "the sea"]  # the same words reordered: as many tokens as the prompt
    assert len(tok.tokenize(others[0])) == len(prompt_ids) != len(tok.tokenize(others[1]))
    main(["--checkpoint", str(root), "--prompt", prompt, "--prompt", others[0], "--prompt", others[1],
          "--max-new-tokens", "12", "--greedy"])
    outs = capsys.readouterr().out.strip().split("\n-----\n")
    singles = []
    for text in (prompt, *others):
        main(["--checkpoint", str(root), "--prompt", text, "--max-new-tokens", "12", "--greedy"])
        singles.append(capsys.readouterr().out.strip())
    assert [o.strip() for o in outs] == singles and outs[0].strip() == expected.strip()


def test_cli_errors(megatron_tp1, tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["--checkpoint", str(tmp_path / "missing"), "--prompt", "hi"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no complete checkpoint"):
        main(["--checkpoint", str(tmp_path / "empty")])

    model, cfg = build("model=tiny", "data.tokenizer_model=/nonexistent/tok.model")
    root = tmp_path / "ck"
    _save_fake_checkpoint(root, 2, cfg, model)
    with pytest.raises(SystemExit, match=r"step 7 .*iter_0000002"):
        main(["--checkpoint", str(root), "--iter", "7"])
    with pytest.raises(SystemExit, match="--tokenizer"):
        main(["--checkpoint", str(root)])

    cfg.parallel.tp = 2
    _save_fake_checkpoint(root, 3, cfg, model)
    with pytest.raises(SystemExit, match=r"parallel.tp=2.*supports checkpoints written with parallel.tp=1 and parallel.pp=1"):
        main(["--checkpoint", str(root), "--iter", "3"])


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_loads_real_deepspeed_checkpoint(megatron_tp1, tmp_path, monkeypatch, capsys, zero_stage):
    """A checkpoint written by DeepSpeed's own save_checkpoint (ZeRO-3: partitioned weights)."""
    import deepspeed

    from mod_train.checkpoint.layout import CheckpointDir
    from mod_train.engine.deepspeed_setup import build_engine
    from mod_train.engine.step import ModelChunks
    from mod_train.generate import load_model_state

    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    deepspeed.init_distributed(dist_backend="gloo")
    tok_path = _tokenizer(tmp_path)
    model, cfg = build("model=tiny_mod", "model.vocab_size=300", f"data.tokenizer_model={tok_path}",
                       f"parallel.zero_stage={zero_stage}", "parallel.micro_batch_size=1")
    weights = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    derived = validate(cfg, world_size=1, check_files=False, has_cuda=False)
    engine, _ = build_engine(cfg, derived, ModelChunks([model]), [model])
    ckpt = CheckpointDir(tmp_path / "ck")
    staging = ckpt.begin(4)
    engine.save_checkpoint(str(staging), tag="state", client_state={}, save_latest=False)
    iter_dir = ckpt.commit(4, {"config": to_plain_dict(cfg)})

    capsys.readouterr()  # DeepSpeed's own start-up messages
    state = load_model_state(iter_dir, zero_stage)
    for name, value in weights.items():
        assert torch.equal(state[name].float(), value.float()), name

    assert main(["--checkpoint", str(tmp_path / "ck"), "--prompt", "the quick", "--max-new-tokens", "5",
                 "--greedy"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("the quick")
