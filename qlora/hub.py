"""One quick look at the Hugging Face hub before anything asks it for files.

huggingface_hub retries a failed connection five times with back-off, about 50 s, before the
one-line error. When a config names a hub id and the hub cannot be reached, this process switches
to offline mode instead: cached files load at once, and missing ones fail at once."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


def is_hub_id(source: str | None) -> bool:
    """"owner/name" that is not a local path."""
    return bool(source) and source.count("/") == 1 and not source.startswith((".", "/")) and not Path(source).exists()


def offline_unless_reachable(sources: list[str | None]) -> None:
    """Probe the hub's endpoint when one of `sources` is a hub id; unreachable: offline mode."""
    if os.environ.get("HF_HUB_OFFLINE") or not any(is_hub_id(s) for s in sources):
        return
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        print(f"hub: {endpoint.hostname} cannot be reached ({e.strerror or e}); using only files already "
              f"in the local cache (HF_HUB_OFFLINE=1)", file=sys.stderr)
        os.environ["HF_HUB_OFFLINE"] = "1"
        for module in ("huggingface_hub.constants", "datasets.config"):  # already imported: read at import
            if module in sys.modules:
                sys.modules[module].HF_HUB_OFFLINE = True
