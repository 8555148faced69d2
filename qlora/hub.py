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

from qlora.config import Config

PROBE_TIMEOUT_S = 3.0
TRUE = {"1", "ON", "YES", "TRUE"}  # how huggingface_hub reads HF_HUB_OFFLINE
PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def is_hub_id(source: str | None) -> bool:
    """"owner/name" that is neither a local path nor a data file's name."""
    return (bool(source) and source.count("/") == 1 and not source.startswith((".", "/"))
            and Path(source).suffix not in (".json", ".jsonl") and not Path(source).exists())


def offline_unless_reachable(cfg: Config) -> None:
    """Probe the hub's endpoint when the config names a hub id; unreachable: offline mode. Behind
    a proxy (which a plain socket would bypass) the probe is left to huggingface_hub itself."""
    sources = [cfg.model.name, cfg.model.arch, cfg.model.tokenizer, cfg.data.source, cfg.eval.source]
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE
    if offline or any(os.environ.get(p) for p in PROXIES) or not any(is_hub_id(s) for s in sources):
        return
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    if not endpoint.hostname:
        return
    try:
        port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
        socket.create_connection((endpoint.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        print(f"hub: {endpoint.hostname} cannot be reached ({e.strerror or e}); using only files already "
              f"in the local cache (HF_HUB_OFFLINE=1)", file=sys.stderr)
        os.environ["HF_HUB_OFFLINE"] = "1"
        for module in ("huggingface_hub.constants", "datasets.config"):  # already imported: read at import
            if module in sys.modules:
                sys.modules[module].HF_HUB_OFFLINE = True
