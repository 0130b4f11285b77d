"""Document masking for packed sequences (data.reset_position_ids / reset_attention_mask /
eod_mask_loss): megatron's GPTDataset marks the documents, the batch carries the mask to SDPA and
to the MoD layer, and a token never sees another document (single process, fp32, tiny models)."""

import pytest
import torch

from mod_train.config.load import compose, to_config
from mod_train.config.schema import ModConfig
from mod_train.config.validate import ConfigError, validate
from mod_train.model.build import build_model_chunks, transformer_config
from mod_train.model.mod import MoDTransformerLayer, causal_routing, pad_mask_to_multiple, pad_to_multiple
from mod_train.model.specs import base_layer_spec

V, S, EOD = 128, 16, 127  # vocab, sequence, the end-of-document id of these synthetic sequences
N = 32  # samples read from the test corpus (32 tokens each; its documents are longer)


def document_mask(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """[b, s] tokens -> megatron's mask [b, 1, s, s], True = masked out: causal and same document
    (an EOD token belongs to the document it ends)."""
    ends = (tokens == eod).long()
    doc = torch.cumsum(ends, dim=1) - ends
    same = doc[:, :, None] == doc[:, None, :]
    causal = torch.ones(tokens.size(1), tokens.size(1), dtype=torch.bool).tril()
    return ~(same & causal).unsqueeze(1)


def build(*overrides, seed: int = 0):
    cfg = to_config(compose([f"model.vocab_size={V}", "model.num_layers=2", "model.hidden_size=32",
                             "model.num_attention_heads=4", f"model.seq_length={S}", *overrides]))
    d = validate(cfg, world_size=1, check_files=False, has_cuda=False)
    torch.manual_seed(seed)
    model = build_model_chunks(cfg, d)[0]
    model.eval()
    return model


def packed(first_doc_seed: int, boundary: int = 6) -> torch.Tensor:
    """One sequence: a first document of ``boundary`` tokens ending with EOD (its content drawn
    from ``first_doc_seed``), then a second document that is always the same."""
    g = torch.Generator().manual_seed(first_doc_seed)
    first = torch.randint(0, EOD, (boundary,), generator=g)
    first[-1] = EOD
    second = torch.randint(0, EOD, (S - boundary,), generator=torch.Generator().manual_seed(999))
    return torch.cat([first, second]).unsqueeze(0)


# ----------------------------------------------------------------------------- the data path
def test_dataset_marks_documents_and_masking_off_keeps_the_fast_path(tiny_data, tmp_path):
    from mod_train.data.datasets import MicroBatches, build_datasets
    from mod_train.data.tokenizer import load_tokenizer

    def batches(*flags):
        cfg = to_config(compose([f"data.tokenizer_model={tiny_data['tokenizer']}", f"data.paths=[{tiny_data['prefix']}]",
                                 "model.seq_length=32", "model.vocab_size=512", "train.max_steps=4",
                                 f"parallel.micro_batch_size={N}", *flags]))
        d = validate(cfg, world_size=1, check_files=False, has_cuda=False)  # file checks: the no-EOD test below
        tok = load_tokenizer(cfg.data.tokenizer_model)
        train = build_datasets(cfg, d, tok, tmp_path / "_".join(flags or ["off"])).train
        return tok.eod, next(MicroBatches(train, 0, N, 0, 1, torch.device("cpu")))

    eod, off = batches()
    # Masking off: no [s, s] mask travels (SDPA's is_causal path), positions and loss as before.
    assert set(off) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert torch.equal(off["position_ids"], torch.arange(32).expand(N, 32))

    _, on = batches("data.reset_position_ids=true", "model.position_embedding=learned_absolute",
                    "data.reset_attention_mask=true", "data.eod_mask_loss=true")
    tokens = on["tokens"]
    assert torch.equal(tokens, off["tokens"]) and (tokens == eod).any()  # same samples, with boundaries
    assert on["attention_mask"].shape == (N, 1, 32, 32) and on["attention_mask"].dtype == torch.bool
    assert torch.equal(on["attention_mask"], document_mask(tokens, eod))
    assert torch.equal(on["loss_mask"], (tokens != eod).float() * off["loss_mask"])
    ends = (tokens == eod).long()
    doc = torch.cumsum(ends, dim=1) - ends
    starts = torch.stack([torch.searchsorted(doc[b], doc[b]) for b in range(N)])  # first index of each document
    assert torch.equal(on["position_ids"], torch.arange(32) - starts)


def test_pad_mask_hides_the_padded_copies():
    mask = document_mask(torch.tensor([[5, EOD, 7, 8, EOD]]), EOD)  # 5 tokens padded to 8
    padded = pad_mask_to_multiple(mask, 4)
    assert padded.shape == (1, 1, 8, 8)
    assert torch.equal(padded[..., :5, :5], mask)
    assert padded[..., :5, 5:].all()  # no real token sees a copy
    assert torch.equal(padded[..., 5:, :], padded[..., 4:5, :].expand(1, 1, 3, 8))  # copies see as the last
    assert pad_to_multiple(torch.zeros(5, 1), 4).size(0) == padded.size(-1)


# ----------------------------------------------------------------------------- dense model
def test_dense_logits_ignore_the_previous_document(megatron_tp1):
    model = build()
    pos = torch.arange(S).unsqueeze(0)
    a, b = packed(1), packed(2)
    assert not torch.equal(a[:, :6], b[:, :6]) and torch.equal(a[:, 6:], b[:, 6:])
    with torch.no_grad():
        la = model(a, pos, document_mask(a, EOD))
        lb = model(b, pos, document_mask(b, EOD))
        assert torch.equal(la[:, 6:], lb[:, 6:])
        # Without the mask the second document sees the first: the check above could fail.
        assert not torch.allclose(model(a, pos, None)[:, 6:], model(b, pos, None)[:, 6:])
        # Rope is relative, so the second document scores as if it started at position 0 (why
        # data.reset_position_ids is refused with rope: it would change nothing).
        # (Causal attention alone, the fast path, keeps the front document from seeing what follows.)
        alone = torch.cat([a[:, 6:], a[:, :6]], dim=1)
        torch.testing.assert_close(la[:, 6:], model(alone, pos, None)[:, :S - 6], rtol=1e-4, atol=1e-5)


def test_forward_step_hands_the_batch_mask_to_the_model(megatron_tp1):
    # The training step's forward (every pipeline stage runs it on the batch it reads).
    from mod_train.engine.step import make_forward_step

    model = build()
    a, pos = packed(1), torch.arange(S).unsqueeze(0)
    batch = {"tokens": a, "labels": a, "loss_mask": (a != EOD).float(), "position_ids": pos,
             "attention_mask": document_mask(a, EOD)}
    with torch.no_grad():
        out, loss_fn = make_forward_step()(iter([batch]), model)
        assert torch.equal(out, model(a, pos, batch["attention_mask"], labels=a))
        assert not torch.allclose(out, model(a, pos, None, labels=a))
    loss, _ = loss_fn(out)
    torch.testing.assert_close(loss, out[a != EOD].mean())  # no loss where the input is EOD


def test_reset_position_ids_with_learned_positions(megatron_tp1):
    model = build("model.position_embedding=learned_absolute")
    a = packed(1)
    pos = torch.cat([torch.arange(6), torch.arange(S - 6)]).unsqueeze(0)  # reset after the EOD
    alone = torch.cat([a[:, 6:], a[:, :6]], dim=1)
    with torch.no_grad():
        got = model(a, pos, document_mask(a, EOD))[:, 6:]
        want = model(alone, torch.arange(S).unsqueeze(0), None)[:, :S - 6]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(a, torch.arange(S).unsqueeze(0), document_mask(a, EOD))[:, 6:], want)


