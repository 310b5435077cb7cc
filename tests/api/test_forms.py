"""`form_problem`: the strict text check FormRoute runs on multipart bodies before FastAPI parses them."""

from __future__ import annotations

import pytest

from app.api.forms import form_problem
from tests.hostile_cases import raw_multipart

CT = "multipart/form-data; boundary=hostileboundary"


def test_text_fields_in_the_request_charset_pass() -> None:
    body = raw_multipart([(b"image", b"a.jpg", b"\xff\xd8\xff binary"), (b"name", None, "Zoë 李".encode())])
    assert form_problem(body, CT) is None
    latin = raw_multipart([(b"name", None, "Zoë".encode("latin-1"))])
    assert form_problem(latin, CT + "; charset=iso-8859-1") is None
    assert form_problem(latin, CT + '; charset="ISO-8859-1"') is None


def test_unknown_charset_is_refused() -> None:
    """Starlette would read it as latin-1: a name in it would be stored garbled."""
    latin = raw_multipart([(b"name", None, "Zoë".encode("latin-1"))])
    assert form_problem(latin, CT + "; charset=no-such-charset") == (
        "unknown charset 'no-such-charset'; send UTF-8 (or no charset)"
    )
    problem = form_problem(latin, CT + "; charset=" + "x" * 5000)
    assert problem is not None and len(problem) < 120  # the client's text is echoed cut short
    assert form_problem(latin, CT + "; charset=utf-8\x00") == (
        "unknown charset 'utf-8\\x00'; send UTF-8 (or no charset)"
    )


@pytest.mark.parametrize("codec", ["hex", "base64", "rot13", "zlib", "bz2", "uu", "quopri", "HEX_CODEC"])
def test_codec_that_is_not_a_text_encoding_is_refused(codec: str) -> None:
    """Python registers these as codecs, but `bytes.decode` refuses them (LookupError: a 500 before the fix)."""
    photo_only = raw_multipart([(b"image", b"c.jpg", b"xx")])
    assert form_problem(photo_only, CT + f"; charset={codec}") == (
        f"charset {codec!r} is not a text encoding; send UTF-8 (or no charset)"
    )


@pytest.mark.parametrize(("codec", "bad"), [("undefined", b"abc"), ("idna", b"xn--abc-"), ("punycode", b"c.jpg")])
def test_decoder_raising_a_bare_unicode_error_is_refused(codec: str, bad: bytes) -> None:
    """These decoders fail with UnicodeError, not UnicodeDecodeError: neither our check nor Starlette's latin-1
    fallback would catch it (a 500), for field names, values or file names."""
    ct = CT + f"; charset={codec}"
    assert form_problem(raw_multipart([(bad, None, b"")]), ct) == f"a field name is not valid {codec} text"
    if codec != "undefined":  # it decodes nothing, not even the field's name
        value = form_problem(raw_multipart([(b"name", None, bad)]), ct)
        assert value is not None and value.startswith("field ") and value.endswith(f" is not valid {codec} text")
        filename = form_problem(raw_multipart([(b"name", bad, b"")]), ct)
        assert filename == f"a file name cannot be read as {codec} text"


def test_file_name_not_valid_in_the_charset_is_left_to_starlette() -> None:
    """A file name is only echoed: Starlette reads one that is not UTF-8 as latin-1, as before."""
    assert form_problem(raw_multipart([(b"image", b"caf\xe9.jpg", b"xx")]), CT) is None


def test_undecodable_value_and_name_are_named() -> None:
    value = raw_multipart([(b"name", None, b"Jos\xe9")])
    assert form_problem(value, CT) == "field 'name' is not valid utf-8 text"
    name = raw_multipart([(b"top\xff_k", None, b"3")])
    assert form_problem(name, CT) == "a field name is not valid utf-8 text"
    # the same bytes are fine in latin-1
    assert form_problem(value, CT + "; charset=latin-1") is None


def test_a_long_field_name_is_cut_in_the_message() -> None:
    body = raw_multipart([(b"n" * 4000, None, b"\xff")])  # a multipart header line holds at most 4 kB
    assert form_problem(body, CT) == f"field '{'n' * 64}...' is not valid utf-8 text"


def test_binary_part_without_filename_gets_a_hint() -> None:
    body = (
        b"--hostileboundary\r\nContent-Disposition: form-data; name=\"image\"\r\n"
        b"Content-Type: image/jpeg\r\n\r\n\xff\xd8\xff\xe0\r\n--hostileboundary--\r\n"
    )
    problem = form_problem(body, CT)
    assert problem is not None and problem.startswith("field 'image' is not valid utf-8 text")
    assert "needs a filename" in problem


def test_not_multipart_or_malformed_is_left_to_starlette() -> None:
    assert form_problem(b"\xff\xfe", "application/x-www-form-urlencoded") is None
    assert form_problem(b"\xff\xfe", "multipart/form-data") is None  # no boundary
    assert form_problem(b"\x00\xff" * 50, CT) is None  # not multipart at all: Starlette refuses it


def test_a_part_with_two_dispositions_is_judged_by_the_one_starlette_reads() -> None:
    """Starlette takes a part's last Content-Disposition: a first one naming a file must not make the text field the
    part really is skip the check ("Иван" in KOI8-R was stored as "é×ÁÎ")."""
    koi8 = "Иван".encode("koi8-r")
    body = (
        b"--hostileboundary\r\n"
        b'Content-Disposition: form-data; name="x"; filename="decoy.txt"\r\n'
        b'Content-Disposition: form-data; name="name"\r\n\r\n' + koi8 + b"\r\n--hostileboundary--\r\n"
    )
    assert form_problem(body, CT) == "field 'name' is not valid utf-8 text"
    # and the other way round: a text field's disposition, then a file's, is the file Starlette reads
    body = (
        b"--hostileboundary\r\n"
        b'Content-Disposition: form-data; name="name"\r\n'
        b'Content-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n\xff\xd8\xff\r\n--hostileboundary--\r\n'
    )
    assert form_problem(body, CT) is None


def test_a_body_cut_before_its_closing_boundary_is_refused() -> None:
    body = raw_multipart([(b"name", None, b"Zoe"), (b"image", b"a.jpg", b"\xff\xd8\xff" + bytes(range(256)) * 8)])
    assert form_problem(body, CT) is None
    assert form_problem(body.rstrip(b"\r\n"), CT) is None  # the closing boundary without its line end is complete
    assert form_problem(body + b"an epilogue", CT) is None
    cut = "the multipart body ends before its closing boundary: the upload was cut short"
    for keep in (len(body) - len(b"--hostileboundary--\r\n"), len(body) // 2, 30, 3):
        assert form_problem(body[:keep], CT) == cut, keep
    assert form_problem(b"", CT) is None and form_problem(b"\r\n", CT) is None  # nothing sent: "Field required"
