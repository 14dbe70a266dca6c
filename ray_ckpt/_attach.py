"""Attaching this process to a running Ray cluster by address, failing fast where none answers.

``ray.init(address=...)`` waits without end for a cluster that is not there (measured here: a
``ray-ckpt ls mem://run`` with a stale ``RAY_ADDRESS`` still waited after 4 minutes): an address
left over from a cluster that has stopped, in ``RAY_ADDRESS`` or in the file a ``ray start``
leaves under the Ray temp directory. :func:`attach` first opens a TCP connection to the
cluster's address and, when none opens, refuses with :class:`RayUnreachableError`, which names
the address and where it came from.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

import ray

from .errors import RayUnreachableError

PROBE_SECS = 5.0  # a cluster's GCS accepts a connection at once; a stopped one refuses at once


def attach(address: str, source: str, **init_kwargs: Any) -> None:
    """``ray.init(address=address, **init_kwargs)`` for ``address`` ``host:port`` or ``"auto"``
    (``RAY_ADDRESS``, else the last ``ray start`` on this machine); ``source`` says where the
    address came from, for the error. Other addresses (``ray://`` for Ray Client) go to Ray
    unchecked."""
    if address == "auto":
        address, source = _auto()
    if address != "auto":
        if "://" not in address:
            _probe(address, source)
        ray.init(address=address, **init_kwargs)
        return
    try:  # no address anywhere: Ray looks for a cluster's processes on this node
        ray.init(address="auto", **init_kwargs)
    except ConnectionError as e:
        raise RayUnreachableError(f"no running Ray cluster found: {e} Start one (`ray start "
                                  "--head`), or set RAY_ADDRESS to a running one's address") from e


def _auto() -> tuple[str, str]:
    """Where ``ray.init(address="auto")`` looks first, as (address, its source)."""
    if (os.environ.get("RAY_ADDRESS") or "auto") != "auto":
        return os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    temp = os.environ.get("RAY_TMPDIR") or (
        os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None) or "/tmp"
    file = os.path.join(temp, "ray", "ray_current_cluster")
    try:
        with open(file) as f:
            return f.read().strip(), f"the address of the last `ray start` on this node, in {file}"
    except FileNotFoundError:
        return "auto", "Ray's search for a running cluster"


def _probe(address: str, source: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return  # not host:port: Ray says what is wrong with it
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECS).close()
    except OSError as e:
        raise RayUnreachableError(
            f"no Ray cluster answers at {address} ({source}): {e}. Start the cluster (`ray "
            "start --head`), or point RAY_ADDRESS at a running one (the address `ray start "
            "--head` printed)"
        ) from None
