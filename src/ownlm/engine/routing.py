"""Which personal model answers each user: the store's routing table, followed by both personal engines
(torch: engine/personal.py, llama.cpp: engine/llama.py).

Hot deploy, and what keeps it from ever answering with a stale or another user's model:
- An install or rollback in this process (the deploy/rollback routes, the learning loop) calls `refresh`
  before it returns, so the next request is served by the new routes.
- Another process on the same home (`ownlm deploy`, `ownlm rollback` in a shell) changes the table behind the
  engine's back. Every generation therefore compares the stored table with the served one as it starts (one
  indexed read) and refreshes first when they differ, and `watch` polls it in the background so that new
  models are usually loaded before anyone asks.
- A stream is routed when its generation starts, with the engine lock held (`route`), never when it was
  asked for: a refresh swaps routes and loaded models together under that lock, so the route a generation
  reads always names a model that is loaded, and it is the newest one.
"""

from __future__ import annotations

import logging
import threading
import traceback

from ownlm.engine.base import GenerationStream

log = logging.getLogger(__name__)

Route = tuple[str, str] | None  # (user id, model id); None: the base


class RoutedEngine:
    """Mixin for an engine that serves each user their routed model. The engine sets `store`, `_routes` (what it
    serves now) and `_refresh_lock` (a threading.RLock), and implements `refresh`."""

    store: object
    _routes: dict[str, Route]
    _refresh_lock: threading.RLock
    _unloadable: dict[str, Route] | None = None  # stored routes whose refresh failed (not retried per request)

    def refresh(self, user_id: str | None = None) -> None:
        """Re-read the routing table (all users) and serve it from the next generation on."""
        raise NotImplementedError

    def _stored_routes(self) -> dict[str, Route]:
        """{user id: (user id, model id) or None} as the store's routing table says now."""
        return {uid: (uid, mid) if mid else None for uid, mid in self.store.query("SELECT user_id, model_id FROM routing")}

    def refresh_if_changed(self) -> bool:
        """Refresh when the stored routing differs from what this engine serves; True if it did."""
        if self._stored_routes() == self._routes:
            return False
        with self._refresh_lock:
            if self._stored_routes() == self._routes:  # another thread refreshed while this one waited
                return False
            self.refresh()
        self._unloadable = None
        return True

    def follow_store(self) -> None:
        """At the start of a generation: serve the stored routes if they changed (an install by another process).
        A model that fails to load keeps the old routes (logged); the same failing table is then left to `watch`
        rather than retried by every request."""
        stored = self._stored_routes()
        if stored == self._routes or stored == self._unloadable:
            return
        try:
            self.refresh_if_changed()
        except Exception:
            self._unloadable = stored
            log.warning("routing refresh failed; serving the previous routes: %s", traceback.format_exc())

    def watch(self, every: float = 1.0) -> threading.Event:
        """Poll the routing table every `every` seconds in a daemon thread; set the returned event to stop it."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(every):
                try:
                    self.refresh_if_changed()
                except Exception:  # a model that fails to load keeps the old routes; say so, try again later
                    log.warning("routing refresh failed: %s", traceback.format_exc())

        threading.Thread(target=loop, daemon=True, name="ownlm-routing-watch").start()
        return stop

    def model_for(self, user_id: str | None, use: str = "personal") -> Route:
        """The (user id, model id) that answers `user_id` now (None: the base)."""
        return None if use == "base" or user_id is None else self._routes.get(user_id)

    def addressed(self, stream: GenerationStream, user_id: str | None, use: str) -> GenerationStream:
        """Mark `stream` as asked by `user_id` for `use` ('personal' or 'base'); model_id is the route as of now,
        final once `route` has run."""
        stream.user_id, stream.use = user_id, use
        stream.model_id = self.model_for(user_id, use)
        return stream

    def route(self, stream: GenerationStream) -> Route:
        """With the engine lock held, as the generation starts: the model that answers `stream` (see module doc)."""
        stream.model_id = self.model_for(stream.user_id, stream.use)
        return stream.model_id
