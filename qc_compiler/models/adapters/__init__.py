"""One file per model family; importing this package registers every family in it.

A new family is one more file here (or anywhere, calling ``register_adapter``) and nothing else.
"""
import importlib
import pkgutil

__all__ = []

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
