"""What changed between what something stored was made from and what is asked for now.

The one diff behind every staleness check: a prepared set's cache key (``cache miss: max_length 512 →
256``), a finished run's or a checkpoint's training identity (``train.learning_rate``), and a
comparison report's inputs. Values are compared as JSON-like data (mappings, lists, scalars).
"""

from __future__ import annotations

from typing import Any, List, Mapping, Tuple

Difference = Tuple[Tuple[str, ...], Any, Any]  # (path of keys, stored value, current value)


def differences(stored: Any, current: Any, depth: int = 2) -> List[Difference]:
    """Each differing field as ``(path, stored value, current value)``, in sorted key order.

    Mappings are compared entry by entry down to ``depth`` levels of keys (a missing key reads as
    None); below that, and wherever either side is not a mapping, values are compared whole.
    ``depth=0`` compares the two values whole (one difference, or none).
    """
    found: List[Difference] = []

    def walk(path: Tuple[str, ...], old: Any, new: Any) -> None:
        if old == new:
            return
        if len(path) < depth and isinstance(old, Mapping) and isinstance(new, Mapping):
            for key in sorted(set(old) | set(new), key=str):
                walk(path + (str(key),), old.get(key), new.get(key))
        else:
            found.append((path, old, new))

    walk((), stored, current)
    return found


def show(value: Any) -> str:
    """A value for a message: long hex digests shortened, strings unquoted, long values cut."""
    import json

    if value is None:
        return "(none)"
    if isinstance(value, str):
        if len(value) >= 32 and all(c in "0123456789abcdef" for c in value):
            return value[:8] + "…"
        return value if len(value) <= 60 else value[:57] + "…"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
        return text if len(text) <= 60 else text[:57] + "…"
    return str(value)


def describe(stored: Mapping[str, Any], current: Mapping[str, Any], depth: int = 2, sep: str = " ") -> List[str]:
    """One ``"field old → new"`` line per difference, the path joined with ``sep``
    (``"model_weights model.safetensors a1b2c3d4… → c3d4e5f6…"``)."""
    return [f"{sep.join(path)} {show(old)} → {show(new)}" for path, old, new in differences(stored, current, depth)]
