"""A hostile user's inputs: every one is refused at start with a message naming the key or the file.

Most cases go through the one validation pass (``validate``) or the preflight checks directly
(cheap); a few go through the command lines (``python -m mod_train.train``, ``mod-launch``) and
assert exit code 2, the key or file in stderr, that the error came before any process group, and
that an existing run directory is byte-for-byte unchanged. Each case was accepted, or crashed
deep inside (ZeroDivisionError, TypeError, DeepSpeed, the embedding), before these checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from mod_train.config.load import compose, to_config, to_plain_dict
from mod_train.config.validate import ConfigError, validate

REPO = Path(__file__).resolve().parents[2]
MOCK = ["data=mock", "model.vocab_size=256", "tracking.enabled=false"]

# (overrides, world size, what the message must contain besides the key). Keys come first in each
# override, so the key named is ``overrides[-1].split("=")[0]``.
OUT = "out of range"
CONFIG_CASES = [
    (["model.num_query_groups=0"], 1, OUT),
    (["model.ffn_hidden_size=-64"], 1, OUT),
    (["model.vocab_size=-5"], 1, OUT),
    (["model.make_vocab_size_divisible_by=0"], 1, OUT),
    (["model.make_vocab_size_divisible_by=-128"], 1, OUT),
    (["model.rotary_base=0"], 1, OUT),
    (["model.init_method_std=0"], 1, OUT),
    (["model.init_method_std=-0.02"], 1, OUT),
    (["model.hidden_dropout=1.0"], 1, OUT),
    (["model.hidden_dropout=-0.1"], 1, OUT),
    (["model.attention_dropout=1.5"], 1, OUT),
    (["model.mod.every=0"], 1, OUT),
    (["model.mod.offset=-1"], 1, OUT),
    (["model.mod.capacity=0"], 1, OUT),
    (["model.mod.capacity=1.5"], 1, OUT),
    (["model.mod.aux_loss_coeff=-1"], 1, OUT),
    (["model.mod.predictor_hidden=-8"], 1, OUT),
    (["model.moe.num_experts=-2"], 1, OUT),
    (["model.moe.every=0"], 1, OUT),
    (["model.moe.offset=-1"], 1, OUT),
    (["model.moe.aux_loss_coeff=-0.01"], 1, OUT),
    (["model.moe.z_loss_coeff=-1"], 1, OUT),
    (["model.moe.ffn_hidden_size=0"], 1, OUT),
    (["model.moe.shared_expert_ffn_hidden_size=-1"], 1, OUT),
    (["parallel.global_batch_size=0"], 1, OUT),
    (["parallel.global_batch_size=-4"], 1, OUT),
    (["parallel.global_batch_size=-2"], 2, OUT),
    (["optim.lr=.inf"], 1, OUT),
    (["optim.weight_decay=-0.1"], 1, OUT),
    (["optim.beta1=1.0"], 1, OUT),
    (["optim.beta2=-0.5"], 1, OUT),
    (["optim.beta2=1.5"], 1, OUT),
    (["optim.eps=0"], 1, OUT),
    (["optim.clip_grad=-1"], 1, OUT),
    (["optim.decay_steps=0"], 1, OUT),
    (["optim.decay_steps=-10"], 1, OUT),
    (["data.seed=-1"], 1, OUT),
    (["data.seed=4294967296"], 1, OUT),
    (["data.split='0,0,100'"], 1, "training split no share"),
    (["data.split='0,50,50'"], 1, "training split no share"),
    (["data.split=abc"], 1, "up to three non-negative numbers"),
    (["data.split='98,2,0,5'"], 1, "up to three non-negative numbers"),
    (["data.split='-1,2,0'"], 1, "up to three non-negative numbers"),
    (["data.split=''"], 1, "up to three non-negative numbers"),
    (["train.eval_interval=0"], 1, OUT),
    (["train.eval_interval=-5"], 1, OUT),
    (["train.eval_iters=0"], 1, OUT),
    (["train.eval_iters=-1"], 1, OUT),
    (["train.seed=-1"], 1, OUT),
    (["train.peak_tflops=0"], 1, OUT),
    (["train.spike.window=1"], 1, OUT),
    (["train.spike.threshold_sigmas=0"], 1, OUT),
    (["train.inject.spike_factor=0"], 1, OUT),
    (["train.inject.hang_s=-1"], 1, OUT),
    (["train.inject.nan_loss_at_step=0"], 1, OUT),
    (["train.inject.hang_at_step=-3"], 1, OUT),
    (["train.inject.ranks=[5]"], 2, OUT),
    (["train.run_dir=''"], 1, OUT),
    (["checkpoint.keep_last=0"], 1, OUT),
    (["checkpoint.keep_last=-1"], 1, OUT),
    (["checkpoint.resume=''"], 1, OUT),
    (["checkpoint.resume='  '"], 1, OUT),
    (["checkpoint.init_from=''"], 1, OUT),
    (["checkpoint.dir=''"], 1, OUT),
]


@lru_cache(maxsize=None)
def _composed(overrides: tuple):
    return compose(MOCK + list(overrides))


def _set(cfg, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for part in parents:
        node = getattr(node, part)
    setattr(node, leaf, value)


def _cfg(overrides=(), groups=()):
    """The mock config with ``groups`` composed by Hydra (cached: composing costs about a second)
    and ``overrides`` ("key=value", values parsed as YAML) set on the typed config, as the
    command line would have set them."""
    import yaml

    cfg = to_config(_composed(tuple(groups)))
    for item in overrides:
        key, text = item.split("=", 1)
        value = yaml.safe_load(text) if text.strip() else ""
        if text.startswith("'") or key == "data.split":  # quoted on the command line: a string
            value = text.strip("'") if text.startswith("'") else text
        _set(cfg, key, value)
    return cfg


def _validate(overrides, world: int = 1):
    return validate(_cfg(overrides), world_size=world, has_cuda=False)


def test_the_mock_base_config_is_valid():
    """The control: every case below differs from a valid config by its one override."""
    _validate([])
    _validate([], world=2)


@pytest.mark.parametrize("overrides,world,needle", CONFIG_CASES, ids=[c[0][-1] for c in CONFIG_CASES])
def test_bad_config_value_is_refused_by_validate(overrides, world, needle):
    key = overrides[-1].split("=")[0]
    with pytest.raises(ConfigError) as e:
        _validate(overrides, world)
    assert key in str(e.value) and needle in str(e.value), str(e.value)


# ---------------------------------------------------------------------------- indexed datasets

def _write_dataset(prefix: Path, docs, dtype=np.uint16) -> str:
    from data_prep.indexed_format import IndexedWriter

    w = IndexedWriter(str(prefix) + ".bin", dtype)
    for doc in docs:
        w.add_documents(np.asarray(doc, dtype=dtype), np.asarray([len(doc)]))
    w.finalize(str(prefix) + ".idx")
    return str(prefix)


@pytest.fixture(scope="module")
def bad_datasets(tiny_data, tmp_path_factory):
    """Damaged copies of the test corpus, each broken one way."""
    import shutil

    d = tmp_path_factory.mktemp("bad_data")
    good = tiny_data["prefix"]

    def copy(name: str) -> str:
        for ext in (".bin", ".idx"):
            shutil.copy(good + ext, d / (name + ext))
        return str(d / name)

    out = {}
    p = copy("cut_short")
    with open(p + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(p + ".bin") - 100)
    out["cut_short"] = (p, ".bin", "cut short")
    p = copy("empty_bin")
    open(p + ".bin", "wb").close()
    out["empty_bin"] = (p, ".bin", "cut short")
    small = _write_dataset(d / "small", [[5, 6, 7, 3]] * 4)
    p = copy("idx_of_smaller")
    shutil.copy(small + ".idx", p + ".idx")
    out["idx_of_smaller"] = (p, ".bin", "another dataset")
    big = _write_dataset(d / "big", [[5, 6, 7, 3] * 50] * 2000)
    p = copy("idx_of_larger")
    shutil.copy(big + ".idx", p + ".idx")
    out["idx_of_larger"] = (p, ".bin", "another dataset")
    p = copy("garbage_idx")
    Path(p + ".idx").write_bytes(os.urandom(64))
    out["garbage_idx"] = (p, ".idx", "not a megatron-core index file")
    p = copy("truncated_idx")
    with open(p + ".idx", "r+b") as f:
        f.truncate(60)
    out["truncated_idx"] = (p, ".idx", "truncated")
    out["larger_vocab"] = (_write_dataset(d / "larger_vocab", [[5, 6, 900, 3], [7, 8, 3]]), ".bin", "token id 900")
    out["int32_larger_vocab"] = (_write_dataset(d / "int32_vocab", [[5, 70000, 3]], np.int32), ".bin",
                                 "token id 70000")
    return out


DATA_CASES = ["cut_short", "empty_bin", "idx_of_smaller", "idx_of_larger", "garbage_idx", "truncated_idx",
              "larger_vocab", "int32_larger_vocab"]


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_indexed_dataset_is_refused_naming_the_file(case, tiny_data, bad_datasets):
    prefix, ext, needle = bad_datasets[case]
    # The bad one second: the check must name it, not the good one.
    cfg = _cfg(["data.mock=false", "model.vocab_size=null", f"data.tokenizer_model={tiny_data['tokenizer']}"])
    cfg.data.paths = [tiny_data["prefix"], prefix]
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=1, has_cuda=False)
    assert f"'{prefix}{ext}'" in str(e.value) and needle in str(e.value), str(e.value)


def test_the_good_dataset_passes_the_checks(tiny_data):
    cfg = _cfg(["data.mock=false", "model.vocab_size=null", f"data.tokenizer_model={tiny_data['tokenizer']}"])
    cfg.data.paths = [tiny_data["prefix"]]
    validate(cfg, world_size=1, has_cuda=False)


# ---------------------------------------------------------------------------- checkpoint shapes

def _split_groups(overrides):
    """(key=value overrides, group choices such as model=tiny_mod)."""
    groups = [o for o in overrides if o.split("=")[0] in ("model", "parallel", "data", "optim")]
    return [o for o in overrides if o not in groups], groups


def _fake_checkpoint(root: Path, step: int, overrides) -> Path:
    """A committed checkpoint whose complete.json records the config of ``overrides`` (no tensors:
    the shape check reads only the record)."""
    from mod_train.checkpoint.layout import CheckpointDir

    cd = CheckpointDir(root)
    cd.begin(step)
    saved = to_plain_dict(_cfg(*_split_groups(overrides)))
    return cd.commit(step, {"config": saved}, keep_last=5)


CKPT_CASES = [  # (saved with, resumed/initialised with, key named)
    ([], ["model.hidden_size=128"], "model.hidden_size"),
    ([], ["model.num_layers=6"], "model.num_layers"),
    ([], ["model.activation=gelu"], "model.activation"),
    ([], ["model.num_query_groups=2"], "model.num_query_groups"),
    ([], ["model=tiny_mod"], "model.mod.enabled"),
    (["model=tiny_moe"], [], "model.moe.num_experts"),
    ([], ["model.tie_embeddings=true"], "model.tie_embeddings"),
]


@pytest.mark.parametrize("saved,now,key", CKPT_CASES, ids=[c[2] for c in CKPT_CASES])
@pytest.mark.parametrize("how", ["resume", "init_from"])
def test_checkpoint_of_another_model_shape_names_the_key(tmp_path, saved, now, key, how):
    from mod_train.preflight import check_checkpoint_fits

    ckpt = _fake_checkpoint(tmp_path / "old" / "checkpoints", 10, saved)
    extra = ([f"checkpoint.dir={ckpt.parent}"] if how == "resume" else
             [f"checkpoint.init_from={ckpt}", f"checkpoint.dir={tmp_path / 'new'}"])
    sets, groups = _split_groups(list(now))
    cfg = _cfg(sets + extra, groups)
    with pytest.raises(ConfigError) as e:
        check_checkpoint_fits(cfg)
    source = "checkpoint.resume" if how == "resume" else "checkpoint.init_from"
    assert key in str(e.value) and source in str(e.value) and str(ckpt) in str(e.value), str(e.value)


def test_checkpoint_of_the_same_model_fits(tmp_path):
    from mod_train.preflight import check_checkpoint_fits

    ckpt = _fake_checkpoint(tmp_path / "checkpoints", 10, [])
    assert check_checkpoint_fits(_cfg([f"checkpoint.dir={ckpt.parent}"])) == ckpt


@pytest.mark.parametrize("override,key", [("checkpoint.resume=/nonexistent/iter_0000010", "checkpoint.resume"),
                                          ("checkpoint.init_from=/nonexistent/model", "checkpoint.init_from")])
def test_missing_resume_or_init_path_is_refused_at_start(tmp_path, override, key):
    from mod_train.preflight import check_checkpoint_fits

    with pytest.raises(ConfigError) as e:
        check_checkpoint_fits(_cfg([override, f"checkpoint.dir={tmp_path}"]))
    assert key in str(e.value) and "/nonexistent/" in str(e.value)


# ---------------------------------------------------------------------------- mod-prep-data

def _text_case(path: Path, kind: str) -> None:
    rng = np.random.default_rng(0)
    if kind == "random_bytes":
        path.write_bytes(rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    elif kind == "nul_bytes":
        path.write_bytes(b"a normal line\n" * 100 + b"\x00\x00" + b"more text\n")
    elif kind == "utf16":
        path.write_bytes("hello world\n".encode("utf-16") * 100)
    elif kind == "latin1":
        path.write_bytes(("caf\xe9 cr\xe8me br\xfbl\xe9e\n" * 2000).encode("latin-1"))


@pytest.mark.parametrize("kind", ["random_bytes", "nul_bytes", "utf16", "latin1"])
def test_prep_data_refuses_input_that_is_not_text(tmp_path, tiny_data, kind):
    from data_prep._io import DataPrepError
    from data_prep.tokenize_corpus import tokenize_corpus

    src = tmp_path / "input.txt"
    _text_case(src, kind)
    with pytest.raises(DataPrepError) as e:
        tokenize_corpus([str(src)], tiny_data["tokenizer"], str(tmp_path / "out"), workers=1)
    assert str(src) in str(e.value) and "not" in str(e.value) and "text" in str(e.value)
    assert not list(tmp_path.glob("out*")), "nothing is written for refused input"


def test_prep_data_tolerates_a_stray_byte_in_text(tmp_path, tiny_data):
    from data_prep.tokenize_corpus import tokenize_corpus

    src = tmp_path / "input.txt"
    src.write_bytes(b"an ordinary line of text\n" * 2000 + b"one stray \xff byte\n")
    tokenize_corpus([str(src)], tiny_data["tokenizer"], str(tmp_path / "out"), workers=1)
    assert (tmp_path / "out.bin").stat().st_size > 0


# ---------------------------------------------------------------------------- command lines

def _tree_hash(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _make_existing_run(run: Path) -> Path:
    """A run directory as a finished run leaves it: Hydra's config copy, metrics, a checkpoint."""
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("# the run's own config\nmodel: {hidden_size: 64}\n")
    (run / ".hydra" / "overrides.yaml").write_text("- train.max_steps=10\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "lm loss": 5.0}) + "\n")
    _fake_checkpoint(run / "checkpoints", 10, [])
    return run


def _cli_env() -> dict:
    from mod_train.distributed.world import free_port

    # WORLD_SIZE=2 with no second rank: had the command reached the process group, it would wait
    # for rank 1 (until the test's timeout); exiting with code 2 proves the error came before it.
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    env.pop("MOD_TRAIN_RUN_LOCK", None)
    return env


def _train_cases(run: Path, bad_datasets, tiny_data):
    base = MOCK + [f"train.run_dir={run}"]
    return {
        "eval_interval_0": (base + ["train.eval_interval=0"], "train.eval_interval"),
        "split_no_train": (base + ["data.split='0,0,100'"], "data.split"),
        "negative_global_batch": (base + ["parallel.global_batch_size=-4"], "parallel.global_batch_size"),
        "keep_last_0": (base + ["checkpoint.keep_last=0"], "checkpoint.keep_last"),
        "bin_cut_short": ([f"train.run_dir={run}", "tracking.enabled=false",
                           f"data.tokenizer_model={tiny_data['tokenizer']}",
                           f"data.paths=[{bad_datasets['cut_short'][0]}]"], bad_datasets["cut_short"][0] + ".bin"),
        "resume_changed_shape": (base + ["model.hidden_size=128"], "model.hidden_size"),
    }


CLI_CASES = ["eval_interval_0", "split_no_train", "negative_global_batch", "keep_last_0", "bin_cut_short",
             "resume_changed_shape"]
LAUNCH_CASES = {  # mod-launch arguments before / after the run's overrides, the key named
    "nproc_0": (["--nproc", "0"], [], "--nproc"),
    "eval_interval_0": (["--nproc", "2"], ["train.eval_interval=0"], "train.eval_interval"),
    "split_no_train": (["--nproc", "2"], ["data.split='0,0,100'"], "data.split"),
    "keep_last_0": (["--nproc", "2"], ["checkpoint.keep_last=0"], "checkpoint.keep_last"),
    "unparsable_override": (["--nproc", "2"], ["model.num_layers=["], "model.num_layers=["),
    "negative_global_batch": (["--nproc", "2"], ["parallel.global_batch_size=-4"], "parallel.global_batch_size"),
}


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, bad_datasets, tiny_data):
    """Every command-line case, each against its own copy of an existing run directory, started
    together (each process spends seconds importing torch; in parallel they share the wait).
    name -> (exit code, stderr, hash of the run directory before, after, what must be named)."""
    jobs = {}
    for name in CLI_CASES:
        run = _make_existing_run(tmp_path_factory.mktemp(f"train_{name}") / "run")
        overrides, named = _train_cases(run, bad_datasets, tiny_data)[name]
        jobs[f"train:{name}"] = (run, named, [sys.executable, "-m", "mod_train.train", *overrides])
    for name, (opts, overrides, named) in LAUNCH_CASES.items():
        run = _make_existing_run(tmp_path_factory.mktemp(f"launch_{name}") / "run")
        jobs[f"launch:{name}"] = (run, named, [sys.executable, "-m", "launch.local", *opts, *MOCK,
                                               f"train.run_dir={run}", *overrides])
    before = {k: _tree_hash(run) for k, (run, _, _) in jobs.items()}
    procs = {k: subprocess.Popen(cmd, cwd=REPO, env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for k, (_, _, cmd) in jobs.items()}
    results = {}
    for k, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            err += "\n[timed out: it reached the process group]"
        run, named, _ = jobs[k]
        results[k] = (proc.returncode, err, before[k], _tree_hash(run), named)
    return results


@pytest.mark.parametrize("case", CLI_CASES)
def test_mod_train_refuses_before_any_process_group_and_leaves_the_run_dir_untouched(case, cli_results):
    code, err, before, after, named = cli_results[f"train:{case}"]
    assert code == 2, err[-3000:]
    assert "mod-train: configuration error" in err and named in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert after == before, "a refused command changed the run directory"


@pytest.mark.parametrize("case", list(LAUNCH_CASES))
def test_mod_launch_prints_config_errors_like_mod_train(case, cli_results):
    code, err, before, after, named = cli_results[f"launch:{case}"]
    assert code == 2, err[-3000:]
    assert err.startswith("mod-launch: configuration error") and named in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert after == before, "a refused command changed the run directory"
