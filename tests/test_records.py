"""The tracker's history writer: the same text as one json.dumps, records in order, all on disk
after close(), and a failed write reported in the caller's thread."""

from __future__ import annotations

import json

import pytest

from fitcli.errors import RuntimeAuditError
from fitcli.records import RecordWriter, encode


def _rec(step: int) -> dict:
    return {"format": "fitcli.history/1", "step": step, "time": 1.5, "batches": 1, "samples": 4, "tau": 0.0,
            "layers": {"a.b": {"units": 2, "final": False, "metrics": {"act_mean": [0.5, None]}, "dead": [1]},
                       'q"x': {"units": 1, "final": True, "metrics": {}, "skipped": {"taylor": "no gradient"}}}}


@pytest.mark.parametrize("rec", [_rec(3), {**_rec(0), "layers": {}}, {"format": "x", "layers": {"l": {}}, "z": 1},
                                 {"layers": {"l": {"units": 1}}}])
def test_encode_is_one_dumps(rec):
    assert encode(rec) == json.dumps(rec, allow_nan=False, separators=(",", ":"))


def test_records_in_order_and_on_disk_after_close(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_text('{"kept": true}\n')  # appended to, never rewritten
    w = RecordWriter(path)
    for i in range(200):
        w.write(_rec(i))
    w.close()
    w.close()  # twice: nothing more
    lines = path.read_text().splitlines()
    assert lines[0] == '{"kept": true}'
    assert [json.loads(x)["step"] for x in lines[1:]] == list(range(200))


def test_a_failed_write_is_raised_in_the_callers_thread(tmp_path):
    w = RecordWriter(tmp_path / "h.jsonl")

    class Full:
        def write(self, s):
            raise OSError(28, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass

    w._file.close()
    w._file = Full()
    w.write(_rec(0))
    with pytest.raises(RuntimeAuditError, match="No space left on device"):
        w.close()


def test_a_history_that_cannot_be_opened_is_a_usage_error(tmp_path):
    from fitcli.errors import UsageError
    with pytest.raises(UsageError, match="cannot be opened"):
        RecordWriter(tmp_path)  # a directory
