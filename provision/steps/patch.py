"""Step 4: CUDA 12.9 crt/math_functions.h patch for glibc >= 2.41.

glibc 2.41 declares sinpi, cospi, sinpif, cospif (2.42 also rsqrt, rsqrtf) `noexcept(true)` in C++;
CUDA 12.9 declares them without an exception specification and nvcc stops with "exception
specification is incompatible with that of previous function". The rules that fix it live in
`patches/<cfg.patch.rules>` (see patches/README.md): twelve declarations (each function's device
declaration and its host-side `__func__(...)` form, changed together) get a gate macro that a
preamble defines from `__GLIBC_PREREQ`, so the patched header is right on any glibc.

States of the header (`state_of(facts, cfg).kind`):
  missing          no header: CUDA is not installed yet; apply refuses until it is
  unpatched        the twelve declarations found once each, none patched -> patch
  partial          some pairs patched, some not (or a pair split) -> patch the rest
  patched-gpubox   satisfied (this step's rules)
  patched-recipe   satisfied (the original recipe's hand edit: noexcept (true) / throw())
  patched-mixed    satisfied (every pair patched, in either style)
  unknown          not a header these rules know: apply refuses and leaves the file untouched
  unread           the fact could not be read (treated as a change; apply reads the file itself)

apply reads the header from the target, rewrites it in Python, checks every rule matched exactly
once, keeps the original as `<header>.gpubox-orig` (atomic copy, kept only while it is an
original), and replaces the header with a temp file + rename in the same directory after checking
the temp file's sha256, so a kill at any moment leaves the old or the new header, never a mix.
Owner and mode are kept. `undo` restores the backup.

The build step calls `state_of(facts, cfg)` (or `check`) before every build: a `cuda-crt-12-9`
update silently puts the unpatched header back. Its FACTS must include `HEADER_FACT`.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from .. import resources
from ..engine import Change, Check, StepError, run_changes
from ..facts import UNKNOWN, Fact
from ..ops import Op
from ..host import sh

NAME = "patch"
TITLE = "CUDA math_functions.h patch for glibc >= 2.41"
BACKUP_SUFFIX = ".gpubox-orig"
PATCHES_DIR = resources.PATCHES

UNPATCHED, GPUBOX, RECIPE, SPLIT = "unpatched", "gpubox", "recipe", "split"
SATISFIED_KINDS = ("patched-gpubox", "patched-recipe", "patched-mixed")


# --- the rule file ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    function: str
    form: str                 # "device" | "host"
    glibc: str                # the glibc version from which glibc declares the function noexcept
    line: int                 # where it is in 12.9.86 (for messages only; matching never uses it)
    before: str
    after: str
    specifier: str            # the gate macro this rule inserts
    recipe: tuple[str, ...]   # specifier regexes the recipe's hand edit uses

    @property
    def id(self) -> str:
        return f"{self.function}/{self.form}"

    @functools.cached_property
    def probe(self) -> re.Pattern:
        """A line that declares this function in this form, whatever follows."""
        return re.compile(r"\s*" + self.before)

    @functools.cached_property
    def regex(self) -> re.Pattern:
        specs = "|".join([re.escape(self.specifier)] + list(self.recipe))
        return re.compile(r"(?P<lead>\s*)(?P<before>" + self.before + r")(?P<spec>\s*(?:" + specs + r"))?"
                          r"(?P<after>" + self.after + r")(?P<tail>.*)$", re.DOTALL)

    def state(self, line: str) -> str | None:
        """unpatched / gpubox / recipe for a line this rule knows, None for any other text."""
        m = self.regex.match(line.rstrip("\r\n"))
        if not m:
            return None
        spec = (m.group("spec") or "").strip()
        outer = (m.groupdict().get("outer") or "").strip()
        if not spec and not outer:
            return UNPATCHED
        if spec == self.specifier and not outer:
            return GPUBOX
        if spec == self.specifier:          # the gate macro plus a hand-written throw(): not ours
            return None
        return RECIPE

    def rewrite(self, line: str) -> str:
        """The line with this rule's gate macro as its only exception specification."""
        body = line.rstrip("\r\n")
        ending = line[len(body):]
        m = self.regex.match(body)
        if not m:
            raise ValueError(f"{self.id}: line does not match: {body!r}")
        cut = [m.span("spec")] + ([m.span("outer")] if m.groupdict().get("outer") is not None else [])
        out, pos = [], 0
        for a, b in sorted(s for s in cut if s[0] >= 0):
            out.append(body[pos:a])
            pos = b
        out.append(body[pos:])
        kept = "".join(out)
        # `before` ends at the same place in the kept text: nothing was cut before it.
        at = m.end("before")
        return kept[:at] + " " + self.specifier + kept[at:] + ending


