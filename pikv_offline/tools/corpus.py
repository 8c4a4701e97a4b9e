"""The embedded corpus: real English built at run time from the Python standard library's docstrings.

    python -m pikv_offline.tools.corpus data/generated/corpus.jsonl

Every machine with Python has these texts, so the demo and the tests need no download and the
project ships no copied text. One JSON line per module, class or function docstring
({"text": ...}), in a fixed order; a held-out split is cut by a hash of the text.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import pkgutil
import sys
import warnings

# Modules with long, well-written prose docstrings; all present in every CPython 3.10+.
MODULES = (
    "abc argparse ast asyncio base64 bisect calendar cmd codecs collections colorsys configparser "
    "contextlib copy csv dataclasses datetime decimal difflib dis email enum fileinput fnmatch "
    "fractions ftplib functools getopt gettext glob gzip hashlib heapq hmac html http imaplib "
    "inspect io ipaddress itertools json logging lzma mailbox mimetypes multiprocessing netrc "
    "numbers operator optparse os pathlib pickle pickletools pkgutil platform plistlib poplib "
    "pprint pydoc queue quopri random re reprlib sched secrets selectors shelve shlex shutil "
    "signal smtplib socket socketserver sqlite3 ssl stat statistics string struct subprocess "
    "symtable tarfile tempfile textwrap threading timeit tokenize trace traceback turtle types "
    "typing unittest urllib uuid warnings wave weakref xml zipfile zipimport zoneinfo"
).split()


def _clean(doc: str) -> str:
    return inspect.cleandoc(doc).strip()


def docstrings(min_chars: int = 80) -> list[str]:
    """Unique docstrings of the modules above and their public classes, functions and methods."""
    seen, out = set(), []

    def add(obj):
        doc = getattr(obj, "__doc__", None)
        if isinstance(doc, str):
            text = _clean(doc)
            if len(text) >= min_chars and text not in seen:
                seen.add(text)
                out.append(text)

    def names():
        for name in MODULES:
            yield name
            mod = sys.modules.get(name)
            for sub in sorted(m.name for m in pkgutil.iter_modules(getattr(mod, "__path__", []))):
                if not sub.startswith("_") and "test" not in sub:
                    yield f"{name}.{sub}"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names():
            try:
                mod = importlib.import_module(name)
            except Exception:  # a module missing from a stripped-down Python is skipped
                continue
            add(mod)
            for attr in sorted(vars(mod)):
                if attr.startswith("_"):
                    continue
                obj = getattr(mod, attr)
                if getattr(obj, "__module__", None) != mod.__name__:
                    continue
                add(obj)
                if inspect.isclass(obj):
                    for meth in sorted(vars(obj)):
                        if not meth.startswith("_"):
                            add(getattr(obj, meth, None))
    return out


def is_heldout(text: str, fraction: float = 0.05) -> bool:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def write_corpus(path: str, heldout_path: str | None = None) -> tuple[int, int]:
    """Write train (and optionally held-out) jsonl; returns (train records, held-out records)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    texts = docstrings()
    train = [t for t in texts if not is_heldout(t)]
    held = [t for t in texts if is_heldout(t)]
    for p, rows in ((path, train), (heldout_path, held)):
        if p:
            with open(p, "w") as f:
                for t in rows:
                    f.write(json.dumps({"text": t}) + "\n")
    return len(train), len(held)


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "data/generated/corpus.jsonl"
    held = out.replace(".jsonl", ".heldout.jsonl")
    n, m = write_corpus(out, held)
    print(f"wrote {n} records to {out} and {m} to {held}")
