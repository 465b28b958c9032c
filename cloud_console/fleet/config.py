"""
What the consoles are, as configured: C{--console NAME=SOURCE}, C{--config FILE}.

One L{ConsoleSpec} per console, built the same way whatever said so (the command line,
a TOML file, a directory entry in L{cloud_console.fleet.consoledir}): L{spec_for} holds the
defaults and the checks, so a console means the same thing from any of them.

A config file (Python's C{tomllib}) holds one C{[console.NAME]} table per console and
nothing else; server-wide settings (ports, credentials, limits) stay command-line
options, so that one file cannot say two things the options also say::

    [console.vm1]
    source = "qmp:/run/qemu/vm1.qmp"
    title = "vm1 (build host)"
    history-size = 200000
    read-only = true

A mistake in the file is a L{ConfigError} naming the file, the line (where it can be
found) and the key, so a reload that would break things is refused with a line an
operator can act on, and the running consoles are kept.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from typing import Any, Mapping

from ..console.sources import parse_source
from ..console.spec import ConsoleSpec

#: A console's name: it goes in URLs (C{/c/NAME/}), file names (C{LOG_DIR/NAME.log}),
#: metric labels and directory entries, hence lowercase and no separators.
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")

#: The pattern in words, for error messages.
NAME_RULE = (
    f"names match {NAME_PATTERN.pattern}: a lowercase letter or digit, then up to 63 "
    "lowercase letters, digits, '.', '_' or '-'"
)


#: The keys a C{[console.NAME]} table may hold, in the order error messages list them.
CONSOLE_KEYS = (
    "source",
    "title",
    "log-file",
    "history-size",
    "head-size",
    "read-only",
    "reopen",
    "log-timestamps",
)


class ConfigError(Exception):
    """
    A config file that cannot be used: one or more lines an operator can act on.

    C{str(error)} is the lines joined by newlines, each naming the file, the line
    where known, the console and the key; L{errors} has them one by one.
    """

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def valid_name(name: str) -> bool:
    """
    Whether C{name} is a console name (fully matches L{NAME_PATTERN}).
    """
    return NAME_PATTERN.fullmatch(name) is not None


def split_console_option(value: str) -> tuple[str | None, str]:
    """
    Split a C{--console} value into C{(NAME, SOURCE)}, or C{(None, SOURCE)}.

    It is C{NAME=SOURCE} only when the part before the first C{=} fully matches
    L{NAME_PATTERN}: C{qmp:/run/vm.qmp:chardev=serial1} is a bare SOURCE (what precedes
    its C{=} has a C{:} and a C{/}), C{vm1=qmp:/run/vm1.qmp:chardev=serial1} is named.
    A bare path that happens to look like a name followed by C{=} (C{a=b}) is therefore
    named; write C{./a=b} or C{pty:a=b} for the file.

    @raise ValueError: C{NAME=} with nothing after it.
    """
    name, sep, source = value.partition("=")
    if not sep or not valid_name(name):
        return None, value
    if not source:
        raise ValueError(
            f"--console {value!r}: no SOURCE after {name}=; give NAME=SOURCE, e.g. "
            f"{name}=qmp:/run/{name}.qmp"
        )
    return name, source


def spec_for(
    name: str | None, source_text: str, origin: str, **overrides: Any
) -> ConsoleSpec:
    """
    Build a L{ConsoleSpec} with the defaults, from whatever configured it.

    Defaults: C{title} is the name, or the SOURCE text for the unnamed single console.
    C{reopen} is C{source.follows_reboots} for a named console: in multi-console mode a
    console that hangs up is retried, except a bare C{/dev/pts/N}, which stays down until
    a reload names it again (after a hang-up its number may be handed to another VM or a
    user's terminal). The unnamed single console keeps today's default, C{--reopen} off.
    Other fields default as in L{ConsoleSpec}; C{overrides} are its field names.

    @raise ValueError: a bad SOURCE (the message from L{parse_source}), a name not
        matching L{NAME_PATTERN}, or C{reopen=True} on a bare C{/dev/pts/N} (with why).
    """
    if name is not None and not valid_name(name):
        raise ValueError(f"console name {name!r} is not allowed; {NAME_RULE}")
    source = parse_source(source_text)
    fields: dict[str, Any] = {
        "title": name if name is not None else source_text,
        "reopen": source.follows_reboots if name is not None else False,
    }
    fields.update(overrides)
    if fields["reopen"] and not source.follows_reboots:
        raise ValueError(reopen_refusal(source_text))
    return ConsoleSpec(name=name, source=source, origin=origin, **fields)


def reopen_refusal(source_text: str) -> str:
    """
    Why reopening a bare C{/dev/pts/N} is refused, and what to use instead.
    """
    return (
        f"reopen with {source_text!r}: after a hang-up that pty number may belong to "
        "another VM or a user's terminal; follow a symlink the VMM keeps "
        "(pty:/run/vm1.console), ask the VMM (qmp:..., cloud-hypervisor:...), or use a "
        "unix: socket"
    )


def spec_defaults(defaults: Mapping[str, Any], name: str) -> dict[str, Any]:
    """
    L{ConsoleSpec} fields from the server-wide defaults, for console C{name}.

    C{defaults} may hold C{history-size}, C{head-size}, C{read-only}, C{raw} (as the
    command-line options give them) and C{log-dir} (C{str} or C{None}: the console then
    logs to C{LOG_DIR/NAME.log}); missing keys keep L{ConsoleSpec}'s defaults.
    """
    fields: dict[str, Any] = {}
    for key, field in (
        ("history-size", "history_size"),
        ("head-size", "head_size"),
        ("log-timestamps", "log_timestamps"),
        ("read-only", "read_only"),
        ("raw", "raw"),
    ):
        if defaults.get(key) is not None:
            fields[field] = defaults[key]
    log_dir = defaults.get("log-dir")
    if log_dir:
        fields["log_file"] = os.path.join(log_dir, f"{name}.log")
    return fields


def load_config(path: str, defaults: Mapping[str, Any]) -> list[ConsoleSpec]:
    """
    Read a C{--config} TOML file: one L{ConsoleSpec} per C{[console.NAME]} table, in
    the file's order, with origin C{"config"}.

    Keys: C{source} (required), C{title} (text), C{log-file} (a path, as given: relative
    to the working directory, like C{--log-file}), C{history-size} (a whole number above
    0), C{head-size} (a whole number, 0 or more), C{read-only} and C{reopen} (true or
    false), C{log-timestamps} (minutes of silence before a MARK line in the log, 0 for
    never). What a table leaves out comes from C{defaults} (see L{spec_defaults}); a
    table's C{log-file} wins over C{log-dir}.

    Unknown keys are errors (a typo must not be silently ignored), as are top-level keys
    other than C{console} (server-wide settings are command-line options).

    @raise ConfigError: the file is unreadable, not TOML, or holds a mistake; every
        mistake found is listed, each naming the file, the line where it can be found,
        the console and the key.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the config file: {e.strerror or e}"])
    try:
        text = data.decode("utf-8")
        document = tomllib.loads(text)
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text (byte {e.start}), so not TOML"])
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([_decode_error(path, e)])
    return _Reader(path, text, defaults).read(document)


#: How C{tomllib} (3.11 to 3.13) ends its messages; 3.14 also sets lineno and colno.
_AT_LINE = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_AT_END = re.compile(r"\s*\(at end of document\)$")


def _decode_error(path: str, error: tomllib.TOMLDecodeError) -> str:
    """
    C{FILE:LINE:COLUMN: not valid TOML: WHAT} from a C{TOMLDecodeError}.
    """
    message = str(error)
    lineno = getattr(error, "lineno", None)
    colno = getattr(error, "colno", None)
    what = getattr(error, "msg", None)
    at = _AT_LINE.search(message)
    if at is not None:
        lineno, colno = int(at.group(1)), int(at.group(2))
        message = message[: at.start()]
    elif _AT_END.search(message):
        message = _AT_END.sub("", message)
        return f"{path}: not valid TOML at the end of the file: {message}"
    if isinstance(what, str) and what:
        message = what
    if isinstance(lineno, int) and isinstance(colno, int):
        return f"{path}:{lineno}:{colno}: not valid TOML: {message}"
    return f"{path}: not valid TOML: {message}"


class _Reader:
    """
    Turn a parsed config document into specs, collecting every mistake.
    """

    def __init__(self, path: str, text: str, defaults: Mapping[str, Any]) -> None:
        self.path = path
        self.lines = _KeyLines(text)
        self.defaults = defaults
        self.errors: list[str] = []

    def error(self, keys: tuple[str, ...], message: str) -> None:
        """
        Record C{FILE:LINE: message}, the line being where C{keys} is defined.
        """
        line = self.lines.find(keys)
        where = f"{self.path}:{line}" if line is not None else self.path
        self.errors.append(f"{where}: {message}")

    def read(self, document: dict[str, Any]) -> list[ConsoleSpec]:
        """
        Every console of the document, or L{ConfigError} listing every mistake.
        """
        specs: list[ConsoleSpec] = []
        for key in document:
            if key != "console":
                self.error(
                    (key,),
                    f"unknown setting {_quote(key)}: a config file holds only "
                    "[console.NAME] tables; server-wide settings stay command-line "
                    "options (see cloud-console --help)",
                )
        consoles = document.get("console", {})
        if not isinstance(consoles, dict):
            self.error(
                ("console",),
                f"console must be tables like [console.vm1], not {_show(consoles)}",
            )
            consoles = {}
        for name, table in consoles.items():
            spec = self.console(name, table)
            if spec is not None:
                specs.append(spec)
        if self.errors:
            raise ConfigError(self.errors)
        return specs

    def console(self, name: str, table: Any) -> ConsoleSpec | None:
        """
        One C{[console.NAME]} table as a spec, or C{None} after recording why not.
        """
        where = f"[console.{_table_key(name)}]"
        keys = ("console", name)
        if not valid_name(name):
            self.error(keys, f"{where} console name {_quote(name)} is not allowed; {NAME_RULE}")
            return None
        if not isinstance(table, dict):
            self.error(keys, f"{where} must be a table of settings, not {_show(table)}")
            return None
        ok = True
        for key in table:
            if key not in CONSOLE_KEYS:
                near = difflib.get_close_matches(key, CONSOLE_KEYS, n=1)
                hint = f" (did you mean {_quote(near[0])}?)" if near else ""
                self.error(
                    keys + (key,),
                    f"{where} unknown key {_quote(key)}{hint}; known keys: "
                    + ", ".join(CONSOLE_KEYS),
                )
                ok = False
        fields = spec_defaults(self.defaults, name)
        checks: list[tuple[str, str, Any, str]] = [
            ("title", "title", lambda v: isinstance(v, str) and v != "", "text (not empty)"),
            ("log-file", "log_file", lambda v: isinstance(v, str) and v != "", "a file path"),
            ("history-size", "history_size", lambda v: _whole(v) and v > 0,
             "a whole number above 0"),
            ("head-size", "head_size", lambda v: _whole(v) and v >= 0,
             "a whole number, 0 or more"),
            ("read-only", "read_only", lambda v: isinstance(v, bool), "true or false"),
            ("reopen", "reopen", lambda v: isinstance(v, bool), "true or false"),
            ("log-timestamps", "log_timestamps",
             lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
             "a number of minutes, 0 (never) or more"),
        ]
        for key, field, check, expected in checks:
            if key in table:
                value = table[key]
                if check(value):
                    fields[field] = value
                else:
                    self.error(
                        keys + (key,), f"{where} {key} must be {expected}, not {_show(value)}"
                    )
                    ok = False
        source = table.get("source")
        if "source" not in table:
            self.error(keys, f'{where} has no source; add source = "SOURCE"')
            return None
        if not isinstance(source, str):
            self.error(
                keys + ("source",), f"{where} source must be text, not {_show(source)}"
            )
            return None
        try:
            parsed = parse_source(source)
        except ValueError as e:
            self.error(keys + ("source",), f"{where} source: {e}")
            return None
        if fields.get("reopen") and not parsed.follows_reboots:
            self.error(keys + ("reopen",), f"{where} {reopen_refusal(source)}")
            return None
        if not ok:
            return None
        return spec_for(name, source, "config", **fields)


def _whole(value: Any) -> bool:
    """
    An integer, and not a boolean (Python's C{True} is an C{int}).
    """
    return isinstance(value, int) and not isinstance(value, bool)


def _quote(text: str) -> str:
    """
    A key or name as TOML would write it in a basic string: C{"web-1"}.
    """
    return json.dumps(text, ensure_ascii=False)


def _table_key(name: str) -> str:
    """
    A table key as written in a header: bare when it can be, quoted otherwise.
    """
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _quote(name)


def _show(value: Any) -> str:
    """
    A value as the operator wrote it in TOML terms: C{"big"}, C{true}, C{12}, a table.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


#: A table header, C{[a.b]} or C{[[a.b]]}, with an optional comment after it.
_HEADER = re.compile(r"\s*\[\[?(?P<keys>[^\]\[]+)\]\]?\s*(#.*)?$")
#: The start of a C{key = value} line (the key may be dotted and quoted).
_KEY_LINE = re.compile(r"\s*(?P<keys>(?:\"(?:[^\"\\]|\\.)*\"|'[^']*'|[A-Za-z0-9_.\- \t])+?)\s*=")
#: One part of a dotted key.
_KEY_PART = re.compile(r"\s*(?:\"((?:[^\"\\]|\\.)*)\"|'([^']*)'|([A-Za-z0-9_-]+))\s*(?:\.|$)")


class _KeyLines:
    """
    Where each key of a TOML text is defined, for error messages.

    tomllib gives values, not positions, so this is a best-effort reading of table
    headers and C{key =} lines (dotted and quoted keys included). It can be fooled by
    lines inside multi-line strings; then an error may point at a wrong line or have
    none, never a wrong key, since the message names the key as well.
    """

    def __init__(self, text: str) -> None:
        self.defined: list[tuple[int, tuple[str, ...]]] = []
        table: tuple[str, ...] = ()
        for number, line in enumerate(text.splitlines(), start=1):
            header = _HEADER.match(line)
            if header is not None:
                parts = _key_parts(header.group("keys"))
                if parts is not None:
                    table = parts
                    self.defined.append((number, table))
                continue
            key = _KEY_LINE.match(line)
            if key is not None:
                parts = _key_parts(key.group("keys"))
                if parts is not None:
                    self.defined.append((number, table + parts))

    def find(self, keys: tuple[str, ...]) -> int | None:
        """
        The line defining C{keys}, else the line defining its longest prefix (the
        table or inline table holding it), else C{None}.
        """
        best: tuple[int, int] | None = None
        for number, defined in self.defined:
            if defined == keys:
                return number
            if keys[: len(defined)] == defined and (best is None or len(defined) > best[0]):
                best = (len(defined), number)
        return best[1] if best is not None else None


def _key_parts(text: str) -> tuple[str, ...] | None:
    """
    C{a."b.c".d} as C{("a", "b.c", "d")}; C{None} when it does not read as a key.
    """
    parts: list[str] = []
    position = 0
    text = text.strip()
    while position < len(text):
        match = _KEY_PART.match(text, position)
        if match is None or match.end() == position:
            return None
        basic, literal, bare = match.groups()
        if basic is not None:
            try:
                parts.append(json.loads(f'"{basic}"'))
            except ValueError:
                parts.append(basic)
        else:
            parts.append(literal if literal is not None else bare)
        position = match.end()
    return tuple(parts) if parts else None