@dataclass(frozen=True)
class RuleSet:
    id: str
    describes: str
    originals: dict[str, str]
    select: str
    specifiers: dict[str, str]
    preamble_after: str
    begin: str
    end: str
    preamble: str
    rules: tuple[Rule, ...]
    path: str = ""

    @functools.cached_property
    def anchor(self) -> re.Pattern:
        return re.compile(self.preamble_after)

    def preamble_lines(self) -> list[str]:
        return [self.begin] + self.preamble.rstrip("\n").split("\n") + [self.end]

    def functions(self) -> list[str]:
        seen: list[str] = []
        for r in self.rules:
            if r.function not in seen:
                seen.append(r.function)
        return seen

    def gate(self, function: str) -> str:
        return next(r.glibc for r in self.rules if r.function == function)


def load_rules(path: str | Path) -> RuleSet:
    """Parse and sanity-check a rule file; a bad file is a StepError naming the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise StepError(f"{NAME}: cannot read the rule file {path}: {e}",
                        "restore patches/ from the gpubox repository (git checkout patches/)")

    def need(d: dict, key: str, where: str) -> Any:
        if not isinstance(d, dict) or key not in d:
            raise StepError(f"{NAME}: rule file {path}: {where}{key} is missing", "see patches/README.md")
        return d[key]

    specifiers = {str(k): str(v) for k, v in need(raw, "specifier", "").items()}
    recipe = tuple(str(x) for x in need(raw, "recipe_specifiers", ""))
    pre = need(raw, "preamble", "")
    rules = []
    for i, r in enumerate(need(raw, "rules", "")):
        where = f"rules[{i}]."
        gate = str(need(r, "glibc", where))
        if gate not in specifiers:
            raise StepError(f"{NAME}: rule file {path}: {where}glibc {gate!r} has no entry in `specifier`",
                            "add it to `specifier` (see patches/README.md)")
        rule = Rule(str(need(r, "function", where)), str(need(r, "form", where)), gate, int(r.get("line", 0)),
                    str(need(r, "before", where)), str(need(r, "after", where)), specifiers[gate], recipe)
        try:
            rule.regex, rule.probe
        except re.error as e:
            raise StepError(f"{NAME}: rule file {path}: {where} has a bad pattern: {e}", "fix the pattern")
        rules.append(rule)
    forms = {(r.function, r.form) for r in rules}
    for f in {r.function for r in rules}:
        if {(f, "device"), (f, "host")} - forms:
            raise StepError(f"{NAME}: rule file {path}: {f} needs both a device and a host rule",
                            "a declaration and its host form change together (see patches/README.md)")
    return RuleSet(str(need(raw, "id", "")), str(raw.get("describes", "")),
                   {str(k): str(v) for k, v in (raw.get("originals") or {}).items()},
                   str(need(raw, "select", "")), specifiers, str(need(pre, "after", "preamble.")),
                   str(need(pre, "begin", "preamble.")), str(need(pre, "end", "preamble.")),
                   str(need(pre, "text", "preamble.")), tuple(rules), str(path))


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime: float) -> RuleSet:
    return load_rules(path)


def rules_for(cfg: dict) -> RuleSet:
    name = cfg["patch"]["rules"]
    path = Path(name) if Path(name).is_absolute() else PATCHES_DIR / name
    try:
        mtime = path.stat().st_mtime
    except OSError:
        raise StepError(f"{NAME}: rule file {path} not found (gpubox.patch.rules = {name!r})",
                        "name a file in patches/ (default: cuda-12.9-glibc-2.41.yaml)")
    return _load_cached(str(path), mtime)


def header_path(cfg: dict) -> str:
    return cfg["cuda"]["prefix"].rstrip("/") + "/" + cfg["patch"]["header"].lstrip("/")


# --- analysis: the same code for the fact's line extract and for the whole file ----------------------

@dataclass
class Analysis:
    kind: str                                     # unpatched / partial / patched-* / unknown
    pairs: dict[str, str] = field(default_factory=dict)       # function -> unpatched/gpubox/recipe/split
    lines: dict[str, tuple[int, str]] = field(default_factory=dict)  # rule id -> (line number, text)
    preamble: str = "absent"                      # absent / present / damaged
    problems: list[str] = field(default_factory=list)

    @property
    def satisfied(self) -> bool:
        return self.kind in SATISFIED_KINDS

    @property
    def todo(self) -> list[str]:
        """Functions whose pair must be (re)written in gpubox style."""
        return [f for f, s in self.pairs.items() if s not in (GPUBOX, RECIPE)]


def analyze(numbered: Iterable[tuple[int, str]], rs: RuleSet) -> Analysis:
    """Classify a header given as (line number, line text) pairs: all of its lines, or the fact's
    extract (every line the rules can match is in it)."""
    a = Analysis("unknown")
    found: dict[str, list[tuple[int, str]]] = {r.id: [] for r in rs.rules}
    begins, ends, anchors = [], [], []
    block: list[str] | None = None
    blocks: list[list[str]] = []
    for n, text in numbered:
        line = text.rstrip("\r\n")
        if line == rs.begin:
            begins.append(n)
            block = []
        if block is not None:
            block.append(line)
        if line == rs.end:
            ends.append(n)
            if block is not None:
                blocks.append(block)
            block = None
        if rs.anchor.search(line):
            anchors.append(n)
        for r in rs.rules:
            if r.probe.match(line):
                found[r.id].append((n, line))
    states: dict[str, str | None] = {}
    for r in rs.rules:
        hits = found[r.id]
        if len(hits) != 1:
            where = f" (lines {', '.join(str(n) for n, _ in hits)})" if hits else ""
            a.problems.append(f"{r.id} declaration of {r.function} (line {r.line} in 12.9.86) found "
                              f"{len(hits)} times{where}, expected exactly once")
            states[r.id] = None
            continue
        n, line = hits[0]
        a.lines[r.id] = (n, line)
        states[r.id] = r.state(line)
        if states[r.id] is None:
            a.problems.append(f"{r.id} declaration at line {n} has text these rules do not know: {line.strip()!r}")
    if not begins and not ends:
        a.preamble = "absent"
    elif len(begins) == 1 and len(ends) == 1 and blocks and blocks[0] == rs.preamble_lines():
        a.preamble = "present"
    else:
        a.preamble = "damaged"
        a.problems.append(f"the gpubox preamble block ({rs.begin!r} ... {rs.end!r}) is not the one the rule file "
                          f"writes: {len(begins)} begin / {len(ends)} end markers"
                          + ("" if len(begins) != 1 or len(ends) != 1 else ", its text was edited"))
    for f in rs.functions():
        dev, host = states.get(f"{f}/device"), states.get(f"{f}/host")
        if dev is None or host is None:
            continue
        a.pairs[f] = dev if dev == host else SPLIT
    if a.problems:
        return a
    if a.preamble == "absent" and len(anchors) != 1 and any(s != RECIPE for s in a.pairs.values()):
        a.problems.append(f"the preamble anchor {rs.preamble_after!r} found {len(anchors)} times, expected once")
        return a
    vals = set(a.pairs.values())
    if vals == {GPUBOX}:
        a.kind = "patched-gpubox"
    elif vals == {RECIPE}:
        a.kind = "patched-recipe"
    elif vals <= {GPUBOX, RECIPE}:
        a.kind = "patched-mixed"
    elif vals == {UNPATCHED} and a.preamble == "absent":
        a.kind = "unpatched"
    else:
        a.kind = "partial"
    if GPUBOX in vals and a.preamble != "present":
        a.kind = "partial"          # gate macros used but not defined: the preamble must be added
    return a


def analyze_text(text: str, rs: RuleSet) -> Analysis:
    return analyze(enumerate(text.splitlines(keepends=True), 1), rs)


@dataclass
class Edits:
    """The change as line edits of the original: `replace` {line number: new line (no newline)}, and
    `insert` lines after line `insert_after` (0 = none). Small enough to send in a command; the target
    applies them with awk and the result's sha256 must equal the text Python computed."""
    replace: dict[int, str] = field(default_factory=dict)
    insert_after: int = 0
    insert: list[str] = field(default_factory=list)

    def apply_to(self, text: str) -> str:
        """The edited text, exactly as the target's awk writes it (every line ends in a newline)."""
        if not self.replace and not self.insert:
            return text
        out = []
        for n, line in enumerate(text.splitlines(keepends=True), 1):
            line = self.replace[n] + "\n" if n in self.replace else line
            out.append(line if line.endswith("\n") else line + "\n")
            if n == self.insert_after:
                out.extend(x + "\n" for x in self.insert)
        return "".join(out)


