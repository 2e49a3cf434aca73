"""Checks the input modules share for their own config sections (``check(raw, key,
base_dir)``): each raises ConfigError naming the full key path (``inputs.exec[0].argv``)."""

from __future__ import annotations

from typing import Any, Dict, Iterable

from ..errors import ConfigError


def mapping(raw: Any, key: str, known: Iterable[str]) -> Dict[str, Any]:
    """``raw`` as a mapping with only ``known`` keys (None: empty)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(key, "must be a mapping")
    names = list(known)
    for name in raw:
        if name not in names:
            raise ConfigError(f"{key}.{name}", f"unknown key (known keys: {', '.join(names)})")
    return dict(raw)


def number(value: Any, key: str, low: float, high: float, integer: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int,) if integer else (int, float)):
        raise ConfigError(key, f"must be {'an integer' if integer else 'a number'}")
    if not low <= value <= high:
        raise ConfigError(key, f"must be between {low:g} and {high:g}, not {value:g}")
    return value if integer else float(value)


def text(value: Any, key: str, max_chars: int = 4096) -> str:
    if not isinstance(value, str) or not value or len(value) > max_chars or "\0" in value:
        raise ConfigError(key, f"must be a string of 1 to {max_chars} characters")
    return value
