"""``hl7bridge user add|passwd|role|token|revoke|remove|list``: the console's and the API's accounts.

``cli.py`` opens the log and turns an ``AccountError`` into one line on stderr (exit 2); this module builds the
parser, reads the password and calls ``workflow.accounts``. A password is read from standard input
(``--password-stdin``, one line) or, on a terminal, typed twice without echo; it is never an argument (a
command line is visible to every local user in ``ps``) and never printed.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Engine

from hl7bridge.app.cli_format import add_by, print_table, when
from hl7bridge.core.status import Role
from hl7bridge.workflow import accounts
from hl7bridge.workflow.accounts import MAX_PASSWORD_CHARS, AccountError

#: Bytes read for one line of password: the longest password allowed, in UTF-8, and its line end.
_LINE_BYTES = MAX_PASSWORD_CHARS * 4 + 2


def add_parser(
    sub: Any,
    with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
    handler: Callable[[argparse.Namespace], int],
) -> None:
    user = sub.add_parser("user", help="console and API accounts: add, passwd, role, token, revoke, remove, list")
    user_sub = user.add_subparsers(dest="user_command", required=True)
    roles = [r.value for r in Role]
    add = with_config(user_sub.add_parser("add", help="a new account with a role"))
    add.add_argument("name", metavar="NAME", help="1 to 64 of A-Z a-z 0-9 . _ @ -")
    add.add_argument("--role", required=True, choices=roles,
                     help="viewer: reads, patient data masked; operator: also acts and unmasks with a reason; "
                          "admin: also manages accounts")  # fmt: skip
    passwd = with_config(user_sub.add_parser("passwd", help="set a new password (ends the user's console sessions)"))
    passwd.add_argument("name", metavar="NAME")
    for p in (add, passwd):
        p.add_argument("--password-stdin", action="store_true",
                       help="read the password from standard input, one line (without it, a terminal asks twice)")  # fmt: skip
    role = with_config(user_sub.add_parser("role", help="change a user's role"))
    role.add_argument("name", metavar="NAME")
    role.add_argument("role", choices=roles)
    token = with_config(user_sub.add_parser("token", help="issue an API token (printed once: the line's last word)"))
    token.add_argument("name", metavar="NAME")
    token.add_argument("--label", default="", metavar="TEXT", help="what the token is for, e.g. nightly export")
    revoke = with_config(user_sub.add_parser("revoke", help="revoke every API token of a user"))
    revoke.add_argument("name", metavar="NAME")
    remove = with_config(user_sub.add_parser("remove", help="remove a user with its API tokens and sessions"))
    remove.add_argument("name", metavar="NAME")
    listing = with_config(user_sub.add_parser("list", help="the accounts, their roles, last login and tokens"))
    listing.add_argument("--json", action="store_true")
    for p in (add, passwd, role, token, revoke, remove):
        add_by(p, "acts")
    for p in (add, passwd, role, token, revoke, remove, listing):
        p.set_defaults(func=handler)


def run(args: argparse.Namespace, engine: Engine, actor: str) -> int:
    command, name = args.user_command, getattr(args, "name", "")
    if command == "list":
        return _list(engine, args.json)
    accounts.check_name(name)
    if command == "add":
        accounts.add_user(engine, name, args.role, read_password(args.password_stdin), actor=actor)
        print(f"added user {name} ({args.role})")
    elif command == "passwd":
        accounts.set_password(engine, name, read_password(args.password_stdin), actor=actor)
        print(f"changed the password of {name}; its console sessions have ended (API tokens stay)")
    elif command == "role":
        accounts.set_role(engine, name, args.role, actor=actor)
        print(f"{name} is now {args.role}")
    elif command == "token":
        secret = accounts.issue_token(engine, name, actor=actor, label=args.label)
        print(f"new API token for {name}, shown only now: {secret}")
    elif command == "revoke":
        count = accounts.revoke_tokens(engine, name, actor=actor)
        print(f"revoked {count} API token(s) of {name}")
    elif command == "remove":
        accounts.remove_user(engine, name, actor=actor)
        print(f"removed user {name} with its API tokens and sessions")
    return 0


def read_password(from_stdin: bool) -> str:
    """One line of standard input with its line end stripped (and nothing else: spaces are the password's), or
    typed twice on a terminal."""
    if not from_stdin:
        if not sys.stdin.isatty():
            raise AccountError("give the password on standard input with --password-stdin (one line)")
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise AccountError("the two passwords differ; nothing changed")
        return first
    line = sys.stdin.buffer.readline(_LINE_BYTES)
    if not line:
        raise AccountError("no password on standard input (--password-stdin reads one line)")
    if len(line) >= _LINE_BYTES and not line.endswith(b"\n"):
        raise AccountError(f"a password takes at most {MAX_PASSWORD_CHARS} characters")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise AccountError("the password on standard input is not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if "\n" in text or "\r" in text:
        raise AccountError("a password is one line")
    return text


def _list(engine: Engine, as_json: bool) -> int:
    users = accounts.list_users(engine)
    if as_json:
        print(json.dumps({"users": [u.to_json() for u in users]}, indent=2))
        return 0
    if not users:
        print("no users (add the first: hl7bridge user add NAME --role admin --password-stdin)")
        return 0
    print_table(("NAME", "ROLE", "CREATED", "LAST LOGIN", "TOKENS"),
                [(u.name, u.role, when(u.created_at), when(u.last_login_at) if u.last_login_at else "never",
                  str(u.tokens)) for u in users])  # fmt: skip
    return 0