def edits_for(text: str, rs: RuleSet) -> Edits:
    """The edits that patch `text`. Raises StepError unless every rule matched exactly once; an already
    patched header gets no edits."""
    a = analyze_text(text, rs)
    if a.kind == "unknown":
        raise StepError(f"{NAME}: not a header these rules know: " + "; ".join(a.problems),
                        "see patches/README.md")
    e = Edits()
    if a.satisfied:
        return e
    lines = text.splitlines(keepends=True)
    by_id = {r.id: r for r in rs.rules}
    for f in a.todo:
        for form in ("device", "host"):
            r = by_id[f"{f}/{form}"]
            n, _ = a.lines[r.id]
            e.replace[n] = r.rewrite(lines[n - 1]).rstrip("\r\n")
    if a.preamble == "absent":
        e.insert_after = next(i for i, line in enumerate(lines, 1) if rs.anchor.search(line.rstrip("\r\n")))
        e.insert = rs.preamble_lines()
    out = e.apply_to(text)
    after = analyze_text(out, rs)
    if not after.satisfied:     # a rule file whose rewrite it does not itself recognise
        raise StepError(f"{NAME}: the rules in {rs.path} do not produce a header they recognise as patched "
                        f"({after.kind}: {'; '.join(after.problems) or after.pairs})", "fix the rule file")
    return e


