"""Config versions: every change the data plane must see bumps one, in the same transaction."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from django.db import transaction
from django.db.models import F

from gateway.models import ConfigState, ConfigVersion

# What a change to one object can alter in the gateways' snapshot: per model, a function
# giving the API keys whose snapshot entries depend on the object as the database has it (a
# key delta), or None (a rebuild: structural, or something only a rebuild reloads). Apps
# register theirs in ready(); a model without one is structural.
_SCOPES: dict[type, Callable[[object], Iterable[str] | None]] = {}


def register_scope(model: type, scope: Callable[[object], Iterable[str] | None]) -> None:
    _SCOPES[model] = scope


def change_scope(obj) -> set[str] | None:
    """The keys a change to `obj` (as stored now) can alter; None: a rebuild."""
    scope = _SCOPES.get(obj._meta.concrete_model)
    if scope is None:
        return None
    keys = scope(obj)
    return None if keys is None else set(keys)


def stored_scope(obj) -> set[str] | None:
    """change_scope of `obj` as the database still has it, before a change is written (the
    keys it reaches may be others after: a consumer moved, an external id dropped)."""
    model = obj._meta.concrete_model
    if model not in _SCOPES:
        return None
    if obj.pk is None:
        return set()
    stored = model._default_manager.filter(pk=obj.pk).first()
    return set() if stored is None else change_scope(stored)


def config_lock() -> None:
    """Take the config row's lock now, held until commit (config_bump takes it anyway). Call
    it before reading which keys a change reaches: on PostgreSQL those reads then see every
    change committed before (a key issued meanwhile for a user being deactivated), and a
    concurrent change's own bump waits for this transaction, so no key falls between two
    deltas."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("config_lock() must run inside the transaction that makes the change")
    if not ConfigState.objects.filter(pk=1).update(version=F("version")):
        ConfigState.objects.get_or_create(pk=1, defaults={"version": 0})


def merge_scopes(*scopes: set[str] | None) -> set[str] | None:
    """The keys of several scopes; None (a rebuild) if any of them is."""
    out: set[str] = set()
    for scope in scopes:
        if scope is None:
            return None
        out |= scope
    return out


def config_bump(*, actor=None, reason: str, key_ids: Iterable[str] | None = None) -> int:
    """Record a new config version inside the caller's transaction; return its number.

    Gateway workers poll the latest version and rebuild their snapshot when it moves, so the
    change becomes visible exactly when (and only if) the caller's transaction commits.
    `key_ids`: the change touched only these API keys (a delta the gateways apply without a
    rebuild); None: anything else.
    """
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("config_bump() must run inside the transaction that made the change")
    # The UPDATE takes the row lock until commit: bumps are serialised (see ConfigState).
    if not ConfigState.objects.filter(pk=1).update(version=F("version") + 1):
        ConfigState.objects.get_or_create(pk=1, defaults={"version": 0})
        ConfigState.objects.filter(pk=1).update(version=F("version") + 1)
    version = ConfigState.objects.values_list("version", flat=True).get(pk=1)
    if actor is not None and not getattr(actor, "is_authenticated", False):
        actor = None
    row = ConfigVersion.objects.create(
        version=version,
        actor=actor,
        reason=reason[:200],
        key_ids=sorted(set(key_ids)) if key_ids is not None else None,
    )
    if key_ids is None:  # structural: keep the configuration it made, for rollbacks
        from gateway.declarative import record_document

        record_document(row)
    transaction.on_commit(lambda: _publish(version))
    return version


CONFIG_CHANNEL = "apigw:config"


def _publish(version: int) -> None:
    """Tell every gateway worker at once (they also poll, so a lost message only delays)."""
    from django.conf import settings

    if not settings.REDIS_URL:
        return
    import redis

    try:
        client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=0.5)
        try:
            client.publish(CONFIG_CHANNEL, str(version))
        finally:
            client.close()
    except redis.RedisError as exc:
        logging.getLogger("gateway.config").warning("config publish failed: %s", exc)


def config_current_version() -> int:
    """The current config version number, 0 before the first change."""
    return ConfigState.objects.filter(pk=1).values_list("version", flat=True).first() or 0


def config_current_stamp() -> tuple[str, int]:
    """(epoch, version): what a gateway compares to know whether its snapshot is current."""
    row = ConfigState.objects.filter(pk=1).values_list("epoch", "version").first()
    return (str(row[0]), row[1]) if row else ("", 0)


def config_changes(since: int, until: int) -> tuple[set[str], bool] | None:
    """The key ids changed by the key-only versions since < v <= until, and whether any
    version in between was structural; None if history is missing (rebuild)."""
    rows = list(
        ConfigVersion.objects.filter(version__gt=since, version__lte=until).values_list(
            "key_ids", flat=True
        )
    )
    if len(rows) != until - since:
        return None
    return {k for r in rows if r is not None for k in r}, any(r is None for r in rows)


def is_database_error(exc: BaseException) -> bool:
    """Did a config read fail because the database is unreachable or unusable (retry at the
    poll interval), rather than because the configuration itself is bad?"""
    from django.db import DatabaseError, InterfaceError, OperationalError

    return isinstance(exc, OperationalError | InterfaceError | ConnectionError | TimeoutError) or (
        type(exc) is DatabaseError  # e.g. SQLite's "file is not a database"
    )
