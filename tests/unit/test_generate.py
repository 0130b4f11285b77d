"""mod-generate, the command line: checkpoints written by DeepSpeed (ZeRO 1/3) and by fake saves,
prompts batched by length, errors that say what to do."""

import pytest
import torch

from mod_train.config.load import to_plain_dict
from mod_train.config.validate import validate
from mod_train.distributed.world import free_port
from mod_train.generate import main
from mod_train.inference.generation import generate
from tests.unit.test_inference import build


def _tokenizer(tmp_path):
    import sentencepiece as spm

    text = tmp_path / "corpus.txt"
    lines = ["once upon a time there was a small robot who liked to read",
             "the quick brown fox jumps over the lazy dog near the river",
             "a tiny model learns to write short stories about the sea"]
    text.write_text("\n".join(lines * 20) + "\n")
    # byte_fallback needs the 256 byte pieces in the vocabulary, hence 300 (padded to 384 rows).
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "tok"), vocab_size=300,
                                   byte_fallback=True, model_type="bpe", minloglevel=2)
    return tmp_path / "tok.model"


def _save_fake_checkpoint(root, step, cfg, model):
    from mod_train.checkpoint.layout import CheckpointDir
    from mod_train.engine.step import ModelChunks

    ckpt = CheckpointDir(root)
    staging = ckpt.begin(step)
    (staging / "state").mkdir()
    torch.save({"module": ModelChunks([model]).state_dict()}, staging / "state" / "mp_rank_00_model_states.pt")
    return ckpt.commit(step, {"config": to_plain_dict(cfg)})


def test_cli_end_to_end(megatron_tp1, tmp_path, capsys):
    from mod_train.data.tokenizer import load_tokenizer

    tok_path = _tokenizer(tmp_path)
    model, cfg = build("model=tiny_mod", "model.vocab_size=300", f"data.tokenizer_model={tok_path}")
    root = tmp_path / "checkpoints"
    _save_fake_checkpoint(root, 5, cfg, model)

    tok = load_tokenizer(str(tok_path))
    prompt = "once upon a time"
    prompt_ids = list(tok.tokenize(prompt))
    new = generate(model, cfg, prompt_ids, 12, greedy=True, eod=tok.eod).tokens[0]
    shown = new[:-1] if new and new[-1] == tok.eod else new
    expected = tok.detokenize(prompt_ids + shown)

    assert main(["--checkpoint", str(root), "--prompt", prompt, "--max-new-tokens", "12", "--greedy"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == expected.strip() and out.startswith(prompt) and len(out) > len(prompt)

    argv = ["--checkpoint", str(root), "--iter", "5", "--prompt", prompt, "--max-new-tokens", "8",
            "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]
    main(argv)
    first = capsys.readouterr().out
    main(argv)
    assert capsys.readouterr().out == first and first.startswith(prompt)

    # An iter_* directory works as well; an empty prompt starts from the end-of-document token.
    # --show-routing prints, per MoD layer (tiny_mod: layers 2 and 4), the tokens its decision routed.
    main(["--checkpoint", str(root / "iter_0000005"), "--max-new-tokens", "4", "--show-routing"])
    routing = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[prompt 1, layer")]
    assert [line.split(":")[0] for line in routing] == ["[prompt 1, layer 2", "[prompt 1, layer 4"]
    assert all(line.endswith("/4 tokens routed]") for line in routing), routing

    # Several prompts: the two of one token length decode as one batch; each output is the same as
    # its prompt alone (greedy), in the order given.
    others = ["upon a time once", "the sea"]  # the same words reordered: as many tokens as the prompt
    assert len(tok.tokenize(others[0])) == len(prompt_ids) != len(tok.tokenize(others[1]))
    main(["--checkpoint", str(root), "--prompt", prompt, "--prompt", others[0], "--prompt", others[1],
          "--max-new-tokens", "12", "--greedy"])
    outs = capsys.readouterr().out.strip().split("\n-----\n")
    singles = []
    for text in (prompt, *others):
        main(["--checkpoint", str(root), "--prompt", text, "--max-new-tokens", "12", "--greedy"])
        singles.append(capsys.readouterr().out.strip())
    assert [o.strip() for o in outs] == singles and outs[0].strip() == expected.strip()


def test_cli_errors(megatron_tp1, tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["--checkpoint", str(tmp_path / "missing"), "--prompt", "hi"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no complete checkpoint"):
        main(["--checkpoint", str(tmp_path / "empty")])

    model, cfg = build("model=tiny", "data.tokenizer_model=/nonexistent/tok.model")
    root = tmp_path / "ck"
    _save_fake_checkpoint(root, 2, cfg, model)
    with pytest.raises(SystemExit, match=r"step 7 .*iter_0000002"):
        main(["--checkpoint", str(root), "--iter", "7"])
    with pytest.raises(SystemExit, match="--tokenizer"):
        main(["--checkpoint", str(root)])
    # A negative temperature is refused, not silently decoded greedily (checked before loading).
    with pytest.raises(SystemExit, match=r"mod-generate: error: temperature must be a number > 0, got -1.0; "
                                         r".*--greedy"):
        main(["--checkpoint", str(root), "--temperature", "-1"])
    with pytest.raises(SystemExit, match=r"top_p must be in \(0, 1\]"):
        main(["--checkpoint", str(root), "--top-p", "0"])

    cfg.parallel.tp = 2
    _save_fake_checkpoint(root, 3, cfg, model)
    with pytest.raises(SystemExit, match=r"parallel.tp=2.*only checkpoints written with parallel.tp=1 and "
                                         r"parallel.pp=1"):
        main(["--checkpoint", str(root), "--iter", "3"])


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_loads_real_deepspeed_checkpoint(megatron_tp1, tmp_path, monkeypatch, capsys, zero_stage):
    """A checkpoint written by DeepSpeed's own save_checkpoint (ZeRO-3: partitioned weights)."""
    import deepspeed

    from mod_train.checkpoint.layout import CheckpointDir
    from mod_train.engine.deepspeed_setup import build_engine
    from mod_train.engine.step import ModelChunks
    from mod_train.checkpoint.read import load_deepspeed_model_state

    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    # A port of our own: on a shared machine DeepSpeed's default (29500) may be another test's, and
    # the rendezvous then waits for minutes.
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    deepspeed.init_distributed(dist_backend="gloo")
    tok_path = _tokenizer(tmp_path)
    model, cfg = build("model=tiny_mod", "model.vocab_size=300", f"data.tokenizer_model={tok_path}",
                       f"parallel.zero_stage={zero_stage}", "parallel.micro_batch_size=1")
    weights = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    derived = validate(cfg, world_size=1, check_files=False, has_cuda=False)
    engine, _ = build_engine(cfg, derived, ModelChunks([model]), [model])
    ckpt = CheckpointDir(tmp_path / "ck")
    staging = ckpt.begin(4)
    engine.save_checkpoint(str(staging), tag="state", client_state={}, save_latest=False)
    iter_dir = ckpt.commit(4, {"config": to_plain_dict(cfg)})

    capsys.readouterr()  # DeepSpeed's own start-up messages
    state = load_deepspeed_model_state(iter_dir, zero_stage)
    for name, value in weights.items():
        assert torch.equal(state[name].float(), value.float()), name

    assert main(["--checkpoint", str(tmp_path / "ck"), "--prompt", "the quick", "--max-new-tokens", "5",
                 "--greedy"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("the quick")