def transform(text: str, rs: RuleSet) -> str:
    """The patched header (unchanged when already patched); StepError for a header the rules do not know."""
    return edits_for(text, rs).apply_to(text)


# --- the fact -------------------------------------------------------------------------------------------

_AWK = ('{ if (index($0, ENVIRON["GPUBOX_BEGIN"]) == 1) b = 1; '
        'if (b || $0 ~ ENVIRON["GPUBOX_SELECT"]) print NR ":" $0; '
        'if (index($0, ENVIRON["GPUBOX_END"]) == 1) b = 0 }')


def _fact_command(cfg: dict) -> str:
    rs = rules_for(cfg)
    h = header_path(cfg)
    return sh('h={h}; b={b}; '
              'if [ -f "$b" ]; then echo "backup $(sha256sum < "$b" | cut -c1-64)"; else echo "backup none"; fi; '
              'if [ -f "$h" ]; then echo "exists yes"; echo "stat $(stat -c \'%u:%g %a\' "$h")"; '
              'echo "sha256 $(sha256sum < "$h" | cut -c1-64)"; echo "--lines--"; '
              'GPUBOX_SELECT={sel} GPUBOX_BEGIN={begin} GPUBOX_END={end} awk {awk} "$h"; '
              'else echo "exists no"; fi',
              h=h, b=h + BACKUP_SUFFIX, sel=rs.select, begin=rs.begin, end=rs.end, awk=_AWK)


def parse_header_fact(out: str, rc: int) -> Any:
    """The fact's output -> {exists, sha256, owner, mode, backup, lines: [(n, text)]}."""
    if rc != 0 or "exists " not in out:
        return UNKNOWN
    d: dict[str, Any] = {"exists": False, "sha256": None, "owner": None, "mode": None, "backup": None, "lines": []}
    head, sep, body = out.partition("--lines--\n")
    if not sep and out.endswith("--lines--"):
        head, sep, body = out[:-len("--lines--")], "x", ""
    for line in head.splitlines():
        k, _, v = line.partition(" ")
        if k == "exists":
            d["exists"] = v.strip() == "yes"
        elif k == "sha256" and re.fullmatch(r"[0-9a-f]{64}", v.strip()):
            d["sha256"] = v.strip()
        elif k == "backup":
            d["backup"] = v.strip() if re.fullmatch(r"[0-9a-f]{64}", v.strip()) else None
        elif k == "stat" and len(v.split()) == 2:
            d["owner"], d["mode"] = v.split()
    if d["exists"] and (not sep or not d["sha256"]):
        return UNKNOWN
    for line in body.splitlines():
        n, colon, text = line.partition(":")
        if colon and n.isdigit():
            d["lines"].append((int(n), text))
    return d


