"""Data preparation against the encoder's limit: `mod-prep-data` end-to-end MB/s vs encoding alone.

For each tokenizer (a 32k sentencepiece BPE and a 32k Hugging Face byte-level BPE, trained here on
a slice of the corpus unless given), measured in the same run:

* the limit: the documents already in memory, encoded in this process on one thread, with no
  reading, parsing, IPC or writing; MB/s of input text, times the cores;
* `mod-prep-data` as a user runs it (a fresh process: interpreter start, imports, reading, writing
  the .bin/.idx) with 1, 2, ... worker processes, and for a tokenizer.json also the library's own
  batch encoding on N threads (``--parallel threads``); wall-clock MB/s, % of the limit, peak RSS of
  the main process, and the time to the first encoded chunk (process start-up + until the first
  chunk was written);
* that every worker count gave byte-identical files.

The corpus is given with ``--corpus`` (.jsonl); ``--make-corpus-mb N`` first writes one of N MB
from the docstrings, then the .rst/.md/.txt documentation, of this Python's standard library and
installed packages (deduplicated, in sorted file order; nothing is downloaded).

(Not named ``bench/tokenize.py``: run as a script, that name would shadow the standard library's
``tokenize`` module for every script in bench/.)

Usage::

    python bench/tokenization.py --corpus /tmp/tok_bench/corpus.jsonl --make-corpus-mb 60 \\
        --workers 1 2 --out bench/results/tokenize_cpu.md
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# ----------------------------------------------------------------------------- corpus
def _docstrings(path: Path):
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, RecursionError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 200:
                yield doc


def _text_files(root: Path):
    """Documentation shipped as text (.rst/.md/.txt) under ``root``, one document per file."""
    for path in sorted(p for ext in ("*.rst", "*.md", "*.txt") for p in root.rglob(ext)):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(text) >= 200:
            yield text


def corpus_documents():
    """Docstrings (>= 200 chars) of the stdlib and installed packages, then their text documentation."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            yield from _docstrings(path)
    for root in roots:
        yield from _text_files(root)


def make_corpus(out: Path, megabytes: float) -> None:
    """A .jsonl of the distinct :func:`corpus_documents`, up to ``megabytes``."""
    seen, size, target = set(), 0, int(megabytes * 1e6)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for doc in corpus_documents():
            key = hashlib.md5(doc.encode("utf-8", "replace")).digest()
            if key in seen:
                continue
            seen.add(key)
            line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode("utf-8"))
            if size >= target:
                return
    print(f"note: only {size / 1e6:.1f} MB of documents found", file=sys.stderr)


def slice_corpus(corpus: Path, out: Path, megabytes: float) -> Path:
    if not out.exists():
        budget = int(megabytes * 1e6)
        with open(corpus, "rb") as src, open(out, "wb") as dst:
            for line in src:
                dst.write(line)
                budget -= len(line)
                if budget <= 0:
                    break
    return out


# ----------------------------------------------------------------------------- measurements
@dataclass
class Run:
    tokenizer: str
    mode: str  # "processes" or "threads"
    workers: int
    seconds: float
    mb_per_s: float
    first_chunk_s: float  # since the process started
    max_rss_mb: float  # the main process
    worker_rss_mb: float  # the largest worker (0 when the main process encodes)
    digest: str


def _load_docs(corpus: Path) -> List[str]:
    from data_prep._io import iter_documents

    return list(iter_documents([str(corpus)]))


def encoder_limit(tokenizer: str, docs: List[str], file_bytes_per_text_byte: float) -> Dict[str, float]:
    """MB/s of one process on one thread encoding the in-memory documents, for each way the encoder offers.

    In MB of the corpus file (JSON quoting included) per second, as the end-to-end figures.
    """
    from data_prep.encoders import TokenizerKind, load_encoder

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # this process measures one thread
    enc = load_encoder(tokenizer)
    nbytes = sum(len(d.encode("utf-8")) for d in docs) * file_bytes_per_text_byte
    batch = 1000
    ways = {"batches of 1000": lambda: [enc.encode_batch(docs[i:i + batch]) for i in range(0, len(docs), batch)]}
    if enc.kind is TokenizerKind.HF:
        tok = enc.tok
        ways["encode() per text"] = lambda: [tok.encode(d, add_special_tokens=False).ids for d in docs]
    result = {}
    for name, fn in ways.items():
        t0 = time.perf_counter()
        fn()
        result[name] = nbytes / 1e6 / (time.perf_counter() - t0)
    return result


# The CLI run by a wrapper that reports the peak RSS of the main process and of its largest worker.
_RSS_WRAPPER = """
import resource, sys
from data_prep.tokenize_corpus import main
try:
    rc = main(sys.argv[1:])
finally:
    # VmHWM, not RUSAGE_SELF: the latter keeps the bench's own peak from before the exec.
    own = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"RSS_KB {own} {workers}")
sys.exit(rc)
"""


