"""Shared fixtures. Multi-process helpers live in tests/helpers.py."""

import os

import pytest


@pytest.fixture(scope="session")
def world_of_one():
    """A real gloo process group of one rank, with the CPU adaptations applied (once per session)."""
    import torch.distributed as dist

    from mod_train.compat import apply_cpu_patches
    from mod_train.distributed.world import free_port

    apply_cpu_patches()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield


@pytest.fixture
def megatron_tp1(world_of_one):
    """megatron parallel_state for TP=PP=1, torn down after the test."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    model_parallel_cuda_manual_seed(0)
    yield ps
    ps.destroy_model_parallel()


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    """(folder, URI) of one migrated sqlite MLflow store for the session (creating one costs
    seconds of migrations); tests keep apart by experiment name."""
    from mlflow import MlflowClient

    from mod_train.tracking import default_tracking_uri

    root = tmp_path_factory.mktemp("mlflow_store")
    uri = default_tracking_uri(root)
    MlflowClient(tracking_uri=uri).search_experiments()
    return root, uri


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """The port of one real ``mlflow server`` (sqlite store) for the session's outage tests, each
    behind its own tests.mlflow_server.OutageProxy (starting a server costs seconds of imports).
    Tests that crash the server itself start their own."""
    from mod_train.distributed.world import free_port
    from tests.mlflow_server import kill_server, start_server

    port = free_port()
    # A generous wait: on a machine busy with other work a start has taken over a minute.
    server = start_server(port, tmp_path_factory.mktemp("mlflow_server"), timeout_s=240)
    yield port
    kill_server(server)


def _stdlib_docs(limit: int = 1500):
    """License-clean English-ish text available on any machine: stdlib docstrings (PSF license)."""
    import inspect
    import json as _json
    import argparse, collections, email, http.client, logging, pathlib, subprocess, textwrap, unittest  # noqa: E401

    docs = []
    for mod in (argparse, collections, email, http.client, logging, pathlib, subprocess, textwrap, unittest, _json):
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80:
                docs.append(" ".join(doc.split()))
    return list(dict.fromkeys(docs))[:limit]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A sentencepiece tokenizer (vocab 512) and an indexed dataset for training tests."""
    import numpy as np
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    d = tmp_path_factory.mktemp("tiny_data")
    docs = _stdlib_docs()
    (d / "corpus.txt").write_text("\n".join(docs))
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tok"), vocab_size=512,
                                   model_type="bpe", byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(d / "tok.model"))
    builder = IndexedDatasetBuilder(str(d / "docs.bin"), dtype=np.uint16)
    for doc in docs:
        ids = sp.encode(doc) + [sp.eos_id()]
        builder.add_document(np.array(ids, dtype=np.uint16), [len(ids)])
    builder.finalize(str(d / "docs.idx"))
    return {"tokenizer": str(d / "tok.model"), "prefix": str(d / "docs")}
