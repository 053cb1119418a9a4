"""Read a `llama-server --help` text: which flag spellings the binary accepts, and their allowed values.

The help text is the binary's own statement of its dialect, so gpubox renders a command against it
(provision.serve.render) and refuses to start a server with a flag the binary does not know.

Entries look like this (description column at 40; a long head puts the description on the next line):

    -ctk,  --cache-type-k TYPE              KV cache data type for K
                                            allowed values: f32, f16, ... turbo3, turbo4
    --spec-type [none|draft|mtp|nextn|...]  type of speculative decoding ...
    --draft, --draft-n, --draft-max N       the argument has been removed. use --spec-draft-n-max ...

Flags whose description says "the argument has been removed" are listed under "removed" and NOT under
"flags": the post-sync fork keeps them only as stubs that exit with an error.

>>> p = parse("-ctk,  --cache-type-k TYPE              KV cache type\\n"
...           "                                        allowed values: f16, q8_0, turbo3\\n"
...           "--draft-max N                           the argument has been removed. use --spec-draft-n-max\\n")
>>> sorted(p["flags"]), p["values"]["cache_type"], sorted(p["removed"])
(['--cache-type-k', '-ctk'], ['f16', 'q8_0', 'turbo3'], ['--draft-max'])
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

# A spelling: -x, --long-name, -ncmoed, --spec-draft-n-max ...
FLAG_RE = re.compile(r"-{1,2}[A-Za-z0-9][A-Za-z0-9_-]*")
REMOVED_RE = re.compile(r"argument has been removed", re.I)
ENV_RE = re.compile(r"\(env: ([A-Z0-9_]+)\)")
ALLOWED_RE = re.compile(r"allowed values:\s*(.*?)(?:\(default|\(env:|$)", re.I | re.S)

# The values gpubox cares about, keyed by a name in gpubox's terms, and the flag whose entry holds them.
VALUE_SOURCES = {
    "cache_type": "--cache-type-k",
    "cache_type_v": "--cache-type-v",
    "cache_type_draft": "--cache-type-k-draft",
    "cache_type_v_draft": "--cache-type-v-draft",
    "spec_type": "--spec-type",
    "flash_attn": "--flash-attn",
    "load_mode": "--load-mode",       # upstream's replacement for --mlock/--no-mmap: "- auto: ..." items
}
# Choices listed as "- name: text" items in a description (upstream's --load-mode).
ITEM_RE = re.compile(r"(?:^|\s)- ([a-z0-9][a-z0-9+_-]*):")

DIALECTS = ("pre-sync", "post-sync", "upstream")


def _split_head(head: str) -> tuple[list[str], str]:
    """`-ctk,  --cache-type-k TYPE` -> (['-ctk', '--cache-type-k'], 'TYPE')."""
    spellings: list[str] = []
    pos = 0
    while True:
        m = re.compile(r"\s*(" + FLAG_RE.pattern + r")").match(head, pos)
        if not m:
            break
        spellings.append(m.group(1))
        pos = m.end()
        comma = re.compile(r"\s*,").match(head, pos)
        if not comma:
            break
        pos = comma.end()
    return spellings, head[pos:].lstrip()


def _arg_values(arg: str) -> list[str]:
    """Choices written into the argument itself: `[on|off|auto]`, `{none,linear,yarn}`, `none,draft-simple,...`."""
    a = arg.strip()
    if not a:
        return []
    if a[0] in "[{<" and a[-1] in "]}>":
        a = a[1:-1]
    if "|" in a:
        parts = a.split("|")
    elif "," in a and " " not in a and "=" not in a:
        parts = a.split(",")
    else:
        return []
    parts = [p.strip() for p in parts]
    if any(not re.match(r"^[a-z0-9][a-z0-9_.-]*$", p) for p in parts):
        return []
    return parts


def parse(text: str) -> dict[str, Any]:
    """Parse a help text. Returns

    {"flags": set of accepted spellings, "removed": set of removed-stub spellings,
     "values": {"cache_type": [...], "spec_type": [...], "flash_attn": [...], ...},
     "options": {canonical long spelling: {"spellings", "arg", "env", "removed", "help"}},
     "dialect": "pre-sync" | "post-sync" | "upstream" | "unknown"}
    """
    entries: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = None
    for raw in text.splitlines():
        line = raw.rstrip("\n")
        if line.startswith("-") and not line.startswith("-----"):
            # Spellings, then the argument; the description starts after a run of 2+ spaces (or on the
            # next line when the head is long).
            spellings, rest = _split_head(line)
            arg, _, desc = rest.partition("  ")
            arg, desc = arg.strip(), desc.strip()
            if not spellings:
                cur = None
                continue
            cur = {"spellings": spellings, "arg": arg, "desc": [desc] if desc else []}
            entries.append(cur)
        elif cur is not None and line.startswith(" ") and line.strip():
            cur["desc"].append(line.strip())
        elif not line.strip():
            # A blank line ends an entry's description (sections are separated by blank lines).
            cur = None if cur is None or cur["desc"] else cur
        else:
            cur = None

    flags: set[str] = set()
    removed: set[str] = set()
    options: dict[str, dict[str, Any]] = {}
    for e in entries:
        desc = " ".join(e["desc"])
        is_removed = bool(REMOVED_RE.search(desc))
        env = ENV_RE.search(desc)
        longs = [s for s in e["spellings"] if s.startswith("--")]
        key = longs[-1] if longs else e["spellings"][-1]
        options[key] = {"spellings": e["spellings"], "arg": e["arg"], "env": env.group(1) if env else "",
                        "removed": is_removed, "help": desc}
        (removed if is_removed else flags).update(e["spellings"])

    def entry_for(flag: str) -> dict[str, Any] | None:
        for o in options.values():
            if flag in o["spellings"]:
                return o
        return None

    values: dict[str, list[str]] = {}
    for name, flag in VALUE_SOURCES.items():
        o = entry_for(flag)
        if o is None or o["removed"]:
            continue
        allowed = ALLOWED_RE.search(o["help"])
        if allowed:
            vals = [v.strip() for v in allowed.group(1).replace("\n", " ").split(",") if v.strip()]
        else:
            vals = _arg_values(o["arg"])
        if not vals and name == "load_mode":
            vals = ITEM_RE.findall(o["help"])
        if vals:
            values[name] = vals
    out = {"flags": flags, "removed": removed, "values": values, "options": options}
    out["dialect"] = detect_dialect(out)
    return out


def detect_dialect(parsed: dict[str, Any]) -> str:
    """pre-sync fork (has --draft-block-size), post-sync fork (turbo cache types, --spec-draft-n-max),
    or upstream llama.cpp (no turbo cache types)."""
    flags = parsed["flags"]
    caches = parsed["values"].get("cache_type", [])
    if not flags or "--cache-type-k" not in flags:
        return "unknown"
    turbo = any(v.startswith("turbo") for v in caches)
    if turbo and "--draft-block-size" in flags:
        return "pre-sync"
    if turbo:
        return "post-sync"
    return "upstream"


def accepts(parsed: dict[str, Any], flag: str) -> bool:
    """True when the binary accepts this spelling (`_` may replace `-` after the leading dashes)."""
    if flag in parsed["flags"]:
        return True
    if flag.startswith("--"):
        return ("--" + flag[2:].replace("_", "-")) in parsed["flags"]
    return False


def canonical(parsed: dict[str, Any], flag: str) -> str | None:
    """The entry key (last long spelling) of the option a spelling belongs to, or None."""
    for key, o in parsed["options"].items():
        if flag in o["spellings"]:
            return key
    return None


# --- storing the result (the build step writes it next to the binary) ----------------------------------

FILENAME = "gpubox-dialect.json"


def to_json(parsed: dict[str, Any], **extra: Any) -> str:
    """JSON with sorted lists for the sets; `extra` (binary path, version, commit) is stored alongside."""
    d = dict(parsed)
    d["flags"] = sorted(parsed["flags"])
    d["removed"] = sorted(parsed["removed"])
    d.update(extra)
    return json.dumps(d, indent=1, sort_keys=True)


def from_json(text: str) -> dict[str, Any]:
    d = json.loads(text)
    d["flags"] = set(d.get("flags", []))
    d["removed"] = set(d.get("removed", []))
    d.setdefault("values", {})
    d.setdefault("options", {})
    if not d.get("dialect"):
        d["dialect"] = detect_dialect(d)
    return d


def load(path: str | Path) -> dict[str, Any]:
    """A stored JSON result, or a raw help text (anything that does not start with `{`)."""
    text = Path(path).read_text()
    return from_json(text) if text.lstrip().startswith("{") else parse(text)
