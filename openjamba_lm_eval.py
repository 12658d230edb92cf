"""Makes plain `lm_eval --model openjamba ...` work: registers openjamba's model in lm_eval's process.

lm_eval 0.4 has no plugin entry points: a model must be registered in the process before lm_eval looks it up. So
setup.py installs `openjamba-lm-eval.pth` into site-packages; its one line runs at every interpreter start-up,
and, only when the command line mentions lm_eval, imports this module and calls `activate()`, which registers
the model as soon as lm_eval itself is imported. Every other Python process pays a string search over
sys.orig_argv and nothing more.

This module is top-level (not inside the `openjamba` package) because importing anything in the package would
import torch: in lm_eval's process it registers a lazy "module:Class" entry, so lm_eval imports openjamba (and
torch) only when `--model openjamba` is actually asked for, and `lm_eval ls tasks` stays as fast as before. It
never raises: a broken openjamba must not break lm_eval for its other models.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Sequence

MODEL_NAME = "openjamba"
TARGET = "openjamba.eval.harness:OpenJambaLM"
CLI_NAMES = ("lm_eval", "lm-eval")
PTH_LINE = ("import sys; 'lm_eval' in str(getattr(sys, 'orig_argv', sys.argv)).replace('-', '_') "
            "and __import__('openjamba_lm_eval').activate()")  # setup.py writes this into openjamba-lm-eval.pth
_OPTIONS_WITH_VALUE = {"-W", "-X", "-Q"}


def is_lm_eval_cli(orig_argv: Sequence[str]) -> bool:
    """Whether the interpreter was started as lm_eval's command: `lm_eval ...`, `lm-eval ...` (console scripts,
    argv [python, .../lm_eval, ...]) or `python [options] -m lm_eval ...`."""
    args = list(orig_argv[1:])
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-m":
            return i + 1 < len(args) and args[i + 1] in ("lm_eval", "lm_eval.__main__")
        if arg.startswith("-m"):
            return arg[2:] in ("lm_eval", "lm_eval.__main__")
        if arg in ("-c", "-"):
            return False
        if not arg.startswith("-"):  # the script
            name = os.path.basename(arg)
            for suffix in (".exe", "-script.py", "-script.pyw", ".py"):
                name = name.removesuffix(suffix)
            return name in CLI_NAMES
        i += 2 if arg in _OPTIONS_WITH_VALUE else 1
    return False


def register() -> None:
    """Register `openjamba` after lm_eval's own models (which lm_eval adds only to an empty registry)."""
    import lm_eval.models  # noqa: F401
    from lm_eval.api import registry

    if hasattr(registry, "model_registry"):  # lm_eval >= 0.4.10: lazy "module:Class" entries
        if MODEL_NAME not in registry.model_registry:
            registry.model_registry.register(MODEL_NAME, target=TARGET)
    else:  # older lm_eval: a plain dict of classes, so import (and register) the class now
        import openjamba.eval.harness  # noqa: F401


def _register_quietly() -> None:
    try:
        register()
    except Exception as error:  # noqa: BLE001 -- never break lm_eval for its other models
        print(f"openjamba: could not register the lm_eval model {MODEL_NAME!r}: {error!r}", file=sys.stderr)


class _AfterLmEvalImport(importlib.abc.MetaPathFinder):
    """Runs the registration right after the `lm_eval` package is first imported.

    At .pth time lm_eval may not be importable yet: site-packages directories are added one by one (user site
    before the system one, a venv's before its base), so the directory holding lm_eval may come after ours.
    The spec may be looked up more than once before the import (runpy does, for `python -m lm_eval`), so this
    finder stays in place until the package actually runs.
    """

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != "lm_eval":
            return None
        spec = None
        for finder in sys.meta_path:  # the spec the other finders give
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_package = spec.loader.exec_module

        def exec_module(module) -> None:
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            run_package(module)
            _register_quietly()

        spec.loader.exec_module = exec_module  # this loader instance serves lm_eval/__init__ only
        return spec


def activate(orig_argv: Sequence[str] | None = None) -> None:
    """Called from the .pth line: in lm_eval's CLI, register openjamba's model once lm_eval is imported."""
    try:
        if not is_lm_eval_cli(sys.orig_argv if orig_argv is None else orig_argv):
            return
        if "lm_eval" in sys.modules:
            _register_quietly()
        elif not any(isinstance(finder, _AfterLmEvalImport) for finder in sys.meta_path):
            sys.meta_path.insert(0, _AfterLmEvalImport())
    except Exception as error:  # noqa: BLE001 -- never break interpreter start-up
        print(f"openjamba: could not prepare the lm_eval model {MODEL_NAME!r}: {error!r}", file=sys.stderr)
