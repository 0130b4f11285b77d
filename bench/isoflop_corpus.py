"""A larger, non-repeating corpus for the CPU isoFLOP miniature (bench/isoflop.py), built offline.

The bundled corpus (data_prep/corpus/, 1.8 MB) is smaller than what a 1e12-FLOP budget reads, so
models would see parts of it twice. This collects the docstrings (module, class, function) of the
Python files installed on this machine -- the interpreter's standard library and the project's
virtualenv (torch, numpy, megatron-core, deepspeed, ...) -- with `ast` (nothing is imported or
executed), one document per docstring headed by its qualified name, in sorted path order. Exact
duplicates (after whitespace normalisation) are dropped, so no document occurs twice; docstrings
shorter than --min-chars are skipped. Stops at --max-mb of text. Not committed: the text is
third-party (each package under its own license) and used only locally for a benchmark.

    .venv/bin/python -P bench/isoflop_corpus.py --out /tmp/isoflop_data/corpus.jsonl --max-mb 8

(-P: this needs no other module of bench/, so keep bench/ off sys.path.)
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Iterator, Tuple


def roots() -> list:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    purelib = Path(sysconfig.get_paths()["purelib"])
    return [stdlib, purelib] if purelib != stdlib else [stdlib]


def python_files(root: Path, skip_site_packages: bool) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts)
        if skip_site_packages and "site-packages" in parts:
            continue
        if parts & {"test", "tests", "testing", "idle_test", "__pycache__"}:
            continue
        yield path


def docstrings(path: Path, module: str) -> Iterator[Tuple[str, str]]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return
    doc = ast.get_docstring(tree)
    if doc:
        yield module, doc
    stack = [(module, tree)]
    while stack:
        prefix, node = stack.pop(0)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    yield name, doc
                if isinstance(child, ast.ClassDef):
                    stack.append((name, child))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--max-mb", type=float, default=8.0)
    p.add_argument("--min-chars", type=int, default=200)
    args = p.parse_args(argv)
    seen, total, docs, dups = set(), 0, 0, 0
    limit = int(args.max_mb * 1e6)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for i, root in enumerate(roots()):
            for path in python_files(root, skip_site_packages=(i == 0)):
                module = ".".join(path.relative_to(root).with_suffix("").parts)
                for name, doc in docstrings(path, module):
                    if len(doc) < args.min_chars:
                        continue
                    key = hashlib.sha1(" ".join(doc.split()).encode()).digest()
                    if key in seen:
                        dups += 1
                        continue
                    seen.add(key)
                    text = f"{name}\n\n{doc}"
                    f.write(json.dumps({"src": name, "text": text}) + "\n")
                    total += len(text.encode())
                    docs += 1
                    if total >= limit:
                        break
                if total >= limit:
                    break
            if total >= limit:
                break
    print(json.dumps({"out": str(out), "documents": docs, "bytes": total, "duplicates_dropped": dups}))
    if total < limit:
        print(f"note: only {total / 1e6:.2f} MB available (asked for {args.max_mb} MB)", file=sys.stderr)


if __name__ == "__main__":
    main()
