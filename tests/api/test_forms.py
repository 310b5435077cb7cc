"""`undecodable_field`: the strict text check FormRoute runs on multipart bodies before FastAPI parses them."""

from __future__ import annotations

from app.api.forms import undecodable_field
from tests.hostile_cases import raw_multipart

CT = "multipart/form-data; boundary=hostileboundary"


def test_text_fields_in_the_request_charset_pass() -> None:
    body = raw_multipart([(b"image", b"a.jpg", b"\xff\xd8\xff binary"), (b"name", None, "Zoë 李".encode())])
    assert undecodable_field(body, CT) is None
    latin = raw_multipart([(b"name", None, "Zoë".encode("latin-1"))])
    assert undecodable_field(latin, CT + "; charset=iso-8859-1") is None
    # a charset Python does not know: Starlette reads it as latin-1, where every byte is text
    assert undecodable_field(latin, CT + "; charset=no-such-charset") is None


def test_undecodable_value_and_name_are_named() -> None:
    value = raw_multipart([(b"name", None, b"Jos\xe9")])
    assert undecodable_field(value, CT) == "field 'name' is not valid utf-8 text"
    name = raw_multipart([(b"top\xff_k", None, b"3")])
    assert undecodable_field(name, CT) == "a field name is not valid utf-8 text"
    # the same bytes are fine in latin-1
    assert undecodable_field(value, CT + "; charset=latin-1") is None


def test_binary_part_without_filename_gets_a_hint() -> None:
    body = (
        b"--hostileboundary\r\nContent-Disposition: form-data; name=\"image\"\r\n"
        b"Content-Type: image/jpeg\r\n\r\n\xff\xd8\xff\xe0\r\n--hostileboundary--\r\n"
    )
    problem = undecodable_field(body, CT)
    assert problem is not None and problem.startswith("field 'image' is not valid utf-8 text")
    assert "needs a filename" in problem


def test_not_multipart_or_malformed_is_left_to_starlette() -> None:
    assert undecodable_field(b"\xff\xfe", "application/x-www-form-urlencoded") is None
    assert undecodable_field(b"\xff\xfe", "multipart/form-data") is None  # no boundary
    assert undecodable_field(b"\x00\xff" * 50, CT) is None  # not multipart at all: Starlette refuses it
