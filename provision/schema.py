"""The schema of the `gpubox:` mapping: every key, its type, its range or pattern, and what is allowed.

Why pydantic (v2) and not jsonschema (docs/config.md): the checks gpubox needs are more than types and
patterns (a path must be normalized and must not name a system directory, a profile snippet must end in
.sh), and pydantic runs such checks as plain Python validators next to the type, in one declaration per
key; `extra="forbid"` refuses unknown keys and `strict=True` refuses "5" for an integer and 1 for a
boolean, so nothing is silently coerced. The models carry NO defaults: the values live in
provision/defaults.yaml, and defaults.yaml must validate against these models exactly (every key of the
one is a key of the other; tests/unit/test_config.py checks it both ways), so there is one list of keys.

Every string is checked by a full match (`re.fullmatch`, never `^...$`, which lets "value\\n" through)
and must be printable (no newline, NUL, tab or Unicode line separator; `str.isprintable`). Integers have
both bounds (a timeout of 1e20 overflows Invoke's timer thread). The message of each check is the
"allowed" part of the error gpubox prints: `gpubox.KEY = VALUE: <allowed>`.
"""

from __future__ import annotations

import posixpath
import re
import typing
from typing import Annotated, Any, Callable, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

STEP_NAMES = ("driver", "cuda", "compiler", "patch", "build", "models")
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1", "turbo2", "turbo3", "turbo4")
SPEC_TYPES = ("none", "mtp", "draft", "draft-mtp", "draft-simple", "nextn", "eagle3", "draft-eagle3",
              "draft-dflash", "ngram-cache", "ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod")

MAX_STRING = 4096          # characters of any one string value (a path is at most PATH_MAX bytes anyway)
MAX_LIST = 256             # items of any one list
PATH_MAX = 4095            # bytes of a path, without the terminating NUL (Linux PATH_MAX is 4096)
NAME_MAX = 255             # bytes of one path component

# Directories gpubox must never use as its own (state, shims, models, build trees, reports): the system's
# own trees, and the top-level directories whose contents belong to others. docs/config.md has the rule.
SYSTEM_TREES = ("/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/boot", "/dev", "/proc", "/sys",
                "/run", "/usr/bin", "/usr/sbin", "/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/libexec",
                "/usr/include", "/usr/share", "/usr/src", "/usr/games", "/usr/local/bin", "/usr/local/sbin",
                "/usr/local/lib", "/usr/local/lib64", "/usr/local/libexec", "/usr/local/include",
                "/usr/local/share", "/usr/local/etc", "/usr/local/src", "/var/log", "/var/spool", "/var/run",
                "/var/lib/rpm", "/var/lib/dnf", "/var/cache/dnf", "/var/cache/libdnf5", "/var/lib/systemd")
SYSTEM_DIRS = frozenset({"/", "/usr", "/usr/local", "/var", "/var/lib", "/var/cache", "/var/tmp", "/var/opt",
                         "/opt", "/srv", "/home", "/root", "/tmp", "/mnt", "/media", "/afs", "/nix", "~"})
PROFILE_DIR = "/etc/profile.d"


def _fail(msg: str) -> PydanticCustomError:
    # The message is a context value, not the template: messages contain braces ({repo, filename}).
    return PydanticCustomError("gpubox", "{msg}", {"msg": msg})


def check(fn: Callable[[Any], Any], allowed: str):
    """An Annotated marker pair: the validator (raises with `allowed`) and the description (the same text,
    used for type errors such as null or a number where a string belongs)."""
    def run(v):
        if not fn(v):
            raise _fail(allowed)
        return v
    return AfterValidator(run), Field(description=allowed)


def Text(pattern: str, allowed: str, max_len: int = 256, empty_ok: bool = False):
    """A string that full-matches `pattern` (or is "" when empty_ok)."""
    rx = re.compile(pattern)

    def ok(v: str) -> bool:
        if empty_ok and v == "":
            return True
        return len(v) <= max_len and v.isprintable() and rx.fullmatch(v) is not None
    return Annotated[str, *check(ok, allowed)]


