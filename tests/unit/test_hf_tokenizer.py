"""Hugging Face tokenizers: byte-level BPE training, tokenization (workers, threads), special tokens, errors."""

import json
import os

import numpy as np
import pytest

from data_prep import BUNDLED_CORPUS
from data_prep._io import DataPrepError
from data_prep.encoders import TokenizerKind, load_encoder
from data_prep.tokenize_corpus import tokenize_corpus
from data_prep.train_hf_tokenizer import train_hf_bpe
from data_prep.train_tokenizer import main as tok_main

VOCAB = 700
N_DOCS = 200


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_tok")
    with open(BUNDLED_CORPUS, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(N_DOCS), f)]
    texts += ["  leading spaces, tabs\tand\n\nblank lines  ", "unicode: naïve café 中文 🙂", "<mask> marks"]
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    info = train_hf_bpe([str(d / "docs.jsonl")], str(d / "tok"), VOCAB, special_tokens=["<mask>"])
    return d, info, texts


def test_trained_tokenizer_special_ids_and_round_trip(hf):
    from tokenizers import Tokenizer

    d, info, _ = hf
    assert sorted(os.listdir(d / "tok")) == ["tokenizer.json", "tokenizer_config.json"]  # no temp files
    tok = Tokenizer.from_file(info.model_path)
    assert info.vocab_size == tok.get_vocab_size() == VOCAB
    assert [tok.id_to_token(i) for i in range(5)] == ["<pad>", "<unk>", "<s>", "</s>", "<mask>"]
    assert info.special_ids == {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, "<mask>": 4}
    enc = load_encoder(str(d / "tok"))  # the directory works as well as the file
    assert enc.kind is TokenizerKind.HF and enc.vocab_size == VOCAB
    assert (enc.special.pad, enc.special.unk, enc.special.bos, enc.special.eos) == (0, 1, 2, 3)
    text = "  x  \n\ny\t😀 never-seen ЖЖЖ <mask>"
    ids = enc.encode_batch([text])[0]
    assert enc.decode(ids) == text and 4 in ids  # byte-level: lossless; special token matched verbatim


def test_cli_kind_hf_bpe(hf, capsys):
    d, _, _ = hf
    assert tok_main(["--kind", "hf-bpe", "-i", str(d / "docs.jsonl"), "-o", str(d / "cli"), "--vocab-size", "400"]) == 0
    assert "<pad>=0 <unk>=1 <s>=2 </s>=3" in capsys.readouterr().out
    assert (d / "cli" / "tokenizer.json").is_file()


def test_workers_and_threads_byte_identical_and_readable(hf):
    """1 worker, 4 worker processes and the library's batch encoding on 2 threads give the same files."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    d, info, texts = hf
    outs = {}
    for name, kw in {"w1": dict(workers=1), "w4": dict(workers=4),
                     "threads": dict(workers=2, parallel="threads")}.items():
        s = tokenize_corpus([str(d / "docs.jsonl")], str(d / "tok"), str(d / name / "ds"), chunk_bytes=8192,
                            progress=False, **kw)
        assert (s.documents, s.dtype, s.eod_id, s.tokenizer_kind) == (len(texts), "uint16", 3, "hf")
        outs[name] = [(d / name / f"ds.{ext}").read_bytes() for ext in ("bin", "idx")]
    assert outs["w1"] == outs["w4"] == outs["threads"]
    enc = load_encoder(info.model_path)
    ds = IndexedDataset(str(d / "w4" / "ds"))
    assert len(ds) == len(texts)
    for i, text in enumerate(texts):
        assert ds[i][-1] == 3 and enc.decode(ds[i][:-1].tolist()) == text


def test_special_tokens_resolved_by_name_and_checked(tmp_path):
    """GPT-2 style names without a config; a config naming its tokens; a missing EOS; pad equal to EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    def make(name, specials, config=None):
        vocab = {t: i for i, t in enumerate(specials + ["a", "b", "ab"])}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.add_special_tokens(specials)
        (tmp_path / name).mkdir()
        tok.save(str(tmp_path / name / "tokenizer.json"))
        if config is not None:
            (tmp_path / name / "tokenizer_config.json").write_text(json.dumps(config))
        return str(tmp_path / name)

    gpt2 = load_encoder(make("gpt2", ["<|endoftext|>"]))
    assert (gpt2.special.eos, gpt2.special.pad, gpt2.vocab_size) == (0, None, 4)
    named = load_encoder(make("named", ["[END]", "[P]"], {"eos_token": "[END]", "pad_token": {"content": "[P]"}}))
    assert (named.special.eos, named.special.pad) == (0, 1)

    corpus = tmp_path / "c.txt"
    corpus.write_text("ab ab\n")
    with pytest.raises(DataPrepError, match="has no EOS token to use as end-of-document.*--no-eod"):
        tokenize_corpus([str(corpus)], make("noeos", ["[X]"]), str(tmp_path / "o"), workers=1)
    s = tokenize_corpus([str(corpus)], str(tmp_path / "noeos"), str(tmp_path / "o"), workers=1, append_eod=False)
    assert s.eod_id is None and s.documents == 1
    with pytest.raises(DataPrepError, match="names eos_token '<eos>', which is not in the tokenizer's vocabulary"):
        load_encoder(make("badcfg", ["</s>"], {"eos_token": "<eos>"}))
    with pytest.raises(DataPrepError, match="pad token is the EOS"):
        load_encoder(make("padeos", ["</s>"], {"eos_token": "</s>", "pad_token": "</s>"}))
    with pytest.raises(DataPrepError, match="has no tokenizer.json"):
        load_encoder(str(tmp_path))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(DataPrepError, match="not a readable Hugging Face tokenizer.json"):
        load_encoder(str(tmp_path / "broken.json"))


