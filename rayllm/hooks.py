"""User functions named in configs: "module:function" (an importable module) or
"path/to/file.py:function". Used for data filters, rule-based rewards and ground-truth scorers;
a hook that cannot be loaded fails when the run starts, naming it, not midway through."""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path


class HookError(ValueError):
    """A hook that cannot be loaded; the message names it."""


@lru_cache(maxsize=None)
def load_hook(spec: str, what: str = "hook", error: type[HookError] = HookError) -> Callable:
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise error(f"{what} {spec!r}: expected 'module:function' or 'file.py:function'")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise error(f"{what} {spec!r}: no file {target}")
            mod_spec = importlib.util.spec_from_file_location(f"rayllm_hook_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except HookError:
        raise
    except Exception as e:  # noqa: BLE001 - any import failure, named
        raise error(f"{what} {spec!r}: cannot import {target} ({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise error(f"{what} {spec!r}: {target} has no function {name!r}")
    return fn
