"""Train a byte-level BPE tokenizer with Hugging Face ``tokenizers`` (``mod-prep-tokenizer --kind hf-bpe``).

Writes a directory ``<prefix>/`` holding ``tokenizer.json`` (the whole tokenizer, loadable by
``tokenizers.Tokenizer.from_file`` and transformers' ``PreTrainedTokenizerFast``) and
``tokenizer_config.json`` (which token is pad/unk/bos/eos). Special ids are those of the
sentencepiece tokenizers of :mod:`data_prep.train_tokenizer`:

    0 <pad>   1 <unk>   2 <s> (BOS)   3 </s> (EOS, used as end-of-document by mod-prep-data)

then ``--special-token`` pieces at 4, 5, ..., then the 256 byte symbols and the merges. Byte-level
pre-tokenization (GPT-2's split regex, no added prefix space) makes every text encodable and
``decode(encode(text)) == text``. Files are written under temporary names and renamed into
place (``tokenizer.json`` last).
"""

from __future__ import annotations

import json
import os
import time
from typing import Iterator, List, Sequence

from data_prep._io import DataPrepError, expand_inputs, iter_documents, prepare_output_dir
from data_prep.encoders import HF_CONFIG_FILE, HF_TOKENIZER_FILE
from data_prep.tokenizer_info import (BOS_ID, BOS_PIECE, EOS_ID, EOS_PIECE, NUM_FIXED_SPECIAL, PAD_ID, PAD_PIECE,
                                      UNK_ID, UNK_PIECE, TokenizerInfo, checked_special_tokens,
                                      empty_corpus_message)

_BYTE_SYMBOLS = 256
_BATCH_DOCS = 1000


def _batches(documents: Iterator[str], counter: List[int]) -> Iterator[List[str]]:
    batch: List[str] = []
    for doc in documents:
        counter[0] += 1
        batch.append(doc)
        if len(batch) >= _BATCH_DOCS:
            yield batch
            batch = []
    if batch:
        yield batch


def train_hf_bpe(
    inputs,
    output_prefix: str,
    vocab_size: int,
    text_key: str = "text",
    special_tokens: Sequence[str] = (),
    min_frequency: int = 2,
    max_token_length: int = 32,
) -> TokenizerInfo:
    """Train and write ``<output_prefix>/tokenizer.json``; see the module docstring.

    ``vocab_size`` is the most ids the tokenizer gets (fewer if the corpus has fewer merges that
    occur ``min_frequency`` times). DataPrepError for bad inputs, an empty corpus or a vocab size
    too small for the special and byte symbols.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    special_tokens = checked_special_tokens(special_tokens)
    floor = NUM_FIXED_SPECIAL + len(special_tokens) + _BYTE_SYMBOLS
    if vocab_size <= floor:
        raise DataPrepError(f"vocab_size={vocab_size} is too small: {NUM_FIXED_SPECIAL} fixed special tokens + "
                            f"{len(special_tokens)} user special tokens + {_BYTE_SYMBOLS} byte symbols already "
                            f"take {floor} ids. Use a larger --vocab-size (e.g. {max(512, floor * 2)}).")
    files = expand_inputs(inputs)
    out_dir = output_prefix
    prepare_output_dir(os.path.join(out_dir, HF_TOKENIZER_FILE))
    t0 = time.perf_counter()

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = [PAD_PIECE, UNK_PIECE, BOS_PIECE, EOS_PIECE] + special_tokens
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        # normalized=False: matched verbatim in raw text, as sentencepiece's user-defined symbols.
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), max_token_length=max_token_length)
    counter: List[int] = [0]
    tok.train_from_iterator(_batches(iter_documents(None, text_key, files=files), counter), trainer)
    if counter[0] == 0:
        raise DataPrepError(empty_corpus_message(files))
    ids = {t: tok.token_to_id(t) for t in specials}
    expected = {t: i for i, t in enumerate(specials)}
    if ids != expected:  # the trainer puts special tokens first, in order: a change upstream must not slip by
        raise DataPrepError(f"tokenizers placed the special tokens at {ids}, not {expected}")
    assert (ids[PAD_PIECE], ids[UNK_PIECE], ids[BOS_PIECE], ids[EOS_PIECE]) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)

    pid = os.getpid()
    config_path, tok_path = os.path.join(out_dir, HF_CONFIG_FILE), os.path.join(out_dir, HF_TOKENIZER_FILE)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": PAD_PIECE, "unk_token": UNK_PIECE,
              "bos_token": BOS_PIECE, "eos_token": EOS_PIECE, "add_bos_token": False, "add_eos_token": False,
              "additional_special_tokens": special_tokens}
    tmp_config, tmp_tok = f"{config_path}.tmp-{pid}", f"{tok_path}.tmp-{pid}"
    try:
        with open(tmp_config, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        tok.save(tmp_tok)
        os.replace(tmp_config, config_path)
        os.replace(tmp_tok, tok_path)
    finally:
        for path in (tmp_config, tmp_tok):
            if os.path.exists(path):
                os.remove(path)
    return TokenizerInfo(model_path=tok_path, vocab_path=config_path,
                         vocab_size=tok.get_vocab_size(with_added_tokens=True), model_type="hf-bpe",
                         special_ids=ids, sentences=counter[0], seconds=time.perf_counter() - t0)
