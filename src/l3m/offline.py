"""Offline detection: a hub name on a machine without network fails at once, or loads from the Hugging Face cache.

Without it, each file the hub client asks for is retried with back-off before the "couldn't connect" error: about a
minute for one model on a machine without network. One TCP connection to the hub's endpoint (``HF_ENDPOINT``) per
process decides; when it fails, the process switches to the hub libraries' own offline mode (``HF_HUB_OFFLINE=1``),
in which a cached model or dataset loads and anything else fails with the libraries' "not in the cache" error.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

# a proxy may reach the hub where a direct connection cannot: then the libraries' own requests decide
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def hub_offline() -> bool:
    """Whether the hub libraries are in offline mode (set by the user or by :func:`go_offline_if_hub_unreachable`)."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


def prepare_hub_name(name: str) -> str:
    """``name`` unchanged; when it is not a local path (so a hub id), offline mode is set first if the hub cannot
    be reached (:func:`go_offline_if_hub_unreachable`)."""
    if not os.path.exists(name):
        go_offline_if_hub_unreachable()
    return name


@functools.cache
def go_offline_if_hub_unreachable(timeout: float = 3.0) -> bool:
    """Probe the hub endpoint once per process; if it cannot be reached, turn on offline mode. Returns
    :func:`hub_offline` afterwards.

    Offline mode is set in the environment (for child processes and libraries imported later) and in the already
    imported ``huggingface_hub`` (which ``transformers`` reads) and ``datasets``. Skipped when offline mode is already
    on or a proxy is configured.
    """
    from huggingface_hub import constants

    if hub_offline():
        return True
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return False
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return False
    except OSError as err:
        logger.warning("%s is unreachable (%s): loading from local folders and the Hugging Face cache only "
                       "(HF_HUB_OFFLINE=1)", endpoint.hostname, err)
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True
    return True
