"""Classes named by import path ("my_pkg.losses:Align"): how objectives and evaluators from outside vlpt
come in without a fork."""
from __future__ import annotations

import importlib


def import_class(path: str, base: type, what: str) -> type:
    """"package.module:Class" -> the class, which must subclass `base`; ValueError says what is wrong."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import module '{module_name}' for {what} '{path}' ({err}); "
                         f"is it installed or on PYTHONPATH?") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"'{path}' is not a {base.__module__}.{base.__name__} subclass")
    return cls
