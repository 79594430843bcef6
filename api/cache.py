"""A small in-process cache in front of the database for what never changes once written.

Plans are immutable and a plan request's answer is fixed once the probes it needs are stored (the
cache lookup always returns the same plan for the same request and probes), so a response can be
kept by the hash of the request body that produced it. The only way an entry can go stale is a
plan or probe row deleted from the database behind the server's back; restart the API (or call
`clear`) after such manual surgery. Bounded, least recently used first out.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict


def body_key(raw_body: bytes) -> bytes:
    """The cache key of a request body: its BLAKE2b digest (the bytes exactly as sent)."""
    return hashlib.blake2b(raw_body, digest_size=20).digest()


class ResponseCache:
    """Serialized responses by key, at most `max_entries` of them."""

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()
        # Reads come from the event loop, writes also from worker threads.
        self._lock = threading.Lock()

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: bytes, value: bytes) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
