"""``package.module:attr`` references: the one place that names an object that way and turns such a name back into
the object.

Why one module: the task registry (built-in tasks registered lazily by module path), experiment files
(``metric: package.module:attr``) and bundles (the manifest's ``program_class``) all use this form. Kept apart, the
parsing and the safety rules drift. Two loaders share one parser:

* :func:`load_reference` for references written in cotune's own code or by the calling program (trusted code);
* :func:`import_reference` for references read from a file (an experiment YAML), which is data that gets shared:
  only installed code, never the current directory, never the standard library.

A bundle's ``program_class`` is never loaded at all (``optimizers.load`` matches it against the classes the caller
allows, by :func:`reference_name`). Why in :mod:`metrics`: it is the lowest package, the only one that ``programs``,
``optimizers`` and ``experiments`` may all import.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["ReferenceImportError", "import_reference", "load_reference", "reference_name"]

_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_ATTR = re.compile(r"[A-Za-z_]\w*(\.\w+)*")


class ReferenceImportError(ValueError):
    """A ``package.module:attr`` reference that cotune will not or cannot import (the message says which and why)."""


def reference_name(obj: Any) -> str:
    """The ``module:qualname`` reference of a class or function (what a bundle records as its ``program_class``).

    Example:
        >>> reference_name(ReferenceImportError)
        'metrics.references:ReferenceImportError'
    """
    return f"{obj.__module__}:{obj.__qualname__}"


def load_reference(spec: str) -> Any:
    """The object a trusted ``package.module:attr`` reference names (imported the ordinary way).

    Use it for references written in code (the task registry's built-in entries), never for ones read from a file:
    those go through :func:`import_reference`.

    Raises:
        ReferenceImportError: a malformed reference, an import error, or a missing attribute.

    Example:
        >>> load_reference("metrics.references:load_reference") is load_reference
        True
    """
    module, attr = _parse(spec)
    try:
        obj = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - a module that fails to import, whatever the reason
        raise ReferenceImportError(f"cannot import {spec!r}: {type(exc).__name__}: {exc}") from exc
    return _attribute(obj, spec, module, attr)


def import_reference(spec: str) -> Any:
    """The object ``package.module:attr`` names, read from a file. Importing it is code execution, as ``import`` in a
    script is.

    Why the limits: an experiment file is data that gets shared, and a reference imports and runs code. So:

    * only importable, installed code is imported (site-packages, the project's editable install, and
      ``$PYTHONPATH``): the current directory, which ``python -m`` and ``python script.py`` put first on
      ``sys.path``, is taken off it while importing, so an ``evil.py`` (or a folder named like a package) lying
      beside a downloaded experiment is never run by naming it; put your own module on ``PYTHONPATH`` or
      ``pip install -e`` it to use it;
    * the standard library is refused: nothing there is a metric, and ``os:system`` or ``builtins:exec``
      would run whatever they are handed.

    Raises:
        ReferenceImportError: a malformed reference, a standard-library module, a module that exists only in
            the current directory, an import error, or a missing attribute.
    """
    module, attr = _parse(spec)
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        raise ReferenceImportError(f"{spec!r} is in the Python standard library, which holds no metrics and "
                                   "whose functions (os:system, builtins:exec, ...) would run arbitrary commands; "
                                   "name a function of your own installed package")
    with _without_current_dir() as current:
        spec_found = _find_top(top)
        if spec_found is None:
            here = importlib.machinery.PathFinder.find_spec(top, [current]) if current else None
            hint = (f"; {top!r} is in the current directory {current}, which cotune never imports from (a file "
                    "beside an experiment is not trusted code): install it (pip install -e) or add its folder to "
                    "PYTHONPATH" if here is not None else "")
            raise ReferenceImportError(f"cannot import {spec!r}: no module named {top!r} among the installed "
                                       f"packages and PYTHONPATH{hint}")
        loaded = sys.modules.get(top)
        if loaded is not None and getattr(loaded, "__file__", None) and spec_found.origin \
                and os.path.realpath(loaded.__file__) != os.path.realpath(spec_found.origin):
            raise ReferenceImportError(f"cannot import {spec!r}: {top!r} was already imported from "
                                       f"{loaded.__file__}, not from the installed packages ({spec_found.origin})")
        try:
            obj: Any = importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - a module that fails to import, whatever the reason
            raise ReferenceImportError(f"cannot import {spec!r}: {type(exc).__name__}: {exc}") from None
    return _attribute(obj, spec, module, attr)


def _parse(spec: str) -> tuple[str, str]:
    module, _, attr = str(spec).partition(":")
    if not _MODULE.fullmatch(module) or not _ATTR.fullmatch(attr):
        raise ReferenceImportError(f"{spec!r} is not a reference of the form 'package.module:name'")
    return module, attr


def _attribute(obj: Any, spec: str, module: str, attr: str) -> Any:
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ReferenceImportError(f"cannot import {spec!r}: {module} has no attribute {part!r}") from None
    return obj


def _find_top(top: str) -> Any:
    """The import spec of top-level module ``top`` as the import system would find it now (sys.modules aside)."""
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        found = find(top, None)
        if found is not None:
            return found
    return None


@contextlib.contextmanager
def _without_current_dir() -> Iterator[str | None]:
    """Take the current directory off ``sys.path`` (unless ``$PYTHONPATH`` names it); yield it (``None``: absent)."""
    cwd = os.path.realpath(os.getcwd())
    explicit = {os.path.realpath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    removed = [(i, p) for i, p in enumerate(sys.path)
               if (p == "" or os.path.realpath(p) == cwd) and cwd not in explicit]
    for _, p in reversed(removed):
        sys.path.remove(p)
    importlib.invalidate_caches()
    try:
        yield cwd
    finally:
        for i, p in removed:
            if p not in sys.path:
                sys.path.insert(min(i, len(sys.path)), p)
