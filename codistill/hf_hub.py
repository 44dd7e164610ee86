"""Whether the Hugging Face hub can be reached, asked once with a short timeout.

Its client retries a connection for half a minute and more before it gives up; a job whose model or
tokenizer is neither a local folder nor in the cache should fail in seconds, before Ray starts, not
after. Imports huggingface_hub (installed with transformers) only when called.
"""

from __future__ import annotations

import socket
from urllib.parse import urlparse

__all__ = ["hub_reachable"]


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the hub's endpoint accepts a TCP connection within `timeout_s` (False when HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout_s).close()
    except OSError:
        return False
    return True
