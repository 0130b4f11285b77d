"""Data preparation: tokenizer training, corpus tokenization into megatron-core indexed files, shard merging.

Console scripts: ``mod-prep-tokenizer`` (:mod:`data_prep.train_tokenizer`), ``mod-prep-data``
(:mod:`data_prep.tokenize_corpus`), ``mod-prep-merge`` (:mod:`data_prep.merge`). Independent of
``mod_train``; megatron-core and torch are imported only where indexed files are written or read.
"""

from pathlib import Path

#: The bundled corpus (Python documentation text, PSF license; see corpus/LICENSE.md).
BUNDLED_CORPUS = Path(__file__).resolve().parent / "corpus" / "corpus.jsonl"
