"""Credentials: a filesystem's secrets stay in process memory; never in what Ray keeps or spills.

A ``pyarrow.fs`` filesystem pickles with its options, and an ``S3FileSystem`` (or
``GcsFileSystem``, ``AzureFileSystem``) built with explicit keys pickles its secret with them.
Anything ray_ckpt hands to Ray may outlive the call: an actor's constructor arguments are kept
by the GCS (for a detached actor, for the cluster's life, and in Redis with GCS fault
tolerance), and a task argument over ~100 KiB goes to the object store, shared memory that Ray
may spill to files under its session directory. So the secrets are split off:

* A :class:`~ray_ckpt.storage.storage.Storage` pickles its filesystem as a :class:`FilesystemSpec`,
  the filesystem's options *without* its secret fields plus a random ``secret_id``. That is all
  that crosses in a ``SaveRequest``, a ``write_bucket`` call or the barrier actor's constructor.
* The secrets themselves cross as a :class:`Handoff`, always the *first* argument of an actor
  call (``write_bucket``, ``run_save``, the barrier's ``arrive``). It is a few hundred bytes, and
  Ray inlines the first small arguments of a call into the call's RPC (under
  ``max_direct_call_object_size``, 100 KiB, while the inlined total is under 10 MiB): it never
  enters the object store, and an actor method call is not recorded in the GCS.
* The receiving actor puts the secrets into this module's process-local registry
  (:func:`accept`); the spec is turned back into a filesystem only when the storage is first
  used (:func:`rebuild`), from the registry. Nothing writes them anywhere.

A filesystem without explicit secrets (credentials from the environment, an instance profile or
role, a credentials file) pickles unchanged: each process resolves its own credentials where it
runs. A URI's user-info (``s3://KEY:SECRET@bucket``) is never printed: :func:`redact`.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from ..errors import StorageError

# Option names of pyarrow filesystems (their ``__reduce__`` keyword arguments) that are secret.
SECRET_FIELDS = frozenset(
    {"access_key", "secret_key", "session_token", "access_token", "account_key",
     "client_secret", "sas_token", "password"}
)
_PROXY_FIELD = "proxy_options"
# how many credentials (and rebuilt filesystems) one process keeps, newest used first
_REGISTRY_SIZE = 64

_lock = threading.Lock()
_registry: OrderedDict[str, dict[str, Any]] = OrderedDict()
_rebuilt: OrderedDict[str, pafs.FileSystem] = OrderedDict()

# scheme://, then anything up to the last "@" before a space or quote: a secret with a raw "/"
# (an unencoded AWS key) is hidden too, at the cost of hiding a path that holds an "@"
_USERINFO_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^\s'\"]*@")


def redact(text: str) -> str:
    """``text`` with the user-info of every URI in it replaced by ``***``
    (``s3://AK:SK@bucket/x`` -> ``s3://***@bucket/x``)."""
    return _USERINFO_RE.sub(r"\1***@", text)


class Handoff:
    """The secrets of one filesystem, on their way to the actors that use it. Pass it as the
    first argument of an actor call, never inside another object; its repr shows no secret."""

    __slots__ = ("_secrets", "secret_id")

    def __init__(self, secret_id: str, secret_fields: dict[str, Any]) -> None:
        self.secret_id = secret_id
        self._secrets = secret_fields

    def __repr__(self) -> str:
        return f"Handoff({self.secret_id}, {sorted(self._secrets)} redacted)"

    def __reduce__(self) -> tuple[Any, ...]:
        return Handoff, (self.secret_id, self._secrets)


@dataclass(frozen=True)
class FilesystemSpec:
    """A filesystem without its secrets: what a pickled :class:`~ray_ckpt.storage.storage.Storage`
    holds. ``secret_id`` names the secrets in the registry; None when there are none."""

    reconstruct: Callable[..., pafs.FileSystem]
    options: dict[str, Any]
    secret_id: str | None = None
    subtree_base: str | None = None  # a SubTreeFileSystem over the filesystem ``options`` build
    plain: pafs.FileSystem | None = None  # a filesystem without explicit secrets, as it is

    def __repr__(self) -> str:
        return f"FilesystemSpec({self.secret_id or 'no secrets'})"


def split(fs: pafs.FileSystem) -> tuple[FilesystemSpec, Handoff | None]:
    """``fs`` as a spec without secrets, and the secrets (None when it holds none). The secrets
    are registered in this process, so that :func:`handoff_for` finds them again."""
    if isinstance(fs, pafs.SubTreeFileSystem):
        inner, handoff = split(fs.base_fs)
        if handoff is None:
            return FilesystemSpec(_identity, {}, plain=fs), None
        return FilesystemSpec(
            inner.reconstruct, inner.options, inner.secret_id, subtree_base=fs.base_path
        ), handoff
    options, found = _secret_options(fs)
    if options is None or not found:
        return FilesystemSpec(_identity, {}, plain=fs), None
    reconstruct = fs.__reduce__()[0]
    secret_id = secrets.token_hex(12)
    handoff = Handoff(secret_id, found)
    accept(handoff)
    _remember(secret_id, fs)
    return FilesystemSpec(reconstruct, options, secret_id), handoff


def _identity(**_: Any) -> pafs.FileSystem:  # pragma: no cover - never called
    raise AssertionError("a plain FilesystemSpec is not rebuilt")


def _secret_options(fs: Any) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The keyword options ``fs`` pickles with, less its non-empty secrets; and the secrets.
    (None, {}) for a filesystem that does not pickle as ``reconstruct(options)``."""
    try:
        reduced = fs.__reduce__()
    except Exception:  # noqa: BLE001 - an unpicklable filesystem is refused by Ray itself
        return None, {}
    args = reduced[1] if isinstance(reduced, tuple) and len(reduced) >= 2 else None
    if not (isinstance(args, tuple) and len(args) == 1 and isinstance(args[0], dict)):
        return None, {}
    options = dict(args[0])
    found = {k: options.pop(k) for k in list(options) if k in SECRET_FIELDS and options[k]}
    proxy = options.get(_PROXY_FIELD)
    if isinstance(proxy, dict) and proxy.get("password"):
        options[_PROXY_FIELD] = {**proxy, "password": ""}
        found[_PROXY_FIELD] = proxy
    return options, found


def accept(handoff: Handoff | None) -> None:
    """Keep ``handoff``'s secrets in this process (the newest ``_REGISTRY_SIZE`` of them)."""
    if handoff is None:
        return
    with _lock:
        _registry[handoff.secret_id] = handoff._secrets
        _registry.move_to_end(handoff.secret_id)
        while len(_registry) > _REGISTRY_SIZE:
            gone, _ = _registry.popitem(last=False)
            _rebuilt.pop(gone, None)


def handoff_for(spec: FilesystemSpec | None) -> Handoff | None:
    """The secrets ``spec`` needs, from this process's registry (None when it needs none)."""
    if spec is None or spec.secret_id is None:
        return None
    with _lock:
        found = _registry.get(spec.secret_id)
    if found is None:
        raise _missing(spec)
    return Handoff(spec.secret_id, found)


def rebuild(spec: FilesystemSpec) -> pafs.FileSystem:
    """The filesystem ``spec`` describes, with its secrets from this process's registry."""
    if spec.plain is not None:
        return spec.plain
    assert spec.secret_id is not None
    with _lock:
        fs = _rebuilt.get(spec.secret_id)
        found = _registry.get(spec.secret_id)
    if fs is None:
        if found is None:
            raise _missing(spec)
        options = dict(spec.options)
        options.update(found)
        fs = spec.reconstruct(options)
        _remember(spec.secret_id, fs)
    if spec.subtree_base is not None:
        return pafs.SubTreeFileSystem(spec.subtree_base, fs)
    return fs


def _remember(secret_id: str, fs: pafs.FileSystem) -> None:
    with _lock:
        _rebuilt[secret_id] = fs
        while len(_rebuilt) > _REGISTRY_SIZE:
            _rebuilt.popitem(last=False)


def _missing(spec: FilesystemSpec) -> StorageError:
    return StorageError(
        f"the credentials of a filesystem ({spec.secret_id}) were not handed to this process: "
        "ray_ckpt passes explicit keys only as the first argument of its own actor calls. Fix: "
        "use the storage through a checkpointer, or give every node credentials of its own "
        "(environment, instance profile or role) instead of access_key=/secret_key=."
    )
