"""The embedded broker's message files appear whole (config/fsbroker.py)."""

from __future__ import annotations

import os

from kombu import Connection


def test_a_message_file_is_never_visible_before_its_payload_is_written(tmp_path, monkeypatch):
    opts = {"data_folder_in": str(tmp_path), "data_folder_out": str(tmp_path)}
    seen_before_rename = []
    real_replace = os.replace

    def replace(src, dst):
        # What a polling worker would see at the last moment before the message is in place.
        # The message being written is not listed yet, and its bytes are all there.
        if os.path.basename(dst) in os.listdir(tmp_path) or os.path.getsize(src) == 0:
            seen_before_rename.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with Connection(
        "filesystem://", transport="config.fsbroker:Transport", transport_options=opts
    ) as c:
        q = c.SimpleQueue("jobs")
        q.put({"n": 1})
        q.put({"n": 2})
        assert seen_before_rename == []
        # Two messages in the same millisecond sort by their uuid: order is not promised.
        got = sorted(q.get(timeout=2).payload["n"] for _ in range(2))
        assert got == [1, 2]
        q.close()
    assert not [n for n in os.listdir(tmp_path) if n.startswith("tmp-")]
