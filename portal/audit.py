from __future__ import annotations

from typing import Any

from portal.models import AuditEvent


def audit_record(*, actor, action: str, target: object, **detail: Any) -> None:
    """Write one audit row; call inside the action's transaction."""
    if actor is not None and not getattr(actor, "is_authenticated", False):
        actor = None
    AuditEvent.objects.create(actor=actor, action=action, target=str(target)[:200], detail=detail)
