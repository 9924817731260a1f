"""The quick log line writer and the name matcher, each against a plain reference."""

from __future__ import annotations

import datetime
import fnmatch
import io
import json
import logging
import os
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from watcher.config import check_pattern
from watcher.logs import JsonFormatter, TextFormatter, configure_logging, info_writer
from watcher.scan import NameMatcher, first_star_in_class

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def restore_logging():
    """Put the root logger back as it was after a test that calls configure_logging."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("formatter_class", [TextFormatter, JsonFormatter])
@pytest.mark.parametrize("created", [1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.25])
def test_line_equals_format(formatter_class, created: float) -> None:
    """line() must give what format() gives for a record with the same fields."""
    formatter = formatter_class()
    for offset in (0.0, 0.5, 1.0):
        for message in ("pruned 'a.pt'", "naïve \u2603 'x'", 'quote " and \\ backslash'):
            record = logging.LogRecord("watcher.prune", logging.INFO, "", 0, "%s", (message,), None)
            record.created = created + offset
            record.msecs = (record.created - int(record.created)) * 1000
            expected = formatter.format(record)
            line = formatter.line(record.created, record.msecs, "INFO", "watcher.prune", message)
            assert line == expected


def _configured(log_format: str) -> tuple[io.StringIO, logging.Logger]:
    stream = io.StringIO()
    configure_logging(log_format, 0)
    logging.getLogger().handlers[0].setStream(stream)
    return stream, logging.getLogger("watcher.prune")


_TIME = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def _both_lines(log_format: str, message: str) -> list[str]:
    """Log `message` through the writer, then through logger.info; return the two lines."""
    stream, logger = _configured(log_format)
    info_writer(logger)(message)
    logger.info("%s", message)
    return stream.getvalue().splitlines()


@pytest.mark.usefixtures("restore_logging")
def test_writer_line_text() -> None:
    quick, standard = _both_lines("text", "pruned 'a.pt' (step 3)")
    assert _TIME.match(quick)
    assert _TIME.match(standard)
    assert (
        _TIME.sub("", quick)
        == _TIME.sub("", standard)
        == ("INFO watcher.prune: pruned 'a.pt' (step 3)")
    )


@pytest.mark.usefixtures("restore_logging")
def test_writer_line_json() -> None:
    quick, standard = (json.loads(line) for line in _both_lines("json", "pruned 'b.pt'"))
    assert quick.keys() == standard.keys() == {"time", "level", "logger", "message"}
    stamps = [
        datetime.datetime.strptime(item["time"], "%Y-%m-%dT%H:%M:%S.%fZ")
        for item in (quick, standard)
    ]
    assert abs((stamps[1] - stamps[0]).total_seconds()) < 5
    del quick["time"], standard["time"]
    assert (
        quick
        == standard
        == {"level": "INFO", "logger": "watcher.prune", "message": "pruned 'b.pt'"}
    )


@pytest.mark.usefixtures("restore_logging")
def test_writer_with_other_handler() -> None:
    """With a handler that configure_logging did not install, records take the standard path."""
    stream, logger = _configured("text")
    seen: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    extra = Collect()
    logger.addHandler(extra)
    try:
        info_writer(logger)("pruned 'c.pt'")
    finally:
        logger.removeHandler(extra)
    assert [record.getMessage() for record in seen] == ["pruned 'c.pt'"]
    assert stream.getvalue().endswith("INFO watcher.prune: pruned 'c.pt'\n")


@pytest.mark.usefixtures("restore_logging")
def test_writer_level_and_filters() -> None:
    stream, logger = _configured("text")
    logging.getLogger().setLevel(logging.WARNING)
    info_writer(logger)("hidden")
    logging.getLogger().setLevel(logging.INFO)
    logger.addFilter(lambda record: False)
    try:
        info_writer(logger)("filtered")
    finally:
        logger.filters.clear()
    assert stream.getvalue() == ""


def test_writer_closed_stream_reported(tmp_path) -> None:
    """A closed stream makes the standard path report the error; the caller goes on."""
    code = (
        "import logging, sys\n"
        "from watcher.logs import configure_logging, info_writer\n"
        "configure_logging('text', 0)\n"
        "logging.getLogger().handlers[0].stream = open(sys.argv[1], 'w')\n"
        "logging.getLogger().handlers[0].stream.close()\n"
        "info_writer(logging.getLogger('watcher.prune'))('pruned x')\n"
        "print('went on')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "log")],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "went on\n"
    assert "--- Logging error ---" in result.stderr
    assert "I/O operation on closed file" in result.stderr


def _reference_match(pattern: str, name: str) -> tuple[int, str] | None:
    """The matcher's rule, by brute force: the longest text the first `*` can match, then its
    leading digits."""
    head, tail = pattern.split("*", 1)
    best = None
    for start in range(len(name) + 1):
        if not fnmatch.fnmatchcase(name[:start], head):
            continue
        for end in range(len(name), start - 1, -1):
            if fnmatch.fnmatchcase(name[end:], tail):
                if best is None or end - start > best[1] - best[0]:
                    best = (start, end)
                break
    if best is None:
        return None
    start, end = best
    star = name[start:end]
    digits = len(star) - len(star.lstrip("0123456789"))
    if digits == 0:
        return None
    return int(name[start : start + digits]), name[:start] + name[start + digits :]


_PIECES = st.sampled_from(
    ["a", "b", "1", "0", "_", ".", "?", "[0-9]", "[!a]", "[[]", "[&&a]", "*", "[", "]"]
)
_CHARS = st.sampled_from(["a", "b", "1", "0", "9", "_", ".", "[", "]", "!", "&"])


@settings(max_examples=3000, deadline=None)
@given(
    head=st.lists(_PIECES.filter(lambda p: p != "*"), max_size=4),
    tail=st.lists(_PIECES, max_size=5),
    name=st.lists(_CHARS, max_size=12),
)
def test_matcher_equals_reference(head, tail, name) -> None:
    pattern = "".join(head) + "*" + "".join(tail)
    text = "".join(name)
    assert NameMatcher(pattern).match(text) == _reference_match(pattern, text)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [("ckpt[[]*.pt", False), ("x[[a]-*.pt", False), ("a[*]b*.pt", True), ("a[!*]*.pt", True)],
)
def test_first_star_in_class(pattern: str, expected: bool) -> None:
    assert first_star_in_class(pattern) is expected


def test_pattern_with_bracket_class() -> None:
    """`[[]` is a class that matches `[`: the pattern is accepted and matches as fnmatch does."""
    matcher = NameMatcher(check_pattern("ckpt[[]*.pt"))
    assert matcher.match("ckpt[12.pt") == (12, "ckpt[.pt")
    assert matcher.match("ckptx12.pt") is None


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("model_v2_step*.pt", "model_v2_step00120_run_s0.pt", (120, "model_v2_step_run_s0.pt")),
        ("ck*5.pt", "ck12345.pt", (1234, "ck5.pt")),
        ("ck*_*.pt", "ck12_3_4.pt", (12, "ck_3_4.pt")),
        ("ck*.pt", "ckx1.pt", None),
        ("ck*.pt", "ck.pt", None),
    ],
)
def test_matcher_examples(pattern: str, name: str, expected) -> None:
    assert NameMatcher(pattern).match(name) == expected
    assert _reference_match(pattern, name) == expected
