"""lm-evaluation-harness on a mod-train checkpoint, through two doors that must agree:

* ``path="ours"``: :class:`ModTrainLM`, an lm-eval ``TemplateLM`` over the megatron model loaded in
  one process (``mod_train.inference.loader``), scoring with the full-sequence *causal* forward
  (MoD layers route by their calibrated causal decision, as when sampling);
* ``path="hf"``: the checkpoint exported with ``mod-export --format hf`` and lm-eval's own ``HFLM``.

Both encode with the same tokenizer and score the same windows (lm-eval's truncation to
``max_length + 1`` tokens, its rolling windows for perplexity), so their scores are equal up to
float rounding. Tasks are lm-eval task names or local YAML files; a YAML's relative
``dataset_kwargs.data_files`` are resolved against its own directory, so a task and its JSONL ship
together (no hub access: set ``HF_DATASETS_OFFLINE=1``). Generation tasks (``generate_until``) are
not supported by :class:`ModTrainLM`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from mod_train.hf.deps import require

TaskSpec = Union[str, Dict[str, Any]]


def task_specs(tasks: Sequence[str]) -> List[TaskSpec]:
    """Names pass through; ``*.yaml`` files become task dicts with their data files made absolute."""
    import yaml

    out: List[TaskSpec] = []
    for task in tasks:
        path = Path(task)
        if path.suffix not in (".yaml", ".yml"):
            out.append(task)
            continue
        if not path.exists():
            raise FileNotFoundError(f"task file {path} not found")
        spec = yaml.safe_load(path.read_text())
        files = (spec.get("dataset_kwargs") or {}).get("data_files")
        if isinstance(files, dict):
            spec["dataset_kwargs"]["data_files"] = {
                split: str((path.parent / f).resolve()) if not os.path.isabs(f) else f for split, f in files.items()}
        out.append(spec)
    return out


def _lm_classes():
    require("lm_eval")
    from lm_eval.api.model import TemplateLM

    return TemplateLM


def make_mod_train_lm(model, tokenizer, max_length: int):
    """Our lm-eval LM over a megatron GPTModel (one process) and our tokenizer."""
    from lm_eval import utils

    from mod_train.inference.decoder import full_forward_logits

    template_lm = _lm_classes()

    class ModTrainLM(template_lm):
        def __init__(self):
            super().__init__()
            self.model, self.tokenizer, self.max_length = model, tokenizer, max_length

        @property
        def eot_token_id(self) -> int:
            return int(self.tokenizer.eod)

        @property
        def prefix_token_id(self) -> int:
            bos = getattr(self.tokenizer, "bos", None)
            return int(bos) if bos is not None and int(bos) >= 0 else self.eot_token_id

        def tok_encode(self, string: str, **kwargs) -> List[int]:
            return list(self.tokenizer.tokenize(string))

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            results = []
            for _, context, continuation in requests:
                inp = (list(context) + list(continuation))[-(self.max_length + 1):][:-1]
                logp = F.log_softmax(full_forward_logits(self.model, inp), dim=-1)[-len(continuation):]
                target = torch.tensor(continuation)
                greedy = bool((logp.argmax(dim=-1) == target).all())
                results.append((float(logp.gather(1, target[:, None]).sum()), greedy))
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
            out = []
            for (string,) in [r.args for r in requests]:
                windows = [(None,) + w for w in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1))]
                out.append(sum(ll for ll, _ in self._loglikelihood_tokens(windows)))
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("mod-eval scores loglikelihood / multiple-choice / perplexity tasks; for "
                                      "generation tasks evaluate the Hugging Face export (--path hf)")

    return ModTrainLM()


def make_hf_lm(hf_dir: Union[str, Path], max_length: int):
    """lm-eval's HFLM over an exported directory (offline, trust_remote_code for our own classes)."""
    require("lm_eval", "transformers")
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True, local_files_only=True,
                                                 dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=max_length, device="cpu",
                trust_remote_code=True)


def run_tasks(lm, tasks: Sequence[str], limit: Optional[int] = None) -> Dict[str, Dict[str, float]]:
    """{task: {metric: value}} (lm-eval's ``metric,filter`` keys shortened to the metric where unique)."""
    require("lm_eval")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    specs = task_specs(tasks)
    # Indexing lm-eval's thousands of built-in task files takes a minute: only when a task is named.
    manager = TaskManager(include_defaults=any(isinstance(t, str) for t in specs))
    results = lm_eval.simple_evaluate(model=lm, tasks=specs, limit=limit, log_samples=False, task_manager=manager,
                                      bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    scores: Dict[str, Dict[str, float]] = {}
    for task, metrics in results["results"].items():
        scores[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                        if isinstance(v, (int, float)) and not k.startswith("alias") and "_stderr" not in k}
    return scores


def metric_rows(scores: Dict[str, Dict[str, float]], prefix: str = "lm_eval") -> Dict[str, float]:
    """Flat MLflow metric names: ``lm_eval/<task>/<metric>``."""
    return {f"{prefix}/{task}/{metric}": value for task, metrics in scores.items() for metric, value in metrics.items()}


def log_to_run(cfg, train_state: dict, scores: Dict[str, Dict[str, float]], step: int,
               local_dir: Optional[str] = None, prefix: str = "lm_eval") -> Optional[str]:
    """Log the scores to the checkpoint's MLflow run (its id from the saved train state) at ``step``;
    returns the run id (None when tracking was off)."""
    from mod_train.tracking.mlflow_run import MlflowTracker

    run_id = train_state.get("mlflow_run_id")
    if not cfg.tracking.enabled:
        return None
    tracker = MlflowTracker(tracking_uri=cfg.tracking.tracking_uri, experiment=cfg.tracking.experiment,
                            run_name=cfg.tracking.run_name, run_id=run_id, local_dir=local_dir)
    tracker.start()
    tracker.log_metrics(metric_rows(scores, prefix), step=step)
    tracker.end()
    return tracker.run_id


def evaluate_checkpoint(checkpoint, tasks: Sequence[str], iteration: Optional[str] = "latest",
                        limit: Optional[int] = None, path: str = "ours", hf_dir: Optional[str] = None,
                        log_mlflow: bool = True) -> Dict[str, Dict[str, Dict[str, float]]]:
    """``mod-eval``: {path: {task: {metric: value}}} for ``path`` in ours | hf | both; the scores of
    the first path go to the checkpoint's MLflow run (``lm_eval/...``; the HF path's as ``lm_eval_hf/...``)."""
    import tempfile

    from mod_train.checkpoint.read import saved_train_state
    from mod_train.distributed.world_of_one import world_of_one
    from mod_train.hf.export import export_checkpoint_hf
    from mod_train.inference.loader import load_for_generation, open_checkpoint

    require("lm_eval")
    source = open_checkpoint(checkpoint, iteration)
    cfg = source.config
    max_length = cfg.model.seq_length
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    if path in ("ours", "both"):
        with world_of_one():
            loaded = load_for_generation(checkpoint, iteration)
            out["ours"] = run_tasks(make_mod_train_lm(loaded.model, loaded.tokenizer, max_length), tasks, limit)
    if path in ("hf", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            target = hf_dir or export_checkpoint_hf(checkpoint, Path(tmp) / "hf", iteration)[0]
            out["hf"] = run_tasks(make_hf_lm(target, max_length), tasks, limit)
    if log_mlflow:
        state = saved_train_state(source.iter_dir)
        for name, scores in out.items():
            log_to_run(cfg, state, scores, source.step, prefix="lm_eval" if name == "ours" else "lm_eval_hf")
    return out
