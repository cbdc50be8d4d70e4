"""Log lines: one JSON object (or readable text) with the context fields."""

from __future__ import annotations

import json
import logging
import os

from shared.logs import JsonFormatter, TextFormatter


def test_log_lines_carry_extra_fields_but_not_uvicorns_colour_copy() -> None:
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "Started %s", ("x",), None)
    record.color_message = "Started \x1b[36m%s\x1b[0m"
    record.feed = "execution"
    line = json.loads(JsonFormatter("gateway").format(record))
    assert line["msg"] == "Started x" and line["feed"] == "execution" and line["service"] == "gateway"
    assert "color_message" not in line
    assert line["pid"] == os.getpid()  # which of a gateway's workers said it
    text = TextFormatter("gateway").format(record)
    assert "feed=execution" in text and "\x1b" not in text
    assert f"gateway[{os.getpid()}]" in text
