"""The anonymizer: stable placeholders per value (``<EMAIL_1>``) and their restoration."""

import re


_PLACEHOLDER_LABEL_RE = re.compile(r"[^A-Z0-9]+")


def _placeholder_label(label: str) -> str:
    return _PLACEHOLDER_LABEL_RE.sub("_", label.upper()).strip("_") or "VALUE"


_PLACEHOLDER_RE = re.compile(r"<[A-Z0-9_]+>")


_CONTEXT_START_RE = re.compile(r"\s+")


_PARTIAL_PLACEHOLDER_RE = re.compile(r"<[A-Z0-9_]*")


class Anonymizer:
    """Per-request reversible replacement: each distinct value gets a placeholder numbered per
    label (<EMAIL_1>, <EMAIL_2>, <PHONE_1>, ...), and `restore` puts the values back."""
    __slots__ = ("_by_value", "_by_placeholder", "_counts", "_max_len")

    def __init__(self) -> None:
        self._by_value: dict[tuple[str, str], str] = {}
        self._by_placeholder: dict[str, str] = {}
        self._counts: dict[str, int] = {}
        self._max_len = 0

    def placeholder(self, label: str, value: str) -> str:
        label = _placeholder_label(label)
        key = (label, value)
        ph = self._by_value.get(key)
        if ph is None:
            n = self._counts.get(label, 0) + 1
            self._counts[label] = n
            ph = f"<{label}_{n}>"
            self._by_value[key] = ph
            self._by_placeholder[ph] = value
            self._max_len = max(self._max_len, len(ph))
        return ph

    def restore(self, text: str) -> str:
        if not self._by_placeholder or "<" not in text:
            return text
        values = self._by_placeholder
        return _PLACEHOLDER_RE.sub(lambda m: values.get(m.group(), m.group()), text)

    @property
    def max_placeholder_len(self) -> int:
        return self._max_len