def Int(lo: int, hi: int, unit: str = ""):
    allowed = f"must be an integer between {lo} and {hi}{unit}"
    return Annotated[int, Field(ge=lo, le=hi, description=allowed)]


Bool = Annotated[bool, Field(description="must be true or false")]


def Choice(values: tuple[str, ...]):
    return Annotated[Literal[values], Field(description="must be one of: " + ", ".join(values))]


def List(item, allowed: str, min_len: int = 0):
    return Annotated[list[item], Field(min_length=min_len, max_length=MAX_LIST, description=allowed)]


# --- paths --------------------------------------------------------------------------------------------

def path_problem(p: str, *, allow_quotes: bool = True) -> str:
    """Why `p` is not a normalized absolute (or ~/) path gpubox accepts; "" when it is fine."""
    if not isinstance(p, str) or not p:
        return "it is empty"
    if not p.isprintable():
        return "it holds a control character (newline, NUL, tab, ...)"
    if "\\" in p:
        return "it holds a backslash"
    if not allow_quotes and ("'" in p or '"' in p):
        return "it holds a quote (systemd refuses quotes in the path of the program it starts)"
    if p != p.strip():
        return "it starts or ends with white space"
    if not (p.startswith("/") or p == "~" or p.startswith("~/")):
        return "it is relative"
    rest = p[2:] if p.startswith("~/") else p[1:]
    if p not in ("/", "~") and (rest == "" or p.endswith("/")):
        return "it ends with /"
    parts = rest.split("/") if rest else []
    if any(c in ("", ".", "..") for c in parts):
        return "it is not normalized (no //, . or .. components)"
    if len(p.encode("utf-8", "surrogatepass")) > PATH_MAX or any(len(c.encode("utf-8", "surrogatepass")) > NAME_MAX for c in parts):
        return f"it is too long (at most {PATH_MAX} bytes, {NAME_MAX} per component)"
    return ""


def system_problem(p: str) -> str:
    """Why `p` must not hold gpubox's own files; "" when it may. `p` is a normalized absolute or ~/ path."""
    if p in SYSTEM_DIRS:
        return f"{p} is a system directory"
    for t in SYSTEM_TREES:
        if p == t or p.startswith(t + "/"):
            return f"{p} is inside the system's {t}"
    if p.startswith("/usr/") and not p.startswith("/usr/local/"):
        return f"{p} is inside /usr, which belongs to the packages"
    if posixpath.dirname(p) == "/home":
        return f"{p} is a user's home directory, not a directory of its own"
    return ""


ABS = "must be a normalized absolute path, or start with ~/ for the target user's home"
OWN = ABS + ", not a system directory (e.g. /var/lib/gpubox, /opt/gpubox/..., ~/...)"


def _path(*, own: bool, empty_ok: bool = False, allow_quotes: bool = True, suffix: str = "",
          allowed: str | None = None):
    base = allowed or (OWN if own else ABS)
    if empty_ok:
        base = 'must be "" or ' + base[len("must be "):]

    def run(v: str):
        if empty_ok and v == "":
            return v
        why = path_problem(v, allow_quotes=allow_quotes)
        if not why and own:
            why = system_problem(v)
        if not why and suffix and not v.endswith(suffix):
            why = f"it does not end in {suffix}"
        if why:
            raise _fail(f"{base}; {why}")
        return v
    run.is_path = True
    return Annotated[str, AfterValidator(run), Field(description=base)]


def _snippet(v: str):
    """The login-shell snippet: a .sh file in /etc/profile.d (the one place login shells read), or a file
    under a directory gpubox may own (then nothing reads it unless the user sources it)."""
    allowed = f"must be a .sh file in {PROFILE_DIR}, or under a directory gpubox may own (see state_dir)"
    why = path_problem(v)
    if not why and not v.endswith(".sh"):
        why = "it does not end in .sh"
    if not why and posixpath.dirname(v) != PROFILE_DIR:
        why = system_problem(posixpath.dirname(v))
    if why:
        raise _fail(f"{allowed}; {why}")
    return v