HEADER_FACT = Fact("patch_header", _fact_command, parse_header_fact)
FACTS = [HEADER_FACT]


# --- check ----------------------------------------------------------------------------------------------

@dataclass
class PatchState:
    kind: str                      # see the module docstring
    header: str
    analysis: Analysis | None = None
    sha256: str | None = None
    backup: str | None = None
    known_original: str | None = None   # the originals entry this header's sha256 matches

    @property
    def satisfied(self) -> bool:
        return self.kind in SATISFIED_KINDS


def state_of(facts: dict, cfg: dict) -> PatchState:
    """The header's patch state from the gathered facts (pure). The build step calls this before
    every build; the facts must come from a gather that included HEADER_FACT."""
    rs = rules_for(cfg)
    h = header_path(cfg)
    f = facts.get(HEADER_FACT.name, UNKNOWN)
    if not isinstance(f, dict):
        return PatchState("unread", h)
    if not f["exists"]:
        return PatchState("missing", h, backup=f.get("backup"))
    a = analyze(f["lines"], rs)
    return PatchState(a.kind, h, a, f["sha256"], f.get("backup"), rs.originals.get(f["sha256"] or ""))


def _glibc_tuple(v: Any) -> tuple[int, int] | None:
    m = re.match(r"^(\d+)\.(\d+)", str(v))
    return (int(m.group(1)), int(m.group(2))) if m else None


def _why(funcs: list[str], rs: RuleSet, glibc: Any) -> str:
    g = _glibc_tuple(glibc)
    needed = [f for f in funcs if g and g >= _glibc_tuple(rs.gate(f))]
    later = [f for f in funcs if f not in needed]
    parts = []
    if needed:
        parts.append(f"glibc {glibc} declares {', '.join(needed)} noexcept: nvcc fails with \"exception "
                     "specification is incompatible\"")
    if later:
        gates = sorted({rs.gate(f) for f in later})
        parts.append(f"{', '.join(later)}: needed from glibc {' / '.join(gates)} "
                     f"({'this host has ' + str(glibc) if g else 'glibc version unknown'}); gated on "
                     "__GLIBC_PREREQ so a glibc update cannot break the build")
    return "; ".join(parts)


def check(facts: dict, cfg: dict) -> Check:
    rs = rules_for(cfg)
    st = state_of(facts, cfg)
    info: dict[str, Any] = {"header": st.header, "state": st.kind, "rules": rs.id}
    if st.sha256:
        info["sha256"] = st.sha256
    if st.known_original:
        info["original"] = st.known_original
    info["backup"] = (st.header + BACKUP_SUFFIX) if st.backup else "none"
    cmds = [PatchHeader(st.header, rs)]
    if st.satisfied:
        info["pairs"] = dict(st.analysis.pairs)
        warnings = []
        if st.kind != "patched-gpubox" and not st.backup:
            warnings.append(f"{st.header} was patched by hand ({st.kind}); no gpubox backup, `undo` cannot restore it "
                            "(dnf reinstall cuda-crt-12-9 can)")
        return Check.done(info=info, warnings=warnings)
    if st.kind == "missing":
        return Check.todo([Change("patch crt/math_functions.h after CUDA is installed",
                                  f"{st.header} not found (the cuda step installs it: cuda-crt-12-9)", cmds)], info=info)
    if st.kind == "unread":
        return Check.todo([Change(f"patch {st.header}", "its state could not be read (fact unreadable); apply reads "
                                  "the file itself", cmds)], info=info)
    a = st.analysis
    if st.kind == "unknown":
        return Check.todo([Change(f"patch {st.header}", "its content is not a CUDA 12.9 header these rules know; "
                                  "apply will refuse", cmds)], info=info,
                          warnings=[f"{NAME}: {p}" for p in a.problems])
    todo = a.todo
    what = (f"add exception specifications to {2 * len(todo)} declarations in crt/math_functions.h "
            f"({', '.join(todo)})")
    why = _why(todo, rs, facts.get("glibc"))
    if st.kind == "partial":
        why = "partly patched: " + ", ".join(f"{f} {a.pairs[f]}" for f in todo) + "; " + why
    info["pairs"] = dict(a.pairs)
    return Check.todo([Change(what, why, cmds)], info=info)


