"""Values for the systemd unit and its EnvironmentFile, escaped by systemd's own rules (docs/systemd.md).

systemd reads a unit line by line, expands `%` specifiers in most settings, splits ExecStart= into words
(quotes and C escapes), and refuses an executable name with a quote, a backslash or a control character
(string_is_safe in its config_parse_exec: "Executable name contains special characters", fatal). So:

    exec_path(p)    ExecStart='s program: no quote/backslash/control character (refused), %% for %, and
                    double quotes around it when it has white space (the executable name is not
                    $-expanded, so $ stays as it is)
    path_value(p)   EnvironmentFile=, StandardOutput=append:...: taken to the end of the line after
                    specifier expansion: %% for %, no control character, no white space at either end
    text_value(s)   Description=: %% for %, no control character
    env_quote(v)    a value in the EnvironmentFile, which both systemd and the launch script's `.` read:
                    double quotes with \\ before " \\ ` $ (the four characters both treat as escapable)

Anything these refuse raises UnitValueError naming the value and the rule; the configuration schema
refuses such paths earlier (state_dir has no quotes), so this is the last line, not the first.

>>> exec_path("/srv/gpu box %h/serve/llama-server.sh")
'"/srv/gpu box %%h/serve/llama-server.sh"'
>>> path_value("/srv/100% x/log")
'/srv/100%% x/log'
>>> env_quote('/a "b" $HOME `id` \\\\')
'"/a \\\\"b\\\\" \\\\$HOME \\\\`id\\\\` \\\\\\\\"'
"""

from __future__ import annotations

import re


class UnitValueError(ValueError):
    pass


def _printable(v: str, what: str) -> None:
    if not isinstance(v, str) or not v.isprintable():
        raise UnitValueError(f"{what} {v!r} holds a control character (newline, tab, NUL...): systemd reads the "
                             "unit line by line")


def exec_path(p: str) -> str:
    _printable(p, "the program path")
    bad = [ch for ch in "\"'\\" if ch in p]
    if bad or not p.startswith("/"):
        raise UnitValueError(f"the program path {p!r} " + (f"holds {bad[0]!r}: systemd refuses quotes and backslashes "
                             "in an ExecStart= executable name" if bad else "is not absolute"))
    v = p.replace("%", "%%")
    return f'"{v}"' if re.search(r"\s", v) else v


def path_value(p: str) -> str:
    _printable(p, "the path")
    if p != p.strip() or not p.startswith("/"):
        raise UnitValueError(f"the path {p!r} must be absolute, without white space at either end")
    return p.replace("%", "%%")


def text_value(s: str) -> str:
    _printable(s, "the text")
    return s.strip().replace("%", "%%")


def env_quote(v: str) -> str:
    _printable(v, "the environment value")
    return '"' + re.sub(r'(["\\`$])', r"\\\1", v) + '"'
