"""Recompute the rollups of a date range from the raw events still kept."""

from __future__ import annotations

from datetime import UTC, datetime

from django.core.management.base import BaseCommand, CommandError

from analytics.retention import rollups_rebuild


def _date(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise CommandError(f"not an ISO date or datetime: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser) -> None:
        parser.add_argument("--since", required=True, help="ISO date/datetime (UTC if naive)")
        parser.add_argument("--until", required=True, help="ISO date/datetime, exclusive")

    def handle(self, *args, since: str, until: str, **opts) -> None:
        start, end = _date(since), _date(until)
        if end <= start:
            raise CommandError("--until must be after --since")
        n = rollups_rebuild(since=start, until=end)
        self.stdout.write(f"rebuilt rollups from {n} raw events")