# --- apply / undo ---------------------------------------------------------------------------------------

def _refuse_unknown(h: str, a: Analysis, rs: RuleSet) -> StepError:
    return StepError(
        f"{NAME}: refusing to edit {h}: it is not a CUDA 12.9 header the rules in patches/{Path(rs.path).name} "
        f"know ({rs.describes}). Found: " + "; ".join(a.problems) + ". The file was left untouched.",
        "check `rpm -qf` / `nvcc --version` for the CUDA version there: gpubox patches CUDA 12.9 only; restore "
        "the packaged header with `dnf reinstall cuda-crt-12-9`, or write a rule file for this header in patches/ "
        "and point gpubox.patch.rules at it")


def _read(host, h: str) -> tuple[str, str, str | None, str]:
    """(owner, mode, backup sha256 or None, text) of the header, read in one command; the text is
    checked byte for byte against the target's sha256."""
    r = host.run(["sh", "-c", 'h=$1; b=$1' + BACKUP_SUFFIX + '; [ -f "$h" ] || { echo "no such file: $h" >&2; '
                  'exit 3; }; stat -c "%u:%g %a" "$h"; if [ -f "$b" ]; then sha256sum < "$b" | cut -c1-64; '
                  'else echo none; fi; sha256sum < "$h" | cut -c1-64; cat "$h"', "sh", h], root=True, check=False)
    if r.exited == 3:
        raise StepError(f"{NAME}: {h} does not exist: CUDA 12.9 is not installed (cuda-crt-12-9 ships this header)",
                        "install CUDA first: invoke cuda (or provision --only cuda,patch), then run the patch step")
    if r.exited != 0:
        raise StepError(f"{NAME}: cannot read {h}", "see the output below", command=f"cat {h}", exited=r.exited,
                        output=(r.stdout or "")[-2000:] + (r.stderr or ""))
    out = r.stdout
    parts = out.split("\n", 3)
    if len(parts) < 4:
        raise StepError(f"{NAME}: reading {h} returned too little output", "run the step again")
    stat, backup, sha, text = parts
    owner, _, mode = stat.partition(" ")
    if hashlib.sha256(text.encode()).hexdigest() != sha.strip():
        raise StepError(f"{NAME}: {h} was not read byte for byte (sha256 differs from the target's)",
                        "run the step again; if it persists, the file is not plain ASCII/UTF-8 text")
    return owner, mode, (backup.strip() if backup.strip() != "none" else None), text


# The header is never streamed to the target (Invoke and Fabric feed a command's stdin one byte per
# 10 ms): the target applies the line edits with awk to a temp file in the same directory, checks the
# result's sha256 against the text Python computed, sets owner and mode, and renames it into place.
_EDIT_AWK = ('{ k = "GPUBOX_L" NR; if (k in ENVIRON) print ENVIRON[k]; else print; '
             'if (NR == ENVIRON["GPUBOX_AT"] + 0) printf "%s", ENVIRON["GPUBOX_INSERT"] }')

_EDIT = ('set -e; p=$1; want=$2; own=$3; mode=$4; src=${5:-$1}; d=$(dirname "$p"); '
         't=$(mktemp "$d/.gpubox.XXXXXX"); trap \'rm -f "$t"\' EXIT; '
         'if [ -n "$GPUBOX_AWK" ]; then awk "$GPUBOX_AWK" "$src" > "$t"; else cp -p "$src" "$t"; fi; '
         'got=$(sha256sum < "$t" | cut -c1-64); '
         'if [ "$got" != "$want" ]; then echo "gpubox: the new $p came out different ($got, expected $want); '
         'not renamed, $p untouched" >&2; exit 4; fi; chown "$own" "$t"; chmod "$mode" "$t"; mv -f "$t" "$p"; '
         'trap - EXIT')

_BACKUP = ('set -e; h=$1; b=$2; want=$3; t=$(mktemp "$b.XXXXXX"); trap \'rm -f "$t"\' EXIT; cp -p "$h" "$t"; '
           'got=$(sha256sum < "$t" | cut -c1-64); '
           'if [ "$got" != "$want" ]; then echo "gpubox: $h changed while being backed up" >&2; exit 4; fi; '
           'mv -f "$t" "$b"; trap - EXIT')


