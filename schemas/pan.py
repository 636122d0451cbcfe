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


def scrub_pans(text: str) -> str:
    """Replace every Luhn-valid 13-19 digit sequence by ``[PAN REDACTED]``."""

    def _replace(match: re.Match[str]) -> str:
        digits = re.sub(r"[ -]", "", match.group())
        if 13 <= len(digits) <= 19 and _luhn_ok(digits):
            return "[PAN REDACTED]"
        return match.group()

    return _CANDIDATE.sub(_replace, text)
