"""mod-submit without a cluster: the rendered sbatch scripts, the Slurm-specific config errors, sweeps,
the requeue decision, and the trainer's stop-signal flag. (The real-Slurm tests: tests/e2e/test_slurm.py.)"""

import os
import re
import shutil
import signal
import subprocess

import pytest

from launch import slurm as S
from launch import slurm_job as J
from launch import submit
from mod_train.config.load import compose, to_config

BASH = shutil.which("bash") or "/bin/bash"
GPU = ["slurm=gpu", "slurm.nodes=4", "slurm.gpus_per_node=8", "parallel.tp=4", "parallel.pp=2",
       "slurm.partition=batch", "slurm.account=proj", "slurm.time=02:00:00", "slurm.signal_seconds=300"]


def _cfg(*overrides):
    return to_config(compose(list(overrides)))


def _render(tmp_path, *overrides):
    ov = [*overrides, f"train.run_dir={tmp_path}/run"]
    cfg = _cfg(*ov)
    alloc = S.check(cfg, check_files=False)
    return S.render_train(cfg, ov, alloc), alloc


def _sbatch_lines(script):
    return [l for l in script.splitlines() if l.startswith("#SBATCH")]


def _bash_syntax_ok(text, tmp_path, name="s.sh"):
    p = tmp_path / name
    p.write_text(text)
    r = subprocess.run([BASH, "-n", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ multi-node GPU rendering
def test_multinode_gpu_script(tmp_path):
    script, alloc = _render(tmp_path, *GPU)
    assert alloc.world_size == 32 and alloc.procs_per_node == 8
    lines = _sbatch_lines(script)
    for expected in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=batch", "--account=proj",
                     "--time=02:00:00", "--signal=B:USR1@300", "--requeue", "--open-mode=append", "--exclusive",
                     "--cpus-per-task=64", "--mem=0", "--job-name=mod-run", f"--output={tmp_path}/run/slurm/train-%j.out"):
        assert f"#SBATCH {expected}" in lines, (expected, lines)
    # one torchrun per node through srun, rendezvous on the allocation's first node
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in script
    assert "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))" in script
    srun = script[script.index("\nsrun "):script.index("SRUN_PID=$!")]
    assert "--nodes=4 --ntasks=4 --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=64" in srun
    assert 'bash "$SLURM_DIR/node.sh"' in srun
    assert "-m torch.distributed.run --nnodes=4 --nproc-per-node=8" in srun
    assert '--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="${SLURM_JOB_ID}_${RESTART}"' in srun
    assert '--log-dir="$RUN_DIR/logs/job${SLURM_JOB_ID}_restart${RESTART}/node@NODE_RANK@"' in srun
    assert "--tee=3" in srun and "--max-restarts=0" in srun
    assert "-m mod_train.train" in srun
    assert "parallel.tp=4 parallel.pp=2" in srun and f"train.run_dir={tmp_path}/run" in srun
    assert '"${RESUME[@]}" &' in srun
    # pre-emption: the warning is trapped, forwarded to srun, then the job requeues itself
    assert "trap on_warning USR1" in script and 'kill -USR1 "$SRUN_PID"' in script
    assert "-m launch.slurm_job requeue-check" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert "RESUME=(checkpoint.resume=auto)" in script
    # NCCL settings from slurm=gpu are exported, the rest documented
    assert "export NCCL_DEBUG=WARN" in script and "# export NCCL_SOCKET_IFNAME=" in script
    assert "# export NCCL_IB_HCA=" in script
    assert "{{" not in script
    _bash_syntax_ok(script, tmp_path)


def test_static_rendezvous_gres_and_no_requeue(tmp_path):
    script, _ = _render(tmp_path, *GPU, "slurm.rendezvous=static", "slurm.gpu_directive=gres",
                        "slurm.requeue=false", "slurm.master_port=29500")
    assert "#SBATCH --gres=gpu:8" in script and "#SBATCH --no-requeue" in script
    assert "#SBATCH --requeue" not in script
    assert '--node-rank=@NODE_RANK@ --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT"' in script
    assert "MASTER_PORT=29500" in script and "rdzv-backend" not in script
    assert "scontrol requeue" not in script
    _bash_syntax_ok(script, tmp_path)


def test_containers_setup_env_and_extra_args(tmp_path):
    script, _ = _render(tmp_path, *GPU, "slurm.container.runtime=pyxis", "slurm.container.image='nvcr.io#nvidia/pytorch:25.01-py3'",
                        "slurm.container.mounts=[/lustre:/lustre]", "slurm.setup=['module load cuda']",
                        "+slurm.env.NCCL_SOCKET_IFNAME=ib0", "slurm.sbatch_args=['--constraint=h100']",
                        "slurm.python=python")
    assert "--container-image='nvcr.io#nvidia/pytorch:25.01-py3'" in script
    assert "--container-mounts=/lustre:/lustre" in script and "--container-workdir=" in script
    assert "\nmodule load cuda\n" in script and "export NCCL_SOCKET_IFNAME=ib0" in script
    assert "#SBATCH --constraint=h100" in script
    assert "python -m torch.distributed.run" in script
    # the job's own helpers run on the batch host, outside the container: with its python3
    assert "python3 -m launch.slurm_job job-start" in script and "python3 -m launch.slurm_job requeue-check" in script
    _bash_syntax_ok(script, tmp_path)

    script, _ = _render(tmp_path, *GPU, "slurm.container.runtime=apptainer", "slurm.container.image=/img/pt.sif",
                        "slurm.container.mounts=[/lustre]")
    assert 'apptainer exec --nv --bind /lustre /img/pt.sif bash "$SLURM_DIR/node.sh"' in script
    _bash_syntax_ok(script, tmp_path)


def test_cpu_cluster_world_is_nodes_times_procs(tmp_path):
    script, alloc = _render(tmp_path, "slurm.nodes=2", "slurm.procs_per_node=4")
    assert alloc.world_size == 8 and alloc.cpus_per_task == 4 and alloc.omp_threads == 1
    assert not any("gpu" in l or "gres" in l for l in _sbatch_lines(script))
    assert "--nnodes=2 --nproc-per-node=4" in script and "#SBATCH --cpus-per-task=4" in script
    assert "#SBATCH --partition" not in script and "#SBATCH --account" not in script


def test_node_script_and_example_are_valid_bash(tmp_path):
    _bash_syntax_ok(S.NODE_SCRIPT.read_text(), tmp_path, "node.sh")
    _bash_syntax_ok((S.TEMPLATE_DIR / "example.sbatch").read_text(), tmp_path, "example.sbatch")


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("overrides, message", [
    (["slurm=gpu", "slurm.account=a", "slurm.partition=null"], "slurm.partition is not set"),
    (["slurm=gpu", "slurm.partition=p", "slurm.account=null"], "slurm.account is not set"),
    # 1 x 12 GPUs for a tp4 x pp2 layout: 4 would idle
    ([*GPU, "slurm.nodes=1", "slurm.gpus_per_node=12"], "is not a multiple of parallel.tp x parallel.pp x parallel.cp = 8"),
    ([*GPU, "slurm.nodes=3", "slurm.gpus_per_node=6"], "only 16 could be used and 2 would idle"),
    # one node of 4 GPUs cannot hold a tp4 x pp2 replica
    ([*GPU, "slurm.nodes=1", "slurm.gpus_per_node=4"], "the layout does not fit"),
    # more GPUs per node than ranks: idle GPUs
    ([*GPU, "slurm.procs_per_node=4"], "would be allocated and idle"),
    ([*GPU, "slurm.procs_per_node=16"], "every rank needs its own GPU"),
    # a global batch that cannot use 4 data-parallel replicas
    ([*GPU, "parallel.micro_batch_size=4", "parallel.global_batch_size=8"], "more than parallel.global_batch_size"),
    # tensor parallel across nodes
    (["slurm.nodes=4", "slurm.procs_per_node=2", "parallel.tp=4"], "tensor-parallel groups"),
    ([*GPU, "slurm.time=00:04:00"], "slurm.signal_seconds=300 must be positive and below the time limit"),
    ([*GPU, "slurm.time=later"], "is not a Slurm time limit"),
    # slurm.rendezvous / container.runtime outside their choices fail at compose (tests/unit/test_config.py)
    ([*GPU, "slurm.container.runtime=pyxis"], "needs slurm.container.image"),
    # ordinary validation, reported with the allocation's world size
    ([*GPU, "model.num_attention_heads=2", "model.hidden_size=64"], "world size 32"),
])
def test_clear_errors(overrides, message):
    with pytest.raises(S.SlurmError, match=re.escape(message)):
        S.check(_cfg(*overrides), check_files=False)


def test_layout_error_says_what_to_use():
    with pytest.raises(S.SlurmError) as e:
        S.check(_cfg(*GPU, "slurm.nodes=1", "slurm.gpus_per_node=4"), check_files=False)
    assert "slurm.nodes=2" in str(e.value)


def test_missing_data_is_checked_unless_disabled(tmp_path):
    cfg = _cfg(*GPU, f"data.tokenizer_model={tmp_path}/none.model")
    with pytest.raises(S.SlurmError, match="no tokenizer file"):
        S.check(cfg)
    S.check(cfg, check_files=False)


@pytest.mark.parametrize("text, seconds", [("30", 1800), ("10:30", 630), ("01:00:00", 3600), ("2-00", 172800),
                                           ("1-02:03", 93780), ("1-00:00:05", 86405)])
def test_parse_time(text, seconds):
    assert S.parse_time(text) == seconds


# ------------------------------------------------------------------ CLI, dry run, sweeps, prep
def test_dry_run_prints_and_keeps_script(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # sbatch must not be called
    submit.main(["--dry-run", "--no-check-files", *GPU, f"train.run_dir={tmp_path}/r"])
    out = capsys.readouterr().out
    kept = (tmp_path / "r" / "slurm" / "train.sbatch").read_text()
    assert kept in out and "#SBATCH --nodes=4" in kept
    assert "would run: sbatch --parsable" in out
    assert (tmp_path / "r" / "slurm" / "node.sh").is_file()
    assert (tmp_path / "r" / "slurm" / "job.json").is_file()


def test_cli_reports_config_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        submit.main(["--dry-run", "--no-check-files", "slurm=gpu", f"train.run_dir={tmp_path}/r"])
    assert e.value.code == 2
    assert "configuration error: slurm.partition is not set" in capsys.readouterr().err


def test_sweep_points_and_run_dirs():
    points = submit.sweep_points(["model.mod.capacity=0.125,0.25", "optim.lr=1e-3,2e-3", "train.max_steps=5"])
    assert len(points) == 4 and all("train.max_steps=5" in p for p in points)
    ov = submit.point_overrides(["train.max_steps=5"], points[1], 1, "runs/sweep")
    assert ov[-1] == "train.run_dir=runs/sweep/1_capacity-0.125_lr-0.002"
    # a sweep over run_dir itself is left alone
    pts = submit.sweep_points(["train.run_dir=a,b"])
    assert submit.point_overrides([], pts[0], 0, "x") == ["train.run_dir=a"]


def test_multirun_dry_run_one_job_per_point(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    submit.main(["-m", "--dry-run", "--no-check-files", "slurm.procs_per_node=2", "optim.lr=1e-3,2e-3",
                 f"train.run_dir={tmp_path}/sweep"])
    scripts = sorted((tmp_path / "sweep").glob("*/slurm/train.sbatch"))
    assert [p.parent.parent.name for p in scripts] == ["0_lr-0.001", "1_lr-0.002"]
    assert "optim.lr=0.002" in scripts[1].read_text()
    assert capsys.readouterr().out.count("would run: sbatch") == 2


def test_prep_dry_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"part{i}.jsonl").write_text('{"text": "hello world"}\n')
    submit.main(["prep", "--dry-run", f"slurm.prep.inputs=[{corpus}/*.jsonl]", "slurm.prep.vocab_size=300",
                 "slurm.prep.array_parallelism=2", "slurm.procs_per_node=2",
                 f"data.tokenizer_model={tmp_path}/data/tok.model", f"data.paths=[{tmp_path}/data/corpus]",
                 f"train.run_dir={tmp_path}/run"])
    sd = tmp_path / "run" / "slurm"
    assert (sd / "shards.txt").read_text().splitlines() == [str(corpus / f"part{i}.jsonl") for i in range(3)]
    tok, arr, merge = ((sd / n).read_text() for n in ("prep_tokenizer.sbatch", "prep_tokenize.sbatch", "prep_merge.sbatch"))
    assert "#SBATCH --array=0-2%2" in arr and f"TOKENIZER_PREFIX={tmp_path}/data/tok" in tok
    assert "--vocab-size 300" in tok and f"SHARD_DIR={tmp_path}/data/corpus_shards" in arr
    assert 'if [ -f "$OUT.bin" ] && [ -f "$OUT.idx" ]' in arr  # finished shards are skipped
    assert "-m data_prep.merge" in merge and "NUM_SHARDS=3" in merge
    for name, text in (("t", tok), ("a", arr), ("m", merge), ("train", (sd / "train.sbatch").read_text())):
        _bash_syntax_ok(text, tmp_path, name)
    out = capsys.readouterr().out
    assert "--dependency=afterok:<tokenizer job id>" in out and "--dependency=afterok:<merge job id>" in out


def test_prep_errors(tmp_path):
    with pytest.raises(S.SlurmError, match="slurm.prep.inputs is empty"):
        submit.submit_prep([f"train.run_dir={tmp_path}/r"], dry_run=True)
    with pytest.raises(S.SlurmError, match="no input files match"):
        submit.submit_prep([f"train.run_dir={tmp_path}/r", f"slurm.prep.inputs=[{tmp_path}/none*.jsonl]"], dry_run=True)


# ------------------------------------------------------------------ requeue decision
def test_requeue_check_stops_without_progress(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "slurm").mkdir(parents=True)
    (run / "slurm" / J.JOB_FILE).write_text('{"max_steps": 100, "checkpoint_dir": "x", "max_requeues": 2}')
    step = {"v": None}
    monkeypatch.setattr(J, "latest_step", lambda d: step["v"])

    def cycle(start, end):
        step["v"] = start
        J.job_start(run)
        step["v"] = end
        return J.requeue_check(run, 1)

    assert cycle(None, 10)[0]  # progress
    assert cycle(10, 20)[0]
    assert cycle(20, 20)[0] and cycle(20, 20)[0]  # 2 requeues without progress are allowed...
    ok, why = cycle(20, 20)
    assert not ok and "slurm.max_requeues=2" in why  # ...the third is not
    assert cycle(20, 30)[0]  # progress resets the count
    ok, why = cycle(30, 100)
    assert not ok and "finished" in why
    history = J._load(run / "slurm" / J.REQUEUE_STATE_FILE, {})["history"]
    assert [h["event"] for h in history if h["event"] != "start"] == \
        ["requeue", "requeue", "requeue", "requeue", "stop", "requeue", "stop"]


def test_requeue_after_a_watchdog_stop_but_not_after_a_crash(tmp_path, monkeypatch):
    import os
    import time

    from mod_train.callbacks.watchdog import WATCHDOG_DIR

    assert J.WATCHDOG_DIR == WATCHDOG_DIR  # the stdlib-only copy of the name
    run = tmp_path / "run"
    (run / "slurm").mkdir(parents=True)
    (run / "slurm" / J.JOB_FILE).write_text('{"max_steps": 100, "checkpoint_dir": "x", "max_requeues": 2}')
    monkeypatch.setattr(J, "latest_step", lambda d: 10)
    dumps = run / WATCHDOG_DIR
    dumps.mkdir()
    old = dumps / "rank_00001.txt"
    old.write_text("stacks of an earlier job run")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    J.job_start(run)
    ok, why = J.requeue_check(run, 1, preempted=False)  # a crash: the only dump predates this run
    assert not ok and "without a pre-emption warning or a watchdog stop" in why
    J.job_start(run)
    (dumps / "rank_00000.txt").write_text("stacks: step 5 exceeded train.step_timeout_s")
    assert J.requeue_check(run, 1, preempted=False)[0]  # the watchdog stopped a hang: requeue
    assert J.main(["requeue-check", "--run-dir", str(run), "--exit-code", "1", "--preempted", "0"]) == 0
    # The rendered job asks requeue-check after any non-zero exit too, telling it whether a
    # pre-emption warning came.
    script, _ = _render(tmp_path / "r", *GPU)
    assert '[ "$PREEMPTED" -gt 0 ] || [ "$RC" -ne 0 ]' in script and "--preempted" in script
    _bash_syntax_ok(script, tmp_path)


def test_requeue_check_cli(tmp_path):
    run = tmp_path / "run"
    (run / "slurm").mkdir(parents=True)
    (run / "slurm" / J.JOB_FILE).write_text(f'{{"max_steps": 5, "checkpoint_dir": "{run}/checkpoints", "max_requeues": 0}}')
    assert J.main(["job-start", "--run-dir", str(run)]) == 0
    assert J.main(["requeue-check", "--run-dir", str(run)]) == 1  # no checkpoint at all, no requeue allowed


# ------------------------------------------------------------------ the trainer's signal flag
def test_stop_signals_flag_and_restore():
    from mod_train.engine.signals import StopSignals

    before = signal.getsignal(signal.SIGUSR1)
    s = StopSignals().install()
    try:
        assert s.agreed() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert s.received == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
        assert s.agreed() == "SIGUSR1"
    finally:
        s.restore()
    assert signal.getsignal(signal.SIGUSR1) == before