def test_rope_with_reset_position_ids_is_refused():
    cfg = to_config(compose([f"model.vocab_size={V}", "data.reset_position_ids=true"]))
    with pytest.raises(ConfigError, match="Set data.reset_position_ids=false"):
        validate(cfg, world_size=1, check_files=False, has_cuda=False)
    cfg.model.position_embedding = "learned_absolute"
    validate(cfg, world_size=1, check_files=False, has_cuda=False)


def test_data_without_document_ends_is_refused(tiny_data, tmp_path):
    from data_prep.tokenize_corpus import tokenize_corpus

    (tmp_path / "a.txt").write_text("one document here\nand a second one\n")
    tokenize_corpus([str(tmp_path / "a.txt")], tiny_data["tokenizer"], str(tmp_path / "noeod"), workers=1,
                    append_eod=False)
    prefix = next(str(p)[:-4] for p in tmp_path.glob("noeod*.bin"))
    flags = [f"data.tokenizer_model={tiny_data['tokenizer']}", "model.seq_length=32", "data.eod_mask_loss=true"]
    with pytest.raises(ConfigError, match="no document of .* ends with it .*--no-eod"):
        validate(to_config(compose(flags + [f"data.paths=[{prefix}]"])), world_size=1, has_cuda=False)
    validate(to_config(compose(flags + [f"data.paths=[{tiny_data['prefix']}]"])), world_size=1, has_cuda=False)