_snippet.is_path = True
TargetPath = _path(own=False)
OwnDir = _path(own=True)
StateDir = _path(own=True, allow_quotes=False,
                 allowed=OWN + ", without quotes (systemd starts the launch script from it)")
OptionalOwnDir = _path(own=True, empty_ok=True)
Program = _path(own=False, empty_ok=True, allowed="must be an absolute path to a program, or start with ~/")
SecretFile = _path(own=False, empty_ok=True, allowed="must be an absolute path (or ~/) of a file only the "
                   "server's user can read (mode 0600)")
ProfileSnippet = Annotated[str, AfterValidator(_snippet), Field(description=f"must be a .sh file in {PROFILE_DIR}")]

# --- names and patterns ---------------------------------------------------------------------------------

PKG = r"[A-Za-z0-9][A-Za-z0-9._+-]*"
PkgName = Text(PKG, "must be a package name (letters, digits, . _ + -)", 128)
Pkgs = List(PkgName, "must be a list of package names (letters, digits, . _ + -)")
LoginName = Text(r"[a-z_][a-z0-9_-]{0,31}", 'must be a login name (a-z 0-9 _ -, at most 32) or ""', 32, empty_ok=True)
Sha40 = Text(r"[0-9a-f]{40}", "must be a full 40-hex lowercase commit SHA", 40)
Url = r"[A-Za-z0-9._~:/?#\[\]@!$&()*+,;=%-]+"
RepoUrl = Text(rf"(https?|file)://{Url}", "must be an http(s):// or file:// URL (no spaces or quotes)", 2048)
GpgKey = Text(rf"(https?|file)://{Url}", '"" or an http(s):// or file:// URL (no spaces or quotes)', 2048,
              empty_ok=True)
# git: URLs of the transports git names (never ext:: or another <transport>::), scp-like user@host:path,
# or an absolute path; never a leading "-" (an option to git).
GitUrl = Text(rf"((https?|ssh|git|file)://{Url}|[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[A-Za-z0-9._~/+-]+|/[^\\\s]+)",
              "must be an https://, ssh://, git:// or file:// URL, user@host:path, or an absolute path "
              "(no ext:: or other transports)", 2048)
Arch = Text(r"native|all|all-major|\d{2,3}(-real|-virtual)?(;\d{2,3}(-real|-virtual)?)*",
            "must be 'native' or CUDA architecture numbers like 61 or 61;86 (optionally -real/-virtual)", 128)
Target = Text(r"[a-z][a-z0-9_-]*", "must be a target name like llama-server", 64)
CmakeDef = Text(r"[A-Za-z_][A-Za-z0-9_]*(:[A-Z]+)?=.*", "must be a NAME=VALUE string (NAME of letters, digits, _)",
                MAX_STRING)
Override = Text(r"[^=\s,]+=[A-Za-z0-9_]+", "must be a PATTERN=BUFFER string, e.g. token_embd\\.weight=CUDA0", 512)
RepoId = Text(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}",
              "must be a Hugging Face repo id like org/name", 193)
GgufName = Text(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,250}\.gguf", "must be a plain .gguf file name (letters, digits, . _ + -)",
                255)
Revision = Text(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*",
                "must be a branch, tag or commit (letters, digits, . _ - /)", 255)
Sha256 = Text(r"[0-9a-f]{64}", 'must be "" or 64 lowercase hex digits', 64, empty_ok=True)
HostName = Text(r"[A-Za-z0-9]([A-Za-z0-9.:-]{0,252}[A-Za-z0-9])?|::|::1",
                "must be a host name or an IP address (letters, digits, . : -)", 254)