def test_ids_outside_the_vocabulary_are_an_error(hf):
    d, info, _ = hf
    enc = load_encoder(info.model_path)
    enc.vocab_size = 10  # as a tokenizer file whose ids exceed its declared vocabulary would be
    with pytest.raises(DataPrepError, match="outside its vocabulary of 10"):
        enc.encode_flat(["hello world"], 3, np.uint16)


def test_training_tokenizer_wrapper(hf):
    """mod_train's tokenizer for a tokenizer.json: megatron's interface, same special ids; validation accepts it."""
    from mod_train.config.validate import tokenizer_vocab_size
    from mod_train.data.tokenizer import load_tokenizer

    d, info, _ = hf
    tok = load_tokenizer(str(d / "tok"))
    assert (tok.vocab_size, tok.eod, tok.pad, tok.bos, tok.unk) == (VOCAB, 3, 0, 2, 1)
    assert tok.detokenize(tok.tokenize("def f(x):\n    return x")) == "def f(x):\n    return x"
    assert json.loads(json.dumps(tok.unique_identifiers))["tokenizer_path"] == info.model_path
    assert tokenizer_vocab_size(str(d / "tok")) == tokenizer_vocab_size(info.model_path) == VOCAB


def test_config_validation_rejects_a_tokenizer_json_without_eos(tmp_path):
    from tokenizers import Tokenizer, models

    from mod_train.config.validate import ConfigError, tokenizer_vocab_size

    tok = Tokenizer(models.BPE(vocab={"[X]": 0, "a": 1}, merges=[]))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ConfigError, match="data.tokenizer_model: tokenizer .* has no EOS token"):
        tokenizer_vocab_size(str(tmp_path))


def test_sentencepiece_bpe_converts_to_identical_hf_encoder(hf, tmp_path):
    """A mod-prep-tokenizer BPE model as a tokenizer.json: same ids on the bundled corpus and on edge cases,
    hence byte-identical mod-prep-data output; a model with user-defined pieces is refused."""
    from data_prep._io import iter_documents
    from data_prep.sp_to_hf import check_same_ids, convert, write
    from data_prep.train_tokenizer import train_tokenizer

    d, _, _ = hf
    sp_info = train_tokenizer([str(BUNDLED_CORPUS)], str(tmp_path / "sp"), 1000, num_threads=2)
    texts = list(iter_documents([str(BUNDLED_CORPUS)]))[:1500]
    texts += ["  leading  and   many    spaces\t\ttabs\n\n x", "unicode: naïve café 中文 🙂 ЖЖЖ", " ", "a" * 60 + " 1234567",
              "\u2581x \u2581\u2581 y", "<s> </s> <pad> <unk> <0x41>", "trailing   "]
    assert check_same_ids(sp_info.model_path, convert(sp_info.model_path), texts) == 0
    write(sp_info.model_path, str(tmp_path / "conv"))
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    a = tokenize_corpus([str(corpus)], sp_info.model_path, str(tmp_path / "a"), workers=1, progress=False)
    b = tokenize_corpus([str(corpus)], str(tmp_path / "conv"), str(tmp_path / "b"), workers=2, parallel="threads",
                        progress=False)
    assert (a.tokenizer_kind, b.tokenizer_kind, b.eod_id) == ("sentencepiece", "hf", a.eod_id)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"a.{ext}").read_bytes() == (tmp_path / f"b.{ext}").read_bytes()

    user = train_tokenizer([str(d / "docs.jsonl")], str(tmp_path / "user"), 500, special_tokens=["<mask>"],
                           num_threads=2)
    with pytest.raises(DataPrepError, match=r"does not convert exactly.*user-defined pieces \['<mask>'\]"):
        convert(user.model_path)
