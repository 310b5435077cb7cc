"""The README documents every setting and every endpoint the app serves."""

from __future__ import annotations

import re
from typing import Any

from app.config import REPO_ROOT, settings_reference
from app.main import create_app

README = (REPO_ROOT / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    missing = [name for name, _, _ in settings_reference() if f"`{name}`" not in README]
    assert missing == []


def test_every_endpoint_has_a_curl_example() -> None:
    app = create_app()  # builds routes only: no I/O until the lifespan starts
    paths = set(app.openapi()["paths"])
    assert {"/enroll", "/verify", "/identify", "/identities", "/healthz", "/readyz"} <= paths
    examples = " ".join(line for line in README.splitlines() if line.lstrip().startswith("curl"))
    for path in paths:
        pattern = re.sub(r"\{[^}]+\}", "[^ /']+", path) + r"(?:[?' ]|$)"
        assert re.search(pattern, examples), f"no curl example for {path}"


def _table(header: str) -> list[list[str]]:
    """The cells of each row of the README table whose header line is `header`."""
    lines = README.splitlines()
    start = lines.index(header) + 2  # past the |---| line
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def test_the_settings_table_is_the_settings() -> None:
    """Name, default and meaning of every row (in the README's own order): a changed default or help text shows here."""
    table = [(name.strip("`"), default.strip("`"), meaning) for name, default, meaning in _table(
        "| variable | default | meaning |")]  # fmt: skip
    assert sorted(table) == sorted(settings_reference())


def _code_texts() -> list[str]:
    """What the README gives as shell: the lines of its fenced blocks (comments cut) and its inline code spans."""
    texts, fenced = [], False
    for line in README.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced:
            texts.append(re.sub(r"(^|\s)#.*", "", line))
        else:
            texts.extend(re.findall(r"`([^`]+)`", line))
    return texts


def test_every_facegate_command_and_flag_exists() -> None:
    """Each `facegate ...` command line of the README names a real command, its options exist, and a bracketed
    `[--option VALUE]` shows the option's real default (where the option has one of its own)."""
    import typer

    from app.cli import cli

    root = typer.main.get_command(cli)  # typer's own click: groups are told by their `commands`
    calls = [m.group(1) for text in _code_texts() for m in re.finditer(r"(?:^|[\s(])facegate ([^|;&]*)", text)]
    assert len(calls) >= 20, calls
    for call in calls:
        words = call.split()
        command: Any = root
        path: list[str] = []
        while hasattr(command, "commands") and words and not words[0].startswith("-"):
            sub = command.commands.get(words[0])
            assert sub is not None, f"facegate {' '.join(path)}: no command {words[0]!r} ({call})"
            command, path = sub, [*path, words.pop(0)]
        assert not hasattr(command, "commands"), f"facegate {call}: names a group, not a command"
        options = {name: p for p in command.params for name in (*p.opts, *p.secondary_opts)}
        for word in words:
            flag = word.strip("[]").split("=")[0]
            if flag.startswith("--"):
                assert flag in options, f"facegate {' '.join(path)}: no option {flag} ({call})"
        for flag, shown in re.findall(r"\[(--[a-z-]+) ([^]\s|]+)\]", call):
            default = getattr(options[flag].default, "value", options[flag].default)
            if default is None or shown.isupper():  # a placeholder, or a default taken from the settings
                continue
            try:
                same = float(shown) == float(default)
            except ValueError:
                same = shown == str(default)
            assert same, f"facegate {' '.join(path)} {flag}: the README shows {shown}, the default is {default}"


def test_the_error_table_gives_each_code_its_status() -> None:
    """The README's error table and the service agree on each code's status, and every code the service maps (or
    the OpenAPI document names) is in the table."""
    from app.api.errors import _HTTP_CODES, STATUS_BY_CODE

    documented: set[tuple[str, int]] = set()
    for codes, statuses, _ in _table("| code | status | triggered by |"):
        names, numbers = re.findall(r"`([a-z_]+)`", codes), [int(s) for s in re.findall(r"\d{3}", statuses)]
        documented |= set(zip(names, numbers * len(names) if len(numbers) == 1 else numbers, strict=True))
    # the CORS middleware, the 500 handler, and the record of a client gone before its body was read (never sent)
    answered_elsewhere = {("cors_refused", 400), ("internal_error", 500), ("client_disconnected", 499)}
    served = {(c, s) for c, s in STATUS_BY_CODE.items() if c != "unknown_api_key"}  # the CLI's (keys revoke)
    served |= {(c, s) for s, c in _HTTP_CODES.items() if s != 415}  # no route takes a body FastAPI refuses by type
    assert documented == served | answered_elsewhere

    openapi = create_app().openapi()
    for path, item in openapi["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                schema = response.get("content", {}).get("application/json", {}).get("schema", {})
                if not schema.get("$ref", "").endswith("/ErrorResponse"):
                    continue
                for part in response["description"].split(" / "):
                    code = re.match(r"[a-z_]+", part)
                    assert code and (code.group(), int(status)) in documented, (method, path, status, part)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than hyphens dropped, spaces made hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_within_the_readme_leads_to_a_heading() -> None:
    headings, in_block = set(), False
    for line in README.splitlines():
        if line.startswith("```"):
            in_block = not in_block  # a `# comment` in a shell block is not a heading
        elif not in_block and re.match(r"#{1,6} ", line):
            headings.add(_anchor(line.lstrip("#")))
    links = set(re.findall(r"\]\(#([^)]+)\)", README))
    assert len(links) >= 10 and "who-may-call-it-api-keys" in headings  # the links and headings were read
    assert sorted(links - headings) == []
