"""Tables that fit the terminal: a cell too wide for its column wraps onto the next line
instead of being cut (`transformer.h.1` never becomes `transf…` on an 80-column terminal)."""

from __future__ import annotations

from typing import Any

from rich.table import Table as _RichTable


class Table(_RichTable):
    def add_column(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("overflow", "fold")
        super().add_column(*args, **kwargs)
