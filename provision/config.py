"""Configuration: the defaults file, the override layers, and validation against one schema.

The layers, lowest first (docs/config.md):

    provision/defaults.yaml                      every key, with the reason for its value
    Invoke's / Fabric's config files             invoke.yaml / fabric.yaml (system, user, project, -f file)
    INVOKE_GPUBOX_* (FABRIC_GPUBOX_* under fab)  read here, values parsed as YAML (false is False)
    --set KEY=VALUE                              the step tasks' flag, values parsed the same way

`load(c, sets)` merges them and `validate()` checks the result against provision/schema.py; any problem
is a ConfigError (exit status 2) naming the key, the value, where it came from and what is allowed,
before any command runs. Why gpubox reads its environment variables itself: Invoke casts an environment
string by the type of the default it overrides (`bool("false")` is True; `int("abc")` is a traceback
before any task body runs), so the task collection hands Invoke an empty `gpubox` mapping and Invoke
leaves INVOKE_GPUBOX_* alone.

Invoke reads config files with a plain `yaml.safe_load` (no size or alias limit: a 342-byte alias bomb
took 15 s and 431 MB) and a malformed file is a traceback. `install_file_loader()` (called by provision/tasks.py,
which Invoke imports before it reads the project and runtime files) replaces that loader with
`load_yaml_text`, which has limits, and turns a bad file into a ConfigError of the next gpubox task.

>>> cfg = validate(defaults()["gpubox"])
>>> cfg["cuda"]["version"], fork_pin(cfg)["sha"][:9]
('12.9', 'a6f3d363e')
"""

from __future__ import annotations

import copy
import difflib
import errno
import ipaddress
import json
import os
import posixpath
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from pydantic import ValidationError

from . import resources, schema
from .schema import CACHE_TYPES, SPEC_TYPES, STEP_NAMES  # noqa: F401  (re-exported)

DEFAULTS_FILE = Path(__file__).with_name("defaults.yaml")
# The MTP head's general.architecture each dialect loads (docs/serve-mtp.md, "Which assistant a binary loads").
ASSISTANT_ARCH = {"pre-sync": "gemma4_assistant", "post-sync": "gemma4-assistant", "upstream": "gemma4-assistant"}
EXIT_CONFIG = 2

# Limits of any YAML gpubox reads from a user (config files, --set and environment values).
MAX_YAML_BYTES = 1 << 20      # 1 MiB of text
MAX_YAML_NODES = 20_000       # nodes after expanding aliases (an alias bomb expands exponentially)
MAX_YAML_DEPTH = 32           # nesting, also through aliases
MAX_SET_CHARS = 64 * 1024     # one --set or environment value

# The key under which the patched Invoke loader reports a config file it refused (see install_file_loader).
FILE_ERRORS = "__gpubox_file_errors__"

# Paths on the target (resolved by on_target against the target user's home) and on the controller.
TARGET_PATHS = (("state_dir",), ("cuda", "prefix"), ("cuda", "profile_snippet"), ("compiler", "shim_dir"),
                ("build", "src_dir"), ("build", "build_dir"), ("build", "nvcc"), ("build", "host_compiler"),
                ("build", "ccache_dir"), ("models", "dir"), ("serve", "api_key_file"))
CONTROLLER_PATHS = (("report_dir",),)
OWN_DIRS = (("state_dir",), ("compiler", "shim_dir"), ("build", "src_dir"), ("build", "build_dir"),
            ("build", "ccache_dir"), ("models", "dir"), ("cuda", "prefix"))


class ConfigError(Exception):
    """A bad configuration value. Exit status 2; nothing has touched the host yet."""

    exit_code = EXIT_CONFIG

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid gpubox configuration (nothing was run):\n" + "\n".join(f"  - {p}" for p in problems))


def defaults() -> dict[str, Any]:
    """The documented defaults, as the mapping handed to `Collection.configure` by tests and tools."""
    with DEFAULTS_FILE.open() as fh:
        return yaml.safe_load(fh)


def show(value: Any, limit: int = 160) -> str:
    """A value as the error shows it: repr (newlines and NULs escaped), cut to `limit` characters."""
    try:
        text = repr(value)
    except Exception:  # a value whose repr fails is shown by its type
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 15] + f"... ({len(text)} chars)"