def run_cli(corpus: Path, tokenizer: str, out_prefix: Path, workers: int, mode: str,
            script: Optional[Path] = None) -> Run:
    """`mod-prep-data` (or ``script``, an older version) in a fresh process; wall time from launch to exit."""
    args = ["-i", str(corpus), "-t", tokenizer, "-o", str(out_prefix), "-w", str(workers), "--no-progress"]
    if script is None:
        args += ["--parallel", mode]
    env = {k: v for k, v in os.environ.items() if k not in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
    env["PYTHONPATH"] = str(REPO)
    wrapper = _RSS_WRAPPER if script is None else _RSS_WRAPPER.replace(
        "from data_prep.tokenize_corpus import main", f"sys.path.insert(0, {str(script.parent)!r}); "
                                                      f"from {script.stem} import main")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", wrapper, *args], cwd=REPO, capture_output=True, text=True,
                       env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"mod-prep-data failed: {' '.join(args)}\n{r.stderr[-3000:]}")
    out = r.stdout
    inside = float(out.split(" in ")[-1].split(" s ")[0])
    first = float(out.split("first chunk after ")[1].split(" s")[0]) if "first chunk after " in out else float("nan")
    main_kb, worker_kb = (int(x) for x in out.split("RSS_KB ")[1].split()[:2])
    h = hashlib.sha256()
    for ext in (".bin", ".idx"):
        h.update(Path(str(out_prefix) + ext).read_bytes())
    size = corpus.stat().st_size
    return Run(tokenizer=tokenizer, mode=mode, workers=workers, seconds=wall, mb_per_s=size / 1e6 / wall,
               first_chunk_s=(wall - inside) + first, max_rss_mb=main_kb / 1024, worker_rss_mb=worker_kb / 1024,
               digest=h.hexdigest()[:12])


def import_seconds() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import data_prep.tokenize_corpus"], cwd=REPO, check=True)
    return time.perf_counter() - t0


