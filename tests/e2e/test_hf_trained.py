"""End to end: a tiny staged-MoDE model (MoD routing around an MoE MLP) trained a few steps under
EP2 (2 processes), exported with ``mod-export --format hf``; the directory loads with transformers
offline (trust_remote_code), its logits equal our causal forward (fp32, rel 1e-5), greedy
``generate()`` equals ``mod-generate``'s tokens, and the converted tokenizer encodes a paragraph
of the corpus to our ids. ``mod-eval`` on the local tasks (multiple choice, perplexity) gives the
same scores through our LM class and through the export (lm-eval's HFLM), logged to the run's
MLflow run."""

import os

import pytest
import torch

pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"

from tests.helpers_train import REPO, run_dir_overrides, tiny_overrides, torchrun  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prep_data(tmp_path_factory):
    """The test corpus tokenized with a mod-prep-tokenizer model (which converts exactly to tokenizer.json)."""
    import numpy as np
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from data_prep.train_tokenizer import train_tokenizer
    from tests.conftest import _stdlib_docs

    d = tmp_path_factory.mktemp("hf_data")
    docs = _stdlib_docs(600)
    (d / "corpus.txt").write_text("\n".join(docs))
    train_tokenizer([str(d / "corpus.txt")], str(d / "tok"), 512, num_threads=1)
    sp = spm.SentencePieceProcessor(model_file=str(d / "tok.model"))
    builder = IndexedDatasetBuilder(str(d / "docs.bin"), dtype=np.uint16)
    for doc in docs:
        ids = sp.encode(doc) + [sp.eos_id()]
        builder.add_document(np.array(ids, dtype=np.uint16), [len(ids)])
    builder.finalize(str(d / "docs.idx"))
    return {"tokenizer": str(d / "tok.model"), "prefix": str(d / "docs"), "docs": docs}


def test_trained_ep2_mode_staged_exports_to_transformers(prep_data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mod_train.data.tokenizer import load_tokenizer
    from mod_train.distributed.world_of_one import world_of_one
    from mod_train.export import main as export_main
    from mod_train.inference.decoder import full_forward_logits
    from mod_train.inference.generation import generate
    from mod_train.inference.loader import load_for_generation

    run = tmp_path / "run"
    r = torchrun(2, ["-m", "mod_train.train", *tiny_overrides(prep_data, "model=tiny_mode_staged", "parallel=ep2",
                                                               "model.num_layers=2", "model.hidden_size=32",
                                                               "train.max_steps=4", "checkpoint.save_interval=4",
                                                               "parallel.micro_batch_size=2"),
                     *run_dir_overrides(run)])
    assert r.returncode == 0, r.stderr[-3000:]

    out = tmp_path / "hf"
    assert export_main(["--checkpoint", str(run / "checkpoints"), "--format", "hf", "--out", str(out)]) == 0
    assert (out / "modeling_mod_train.py").exists() and (out / "tokenizer.json").exists()
    assert list(out.glob("*.safetensors"))

    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    paragraph = prep_data["docs"][3]
    ours_tok = load_tokenizer(prep_data["tokenizer"])
    ids = ours_tok.tokenize(paragraph)
    assert tok.encode(paragraph, add_special_tokens=False) == ids

    with world_of_one():
        loaded = load_for_generation(run / "checkpoints")
        thresholds = [float(b) for n, b in loaded.model.named_buffers() if n.endswith("causal_threshold")]
        assert thresholds and any(t != 0.0 for t in thresholds)  # calibrated while training
        seq = ids[:24]
        ours = full_forward_logits(loaded.model, seq)
        want = generate(loaded.model, loaded.config, seq[:8], 12, greedy=True, eod=ours_tok.eod).tokens[0]
    with torch.no_grad():
        theirs = hf(torch.tensor([seq])).logits[0]
        got = hf.generate(torch.tensor([seq[:8]]), max_new_tokens=12, do_sample=False)[0, 8:].tolist()
    assert float((theirs - ours).abs().max() / ours.abs().max()) < 1e-5
    assert got == want

    # mod-eval: both doors, same scores, in the run's MLflow run at the checkpoint's step.
    import json

    import mlflow

    from mod_train.checkpoint.read import resolve_iter_dir, saved_train_state
    from mod_train.eval import main as eval_main

    tasks = [str(REPO / "tests/data/lm_eval/choice.yaml"), str(REPO / "tests/data/lm_eval/perplexity.yaml")]
    capsys.readouterr()
    assert eval_main(["--checkpoint", str(run / "checkpoints"), "--tasks", *tasks, "--path", "both",
                      "--hf-dir", str(out), "--limit", "3"]) == 0
    printed = capsys.readouterr().out
    scores = json.loads(printed[printed.index("{\n"):])
    assert set(scores) == {"ours", "hf"} and scores["ours"]["modtrain_choice"]["sample_len"] == 3
    run_id = saved_train_state(resolve_iter_dir(run / "checkpoints", "latest"))["mlflow_run_id"]
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{run}/mlflow.db")
    metrics = client.get_run(run_id).data.metrics
    for task, metric in (("modtrain_choice", "acc"), ("modtrain_perplexity", "word_perplexity"),
                         ("modtrain_perplexity", "bits_per_byte")):
        ours, theirs = metrics[f"lm_eval/{task}/{metric}"], metrics[f"lm_eval_hf/{task}/{metric}"]
        assert abs(ours - theirs) <= 1e-5 * abs(ours), (task, metric, ours, theirs)
    assert [m.step for m in client.get_metric_history(run_id, "lm_eval/modtrain_choice/acc")] == [4]