def dotted(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (("." if out else "") + str(part))
    return out


# --- bounded YAML -------------------------------------------------------------------------------------

class YamlRefused(ValueError):
    """Text gpubox will not read as YAML (syntax, size, aliases, nesting)."""


def load_yaml_text(text: str) -> Any:
    """yaml.safe_load with limits: size, nesting depth and the node count after expanding aliases.

    The parser is iterative, so the first pass over its events measures the written depth safely; the
    composed graph is then measured without recursion (cycles refused) before anything is constructed."""
    if len(text) > MAX_YAML_BYTES:
        raise YamlRefused(f"it is {len(text)} characters; at most {MAX_YAML_BYTES} are read")
    try:
        depth = events = 0
        for ev in yaml.parse(text, Loader=yaml.SafeLoader):
            events += 1
            if isinstance(ev, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise YamlRefused(f"it nests deeper than {MAX_YAML_DEPTH} levels")
            elif isinstance(ev, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                depth -= 1
            if events > MAX_YAML_NODES * 2:
                raise YamlRefused(f"it has more than {MAX_YAML_NODES} nodes")
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _measure(node)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except YamlRefused:
        raise
    except yaml.YAMLError as e:
        raise YamlRefused(" ".join(str(e).split())) from None
    except (ValueError, TypeError, RecursionError, OverflowError, MemoryError) as e:
        raise YamlRefused(f"{type(e).__name__}: {e}") from None


def _measure(root: yaml.Node) -> None:
    """Refuse a node graph whose expansion is too big or too deep, or that refers to itself."""
    size: dict[int, int] = {}
    deep: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    on_path: set[int] = set()
    while stack:
        node, done = stack.pop()
        nid = id(node)
        kids = _kids(node)
        if done:
            on_path.discard(nid)
            size[nid] = 1 + sum(size[id(k)] for k in kids)
            deep[nid] = 1 + max((deep[id(k)] for k in kids), default=0)
            if size[nid] > MAX_YAML_NODES:
                raise YamlRefused(f"its aliases expand to more than {MAX_YAML_NODES} nodes")
            if deep[nid] > MAX_YAML_DEPTH:
                raise YamlRefused(f"its aliases nest deeper than {MAX_YAML_DEPTH} levels")
            continue
        if nid in size:
            continue
        if nid in on_path:
            raise YamlRefused("an alias refers to the node that contains it")
        on_path.add(nid)
        stack.append((node, True))
        for k in kids:
            if id(k) in on_path:
                raise YamlRefused("an alias refers to the node that contains it")
            if id(k) not in size:
                stack.append((k, False))


def _kids(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def load_config_file(path: str) -> Any:
    """What Invoke's loader returns for one config file: its data, or a marker naming the problem."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_YAML_BYTES + 1)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise   # Invoke's "no such file, try the next suffix"
        return {"gpubox": {FILE_ERRORS: {str(path): f"cannot be read: {e.strerror}"}}}
    try:
        text = raw.decode("utf-8")
        data = (json.loads(text) if str(path).endswith(".json") else load_yaml_text(text)) \
            if len(raw) <= MAX_YAML_BYTES else _too_big()
    except UnicodeDecodeError:
        return {"gpubox": {FILE_ERRORS: {str(path): "is not UTF-8 text"}}}
    except (YamlRefused, ValueError, RecursionError) as e:
        return {"gpubox": {FILE_ERRORS: {str(path): f"is not a config file gpubox reads: {e}"}}}
    if data is None:
        return {}
    if not isinstance(data, dict):
        return {"gpubox": {FILE_ERRORS: {str(path): f"must hold a mapping at its top, not {type(data).__name__}"}}}
    return data


def _too_big():
    raise YamlRefused(f"it is larger than {MAX_YAML_BYTES} bytes")


def install_file_loader() -> None:
    """Make Invoke (and Fabric, whose Config subclasses Invoke's) read config files with limits.

    Invoke looks up `_load_<suffix>` on its Config (invoke/config.py, Config._load_file); this replaces
    the yaml/yml/json readers. System and user files (/etc/invoke.yaml, ~/.invoke.yaml) are read when
    Invoke creates its Config, before any tasks module is imported: those stay with Invoke's reader."""
    from invoke.config import Config

    def _load(self, path):  # noqa: ARG001  (Invoke's signature)
        return load_config_file(path)

    Config._load_yaml = _load
    Config._load_yml = _load
    Config._load_json = _load


# --- layers ---------------------------------------------------------------------------------------------

def _plain(value: Any, depth: int = 0) -> Any:
    """Invoke's DataProxy -> plain dicts/lists, so validated config is an ordinary value."""
    if depth > 2 * MAX_YAML_DEPTH:
        raise ConfigError([f"the gpubox configuration nests deeper than {2 * MAX_YAML_DEPTH} levels"])
    if hasattr(value, "items") and callable(value.items):
        return {k: _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    return value


def merge(base: Any, top: Any) -> Any:
    """`top` over `base`: mappings merged key by key, anything else (lists, null) replaces."""
    if isinstance(base, dict) and isinstance(top, dict):
        out = dict(base)
        for k, v in top.items():
            out[k] = merge(base.get(k), v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(top)


def _suggest(word: str, choices: Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _key_problem(path: tuple[str, ...], what: str) -> str | None:
    """None when `path` names a key of the schema, else the problem (with a "did you mean")."""
    node: Any = schema.Gpubox
    for i, part in enumerate(path):
        if not part:
            return f"{what}: empty key component in {'.'.join(path)!r}"
        nxt = schema.model_at(tuple(path[:i + 1]))
        if nxt is None:
            known = schema.keys_of(node)
            where = ".".join(path[:i]) or "gpubox"
            sugg = _suggest(part, known, ".".join(path[:i]) + "." if i else "")
            return f"{what}: unknown key {part!r} in {where}{sugg} (known: {', '.join(known)})"
        node = nxt
    return None


def parse_value(node: Any, raw: str) -> Any:
    """A --set / environment value for the key whose schema node is `node`.

    String keys take the text as written (a quoted YAML string is unquoted); other keys parse it as YAML:
    `8`, `true`/`false` (also yes/no/on/off), `[a, b]`, `{sha: ..., dialect: ...}`."""
    if len(raw) > MAX_SET_CHARS:
        raise YamlRefused(f"it is {len(raw)} characters; at most {MAX_SET_CHARS}")
    if not raw.strip():
        return ""
    if schema.is_text(node):
        # As written; a YAML-quoted string ('a b', "x") is unquoted. Never a plain YAML scalar: YAML would
        # fold "a\nb" into "a b" and read "on" as true.
        if raw[:1] in ("'", '"') and raw.isprintable():
            try:
                v = load_yaml_text(raw)
            except YamlRefused:
                return raw
            return v if isinstance(v, str) else raw
        return raw
    return load_yaml_text(raw)


def _put(cfg: dict, path: tuple[str, ...], value: Any, what: str) -> str | None:
    node = cfg
    for i, part in enumerate(path[:-1]):
        nxt = node.get(part)
        if nxt is None and schema.is_map(schema.model_at(tuple(path[:i]))):
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            return f"{what}: {'.'.join(path[:i + 1])} is {show(nxt)}, not a mapping; set it whole"
        node = nxt
    node[path[-1]] = value
    return None


def apply_sets(cfg: dict[str, Any], sets: Iterable[str], sources: dict | None = None) -> dict[str, Any]:
    """Apply `--set a.b.c=value` overrides (values parsed by `parse_value`). Unknown keys are errors."""
    cfg = copy.deepcopy(cfg)
    problems = []
    for item in sets or ():
        if not isinstance(item, str):
            problems.append(f"--set {show(item)}: expected KEY=VALUE text")
            continue
        key, sep, raw = item.partition("=")
        what = f"--set {show(item, 80)}"
        if not sep or not key.strip():
            problems.append(f"{what}: expected KEY=VALUE, e.g. --set build.jobs=8")
            continue
        path = tuple(key.strip().split("."))
        bad = _key_problem(path, what)
        if bad:
            problems.append(bad)
            continue
        try:
            value = parse_value(schema.model_at(path), raw)
        except YamlRefused as e:
            problems.append(f"gpubox.{key.strip()} = {show(raw)} (from --set): not a value gpubox reads: {e}")
            continue
        bad = _put(cfg, path, value, what)
        if bad:
            problems.append(bad)
        elif sources is not None:
            sources[path] = f"--set {key.strip()}"
    if problems:
        raise ConfigError(problems)
    return cfg


def env_prefix(conf: Any) -> str:
    """INVOKE_ under invoke, FABRIC_ under fab (the prefix of the Config class in use)."""
    p = getattr(conf, "_env_prefix", None)
    if not isinstance(p, str) or not p:
        cls = type(conf)
        p = (getattr(cls, "env_prefix", None) or getattr(cls, "prefix", None) or "invoke").upper() + "_"
    return p


def _leaves(tree: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(tree, dict) and (not path or schema.is_model(schema.model_at(path)) or schema.is_map(schema.model_at(path))):
        return [p for k, v in tree.items() if isinstance(k, str) for p in _leaves(v, path + (k,))]
    return [path]


def apply_env(cfg: dict, environ: Mapping[str, str], prefix: str, sources: dict | None = None) -> dict:
    """Apply `<PREFIX>GPUBOX_<KEY>` variables, KEY being the dotted key upper-cased with _ for the dots
    (INVOKE_GPUBOX_BUILD_JOBS -> build.jobs), as Invoke names them. Unknown names are errors."""
    head = prefix + "GPUBOX_"
    names = {head + "_".join(p).upper(): p for p in _leaves(cfg) if schema.model_at(p) is not None}
    cfg = copy.deepcopy(cfg)
    problems = []
    for name in sorted(n for n in environ if n.startswith(head)):
        raw = environ[name]
        path = names.get(name)
        if path is None:
            problems.append(f"{name}: no such gpubox setting{_suggest(name, names)} "
                            f"(the name is {head} + the key upper-cased, dots as _: {head}BUILD_JOBS)")
            continue
        try:
            value = parse_value(schema.model_at(path), raw)
        except YamlRefused as e:
            problems.append(f"gpubox.{'.'.join(path)} = {show(raw)} (from {name}): not a value gpubox reads: {e}")
            continue
        _put(cfg, path, value, name)
        if sources is not None:
            sources[path] = name
    if problems:
        raise ConfigError(problems)
    return cfg


def layered(c, sets: Iterable[str] = (), environ: Mapping[str, str] | None = None,
            sources: dict | None = None) -> dict[str, Any]:
    """defaults.yaml <- Invoke/Fabric config files <- environment <- --set, not yet validated."""
    conf = c.config
    files = _plain(conf["gpubox"]) if "gpubox" in conf else {}
    problems = []
    if isinstance(files, dict):
        for path, msg in sorted((files.pop(FILE_ERRORS, None) or {}).items()):
            problems.append(f"config file {path} {msg}")
    else:
        problems.append(f"gpubox = {show(files)} (from the config files): must be a mapping of settings "
                        "(see provision/defaults.yaml)")
        files = {}
    if problems:
        raise ConfigError(problems)
    raw = merge(defaults()["gpubox"], files)
    raw = apply_env(raw, os.environ if environ is None else environ, env_prefix(conf), sources)
    return apply_sets(raw, sets, sources)


def load(c, sets: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The validated gpubox config of an Invoke Context / Fabric Connection, with env and --set applied."""
    sources: dict = {}
    return validate(layered(c, sets, environ, sources), sources)


# --- validation -------------------------------------------------------------------------------------------

def _walk_raw(v: Any, loc: tuple, problems: list[str], sources: dict) -> None:
    """Before the schema: every mapping key is a string, and no string anywhere holds a control
    character (the schema checks each key's own pattern; this covers map keys and unknown keys too)."""
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str) or not k.isprintable() or len(k) > 256:
                problems.append(f"gpubox.{dotted(loc)}: key {show(k)} must be a short printable name"
                                + _from(loc, sources))
                continue
            _walk_raw(x, loc + (k,), problems, sources)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _walk_raw(x, loc + (i,), problems, sources)
    elif isinstance(v, str) and (not v.isprintable() or len(v) > schema.MAX_STRING):
        why = "holds a control character (newline, NUL, tab, ...)" if not v.isprintable() else \
            f"is longer than {schema.MAX_STRING} characters"
        allowed = schema.describe(loc)
        problems.append(f"gpubox.{dotted(loc)} = {show(v)}{_from(loc, sources)}: {why}"
                        + (f"; {allowed}" if allowed else ""))


def _from(loc: tuple, sources: dict) -> str:
    for n in range(len(loc), 0, -1):
        src = sources.get(tuple(str(x) for x in loc[:n]))
        if src:
            return f" (from {src})"
    return ""


def _message(err: dict, sources: dict) -> str:
    loc = tuple(err["loc"])
    if loc and loc[-1] == "[key]":
        name = loc[-2]
        return (f"gpubox.{dotted(loc[:-2])}: key {show(name)}{_from(loc[:-2], sources)}: "
                f"{err['msg'] if err['type'] == 'gpubox' else 'must be a name of a-z 0-9 _ -'}")
    where = "gpubox." + dotted(loc) if loc else "gpubox"
    if err["type"] == "extra_forbidden":
        parent = schema.model_at(tuple(str(x) for x in loc[:-1]))
        known = schema.keys_of(parent)
        prefix = dotted(loc[:-1]) + "." if len(loc) > 1 else ""
        return (f"{where} = {show(err.get('input'))}{_from(loc, sources)}: unknown key"
                f"{_suggest(loc[-1], known, prefix)} (known in {dotted(loc[:-1]) or 'gpubox'}: {', '.join(known)})")
    allowed = err["msg"] if err["type"] == "gpubox" else (schema.describe(loc) or err["msg"])
    if err["type"] == "missing":
        return f"{where} is missing{_from(loc, sources)}: {allowed} (see provision/defaults.yaml)"
    if err["type"] in ("too_long", "too_short") and "list" in err["msg"].lower():
        allowed += f" ({err['msg'].lower()})"
    return f"{where} = {show(err.get('input'))}{_from(loc, sources)}: {allowed}"


def validate(cfg: dict[str, Any], sources: dict | None = None) -> dict[str, Any]:
    """Check every value; raise ConfigError naming each bad key, its value and what is allowed."""
    sources = sources or {}
    if not isinstance(cfg, dict):
        raise ConfigError([f"gpubox = {show(cfg)}: must be a mapping of settings (see provision/defaults.yaml)"])
    problems: list[str] = []
    _walk_raw(cfg, (), problems, sources)
    if problems:
        raise ConfigError(problems)
    try:
        model = schema.Gpubox.model_validate(cfg)
    except ValidationError as e:
        raise ConfigError([_message(err, sources) for err in e.errors(include_url=False)]) from None
    out = model.model_dump()
    problems = _cross_checks(out, sources)
    if problems:
        raise ConfigError(problems)
    return out


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cross_checks(cfg: dict, sources: dict) -> list[str]:
    """What one key's schema cannot say: choices from other keys, combinations, files that must exist."""
    problems: list[str] = []

    def bad(key: str, value: Any, allowed: str) -> None:
        problems.append(f"gpubox.{key} = {show(value)}{_from(tuple(key.split('.')), sources)}: {allowed}")

    if tuple(cfg["steps"]) != STEP_NAMES:
        bad("steps", cfg["steps"], f"is fixed: {', '.join(STEP_NAMES)} (use --only/--skip to choose)")
    b = cfg["build"]
    if b["profile"] not in b["profiles"]:
        bad("build.profile", b["profile"], f"must be one of: {', '.join(b['profiles'])}")
    for name, p in b["profiles"].items():
        if p["assistant_arch"] != ASSISTANT_ARCH[p["dialect"]]:
            bad(f"build.profiles.{name}.assistant_arch", p["assistant_arch"],
                f"the {p['dialect']} dialect loads an MTP head of architecture {ASSISTANT_ARCH[p['dialect']]!r}")
    if b["fallback_architectures"] == "native":
        bad("build.fallback_architectures", "native", "must be explicit numbers (it is used when no GPU is visible)")
    for forbidden in ("cuda", "cuda-drivers", "nvidia-driver"):
        if forbidden in cfg["cuda"]["packages"]:
            bad("cuda.packages", cfg["cuda"]["packages"], f"must not contain {forbidden!r}: it pulls NVIDIA's "
                "driver, which conflicts with RPM Fusion's")
    files = cfg["models"]["files"]
    if "model" not in files:
        bad("models.files", list(files), "must have an entry named model (the GGUF that is served)")
    seen: dict[str, str] = {}
    for k, f in files.items():
        if f["filename"] in seen:
            bad(f"models.files.{k}.filename", f["filename"], f"must differ from models.files.{seen[f['filename']]}"
                ".filename (both would be written to the same file)")
        seen.setdefault(f["filename"], k)
    dm = cfg["serve"]["draft_model"]
    if dm and dm not in files:
        bad("serve.draft_model", dm, f"must be \"\" or one of models.files: {', '.join(files)}")
    if not (resources.PATCHES / cfg["patch"]["rules"]).is_file():
        bad("patch.rules", cfg["patch"]["rules"], f"must name a file in {resources.PATCHES}")
    s = cfg["serve"]
    if not is_loopback(s["host"]) and not s["api_key_file"]:
        bad("serve.host", s["host"], "is reachable from the network: set serve.api_key_file (a 0600 file holding "
            "the API key llama-server requires) or keep serve.host on 127.0.0.1")
    return problems


# --- on the target ------------------------------------------------------------------------------------

def _get(cfg: dict, path: tuple[str, ...]) -> Any:
    node: Any = cfg
    for p in path:
        node = node[p]
    return node


def _set(cfg: dict, path: tuple[str, ...], value: Any) -> None:
    node = cfg
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def on_target(cfg: dict[str, Any], home: Any) -> dict[str, Any]:
    """cfg with every target path's `~/` replaced by the target user's home (facts["home"]), checked again
    (a home of / would make ~/bin the system's /bin). Raises ConfigError when a `~/` path cannot be
    resolved. Steps then see only absolute paths, in their facts, their changes and their commands."""
    out = copy.deepcopy(cfg)
    problems = []
    ok_home = isinstance(home, str) and home.startswith("/") and not schema.path_problem(home.rstrip("/") or "/")
    for path in TARGET_PATHS:
        v = _get(out, path)
        if not (v == "~" or v.startswith("~/")):
            continue
        key = ".".join(path)
        if not ok_home:
            problems.append(f"gpubox.{key} = {show(v)}: the target user's home is not known ({show(home)}), so ~/ "
                            "cannot be resolved; set an absolute path")
            continue
        full = posixpath.join(home.rstrip("/") or "/", v[2:]) if v != "~" else home.rstrip("/") or "/"
        why = schema.path_problem(full, allow_quotes=path != ("state_dir",)) or \
            (schema.system_problem(full) if path in OWN_DIRS else "")
        if why:
            problems.append(f"gpubox.{key} = {show(v)} is {full} on the target: {why}")
            continue
        _set(out, path, full)
    if problems:
        raise ConfigError(problems)
    return out


# --- helpers of the tasks ---------------------------------------------------------------------------------

def fork_pin(cfg: dict[str, Any]) -> dict[str, str]:
    """The commit, dialect and assistant architecture the build should use (sha overrides the profile)."""
    b = cfg["build"]
    prof = dict(b["profiles"][b["profile"]])
    if b.get("sha"):
        prof["sha"] = b["sha"]
    prof["profile"] = b["profile"]
    return prof


def select_steps(only: Iterable[str] | str | None, skip: Iterable[str] | str | None) -> list[str]:
    """Validate --only/--skip against the step names; return the steps to run, in order."""

    def names(v):
        if not v:
            return []
        if isinstance(v, str):
            v = [v]
        return [n.strip() for item in v for n in item.split(",") if n.strip()]

    o, s = names(only), names(skip)
    unknown = [n for n in o + s if n not in STEP_NAMES]
    if unknown:
        raise ConfigError([f"step name {show(n)} is unknown: allowed are {', '.join(STEP_NAMES)}"
                           + _suggest(n, STEP_NAMES) for n in unknown])
    chosen = [n for n in STEP_NAMES if (not o or n in o)]
    return [n for n in chosen if n not in s]
