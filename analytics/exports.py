"""CSV exports of rollups, streamed: memory stays flat whatever the range."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from datetime import datetime

from django.http import StreamingHttpResponse

HEADER = (
    "bucket",
    "dimension",
    "id",
    "api_id",
    "status_class",
    "requests",
    "gateway_errors",
    "bytes_in",
    "bytes_out",
    "latency_ms_sum",
)


class _Echo:
    def write(self, value: str) -> str:
        return value


def _lines(rows: Iterable[tuple]) -> Iterator[str]:
    writer = csv.writer(_Echo())
    yield writer.writerow(HEADER)
    for row in rows:
        bucket: datetime = row[0]
        yield writer.writerow((bucket.isoformat(), *row[1:4], f"{row[4]}xx", *row[5:]))


def csv_response(rows: Iterable[tuple], *, filename: str) -> StreamingHttpResponse:
    response = StreamingHttpResponse(_lines(rows), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    response["Cache-Control"] = "no-store"
    return response
