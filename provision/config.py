"""Configuration: the defaults file, Invoke's override layers, and validation.

gpubox has no config system of its own. `defaults()` is handed to the task collection
(`Collection.configure`), so Invoke/Fabric layer their config files, environment variables and
our `--set key=value` flag on top. `load(c, overrides)` then reads `c.config.gpubox`, applies
`--set` values and validates everything before any step runs.

>>> cfg = validate(defaults()["gpubox"])
>>> cfg["cuda"]["version"], fork_pin(cfg)["sha"][:9]
('12.9', 'a6f3d363e')
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from . import resources

DEFAULTS_FILE = Path(__file__).with_name("defaults.yaml")

STEP_NAMES = ("driver", "cuda", "compiler", "patch", "build", "models")
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1", "turbo2", "turbo3", "turbo4")
SPEC_TYPES = ("none", "mtp", "draft", "draft-mtp", "draft-simple", "nextn", "eagle3", "draft-eagle3",
              "draft-dflash", "ngram-cache", "ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod")
SHA_RE = re.compile(r"^[0-9a-f]{40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
ARCH_RE = re.compile(r"^(native|all|all-major|\d{2,3}(-real|-virtual)?(;\d{2,3}(-real|-virtual)?)*)$")
PKG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
CMAKE_DEF_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(:[A-Z]+)?=.*$")
EXIT_CONFIG = 2


class ConfigError(Exception):
    """A bad configuration value. Exit status 2; nothing has touched the host yet."""

    exit_code = EXIT_CONFIG

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid gpubox configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def defaults() -> dict[str, Any]:
    """The documented defaults, as the mapping handed to `Collection.configure`."""
    with DEFAULTS_FILE.open() as fh:
        return yaml.safe_load(fh)


def _plain(value: Any) -> Any:
    """Invoke's DataProxy -> plain dicts/lists, so validated config is an ordinary value."""
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def apply_sets(cfg: dict[str, Any], sets: Iterable[str]) -> dict[str, Any]:
    """Apply `--set a.b.c=value` overrides. Values are parsed as YAML scalars/lists (`8`, `true`, `[a, b]`)."""
    cfg = copy.deepcopy(cfg)
    problems = []
    for item in sets or ():
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. --set build.jobs=8")
            continue
        parts = key.strip().split(".")
        node = cfg
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                problems.append(f"--set {key}: unknown key {part!r}; known: {', '.join(sorted(node))}")
                break
            node = node[part]
        else:
            if parts[-1] not in node:
                problems.append(f"--set {key}: unknown key {parts[-1]!r}; known: {', '.join(sorted(node))}")
                continue
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                value = raw
            # A string setting stays a string ("61", a SHA of digits), whatever YAML would make of it.
            if isinstance(node[parts[-1]], str) and not isinstance(value, str):
                value = raw
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems)
    return cfg


def load(c, sets: Iterable[str] = ()) -> dict[str, Any]:
    """The validated gpubox config of an Invoke Context / Fabric Connection, with --set applied."""
    raw = _plain(c.config.get("gpubox") or defaults()["gpubox"])
    return validate(apply_sets(raw, sets))


# --- validation ---------------------------------------------------------------------------------------