def edit_atomic(host, path: str, edits: Edits | None, want_sha256: str, owner: str, mode: str,
                source: str | None = None) -> None:
    """Replace `path` with `source` (default: `path` itself) edited by `edits` (None: copied as is),
    atomically; the result must have sha256 `want_sha256` or nothing is renamed."""
    env: dict[str, str] = {}
    if edits is not None:
        env = {f"GPUBOX_L{n}": line for n, line in edits.replace.items()}
        env["GPUBOX_AT"] = str(edits.insert_after)
        env["GPUBOX_INSERT"] = "".join(x + "\n" for x in edits.insert)
        env["GPUBOX_AWK"] = _EDIT_AWK
    host.run(["sh", "-c", _EDIT, "sh", path, want_sha256, owner, mode] + ([source] if source else []),
             root=True, env=env or None)


def apply(host, facts: dict, cfg: dict, check: Check):
    return run_changes(host, check)


@dataclass
class PatchHeader(Op):
    """Read the header (checked byte for byte), refuse one the rules do not know, keep the original as
    <header>.gpubox-orig, and put the rewritten text in place atomically (temp file, sha256, rename)."""
    header: str
    rules: RuleSet
    root: bool = True

    def text(self) -> str:
        return (f"patch {self.header}: {len(self.rules.rules)} declarations + preamble ({self.rules.id}); original "
                f"kept as {self.header}{BACKUP_SUFFIX}; temp file, sha256 checked, rename (owner and mode kept)")

    def run(self, host, state: dict):
        h, rs = self.header, self.rules
        owner, mode, backup, text = _read(host, h)
        a = analyze_text(text, rs)
        if a.kind == "unknown":
            raise _refuse_unknown(h, a, rs)
        if a.satisfied:
            return [f"{h} was already patched ({a.kind})"]
        edits = edits_for(text, rs)
        new = edits.apply_to(text)
        cur = hashlib.sha256(text.encode()).hexdigest()
        # The backup holds the original: written when missing, and replaced when the header is unpatched
        # but differs from it (a package update brought a new original).
        if backup is None or (a.kind == "unpatched" and backup != cur):
            host.run(["sh", "-c", _BACKUP, "sh", h, h + BACKUP_SUFFIX, cur], root=True)
        edit_atomic(host, h, edits, hashlib.sha256(new.encode()).hexdigest(), owner, mode)
        return None


def undo(host, facts: dict, cfg: dict) -> list[str]:
    """Put the backed-up original back (atomically, owner and mode kept) and remove the backup.
    A header that gpubox did not patch is left alone."""
    rs = rules_for(cfg)
    h = header_path(cfg)
    b = h + BACKUP_SUFFIX
    owner, mode, backup, text = _read(host, h)
    a = analyze_text(text, rs)
    has_gpubox = GPUBOX in a.pairs.values() or a.preamble != "absent"
    if backup is None:
        if has_gpubox:
            raise StepError(f"{NAME}: cannot undo: {h} carries gpubox's patch but its backup {b} is gone",
                            "restore the packaged header: dnf reinstall cuda-crt-12-9")
        return [f"{h}: not patched by gpubox and no backup; nothing to undo"]
    if not has_gpubox:
        if backup == hashlib.sha256(text.encode()).hexdigest():
            host.run(["rm", "-f", b], root=True)
            return [f"{h} is already the original; removed the backup"]
        return [f"{h} does not carry gpubox's patch ({a.kind}); left it and {b} alone"]
    edit_atomic(host, h, None, backup, owner, mode, source=b)
    host.run(["rm", "-f", b], root=True)
    return [f"restored {h} from {b}"]


def unified_diff(text: str, rs: RuleSet, label: str = "math_functions.h") -> str:
    """The reviewable diff of the rules against a header (patches/<id>.diff is this, for 12.9.86)."""
    import difflib
    new = transform(text, rs)
    return "".join(difflib.unified_diff(text.splitlines(keepends=True), new.splitlines(keepends=True),
                                        f"a/{label}", f"b/{label}", n=2))


__all__ = ["NAME", "TITLE", "FACTS", "HEADER_FACT", "check", "apply", "undo", "state_of", "PatchState",
           "load_rules", "rules_for", "analyze", "analyze_text", "transform", "unified_diff", "header_path",
           "edit_atomic", "edits_for", "Edits"]
