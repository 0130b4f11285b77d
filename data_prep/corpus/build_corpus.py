"""Regenerate ``corpus.jsonl``: a small, license-clean English corpus from Python's own documentation.

Sources (both ship with CPython and are under the PSF License Version 2, see LICENSE.md):

* ``pydoc_data.topics``: the plain-text help topics that ``help('assignment')`` shows, generated
  from the Python Language Reference; one document per topic.
* The docstrings of the standard library (modules, classes, functions, methods), one document per
  docstring, headed by its qualified name and signature.

Usage::

    python data_prep/corpus/build_corpus.py [--out data_prep/corpus/corpus.jsonl] [--max-mb 2.4]

The output is deterministic for a given Python build (the bundled file was made with CPython 3.11.7
on Linux); another Python version or platform gives a similar but not identical corpus. Nothing
outside the standard library is read and nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import io
import json
import os
import pkgutil
import re
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

# Importing these opens a browser, prints, needs a display, or is an installer/test harness.
_SKIP_TOP = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip",
    "venv", "pydoc_data", "test", "unittest.test", "ctypes.test", "distutils", "msilib", "winreg",
    "winsound", "nt", "msvcrt", "_winapi",
}
# Packages whose public submodules are walked too (the rest contribute their top-level module only).
_WALK = {
    "asyncio", "collections", "concurrent", "email", "html", "http", "importlib", "json", "logging",
    "multiprocessing", "sqlite3", "unittest", "urllib", "wsgiref", "xml", "xmlrpc", "zoneinfo", "dbm",
    "ctypes", "curses", "os",
}
_MIN_CHARS = 120  # shorter docstrings are mostly one-liners ("Return self+value.")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # object reprs differ between runs: drop them
# Machine-specific paths (install prefix, home) in signatures' defaults: drop those signatures.
_LOCAL = tuple({p for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.expanduser("~")) if len(p) > 1})
# Docstrings carrying their own copyright or license notice are left out, so that everything kept is
# plainly under the PSF license of the Python distribution.
_NOTICE = re.compile(r"copyright|\(c\)|\bGPL|licen[cs]e", re.IGNORECASE)


def _quiet_import(name: str):
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - platform-specific or broken modules are just skipped
            return None


def _module_names() -> List[str]:
    names = []
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in _SKIP_TOP:
            continue
        mod = _quiet_import(top)
        if mod is None:
            continue
        names.append(top)
        if top in _WALK and hasattr(mod, "__path__"):
            for info in pkgutil.walk_packages(mod.__path__, prefix=top + "."):
                parts = info.name.split(".")
                if any(p.startswith("_") or p.startswith("test") for p in parts) or info.name in _SKIP_TOP:
                    continue
                names.append(info.name)
    return sorted(set(names))


def _signature(obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    bad = _ADDRESS.search(sig) or any(p in sig for p in _LOCAL) or len(sig) > 300
    return "" if bad else sig


def _own_doc(obj) -> str:
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _docstrings(modname: str) -> Iterator[Tuple[str, str]]:
    """(qualified name with signature, docstring) for a module and what it defines itself."""
    mod = _quiet_import(modname)
    if mod is None:
        return
    yield modname, _own_doc(mod)
    for name, obj in sorted(vars(mod).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != modname:
            continue
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        yield f"{modname}.{name}{_signature(obj)}", _own_doc(obj)
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                if attr.startswith("_") and attr != "__init__":
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if isinstance(member, property):
                    yield f"{modname}.{name}.{attr}", _own_doc(member)
                elif inspect.isroutine(member):
                    yield f"{modname}.{name}.{attr}{_signature(member)}", _own_doc(member)


def build(max_bytes: int) -> List[Dict[str, str]]:
    from pydoc_data.topics import topics

    docs: List[Dict[str, str]] = []
    seen = set()

    def add(src: str, text: str) -> None:
        text = text.strip()
        if (len(text) < _MIN_CHARS or text in seen or _ADDRESS.search(text) or _NOTICE.search(text)
                or any(p in text for p in _LOCAL)):
            return
        seen.add(text)
        docs.append({"src": src, "text": text})

    for key in sorted(topics):
        add(f"pydoc_data.topics:{key}", topics[key])
    for modname in _module_names():
        for title, doc in _docstrings(modname):
            if doc:
                add(f"docstring:{modname}", f"{title}\n\n{doc}")

    out, size = [], 0
    for d in docs:
        n = len(json.dumps(d, ensure_ascii=False).encode("utf-8")) + 1
        if size + n > max_bytes:
            break
        out.append(d)
        size += n
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).with_name("corpus.jsonl")))
    p.add_argument("--max-mb", type=float, default=2.4, help="stop adding documents at this size (MB)")
    a = p.parse_args(argv)
    docs = build(int(a.max_mb * 1e6))
    tmp = a.out + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    os.replace(tmp, a.out)
    print(f"wrote {a.out}: {len(docs)} documents, {os.path.getsize(a.out) / 1e6:.2f} MB "
          f"(Python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
