"""Images that stop loading during a run: which ones failed and which readable image stands in for each."""

from __future__ import annotations

import threading

from .scan import DatasetError


class StandIns:
    def __init__(self, items):
        self.items = items
        self.unreadable: dict[int, str] = {}  # item -> why it failed
        self._chosen: dict[int, int] = {}
        self._lock = threading.Lock()  # the loader's worker threads report failures concurrently

    def source_item(self, item_index: int) -> int:
        """The item whose image and caption stand for `item_index`: itself, or, once its image failed to load, the next
        item (in dataset order, wrapping) whose image still loads. That depends only on which files are readable, so a
        resumed run makes the same choice."""
        with self._lock:
            if item_index not in self.unreadable:
                return item_index
            cached = self._chosen.get(item_index)
            if cached is not None and cached not in self.unreadable:
                return cached
            n = len(self.items)
            for step in range(1, n):
                j = (item_index + step) % n
                if j not in self.unreadable:
                    self._chosen[item_index] = j
                    return j
        listed = "; ".join(f"{self.items[i].path.name}: {why}" for i, why in list(self.unreadable.items())[:3])
        raise DatasetError(f"No readable images left: every image of the dataset failed to load during training ({listed}). "
                           "Check the dataset folder (a disk or network share that went away?) and resume.")

    def mark(self, item_index: int, reason: str) -> bool:
        """Record that the item's image failed; False when it was already known."""
        with self._lock:
            if item_index in self.unreadable:
                return False
            self.unreadable[item_index] = reason
            return True
