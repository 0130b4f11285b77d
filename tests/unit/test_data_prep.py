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
    assert "needs a Hugging Face tokenizer.json" in err(tokenize_corpus, [good], info.model_path, str(tmp_path / "t"),
                                                        parallel="threads")


def _megatron_build(prefix: str, docs_ids, dtype):
    """The files megatron-core's own IndexedDatasetBuilder writes for these documents."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for ids in docs_ids:
        builder.add_item(torch.tensor(ids, dtype=torch.int64))
        builder.end_document()
    builder.finalize(prefix + ".idx")


def test_writer_byte_identical_to_megatron_on_bundled_corpus(work, tmp_path):
    """Our torch-free writer against megatron-core's IndexedDatasetBuilder, read back by IndexedDataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from data_prep._io import iter_documents

    _, info = work
    s = tokenize_corpus([str(BUNDLED_CORPUS)], info.model_path, str(tmp_path / "ours"), workers=2,
                        chunk_bytes=200_000, progress=False)
    sp = spm.SentencePieceProcessor(model_file=info.model_path)
    docs = list(iter_documents([str(BUNDLED_CORPUS)]))
    ref_ids = [ids + [sp.eos_id()] for ids in sp.encode(docs)]
    _megatron_build(str(tmp_path / "ref"), ref_ids, np.uint16)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"ref.{ext}").read_bytes(), ext
    ds = IndexedDataset(str(tmp_path / "ours"))
    assert len(ds) == s.documents == len(docs) > 3000
    assert ds[0].tolist() == ref_ids[0] and ds[len(docs) - 1].tolist() == ref_ids[-1]


def test_writer_int32_and_merge_byte_identical_to_megatron(tmp_path):
    """Large vocabularies (int32 tokens), empty sequences, and add_index merging, against megatron-core."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from data_prep.indexed_format import IndexedWriter, token_dtype

    assert token_dtype(65499) == np.uint16 and token_dtype(65500) == np.int32  # DType.optimal_dtype
    rng = np.random.default_rng(0)
    parts = [[rng.integers(0, 100_000, size=int(n)).tolist() for n in rng.integers(0, 50, size=30)] for _ in range(2)]
    for i, docs_ids in enumerate(parts):
        w = IndexedWriter(str(tmp_path / f"ours{i}.bin"), token_dtype(100_000))
        w.add_documents(np.concatenate([np.asarray(d, np.int64) for d in docs_ids]),
                        np.array([len(d) for d in docs_ids]))
        w.finalize(str(tmp_path / f"ours{i}.idx"))
        _megatron_build(str(tmp_path / f"ref{i}"), docs_ids, np.int32)
        for ext in ("bin", "idx"):
            assert (tmp_path / f"ours{i}.{ext}").read_bytes() == (tmp_path / f"ref{i}.{ext}").read_bytes()
    merge_shards([str(tmp_path / "ours0"), str(tmp_path / "ours1")], str(tmp_path / "merged"))
    builder = IndexedDatasetBuilder(str(tmp_path / "ref_merged.bin"), dtype=np.int32)
    for i in range(2):
        builder.add_index(str(tmp_path / f"ref{i}"))
    builder.finalize(str(tmp_path / "ref_merged.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"merged.{ext}").read_bytes() == (tmp_path / f"ref_merged.{ext}").read_bytes()
    ds = IndexedDataset(str(tmp_path / "merged"))
    assert [ds[i].tolist() for i in range(len(ds))] == parts[0] + parts[1]
    assert torch.is_tensor(torch.from_numpy(ds[1]))


_NO_HEAVY_IMPORTS = """
import json, sys
from data_prep.{module} import main
rc = main({argv!r})
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "megatron", "deepspeed"))
print(json.dumps({{"rc": rc, "heavy": heavy[:5]}}))
"""


def test_data_prep_clis_import_no_torch_or_megatron(work, tmp_path):
    """mod-prep-data (2 workers) and mod-prep-merge start encoding/merging without torch or megatron-core."""
    import subprocess
    import sys

    d, info = work
    prefix = str(tmp_path / "ds")
    runs = [("tokenize_corpus", ["-i", str(d / "all.jsonl"), "-t", info.model_path, "-o", prefix, "-w", "2",
                                 "--no-progress"]),
            ("merge", ["-i", prefix, "-o", str(tmp_path / "merged")])]
    for module, argv in runs:
        r = subprocess.run([sys.executable, "-c", _NO_HEAVY_IMPORTS.format(module=module, argv=argv)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        result = json.loads(r.stdout.strip().splitlines()[-1])
        assert result == {"rc": 0, "heavy": []}, result
        if module == "tokenize_corpus":
            first = float(r.stdout.split("first chunk after ")[1].split(" s")[0])
            assert 0 < first < 5.0  # loose: encoding starts at once (was ~4 s of torch/megatron imports)
    assert (tmp_path / "merged.bin").read_bytes() == (tmp_path / "ds.bin").read_bytes()


def test_byte_range_chunks_keep_line_numbers_and_text(tmp_path):
    """Workers read their own byte ranges: text (CR, odd Unicode line breaks, bad UTF-8) and error line numbers
    are as when the whole file is read."""
    from data_prep._io import iter_documents
    from data_prep.tokenize_corpus import chunk_documents, iter_chunks

    path = tmp_path / "odd.jsonl"
    lines = [json.dumps({"text": f"doc {i} \u2028 x\r y\x0c"}) for i in range(50)]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "bad \xff byte"}\n' + b'{"nope": 1}\n')
    chunks = list(iter_chunks([str(path)], chunk_bytes=100))
    assert len(chunks) > 10
    docs = []
    with pytest.raises(DataPrepError, match=f"{path}:52: no 'text' field"):
        for c in chunks:
            docs += chunk_documents(c, "text")[0]
    path.write_bytes(path.read_bytes().replace(b'{"nope": 1}\n', b""))
    docs = [doc for c in iter_chunks([str(path)], 100) for doc in chunk_documents(c, "text")[0]]
    assert docs == list(iter_documents([str(path)])) and len(docs) == 51 and "\ufffd" in docs[-1]
