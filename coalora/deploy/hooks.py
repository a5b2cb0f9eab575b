"""Register coalora with transformers when transformers' quantizer registry is imported, not before.

``import coalora`` must stay cheap (``coalora --help`` imports it): importing transformers' quantizer registry
costs seconds (torch and ~30 quantizer modules; measured in benchmarks/deploy.md). So :func:`install` only
puts a finder on ``sys.meta_path`` that, when ``transformers.quantizers.auto`` is imported — which
``from_pretrained`` always does before it looks a quantization method up — runs
``coalora.deploy.hf.register`` right after that module's body. If it is already imported, it registers at once.
The finder looks up nothing itself: it asks the other finders for the module's spec and wraps that spec's
``exec_module``; every other import passes straight through.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

TRIGGER = "transformers.quantizers.auto"


def _register_transformers() -> None:
    from coalora.deploy.hf import register

    register()


class _AfterImport:
    """A ``sys.meta_path`` finder that runs ``callback`` once, right after the module ``name`` has executed.

    (Duck-typed: importing ``importlib.abc`` for the base class would cost more than this whole module.)
    """

    def __init__(self, name: str, callback: Callable[[], None]):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run_body = spec.loader.exec_module

            def exec_module(module):
                run_body(module)
                self._fire()

            spec.loader.exec_module = exec_module  # this module's loader instance only
        return spec

    def _fire(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        try:
            self.callback()
        except Exception:  # a broken registration must not break importing transformers
            import logging

            logging.getLogger(__name__).warning("coalora: could not register the 'coalora' quantization method with transformers",
                        exc_info=True)


def install() -> None:
    """Register now if transformers' registry is imported, else when it is (idempotent)."""
    if TRIGGER in sys.modules:
        _AfterImport(TRIGGER, _register_transformers)._fire()
    elif not any(isinstance(f, _AfterImport) and f.name == TRIGGER for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(TRIGGER, _register_transformers))