Key = Text(r"[a-z][a-z0-9_-]{0,31}", "must be a name of a-z 0-9 _ - (at most 32)", 32)
RulesName = Text(r"[A-Za-z0-9][A-Za-z0-9._-]*\.yaml", "must be the name of a rule file in patches/ (no /)", 128)
HeaderRel = Text(r"[A-Za-z0-9_][A-Za-z0-9._+-]*(/[A-Za-z0-9_][A-Za-z0-9._+-]*)*\.h",
                 "must be a .h path relative to cuda.prefix (no leading /, no . or ..)", 1024)
Version = Text(r"\d{1,3}\.\d{1,3}", "must be MAJOR.MINOR, e.g. 12.9", 7)
Release = Text(r"(fedora|rhel)\d{1,3}", "must look like fedora41", 10)
Branch = Text(r"\d{3}xx", "must look like 580xx", 5)


def _log_verbosity(v: Any) -> Any:
    if v == "auto" or (type(v) is int and 0 <= v <= 5):
        return v
    raise _fail('must be "auto" or an integer between 0 and 5')


# --- the sections ---------------------------------------------------------------------------------------

class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Driver(Section):
    branch: Branch
    packages: Pkgs
    replaces: Pkgs
    releasever: Int(0, 99)
    lock: Bool
    akmods_timeout: Int(1, 86400, " (seconds)")


class Cuda(Section):
    version: Version
    repo_release: Release
    repo_baseurl: RepoUrl
    repo_gpgcheck: Bool
    repo_gpgkey: GpgKey
    exclude: Pkgs
    packages: Pkgs
    prefix: OwnDir
    profile_snippet: ProfileSnippet


class Compiler(Section):
    major: Int(5, 99)
    packages: Pkgs
    shim_dir: OwnDir
    user_shims: Bool


class Patch(Section):
    header: HeaderRel
    rules: RulesName


class Profile(Section):
    sha: Sha40
    dialect: Choice(("pre-sync", "post-sync", "upstream"))
    assistant_arch: Text(r"[a-z0-9_-]{1,64}", "must be a GGUF architecture name like gemma4-assistant", 64)


class Build(Section):
    repo_url: GitUrl
    profile: Key
    profiles: Annotated[dict[Key, Profile], Field(min_length=1, max_length=32,
                                                  description="must map profile names to {sha, dialect, assistant_arch}")]
    sha: Text(r"[0-9a-f]{40}", 'must be "" (use the profile\'s) or a full 40-hex lowercase commit SHA', 40, empty_ok=True)
    src_dir: OwnDir
    build_dir: OwnDir
    cuda: Bool
    cuda_architectures: Arch
    fallback_architectures: Arch
    nvcc: Program
    host_compiler: Program
    targets: List(Target, "must be a non-empty list of target names like llama-server", min_len=1)
    jobs: Int(0, 1024)
    mem_per_job_gb: Int(1, 64)
    cmake_extra: List(CmakeDef, "must be a list of NAME=VALUE strings")
    ccache_dir: OptionalOwnDir
    ccache: Bool


class ModelFile(Section):
    repo: RepoId
    filename: GgufName
    revision: Revision
    sha256: Sha256
    allow_unverified: Bool


class Models(Section):
    dir: OwnDir
    reserve_gb: Int(0, 1 << 20)
    update: Bool
    metadata_timeout: Int(1, 600, " (seconds)")
    progress_interval: Int(1, 3600, " (seconds)")
    hf_package: PkgName
    files: Annotated[dict[Key, ModelFile], Field(min_length=1, max_length=16,
                                                 description="must map names to {repo, filename, revision, sha256, "
                                                             "allow_unverified}")]


