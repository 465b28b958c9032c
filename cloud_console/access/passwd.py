"""
C{cloud-console-passwd FILE USER [--read-only | --control] [--consoles PATTERNS]}: add or
replace a user in a password file (C{--control}: the right to the consoles' actions); C{--consoles web-*,db1} limits the user to the consoles whose
names match those fnmatch patterns (default: every console).

The password is read from the terminal (twice), or from standard input when it is not a
terminal, and stored only as a PBKDF2-SHA256 hash.
"""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path
from typing import Sequence

from .checkers import hash_password, load_password_file
from .policy import CredentialFileError, parse_console_patterns

USAGE = "usage: cloud-console-passwd <password_file> <user> [--read-only | --control] [--consoles PATTERNS]\n"


def main(argv: Sequence[str] | None = None) -> int:
    rest = list(sys.argv[1:] if argv is None else argv)
    read_only = False
    control = False
    consoles: tuple[str, ...] = ()
    args: list[str] = []
    while rest:
        arg = rest.pop(0)
        if arg == "--read-only":
            read_only = True
        elif arg == "--control":
            control = True
        elif arg == "--consoles" or arg.startswith("--consoles="):
            if arg == "--consoles":
                if not rest:
                    sys.stderr.write(USAGE)
                    return 1
                value = rest.pop(0)
            else:
                value = arg.partition("=")[2]
            try:
                consoles = parse_console_patterns(value)
            except ValueError as e:
                sys.stderr.write(f"cloud-console-passwd: --consoles: {e}\n")
                return 1
        else:
            args.append(arg)
    if len(args) != 2 or ":" in args[1] or not args[1] or (read_only and control):
        sys.stderr.write(USAGE)
        return 1
    path, user = args
    if os.path.exists(path):
        try:
            load_password_file(path)
        except CredentialFileError as e:
            sys.stderr.write(f"cloud-console-passwd: {e}\n")
            return 2
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {user}: ")
        if getpass.getpass("again: ") != password:
            sys.stderr.write("cloud-console-passwd: the passwords differ\n")
            return 1
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        sys.stderr.write("cloud-console-passwd: empty password refused\n")
        return 1
    entry = f"{user}:{hash_password(password)}" + (":read-only" if read_only else "")
    entry += ":control" if control else ""
    if consoles:
        entry += ":consoles=" + ",".join(consoles)
    lines = []
    if os.path.exists(path):
        lines = [
            line for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.split(":", 1)[0] != user
        ]
    lines.append(entry)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