def _target_path(value: Any) -> bool:
    return isinstance(value, str) and (value.startswith("/") or value.startswith("~/")) and "\n" not in value and "\0" not in value


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check every value; raise ConfigError naming each bad key, its value and what is allowed."""
    cfg = copy.deepcopy(cfg)
    problems: list[str] = []

    def bad(key: str, value: Any, allowed: str) -> None:
        problems.append(f"gpubox.{key} = {value!r}: {allowed}")

    def get(key: str) -> Any:
        node: Any = cfg
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                problems.append(f"gpubox.{key} is missing (see provision/defaults.yaml)")
                return None
            node = node[part]
        return node

    def want_int(key: str, lo: int = 0, hi: int | None = None) -> None:
        v = get(key)
        if v is None:
            return
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            bad(key, v, f"must be an integer {rng}")

    def want_bool(key: str) -> None:
        v = get(key)
        if v is not None and not isinstance(v, bool):
            bad(key, v, "must be true or false")

    def want_path(key: str, empty_ok: bool = False) -> None:
        v = get(key)
        if v is None or (empty_ok and v == ""):
            return
        if not _target_path(v):
            bad(key, v, "must be an absolute path (or start with ~/ for the target user's home)")

    def want_choice(key: str, choices: Iterable[str]) -> None:
        v = get(key)
        if v is not None and v not in choices:
            bad(key, v, f"must be one of: {', '.join(choices)}")

    def want_pkgs(key: str) -> None:
        v = get(key)
        if v is None:
            return
        if not isinstance(v, list) or not all(isinstance(p, str) and PKG_RE.match(p) for p in v):
            bad(key, v, "must be a list of package names (letters, digits, . _ + -)")

    steps = get("steps")
    if steps is not None and list(steps) != list(STEP_NAMES):
        bad("steps", steps, f"is fixed: {', '.join(STEP_NAMES)} (use --only/--skip to choose)")

    want_path("state_dir")
    want_path("report_dir")
    user = get("user")
    if user is not None and not (user == "" or re.match(r"^[a-z_][a-z0-9_-]*$", str(user))):
        bad("user", user, "must be a login name or \"\"")

    # driver
    br = get("driver.branch")
    if br is not None and not re.match(r"^\d{3}xx$", str(br)):
        bad("driver.branch", br, "must look like 580xx")
    want_pkgs("driver.packages")
    want_pkgs("driver.replaces")
    want_int("driver.releasever", 0, 99)
    want_bool("driver.lock")
    want_int("driver.akmods_timeout", 1)

    # cuda
    ver = get("cuda.version")
    if ver is not None and not re.match(r"^\d+\.\d+$", str(ver)):
        bad("cuda.version", ver, "must be MAJOR.MINOR, e.g. 12.9")
    rel = get("cuda.repo_release")
    if rel is not None and not re.match(r"^(fedora|rhel)\d+$", str(rel)):
        bad("cuda.repo_release", rel, "must look like fedora41")
    url = get("cuda.repo_baseurl")
    if url is not None and not re.match(r"^(https?|file)://[^\s'\"]+$", str(url)):
        bad("cuda.repo_baseurl", url, "must be an http(s):// or file:// URL without spaces or quotes")
    want_bool("cuda.repo_gpgcheck")
    gk = get("cuda.repo_gpgkey")
    if gk is not None and not (gk == "" or re.match(r"^(https?|file)://[^\s'\"]+$", str(gk))):
        bad("cuda.repo_gpgkey", gk, "must be \"\" or an http(s):// or file:// URL without spaces or quotes")
    want_pkgs("cuda.exclude")
    want_pkgs("cuda.packages")
    pk = get("cuda.packages") or []
    for forbidden in ("cuda", "cuda-drivers", "nvidia-driver"):
        if forbidden in pk:
            bad("cuda.packages", pk, f"must not contain {forbidden!r}: it pulls NVIDIA's driver, which conflicts with RPM Fusion's")
    want_path("cuda.prefix")
    want_path("cuda.profile_snippet")

    # compiler
    want_int("compiler.major", 5, 99)
    want_pkgs("compiler.packages")
    want_path("compiler.shim_dir")
    want_bool("compiler.user_shims")

    # patch
    hdr = get("patch.header")
    if hdr is not None and (not isinstance(hdr, str) or hdr.startswith("/") or ".." in hdr.split("/")):
        bad("patch.header", hdr, "must be a path relative to cuda.prefix, without '..'")
    rules = get("patch.rules")
    if rules is not None and not (resources.PATCHES / str(rules)).is_file():
        bad("patch.rules", rules, f"must name a file in {resources.PATCHES}")

    # build
    url = get("build.repo_url")
    if url is not None and (not isinstance(url, str) or not url or any(ch in url for ch in "\n\0") or url.startswith("-")):
        bad("build.repo_url", url, "must be a git URL or an absolute path")
    profiles = get("build.profiles") or {}
    prof = get("build.profile")
    if prof is not None and prof not in profiles:
        bad("build.profile", prof, f"must be one of: {', '.join(profiles)}")
    for name, p in profiles.items():
        if not isinstance(p, dict) or not SHA_RE.match(str(p.get("sha", ""))):
            bad(f"build.profiles.{name}.sha", (p or {}).get("sha") if isinstance(p, dict) else p, "must be a full 40-hex commit SHA")
        elif p.get("dialect") not in ("pre-sync", "post-sync", "upstream"):
            bad(f"build.profiles.{name}.dialect", p.get("dialect"), "must be one of: pre-sync, post-sync, upstream")
    sha = get("build.sha")
    if sha not in (None, "") and not SHA_RE.match(str(sha)):
        bad("build.sha", sha, "must be \"\" (use the profile's) or a full 40-hex lowercase commit SHA")
    want_path("build.src_dir")
    want_path("build.build_dir")
    want_bool("build.cuda")
    for key in ("build.cuda_architectures", "build.fallback_architectures"):
        v = get(key)
        if v is not None and not ARCH_RE.match(str(v)):
            bad(key, v, "must be 'native' or CUDA architecture numbers like 61 or 61;86 (optionally -real/-virtual)")
    if get("build.fallback_architectures") == "native":
        bad("build.fallback_architectures", "native", "must be explicit numbers (it is used when no GPU is visible)")
    want_path("build.nvcc", empty_ok=True)
    want_path("build.host_compiler", empty_ok=True)
    tg = get("build.targets")
    if tg is not None and (not isinstance(tg, list) or not tg or not all(isinstance(t, str) and re.match(r"^[a-z][a-z0-9_-]*$", t) for t in tg)):
        bad("build.targets", tg, "must be a non-empty list of target names like llama-server")
    want_int("build.jobs", 0, 1024)
    want_int("build.mem_per_job_gb", 1, 64)
    want_path("build.ccache_dir", empty_ok=True)
    want_bool("build.ccache")
    ce = get("build.cmake_extra")
    if ce is not None and (not isinstance(ce, list) or not all(isinstance(x, str) and CMAKE_DEF_RE.match(x) for x in ce)):
        bad("build.cmake_extra", ce, "must be a list of NAME=VALUE strings")

    # models
    want_path("models.dir")
    want_int("models.reserve_gb", 0)
    want_bool("models.update")
    want_int("models.metadata_timeout", 1, 600)
    want_int("models.progress_interval", 1, 3600)
    hp = get("models.hf_package")
    if hp is not None and not (isinstance(hp, str) and PKG_RE.match(hp)):
        bad("models.hf_package", hp, "must be a package name (letters, digits, . _ + -)")
    files = get("models.files") or {}
    if not isinstance(files, dict) or not files:
        bad("models.files", files, "must map names to {repo, filename, revision, sha256}")
        files = {}
    for name, f in files.items():
        k = f"models.files.{name}"
        if not isinstance(f, dict):
            bad(k, f, "must be a mapping with repo, filename, revision, sha256")
            continue
        if not REPO_ID_RE.match(str(f.get("repo", ""))):
            bad(f"{k}.repo", f.get("repo"), "must be a Hugging Face repo id like org/name")
        fn = str(f.get("filename", ""))
        if not fn or "/" in fn or fn.startswith(".") or not fn.endswith(".gguf"):
            bad(f"{k}.filename", f.get("filename"), "must be a plain .gguf file name")
        rev = f.get("revision", "")
        if not isinstance(rev, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$", rev):
            bad(f"{k}.revision", rev, "must be a branch, tag or commit")
        sh = f.get("sha256", "")
        if sh not in ("", None) and not SHA256_RE.match(str(sh)):
            bad(f"{k}.sha256", sh, "must be \"\" or 64 lowercase hex digits")

    # serve
    host = get("serve.host")
    if host is not None and not re.match(r"^[A-Za-z0-9.:-]+$", str(host)):
        bad("serve.host", host, "must be a host name or IP address")
    want_int("serve.port", 1, 65535)
    want_int("serve.ctx_size", 1)
    want_int("serve.parallel", 1, 256)
    want_int("serve.n_gpu_layers", 0)
    want_int("serve.n_cpu_moe", 0)
    want_int("serve.n_gpu_layers_draft", 0)
    want_int("serve.n_cpu_moe_draft", 0)
    for key in ("serve.cache_type_k", "serve.cache_type_v", "serve.cache_type_k_draft", "serve.cache_type_v_draft"):
        want_choice(key, CACHE_TYPES)
    want_choice("serve.flash_attn", ("on", "off", "auto"))
    want_bool("serve.mlock")
    want_bool("serve.mmap")
    dm = get("serve.draft_model")
    if dm not in (None, "") and dm not in files:
        bad("serve.draft_model", dm, f"must be \"\" or one of models.files: {', '.join(files)}")
    want_choice("serve.spec_type", SPEC_TYPES)
    want_int("serve.draft_block_size", 1, 64)
    want_int("serve.draft_max", 0)
    want_int("serve.draft_min", 0)
    for key in ("serve.override_tensor_draft", "serve.override_tensor"):
        v = get(key)
        if v is not None and (not isinstance(v, list) or not all(isinstance(x, str) and re.match(r"^[^=\s]+=[A-Za-z0-9_]+$", x) for x in v)):
            bad(key, v, "must be a list of PATTERN=BUFFER strings, e.g. token_embd\\.weight=CUDA0")
    if get("serve.log_verbosity") != "auto":
        want_int("serve.log_verbosity", 0, 5)
    want_choice("serve.on_missing_option", ("error", "drop"))
    su = get("serve.service_user")
    if su is not None and not (su == "" or re.match(r"^[a-z_][a-z0-9_-]*$", str(su))):
        bad("serve.service_user", su, "must be a login name or \"\"")
    want_int("serve.ready_timeout", 1)

    want_int("tune.margin_mib", 0)
    want_int("tune.max_probes", 1, 50)
    want_int("tune.overhead_prior_mib", 0, 65536)
    want_int("tune.probe_port", 1, 65535)
    want_int("tune.probe_prompt_tokens", 1, 1 << 20)
    want_int("tune.probe_gen_tokens", 1, 4096)
    want_bool("tune.speed_check")

    if problems:
        raise ConfigError(problems)
    return cfg


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
        raise ConfigError([f"step name {n!r} is unknown: allowed are {', '.join(STEP_NAMES)}" for n in unknown])
    chosen = [n for n in STEP_NAMES if (not o or n in o)]
    return [n for n in chosen if n not in s]
