"""Train a sentencepiece tokenizer (BPE or unigram, byte fallback) on .txt / .jsonl documents.

Fixed special ids, the same for every tokenizer this script writes:

    0 <pad>   1 <unk>   2 <s> (BOS)   3 </s> (EOS, used as end-of-document by mod-prep-data)

User special tokens (``--special-token``) follow at 4, 5, ... in the order given; they are
matched verbatim in text. With byte fallback (the default) the next 256 ids are ``<0x00>`` ..
``<0xFF>``, so no text is ever out of vocabulary. Normalization is ``identity`` and whitespace is
kept as is, so ``decode(encode(text)) == text`` for any text.

Training sees every non-blank line of every document as one sentence. The result is written as
``<prefix>.model`` and ``<prefix>.vocab``, trained in a temporary directory beside them and renamed
into place (the .model last), so a crash never leaves a half-written tokenizer.

``--kind hf-bpe`` trains a byte-level BPE with Hugging Face ``tokenizers`` instead (same special
ids; writes a directory with ``tokenizer.json``; :mod:`data_prep.train_hf_tokenizer`).

Usage::

    mod-prep-tokenizer -i 'data/*.jsonl' -o data/tok --vocab-size 2048 [--model-type unigram]
    mod-prep-tokenizer --kind hf-bpe -i 'data/*.jsonl' -o data/hf_tok --vocab-size 2048
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Iterator, List, Optional, Sequence

from data_prep._io import DataPrepError, expand_inputs, iter_documents, prepare_output_dir
from data_prep.tokenizer_info import (BOS_ID, BOS_PIECE, EOS_ID, EOS_PIECE, NUM_FIXED_SPECIAL, PAD_ID, PAD_PIECE,
                                      UNK_ID, UNK_PIECE, TokenizerInfo, checked_special_tokens,
                                      empty_corpus_message)

MAX_SENTENCE_CHARS = 4096  # longer lines are cut into pieces of this size for training


def _sentences(documents: Iterator[str], counter: List[int], error: List[Exception]) -> Iterator[str]:
    """Non-blank lines of the documents; errors are stashed (sentencepiece would mangle them)."""
    try:
        for doc in documents:
            for line in doc.split("\n"):
                if not line.strip():
                    continue
                for i in range(0, len(line), MAX_SENTENCE_CHARS):
                    counter[0] += 1
                    yield line[i:i + MAX_SENTENCE_CHARS]
    except Exception as e:  # noqa: BLE001 - re-raised by train_tokenizer
        error.append(e)
        raise


def _explain(msg: str, vocab_size: int, model_type: str) -> Optional[str]:
    m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
    if m:
        return (f"vocab_size={vocab_size} is too large for this corpus: a {model_type} model can find "
                f"at most {m.group(2)} pieces in it. Use --vocab-size {m.group(2)} or less, or train on "
                f"more text.")
    m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg)
    if m:
        return (f"vocab_size={vocab_size} is too small: the special tokens, byte pieces and the "
                f"characters that cover the corpus need {m.group(2)}. Use --vocab-size larger than "
                f"{m.group(2)} or lower --character-coverage.")
    return None


def train_tokenizer(
    inputs,
    output_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    text_key: str = "text",
    special_tokens: Sequence[str] = (),
    byte_fallback: bool = True,
    character_coverage: float = 0.9995,
    split_digits: bool = True,
    max_sentences: int = 0,
    num_threads: Optional[int] = None,
    seed: int = 1234,
    verbose: bool = False,
) -> TokenizerInfo:
    """Train and write ``<output_prefix>.model`` / ``.vocab``; see the module docstring.

    ``inputs``: files, globs or directories of .txt/.jsonl(.gz). ``max_sentences`` > 0 trains on
    a random sample of that many sentences (seeded). Raises DataPrepError with a message saying what
    to change for bad inputs, an empty corpus or an unsuitable vocab size.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise DataPrepError(f"model_type must be 'bpe' or 'unigram', not {model_type!r}")
    special_tokens = checked_special_tokens(special_tokens)
    floor = NUM_FIXED_SPECIAL + len(special_tokens) + (256 if byte_fallback else 0)
    if vocab_size <= floor:
        raise DataPrepError(f"vocab_size={vocab_size} is too small: {NUM_FIXED_SPECIAL} fixed special tokens + "
                            f"{len(special_tokens)} user special tokens"
                            + (" + 256 byte-fallback pieces" if byte_fallback else "")
                            + f" already take {floor} ids. Use a larger --vocab-size (e.g. {max(512, floor * 2)}).")

    files = expand_inputs(inputs)
    out_dir = prepare_output_dir(output_prefix)
    t0 = time.perf_counter()
    counter, error = [0], []
    tmp_dir = tempfile.mkdtemp(prefix=".tokenizer-", dir=out_dir)
    try:
        spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_sentences(iter_documents(None, text_key, files=files), counter, error),
                model_prefix=os.path.join(tmp_dir, "sp"),
                model_type=model_type,
                vocab_size=vocab_size,
                pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                pad_piece=PAD_PIECE, unk_piece=UNK_PIECE, bos_piece=BOS_PIECE, eos_piece=EOS_PIECE,
                user_defined_symbols=special_tokens,
                byte_fallback=byte_fallback,
                character_coverage=character_coverage,
                split_digits=split_digits,
                # Lossless round trip: no normalization, whitespace kept, runs of spaces allowed as pieces.
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                add_dummy_prefix=True,
                max_sentence_length=4 * MAX_SENTENCE_CHARS + 16,  # bytes; a cut line is <= 4 bytes/char
                input_sentence_size=max_sentences,
                shuffle_input_sentence=True,
                hard_vocab_limit=True,
                num_threads=num_threads or max(1, os.cpu_count() or 1),
                minloglevel=0 if verbose else 2,
            )
        except RuntimeError as e:
            if error:
                raise error[0] from None
            if counter[0] == 0:
                raise DataPrepError(empty_corpus_message(files)) from None
            explained = _explain(str(e), vocab_size, model_type)
            if explained:
                raise DataPrepError(explained) from None
            raise DataPrepError(f"sentencepiece training failed: {e}") from e
        if counter[0] == 0:
            raise DataPrepError(empty_corpus_message(files))
        model_path, vocab_path = output_prefix + ".model", output_prefix + ".vocab"
        os.replace(os.path.join(tmp_dir, "sp.vocab"), vocab_path)
        os.replace(os.path.join(tmp_dir, "sp.model"), model_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    sp = spm.SentencePieceProcessor(model_file=model_path)
    special = {PAD_PIECE: sp.pad_id(), UNK_PIECE: sp.unk_id(), BOS_PIECE: sp.bos_id(), EOS_PIECE: sp.eos_id()}
    special.update({t: sp.piece_to_id(t) for t in special_tokens})
    return TokenizerInfo(model_path=model_path, vocab_path=vocab_path, vocab_size=sp.get_piece_size(),
                         model_type=model_type, special_ids=special, sentences=counter[0],
                         seconds=time.perf_counter() - t0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mod-prep-tokenizer",
        description="Train a sentencepiece tokenizer (ids: <pad>=0 <unk>=1 <s>=2 </s>=3, then "
                    "--special-token pieces, then byte fallback), or with --kind hf-bpe a Hugging Face "
                    "byte-level BPE (same special ids; PREFIX/tokenizer.json).")
    p.add_argument("--kind", choices=("sentencepiece", "hf-bpe"), default="sentencepiece",
                   help="sentencepiece (default): PREFIX.model; hf-bpe: PREFIX/tokenizer.json")
    p.add_argument("-i", "--input", dest="inputs", nargs="+", action="extend", required=True,
                   metavar="PATH", help=".txt (one document per line) or .jsonl files, globs or directories")
    p.add_argument("-o", "--output-prefix", required=True,
                   help="writes PREFIX.model and PREFIX.vocab (hf-bpe: the directory PREFIX/)")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="sentencepiece only")
    p.add_argument("--text-key", default="text", help="JSON field holding the text (default: text)")
    p.add_argument("--special-token", dest="special_tokens", action="append", default=[], metavar="TOKEN",
                   help="user special token, ids from 4 in order given (repeatable)")
    p.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--no-split-digits", dest="split_digits", action="store_false")
    p.add_argument("--max-sentences", type=int, default=0, help="train on a random sample of N lines (0: all)")
    p.add_argument("--threads", type=int, default=None, help="default: all cores")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("-v", "--verbose", action="store_true", help="show sentencepiece's log")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.kind == "hf-bpe":
            from data_prep.train_hf_tokenizer import train_hf_bpe

            info = train_hf_bpe(a.inputs, a.output_prefix, a.vocab_size, text_key=a.text_key,
                                special_tokens=a.special_tokens)
        else:
            info = train_tokenizer(a.inputs, a.output_prefix, a.vocab_size, model_type=a.model_type,
                                   text_key=a.text_key, special_tokens=a.special_tokens,
                                   byte_fallback=a.byte_fallback, character_coverage=a.character_coverage,
                                   split_digits=a.split_digits, max_sentences=a.max_sentences,
                                   num_threads=a.threads, seed=a.seed, verbose=a.verbose)
    except DataPrepError as e:
        print(f"mod-prep-tokenizer: error: {e}", file=sys.stderr)
        return 1
    d = asdict(info)
    ids = " ".join(f"{k}={v}" for k, v in d.pop("special_ids").items())
    print(f"wrote {info.model_path} ({info.model_type}, vocab {info.vocab_size}; {ids}) from "
          f"{info.sentences} {'documents' if a.kind == 'hf-bpe' else 'lines'} in {info.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