# ----------------------------------------------------------------------------- MoD
def mod_layer():
    cfg = to_config(compose([f"model.vocab_size={V}", "model.hidden_size=32", "model.num_attention_heads=4",
                             f"model.seq_length={S}", "model.num_layers=2"]))
    tcfg = transformer_config(cfg, validate(cfg, world_size=1, check_files=False, has_cuda=False))
    spec = base_layer_spec(cfg.model, moe=False)
    torch.manual_seed(0)
    layer = MoDTransformerLayer(config=tcfg, submodules=spec.submodules, layer_number=1, capacity=0.25,
                                mod=ModConfig(enabled=True, router_weight="none"), seq_length=S)
    with torch.no_grad():  # the router reads feature 0 only: the routed set is fixed by the inputs
        layer.router.linear.weight.zero_()
        layer.router.linear.weight[0, 0] = 1.0
    return layer.eval()


@pytest.mark.parametrize("routing", ["topk", "causal"])
def test_mod_routed_tokens_attend_only_to_routed_tokens_of_their_document(megatron_tp1, routing):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    layer = mod_layer()
    layer.routing = routing
    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0)(S)
    routed = [2, 5, 9, 13]  # documents: 0..6 (EOD at 6) and 7..15
    x = torch.randn(S, 2, 32)
    x[:, :, 0] = -5.0
    x[routed, :, 0] = 5.0  # routed by top-k (k = 4) and by the causal decision (logit > 0)
    tokens = torch.zeros(2, S, dtype=torch.long)
    tokens[:, 6] = EOD
    mask = document_mask(tokens, EOD)
    changed = x.clone()
    changed[[2, 5], :, 1:] += 3.0  # the routed tokens of the previous document

    def run(inp, m):
        with torch.no_grad():
            return layer(inp, attention_mask=m, rotary_pos_emb=rope)[0]

    base, out = run(x, mask), run(changed, mask)
    assert torch.equal(out[[9, 13]], base[[9, 13]])  # the next document's routed tokens do not see them
    assert not torch.allclose(out[5], base[5])
    assert not torch.allclose(run(changed, None)[[9, 13]], run(x, None)[[9, 13]])  # without the mask they do
    later = x.clone()
    later[9, :, 1:] += 3.0  # inside a document, routed tokens still see earlier routed ones
    assert not torch.allclose(run(later, mask)[13], base[13])


@pytest.mark.parametrize("model_name", ["tiny_mod", "tiny_mode_staged", "tiny_mode_integrated"])
def test_mod_model_with_causal_routing_ignores_the_previous_document(megatron_tp1, model_name):
    # With each token's own (causal) routing decision, a document's routing and logits cannot
    # depend on the previous document at all: the whole-model version of the test above. MoE layers
    # (MoDE) route each token on its own (dropless) and ignore the mask.
    model = build(f"model={model_name}", "model.mod.capacity=0.25")
    pos = torch.arange(S).unsqueeze(0)
    a, b = packed(1), packed(2)
    with torch.no_grad(), causal_routing([model]):
        la, lb = model(a, pos, document_mask(a, EOD)), model(b, pos, document_mask(b, EOD))
        # Not bitwise: the previous document routes a different number of tokens, so the second
        # document's tokens sit in differently sized matmuls (measured difference 3e-8; without the
        # mask 3e-2).
        torch.testing.assert_close(la[:, 6:], lb[:, 6:], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(model(a, pos, None)[:, 6:], model(b, pos, None)[:, 6:], rtol=1e-3, atol=1e-3)
