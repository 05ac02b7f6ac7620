"""Fail fast, with a clear message, when weights or data must be downloaded and cannot be.

Every loader that may reach a hub (diffusers/transformers ``from_pretrained`` of a hub id,
torchvision / LPIPS / Inception / open_clip weights, CIFAR-10) checks first with
``require_download(what, host)``: if the files are not cached and the host is unreachable
(or ``HF_HUB_OFFLINE=1``), it raises ``OfflineError`` within seconds instead of hanging in
retries.
"""

from __future__ import annotations

import os
import socket


class OfflineError(RuntimeError):
    """A download was needed and is not possible here."""


def host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def require_download(what: str, host: str = "huggingface.co", hint: str = "") -> None:
    """Raise ``OfflineError`` naming ``what`` when ``host`` cannot be reached (or the HF hub is
    set offline and the host is the hub)."""
    offline_hub = hub_offline() and host.endswith("huggingface.co")
    if offline_hub or not host_reachable(host):
        why = "HF_HUB_OFFLINE is set" if offline_hub else f"{host} is unreachable"
        raise OfflineError(f"{what} is not available locally and cannot be downloaded ({why}). "
                           + (hint or "Download it on a machine with internet access and pass "
                              "its local path instead."))
