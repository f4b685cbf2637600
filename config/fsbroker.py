"""kombu's filesystem transport (the embedded default broker), with messages written atomically.

kombu 5's filesystem Channel._put creates the message file under its final `.msg` name and
only then writes the payload; a worker polling the folder can move and read it in between,
get an empty payload and die with "Unrecoverable error: JSONDecodeError" (seen in this
project's test runs: ingest stopped until the worker was restarted). Here the payload is
written under a name the reader skips and renamed into place, which is atomic on POSIX.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        tmp = os.path.join(self.data_folder_out, f"tmp-{uuid.uuid4()}")  # no ".<queue>.msg"
        try:
            with open(tmp, "wb") as f:
                f.write(dumps(payload).encode())
            os.replace(tmp, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel
