"""data_prep: tokenizer training, tokenization into megatron-core indexed files, shard merging, errors."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from data_prep import BUNDLED_CORPUS
from data_prep._io import DataPrepError
from data_prep.merge import main as merge_main
from data_prep.merge import merge_shards
from data_prep.tokenize_corpus import main as data_main
from data_prep.tokenize_corpus import tokenize_corpus
from data_prep.train_tokenizer import main as tok_main
from data_prep.train_tokenizer import train_tokenizer

VOCAB = 600
N_DOCS = 240


def write_jsonl(path: Path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def docs():
    """A small slice of the bundled corpus, plus a few documents that stress the round trip."""
    with open(BUNDLED_CORPUS, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(N_DOCS), f)]
    return texts + ["  leading spaces, tabs\tand\n\nblank lines  ", "unicode: naïve café 中文 🙂", "<mask> marks"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, docs):
    d = tmp_path_factory.mktemp("data_prep")
    write_jsonl(d / "all.jsonl", docs)
    half = len(docs) // 2
    write_jsonl(d / "part1.jsonl", docs[:half])
    write_jsonl(d / "part2.jsonl", docs[half:])
    info = train_tokenizer([str(d / "all.jsonl")], str(d / "tok"), VOCAB, special_tokens=["<mask>"], num_threads=2)
    return d, info


def test_bundled_corpus_is_small_and_licensed():
    size = BUNDLED_CORPUS.stat().st_size
    assert 1_000_000 < size <= 3_000_000
    assert (BUNDLED_CORPUS.parent / "LICENSE.md").read_text().count("PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2") == 1
    with open(BUNDLED_CORPUS, encoding="utf-8") as f:
        first = json.loads(f.readline())
    assert isinstance(first["text"], str) and first["text"].strip()


def test_tokenizer_vocab_size_and_special_ids(work):
    d, info = work
    assert Path(info.model_path).is_file() and Path(info.vocab_path).is_file()
    assert not [p for p in os.listdir(d) if p.startswith(".tokenizer-")]  # temp dir cleaned up
    sp = spm.SentencePieceProcessor(model_file=info.model_path)
    assert sp.get_piece_size() == info.vocab_size == VOCAB
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in range(6)] == ["<pad>", "<unk>", "<s>", "</s>", "<mask>", "<0x00>"]
    assert info.special_ids == {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, "<mask>": 4}
    text = "  x  \n\ny\t😀 never-seen ЖЖЖ"
    assert sp.decode(sp.encode(text)) == text  # identity normalization + byte fallback: lossless


def test_unigram_and_txt_input(tmp_path, docs):
    txt = tmp_path / "docs.txt"
    lines = [t.replace("\n", " ") for t in docs[100:220]]  # docstrings: short lines
    txt.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    info = train_tokenizer([str(tmp_path / "*.txt")], str(tmp_path / "uni"), 400, model_type="unigram",
                           num_threads=2)
    assert info.vocab_size == 400 and info.sentences == 120  # one per line; blank lines skipped
    s = tokenize_corpus([str(txt)], info.model_path, str(tmp_path / "out"), workers=1, progress=False)
    assert s.documents == 120  # .txt: one document per non-blank line


def test_workers_byte_identical_and_readable_by_megatron(work, docs):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    d, info = work
    outs = {}
    for w in (1, 4):
        s = tokenize_corpus([str(d / "all.jsonl")], info.model_path, str(d / f"w{w}" / "ds"), workers=w,
                            chunk_bytes=8192, progress=False)
        assert (s.documents, s.dtype, s.eod_id) == (len(docs), "uint16", 3)
        outs[w] = [(d / f"w{w}" / f"ds.{ext}").read_bytes() for ext in ("bin", "idx")]
        assert sorted(os.listdir(d / f"w{w}")) == ["ds.bin", "ds.idx"]  # no temp files left
    assert outs[1] == outs[4]

    sp = spm.SentencePieceProcessor(model_file=info.model_path)
    ds = IndexedDataset(str(d / "w4" / "ds"))
    assert len(ds) == len(docs)
    assert ds.index.dtype == np.uint16
    assert ds.document_indices.tolist() == list(range(len(docs) + 1))
    assert int(ds.sequence_lengths.sum()) == s.tokens
    for i, text in enumerate(docs):
        seq = ds[i]
        assert seq[-1] == sp.eos_id()
        assert sp.decode(seq[:-1].tolist()) == text


def test_merge_of_shards_equals_tokenizing_the_concatenation(work):
    d, info = work
    whole = tokenize_corpus([str(d / "part1.jsonl"), str(d / "part2.jsonl")], info.model_path,
                            str(d / "whole" / "ds"), workers=1, progress=False)
    for i in (1, 2):
        tokenize_corpus([str(d / f"part{i}.jsonl")], info.model_path, str(d / "shards" / f"s{i}"), workers=2,
                        chunk_bytes=8192, progress=False)
    m = merge_shards([str(d / "shards" / "s*")], str(d / "merged" / "ds"))
    assert (m.documents, m.tokens, len(m.shards)) == (whole.documents, whole.tokens, 2)
    for ext in ("bin", "idx"):
        assert (d / "merged" / f"ds.{ext}").read_bytes() == (d / "whole" / f"ds.{ext}").read_bytes()


def test_clis(work, capsys):
    d, info = work
    assert tok_main(["-i", str(d / "part1.jsonl"), "-o", str(d / "cli" / "tok"), "--vocab-size", "400"]) == 0
    assert "<pad>=0 <unk>=1 <s>=2 </s>=3" in capsys.readouterr().out
    assert data_main(["-i", str(d / "part1.jsonl"), "-t", str(d / "cli" / "tok.model"), "-o",
                      str(d / "cli" / "a"), "-w", "1", "--no-progress"]) == 0
    assert "documents" in capsys.readouterr().out
    assert merge_main(["-i", str(d / "cli" / "a.bin"), "-o", str(d / "cli" / "m")]) == 0
    assert (d / "cli" / "m.bin").read_bytes() == (d / "cli" / "a.bin").read_bytes()
    capsys.readouterr()
    assert data_main(["-i", str(d / "nope.jsonl"), "-t", info.model_path, "-o", str(d / "x")]) == 1
    assert "mod-prep-data: error: input file not found" in capsys.readouterr().err


def test_error_messages(work, tmp_path):
    d, info = work
    good = str(d / "part1.jsonl")

    def err(fn, *args, **kw):
        with pytest.raises(DataPrepError) as e:
            fn(*args, **kw)
        return str(e.value)

    assert "tokenizer model not found: " in err(tokenize_corpus, [good], str(tmp_path / "no.model"), str(tmp_path / "o"))
    assert "input file not found: " in err(tokenize_corpus, [str(tmp_path / "missing.jsonl")], info.model_path,
                                           str(tmp_path / "o"))
    assert "no input files match the glob" in err(train_tokenizer, [str(tmp_path / "nothing" / "*.jsonl")],
                                                  str(tmp_path / "t"), VOCAB)
    assert "unsupported input file" in err(train_tokenizer, [str(d / "tok.vocab")], str(tmp_path / "t"), VOCAB)

    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n\n{"text": "   "}\n')
    assert "empty corpus: no non-blank documents in" in err(train_tokenizer, [str(empty)], str(tmp_path / "t"), VOCAB)
    assert "empty corpus" in err(tokenize_corpus, [str(empty)], info.model_path, str(tmp_path / "e"), workers=1)
    assert not list(tmp_path.glob("e*.bin")) and not list(tmp_path.glob("t.model"))  # nothing half-written

    msg = err(train_tokenizer, [good], str(tmp_path / "t"), 50_000)
    assert "vocab_size=50000 is too large for this corpus" in msg and "Use --vocab-size" in msg
    assert "is too small" in err(train_tokenizer, [good], str(tmp_path / "t"), 200)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "x"}\n')
    assert f"{bad}:2: no 'text' field" in err(tokenize_corpus, [str(bad)], info.model_path, str(tmp_path / "b"),
                                             workers=2)
    blocker = tmp_path / "afile"
    blocker.write_text("")
    assert "cannot create output directory" in err(tokenize_corpus, [good], info.model_path,
                                                   str(blocker / "sub" / "ds"), workers=1)
    assert "no shards" in err(merge_shards, [str(tmp_path / "zz*")], str(tmp_path / "m"))
