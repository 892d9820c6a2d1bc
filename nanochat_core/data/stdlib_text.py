"""Real English that is present wherever Python is: the standard library's docstrings.

Tests and benchmarks that must run with nothing fetched train on these (the sample corpus needs
package files; DESIGN.md §8). About 2 MB of text from a few thousand documents.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
import warnings

# Modules that open windows, print on import or are not library code.
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}


@functools.cache
def stdlib_docs(min_chars: int = 200) -> tuple[str, ...]:
    """Every distinct docstring of at least `min_chars` characters, in a fixed order."""
    docs = []
    with warnings.catch_warnings():  # deprecated modules warn on import
        warnings.simplefilter("ignore")
        for name in sorted(sys.stdlib_module_names):
            if name.startswith("_") or name in SKIP:
                continue
            try:
                module = importlib.import_module(name)
            except Exception:
                continue
            for obj in [module] + [getattr(module, a, None) for a in sorted(dir(module))]:
                doc = inspect.getdoc(obj) if obj is not None else None
                if doc and len(doc) >= min_chars:
                    docs.append(doc)
    return tuple(dict.fromkeys(docs))
