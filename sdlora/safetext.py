"""Text that is safe to show, encode and store: file names that are not UTF-8 and lone surrogates from JSON.

On Linux a file name that is not valid UTF-8 reaches Python as a str with "surrogate escapes" (U+DC80..U+DCFF), and
JSON text may carry lone surrogates ("\\ud800"). Such strings cannot be encoded as UTF-8: printing them, putting them in
safetensors metadata or handing them to a tokenizer fails. Paths keep them (they name real files); text meant for a
model or for people goes through these helpers.
"""

from __future__ import annotations

import codecs
import re

_SURROGATES = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD (valid surrogate pairs become their character)."""
    if not isinstance(text, str) or not _SURROGATES.search(text):
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def shown(text) -> str:
    """A str for messages: file-name bytes that are not UTF-8 appear as \\xNN, other lone surrogates as \\uXXXX."""
    text = str(text)
    if not _SURROGATES.search(text):
        return text

    def one(m: re.Match) -> str:
        code = ord(m.group())
        return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"

    return _SURROGATES.sub(one, text)


def _stream_errors(exc: UnicodeError):
    """Encoding error handler for stdout/stderr: surrogate escapes go out as the file name's own bytes (so a printed path
    still names the file), anything else unencodable as a backslash escape."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    out = bytearray()
    for ch in exc.object[exc.start:exc.end]:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(code - 0xDC00)
        else:
            out += (f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}").encode("ascii")
    return bytes(out), exc.end


STREAM_ERRORS = "sdlora-stream"
codecs.register_error(STREAM_ERRORS, _stream_errors)


def make_streams_safe(*streams) -> None:
    """Never let printing a name or caption end a command with UnicodeEncodeError."""
    for stream in streams:
        try:
            stream.reconfigure(errors=STREAM_ERRORS)
        except (AttributeError, ValueError, OSError):
            pass  # not a TextIOWrapper (e.g. captured by a test): leave it as it is
