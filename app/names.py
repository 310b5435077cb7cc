"""What a name may hold: the names of people (identities) and of API keys, shown in consoles, lists and terminals."""

from __future__ import annotations

import unicodedata

from app.errors import InvalidRequest

__all__ = ["clean_name", "printable"]


def clean_name(name: str, *, what: str = "name") -> str:
    """The name without surrounding white space. Refused (before any model work): blank; not valid UTF-8 (a lone
    surrogate); holding a control character or line break (NUL, ESC, CR/LF, ...: they forge log lines and terminal
    output and are never part of a person's name); or holding an invisible character that reorders or hides text
    (`_hidden_in_names`). Every name a person gives comes here (enrolment, PATCH /identities/{id}, `facegate enroll`),
    and an API key's name."""
    cleaned = name.strip()
    if not cleaned:
        raise InvalidRequest(f"{what} must not be blank", field="name")
    surrogate = next((i for i, c in enumerate(cleaned) if unicodedata.category(c) == "Cs"), None)
    if surrogate is not None:
        # A lone surrogate is no character: Python decodes a file name's bytes that are not UTF-8 to these
        # (b"\xff" -> U+DCFF), so a folder named in another encoding comes here; they were called control characters.
        raise InvalidRequest(
            f"{what} is not valid UTF-8 (lone surrogate U+{ord(cleaned[surrogate]):04X} at index {surrogate}, as a "
            "file or folder name in another encoding gives)",
            field="name",
        )
    if any(unicodedata.category(c) in _NOT_IN_NAMES for c in cleaned):
        raise InvalidRequest(f"{what} must not contain control characters or line breaks", field="name")
    hidden = next((i for i, c in enumerate(cleaned) if _hidden_in_names(c)), None)
    if hidden is not None:
        raise InvalidRequest(
            f"{what} must not contain invisible bidirectional controls or marks, byte order marks, tag characters or "
            f"noncharacters (U+{ord(cleaned[hidden]):04X} at index {hidden})",
            field="name",
        )
    if not any(unicodedata.category(c)[0] in "LNPS" for c in cleaned):  # only zero-width or combining characters
        raise InvalidRequest(f"{what} must have a visible character", field="name")
    return cleaned


_NOT_IN_NAMES = {"Cc", "Zl", "Zp"}  # controls (C0, DEL, C1), line and paragraph separators

# Bidirectional embeddings, overrides and isolates reorder the text after them: "Alice\u202egnp.exe" shows as
# "Aliceexe.png". The marks (LRM, RLM, ALM) are refused too: they draw nothing and reorder only the punctuation and
# digits around them, so they serve no name (a name is shown in its own isolated element) and make distinct names
# that look the same. Not refused: ZWJ and ZWNJ (U+200D, U+200C), which change how letters join and are part of the
# spelling (emoji sequences, Persian and Indic names).
_BIDI_CONTROLS = frozenset(chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C))


def _hidden_in_names(c: str) -> bool:
    """An invisible character that reorders text, hides text or is no character at all."""
    cp = ord(c)
    return (
        c in _BIDI_CONTROLS
        or cp == 0xFEFF  # byte order mark (zero-width no-break space): an encoding artefact, never part of a name
        or 0xE0000 <= cp <= 0xE007F  # tag characters: invisible ASCII, text a reader cannot see
        or 0x206A <= cp <= 0x206F  # deprecated format characters (Unicode: not to be used)
        or 0xFFF9 <= cp <= 0xFFFB  # interlinear annotation controls (Unicode: not to be exchanged)
        or 0xFDD0 <= cp <= 0xFDEF  # noncharacters ...
        or cp & 0xFFFE == 0xFFFE  # ... and the last two code points of every plane (U+FFFE, U+FFFF, U+1FFFF, ...)
    )


def printable(text: str) -> str:
    """`text` with each character that is not printable written as its Python escape: a line break or a terminal
    escape in a file name cannot split the line it is printed in or drive the terminal, and matplotlib can draw it
    (a lone surrogate made FreeType refuse a report's title). A byte of a file name that is not UTF-8 reaches Python
    as a lone surrogate (b"\\xff" -> U+DCFF); it is shown as the byte, \\xff, not as \\udcff."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escaped(c) for c in text)


def _escaped(c: str) -> str:
    if 0xDC80 <= ord(c) <= 0xDCFF:  # os.fsdecode's surrogateescape range: the undecodable bytes 0x80-0xFF
        return f"\\x{ord(c) - 0xDC00:02x}"
    return repr(c)[1:-1]
