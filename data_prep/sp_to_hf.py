"""A sentencepiece BPE model as a Hugging Face ``tokenizers`` tokenizer that gives the same ids.

For the tokenizers ``mod-prep-tokenizer`` writes (BPE, identity normalization, whitespace kept,
dummy prefix, byte fallback, no user-defined pieces): one ``▁`` before the text and ``▁`` for
every space (normalizers), then a BPE whose merges are every split of a vocabulary piece into two
vocabulary pieces, ranked by the piece's score (sentencepiece merges the adjacent pair whose
*result* scores highest), with byte fallback for characters outside the vocabulary. Control
pieces (``<s>``, ``</s>``, ``<pad>``) are in the vocabulary but never matched in text, as in
sentencepiece. When no piece joins a character to a following space, the text is split into
words before BPE: exact, and what lets the library cache words. Other models (unigram, other
normalization, user-defined pieces: the library normalizes the text between added tokens
separately) are refused with the reason.

Sentencepiece treats two pairs that make the same piece as equal and takes the leftmost; a
ranked merge list orders them by their parts' ids. :func:`check_same_ids` counts the texts where
the ids differ; the tests and the bench (byte-identical ``mod-prep-data`` output on the whole
corpus) check it. The written directory is a tokenizer for ``mod-prep-data -t`` like any other.

Usage::

    python -m data_prep.sp_to_hf data/tok.model data/tok_hf     # writes data/tok_hf/tokenizer.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Sequence, Tuple

from data_prep._io import DataPrepError
from data_prep.encoders import HF_CONFIG_FILE, HF_TOKENIZER_FILE

SPACE = "\u2581"  # sentencepiece's visible space


def _merges(pieces, vocab: Dict[str, int], normal: List[int]) -> List[Tuple[str, str]]:
    mergeable = frozenset(normal)
    ranked = []
    for i in normal:
        piece = pieces[i].piece
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if vocab.get(left) in mergeable and vocab.get(right) in mergeable:
                ranked.append((-pieces[i].score, i, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _load_proto(model_path: str):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        with open(model_path, "rb") as f:
            proto.ParseFromString(f.read())
    except Exception as e:  # protobuf's DecodeError, OSError
        raise DataPrepError(f"'{model_path}' is not a readable sentencepiece model: {e}") from None
    return proto, pb


def convert(model_path: str):
    """A ``tokenizers.Tokenizer`` equivalent to the sentencepiece BPE model (see the module docstring).

    DataPrepError naming the setting for a model this conversion is not exact for.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    proto, pb = _load_proto(model_path)
    t, ns = pb.ModelProto.SentencePiece, proto.normalizer_spec
    problems = []
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
        problems.append("not a BPE model")
    if ns.name != "identity" or ns.precompiled_charsmap:
        problems.append(f"normalization '{ns.name}' (only identity converts)")
    if ns.remove_extra_whitespaces or not ns.add_dummy_prefix or not ns.escape_whitespaces:
        problems.append("whitespace handling other than mod-prep-tokenizer's (dummy prefix, spaces kept)")
    if proto.trainer_spec.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix")
    pieces = proto.pieces
    user = [p.piece for p in pieces if p.type == t.USER_DEFINED]
    if user:
        # The library normalizes the text between added tokens separately: each part would get a
        # dummy prefix, where sentencepiece adds one to the whole text.
        problems.append(f"user-defined pieces {user[:5]}")
    if not any(p.type == t.BYTE for p in pieces):
        problems.append("no byte fallback")
    if problems:
        raise DataPrepError(f"'{model_path}' does not convert exactly to a Hugging Face tokenizer: "
                            f"{'; '.join(problems)}")
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    normal = [i for i, p in enumerate(pieces) if p.type == t.NORMAL]
    unk = next(p.piece for p in pieces if p.type == t.UNKNOWN)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges(pieces, vocab, normal), unk_token=unk, fuse_unk=True,
                               byte_fallback=True))
    # sentencepiece always adds the dummy prefix (Metaspace would not before a leading space).
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    if not any(_crosses_word_start(pieces[i].piece) for i in normal):
        # No piece joins a character to a following space, so no merge crosses the start of a
        # "word" (a run of spaces and what follows it): splitting there changes no id, and lets the
        # library's BPE work (and cache) word by word instead of on whole documents.
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(f"{SPACE}+[^{SPACE}]*|[^{SPACE}]+"), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


def _crosses_word_start(piece: str) -> bool:
    return any(a != SPACE and b == SPACE for a, b in zip(piece, piece[1:]))


def check_same_ids(model_path: str, tok, texts: Sequence[str]) -> int:
    """How many of ``texts`` get different ids from sentencepiece and from the converted ``tok``."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_path)
    ours = sp.encode(list(texts))
    theirs = [e.ids for e in tok.encode_batch_fast(list(texts), add_special_tokens=False)]
    return sum(a != b for a, b in zip(ours, theirs))


def write(model_path: str, out_dir: str) -> str:
    """Convert and write ``out_dir/tokenizer.json`` (+ tokenizer_config.json naming the special pieces)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_path)
    tok = convert(model_path)
    os.makedirs(out_dir, exist_ok=True)
    names = {k: sp.id_to_piece(getattr(sp, f"{k}_id")()) for k in ("pad", "unk", "bos", "eos")
             if getattr(sp, f"{k}_id")() >= 0}
    with open(os.path.join(out_dir, HF_CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **{f"{k}_token": v for k, v in names.items()},
                   "converted_from": os.path.abspath(model_path)}, f, indent=2)
    path = os.path.join(out_dir, HF_TOKENIZER_FILE)
    tok.save(path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.sp_to_hf", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="sentencepiece BPE .model (byte fallback)")
    p.add_argument("out_dir", help="writes OUT_DIR/tokenizer.json")
    a = p.parse_args(argv)
    try:
        print(f"wrote {write(a.model, a.out_dir)}")
    except DataPrepError as e:
        print(f"sp_to_hf: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