def heavy_modules() -> List[str]:
    code = ("import sys, data_prep.tokenize_corpus, data_prep.merge; "
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron'))))")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout.split()


def _seconds(value: float) -> str:
    return "n/a" if value != value else f"{value:.2f}"  # NaN: the version does not report it


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, required=True, help=".jsonl corpus (made first with --make-corpus-mb)")
    p.add_argument("--make-corpus-mb", type=float, default=None, help="write a corpus of this size if missing")
    p.add_argument("--work-dir", type=Path, default=None, help="tokenizers and outputs (default: beside the corpus)")
    p.add_argument("--sp-tokenizer", default=None, help="sentencepiece .model (default: train a 32k BPE here)")
    p.add_argument("--hf-tokenizer", default=None, help="tokenizer.json or its directory (default: train here)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--train-mb", type=float, default=10.0, help="corpus slice the tokenizers are trained on")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--only", nargs="+", default=None, choices=("sentencepiece", "hf-bpe", "converted"),
                   help="measure only these tokenizers (converted: the sentencepiece model as tokenizer.json)")
    p.add_argument("--baseline-script", type=Path, default=None,
                   help="an older tokenize_corpus.py run the same way with the sentencepiece model, e.g. from "
                        "`git show 200d328:data_prep/tokenize_corpus.py` (imports torch and megatron-core)")
    p.add_argument("--out", type=Path, default=None, help="write the results as markdown here")
    a = p.parse_args(argv)

    if not a.corpus.exists():
        if a.make_corpus_mb is None:
            raise SystemExit(f"{a.corpus} does not exist: pass --make-corpus-mb N to create it")
        make_corpus(a.corpus, a.make_corpus_mb)
    work = a.work_dir or a.corpus.parent / "bench_work"
    work.mkdir(parents=True, exist_ok=True)
    corpus_bytes = a.corpus.stat().st_size
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load_before = load_avg()

    from data_prep._io import DataPrepError
    from data_prep.sp_to_hf import write as write_converted
    from data_prep.train_hf_tokenizer import train_hf_bpe
    from data_prep.train_tokenizer import train_tokenizer

    train_slice = slice_corpus(a.corpus, work / "train_slice.jsonl", a.train_mb)
    tokenizers = {}
    sp = a.sp_tokenizer or str(work / "sp32k.model")
    if not Path(sp).exists():
        train_tokenizer([str(train_slice)], sp[: -len(".model")], a.vocab_size, max_sentences=300_000)
    tokenizers["sentencepiece"] = sp
    hf = a.hf_tokenizer or str(work / "hf32k")
    if not Path(hf).exists():
        train_hf_bpe([str(train_slice)], hf, a.vocab_size)
    tokenizers["hf-bpe"] = hf
    converted = work / (Path(sp).stem + "_as_hf")
    try:
        if not converted.exists():
            write_converted(sp, str(converted))
        tokenizers["sentencepiece as tokenizer.json"] = str(converted)
    except DataPrepError as e:
        print(f"the sentencepiece model does not convert: {e}")

    if a.only:
        keep = {"converted": "sentencepiece as tokenizer.json"}
        wanted = {keep.get(k, k) for k in a.only}
        tokenizers = {k: v for k, v in tokenizers.items() if k in wanted}
    # Limits on an evenly spread quarter of the documents, measured before and after the end-to-end
    # runs; the faster of the two counts (the cores are shared: the better figure is the machine's).
    docs = _load_docs(a.corpus)
    ratio = corpus_bytes / sum(len(d.encode("utf-8")) for d in docs)
    sample, n_docs = docs[::4], len(docs)
    del docs
    limits_before = {name: encoder_limit(tok, sample, ratio) for name, tok in tokenizers.items()}
    runs_by = {}
    for name, tok in tokenizers.items():
        modes = [("processes", w) for w in a.workers]
        if name != "sentencepiece":
            modes += [("threads", w) for w in a.workers if w > 1]
        runs_by[name] = [run_cli(a.corpus, tok, work / f"out_{name.replace(' ', '_')}_{m}_{w}", w, m)
                         for m, w in modes]
        if name == "sentencepiece" and a.baseline_script:
            runs_by[name] += [run_cli(a.corpus, tok, work / f"out_baseline_{w}", w, "baseline", a.baseline_script)
                              for w in a.workers]
    limits_after = {name: encoder_limit(tok, sample, ratio) for name, tok in tokenizers.items()}
    rows = []
    for name in tokenizers:
        limits = {k: max(v, limits_after[name][k]) for k, v in limits_before[name].items()}
        limit_1 = max(limits.values())
        runs = runs_by[name]
        identical = len({r.digest for r in runs}) == 1
        if name == "sentencepiece as tokenizer.json":  # the same ids as the model on the whole corpus?
            identical = identical and ("sentencepiece" not in runs_by
                                       or runs[0].digest == runs_by["sentencepiece"][0].digest)
        rows.append((name, limits, limit_1, runs, identical))
        print(f"{name}: limit {limit_1:.2f} MB/s/core (before {limits_before[name]}, after {limits_after[name]}); "
              f"identical outputs: {identical}")
        for r in runs:
            lim = limit_1 * min(r.workers, cores)
            print(f"  {r.mode} x{r.workers}: {r.mb_per_s:.2f} MB/s = {100 * r.mb_per_s / lim:.0f}% of {lim:.2f}; "
                  f"first chunk {r.first_chunk_s:.2f} s; rss main {r.max_rss_mb:.0f} MB, worker "
                  f"{r.worker_rss_mb:.0f} MB")
    imp = import_seconds()
    heavy = heavy_modules()
    load_after = load_avg()
    print(f"start-up (python + import data_prep.tokenize_corpus): {imp:.2f} s; torch/megatron imported: {heavy}")
    print(f"load average before {load_before}, after {load_after}; cores {cores}")

    if a.out:
        lines = [
            "# Data preparation vs the encoder's limit (CPU)",
            "",
            "```bash",
            "python bench/tokenization.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "```",
            "",
            f"Corpus: {a.corpus.name}, {corpus_bytes / 1e6:.1f} MB, {n_docs} documents. Cores: {cores}. "
            f"Load average (1/5/15 min) before: {load_before}, after: {load_after}. Tokenizers: "
            f"{a.vocab_size} ids, trained on the first {a.train_mb:g} MB.",
            "",
            "Limit = documents in memory (every 4th of the corpus) encoded by one process on one thread (no "
            "reading, parsing, IPC or writing), the better of two measurements (before and after the runs), "
            "times the workers (at most the cores). End to end = `mod-prep-data` in a fresh process, "
            "wall clock from launch to exit. First chunk = from launch until the first encoded chunk was written.",
            "",
            "| tokenizer | parallel | workers | MB/s | limit MB/s | % of limit | first chunk (s) | RSS main / worker (MB) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, limits, limit_1, runs, identical in rows:
            for r in runs:
                lim = limit_1 * min(r.workers, cores)
                lines.append(f"| {name} | {r.mode} | {r.workers} | {r.mb_per_s:.2f} | {lim:.2f} | "
                             f"{100 * r.mb_per_s / lim:.0f}% | {_seconds(r.first_chunk_s)} | {r.max_rss_mb:.0f} / {r.worker_rss_mb:.0f} |")
        lines.append("")
        for name, limits, limit_1, runs, identical in rows:
            ways = ", ".join(f"{k}: {v:.2f} MB/s" for k, v in limits.items())
            same = " and to the sentencepiece rows" if name == "sentencepiece as tokenizer.json" else ""
            lines.append(f"- {name}: one thread {ways}; outputs of its rows byte-identical{same}: {identical}.")
        lines.append(f"- Start-up (`python -c 'import data_prep.tokenize_corpus'`): {imp:.2f} s; torch/megatron "
                     f"modules imported by mod-prep-data / mod-prep-merge: {heavy or 'none'}.")
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
