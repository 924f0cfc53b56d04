"""`option`: a dataclass field that must carry help text.

Every configuration dataclass in dialogrl (data builders, evaluation, training
stages) declares its fields with it, so any recipe section can be documented
by `dialogrl recipe keys`. It lives in the lowest layer because all three
layers define recipe sections.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def option(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
           minimum: float | None = None) -> Any:
    """A dataclass field with mandatory, non-empty help text (stored in the field's metadata).

    `minimum`: the smallest value a recipe may set (the recipe loader refuses less, naming the key).
    """
    if not help.strip():
        raise ValueError("every recipe field needs help text")
    metadata = {"help": help} | ({"minimum": minimum} if minimum is not None else {})
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)