class Serve(Section):
    host: HostName
    port: Int(1, 65535)
    ctx_size: Int(1, 1 << 24)
    parallel: Int(1, 256)
    n_gpu_layers: Int(0, 1000)
    n_cpu_moe: Int(0, 1000)
    cache_type_k: Choice(CACHE_TYPES)
    cache_type_v: Choice(CACHE_TYPES)
    flash_attn: Choice(("on", "off", "auto"))
    mlock: Bool
    mmap: Bool
    draft_model: Text(r"[a-z][a-z0-9_-]{0,31}", '"" or one of the keys of models.files', 32, empty_ok=True)
    spec_type: Choice(SPEC_TYPES)
    draft_block_size: Int(1, 64)
    draft_max: Int(0, 1024)
    draft_min: Int(0, 1024)
    n_gpu_layers_draft: Int(0, 1000)
    n_cpu_moe_draft: Int(0, 1000)
    cache_type_k_draft: Choice(CACHE_TYPES)
    cache_type_v_draft: Choice(CACHE_TYPES)
    override_tensor_draft: List(Override, "must be a list of PATTERN=BUFFER strings, e.g. token_embd\\.weight=CUDA0")
    override_tensor: List(Override, "must be a list of PATTERN=BUFFER strings, e.g. token_embd\\.weight=CUDA0")
    log_verbosity: Annotated[Any, AfterValidator(_log_verbosity), Field(description='must be "auto" or an integer between 0 and 5')]
    on_missing_option: Choice(("error", "drop"))
    service_user: LoginName
    ready_timeout: Int(1, 86400, " (seconds)")
    api_key_file: SecretFile


class Tune(Section):
    margin_mib: Int(0, 1 << 20)
    max_probes: Int(1, 50)
    overhead_prior_mib: Int(0, 65536)
    probe_port: Int(1, 65535)
    probe_prompt_tokens: Int(1, 1 << 20)
    probe_gen_tokens: Int(1, 4096)
    speed_check: Bool


class Gpubox(Section):
    steps: Annotated[list[Literal[STEP_NAMES]], Field(
        description="is fixed: " + ", ".join(STEP_NAMES) + " (use --only/--skip to choose)")]
    state_dir: StateDir
    report_dir: OwnDir
    user: LoginName
    lock_wait: Int(0, 86400, " (seconds)")
    driver: Driver
    cuda: Cuda
    compiler: Compiler
    patch: Patch
    build: Build
    models: Models
    serve: Serve
    tune: Tune


# --- walking the schema (for messages, --set and environment variables) ---------------------------------

def describe(loc: tuple) -> str:
    """The "allowed" text of the field at `loc` (the nearest field that has one)."""
    node: Any = Gpubox
    text = ""
    for part in loc:
        sub = _child(node, part)
        if sub is None:
            break
        node, desc = sub
        text = desc or text
    return text


def _bare(node: Any) -> Any:
    """Annotated[X, ...] -> X."""
    while getattr(node, "__metadata__", None) is not None:
        node = node.__origin__
    return node


def _child(node: Any, part: Any):
    """(annotation, description) one step down from `node` (a model class or a container annotation)."""
    node = _bare(node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        f = node.model_fields.get(part) if isinstance(part, str) else None
        if f is None:
            return None
        return f.annotation, f.description or ""
    origin, args = typing.get_origin(node), typing.get_args(node)
    if origin is dict and len(args) == 2:
        return (args[0], "") if part == "[key]" else (args[1], "")
    if origin is list and args:
        return args[0], ""
    return None


def model_at(path: tuple[str, ...]) -> Any:
    """The schema node for a key path ('build', 'profiles', 'recipe', 'sha'); None when there is no such key.
    Map keys (profile and file names) are free: any name walks into the entry's model."""
    node: Any = Gpubox
    for part in path:
        sub = _child(node, part)
        if sub is None:
            return None
        node = sub[0]
    return node


def is_model(node: Any) -> bool:
    node = _bare(node)
    return isinstance(node, type) and issubclass(node, BaseModel)


def is_map(node: Any) -> bool:
    """A mapping of free names (build.profiles, models.files)."""
    return typing.get_origin(_bare(node)) is dict


def is_text(node: Any) -> bool:
    """A string-valued key (its --set/environment value is taken as written, not parsed as YAML)."""
    node = _bare(node)
    if typing.get_origin(node) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(node))
    return node is str


def keys_of(node: Any) -> list[str]:
    node = _bare(node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    return []
