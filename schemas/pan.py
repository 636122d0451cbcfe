"""Card-number (PAN) detection and scrubbing. paystream never stores or logs a PAN."""

from __future__ import annotations

import re

# 13 to 19 digits, optionally separated by single spaces or dashes.
_CANDIDATE = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")


def _luhn_ok(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def looks_like_pan(text: str) -> bool:
    """True when ``text`` contains a 13-19 digit sequence that passes the Luhn check."""
    for match in _CANDIDATE.finditer(text):
        digits = re.sub(r"[ -]", "", match.group())
        if 13 <= len(digits) <= 19 and _luhn_ok(digits):
            return True
    return False


# The same digit runs, but standing alone: not glued to a letter or digit on either side.
# Random hexadecimal ids (cmd_<uuid hex>) contain Luhn-valid 13-19 digit runs about once
# in 500; rejecting those would refuse valid commands. Scrubbing stays with the wider
# pattern above (masking part of an id costs nothing).
_STANDALONE = re.compile(r"(?<![0-9A-Za-z])(?:\d[ -]?){12,18}\d(?![0-9A-Za-z])")


def looks_like_standalone_pan(text: str) -> bool:
    """True when ``text`` holds a Luhn-valid 13-19 digit number delimited by start or end,
    whitespace or punctuation (``cus_4242...``, ``card 4242 4242 ...``), not inside a
    longer alphanumeric token such as a hexadecimal id."""
    for match in _STANDALONE.finditer(text):
        digits = re.sub(r"[ -]", "", match.group())
        if 13 <= len(digits) <= 19 and _luhn_ok(digits):
            return True
    return False


def _scrub(pattern: re.Pattern[str], text: str) -> str:
    def _replace(match: re.Match[str]) -> str:
        digits = re.sub(r"[ -]", "", match.group())
        if 13 <= len(digits) <= 19 and _luhn_ok(digits):
            return "[PAN REDACTED]"
        return match.group()

    return pattern.sub(_replace, text)


def scrub_pans(text: str) -> str:
    """Replace every Luhn-valid 13-19 digit sequence by ``[PAN REDACTED]``."""
    return _scrub(_CANDIDATE, text)


def scrub_standalone_pans(text: str) -> str:
    """Like :func:`scrub_pans`, for standalone numbers only (see
    :func:`looks_like_standalone_pan`): for Kafka keys, which must keep addressing the
    payment when a random hexadecimal id happens to hold a Luhn-valid digit run."""
    return _scrub(_STANDALONE, text)


def pan_fields(data: object, path: str = "") -> list[str]:
    """Where a decoded JSON value holds something that looks like a card number.

    Every string anywhere (object keys included, lists and nested objects walked) and every
    integer is checked with :func:`looks_like_standalone_pan`. Paths name the fields
    without echoing the number: a key that is itself card-number-like shows as ``<key>``.
    """
    found: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            name = str(key)
            shown = "<key>" if looks_like_standalone_pan(name) else name
            where = f"{path}.{shown}" if path else shown
            if shown == "<key>":
                found.append(where)
            found.extend(pan_fields(value, where))
    elif isinstance(data, list):
        for index, item in enumerate(data):
            found.extend(pan_fields(item, f"{path}[{index}]"))
    elif isinstance(data, str) or (isinstance(data, int) and not isinstance(data, bool)):
        if looks_like_standalone_pan(str(data)):
            found.append(path or "<value>")
    return found


def scrub_bytes(raw: bytes | None, *, standalone_only: bool = False) -> bytes | None:
    """``raw`` with card-number-like digit runs replaced (unchanged when there are none)."""
    if raw is None:
        return None
    text = raw.decode("utf-8", errors="replace")
    scrubbed = scrub_standalone_pans(text) if standalone_only else scrub_pans(text)
    return raw if scrubbed == text else scrubbed.encode()
