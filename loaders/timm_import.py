"""Import ``timm`` for parity tests and peer benchmarks where torchvision is absent or broken.

timm imports torchvision at module level, yet its ViT code never calls it. When torchvision cannot be
found, ``import_timm()`` puts a stand-in package on ``sys.meta_path`` for the duration of the import only:
every attribute of a stand-in module is a do-nothing class, and ``InterpolationMode`` is an enum of
torchvision's names. A real torchvision, when installed, is used as is.
"""

from __future__ import annotations

import enum
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types


class _StandInModule(types.ModuleType):
    def __init__(self, name):
        super().__init__(name)
        self.__path__ = []

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        if attr == "InterpolationMode":
            return enum.Enum("InterpolationMode", "NEAREST NEAREST_EXACT BILINEAR BICUBIC BOX HAMMING LANCZOS")
        return type(attr, (), {"__init__": lambda self, *a, **k: None})


class _StandInTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StandInModule(spec.name)

    def exec_module(self, module):
        pass


def timm_available() -> bool:
    """True when both torch and timm are installed (the test extra has both)."""
    return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("timm") is not None


def import_timm():
    """Return the ``timm`` module, standing in for torchvision while it imports if torchvision is missing."""
    stand_in = None
    if importlib.util.find_spec("torchvision") is None:
        stand_in = _StandInTorchvision()
        sys.meta_path.insert(0, stand_in)
    try:
        import timm
    finally:
        if stand_in is not None:
            sys.meta_path.remove(stand_in)
    return timm
