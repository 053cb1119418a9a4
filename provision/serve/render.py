"""Render the llama-server command from gpubox's settings, in the dialect of the binary that was built.

Settings are stated once, in gpubox's terms (cfg["serve"]: n_cpu_moe, draft_block_size, cache_type_k ...).
Each setting has the spellings it may take, recipe spelling first; the renderer picks the first one the
binary's `--help` accepts (provision.serve.helptext). Where the dialects differ in meaning, not only in
spelling, the translation is explicit (docs/fork.md):

    pre-sync  (recipe, b0e900a28)  --draft-block-size B   --draft-max M        --draft-min N      --spec-type mtp
    post-sync (b10018-1.2.0)       --spec-draft-n-max B-1  (no equivalent)     --spec-draft-n-min N --spec-type draft-mtp
    upstream llama.cpp             as post-sync; no turbo* cache types, no --mtp-head

An option the binary lacks (turbo3 on upstream) is an error naming the option, the value and the binary,
unless serve.on_missing_option is "drop": then it is left out (the binary's default applies) and the
rendered result says so in `dropped`, which the serve step logs and reports. Finally every flag of the
rendered command is checked against the parsed `--help` again.

Options equal to "off" in gpubox's terms are not rendered (n_cpu_moe 0, mmap true, no overrides), so the
default settings on the pre-sync binary render exactly the recipe's command.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import helptext

# gpubox's spec types, whichever era's name the config uses -> the names each era's binary may know,
# in order of preference (the recipe's first).
SPEC_NAMES = {
    "none": ["none"],
    "mtp": ["mtp", "draft-mtp"], "draft-mtp": ["mtp", "draft-mtp"],
    "draft": ["draft", "draft-simple"], "draft-simple": ["draft", "draft-simple"],
    "eagle3": ["eagle3", "draft-eagle3"], "draft-eagle3": ["eagle3", "draft-eagle3"],
    "nextn": ["nextn"], "draft-dflash": ["draft-dflash"],
    "ngram-cache": ["ngram-cache"], "ngram-simple": ["ngram-simple"], "ngram-map-k": ["ngram-map-k"],
    "ngram-map-k4v": ["ngram-map-k4v"], "ngram-mod": ["ngram-mod"],
}

# Spec types a dialect parses but cannot serve, with the reason (docs/serve-mtp.md, "Known defects").
BROKEN_SPEC = {
    ("post-sync", "draft-simple"): (
        "the post-sync fork (b10018) aborts every request with a plain draft model: the draft context allows one "
        "output (GGML_ASSERT(n_outputs_max <= cparams.n_outputs_max) in llama-context.cpp), also with the target "
        "as its own draft, so draft-simple is no fallback there; fix: serve.spec_type=mtp with the assistant head "
        "(serve.draft_model=assistant), or serve.spec_type=none"),
}

# Spellings per option, the recipe's first.
SPELL = {
    "model": ["-m", "--model"],
    "draft_model_mtp": ["--mtp-head", "--spec-draft-model", "--model-draft", "-md"],
    "draft_model": ["--model-draft", "-md", "--spec-draft-model"],
    "spec_type": ["--spec-type"],
    "draft_block_size": ["--draft-block-size"],
    "spec_draft_n_max": ["--spec-draft-n-max"],
    "draft_max": ["--draft-max", "--draft", "--draft-n"],
    "draft_min": ["--draft-min", "--draft-n-min"],
    "spec_draft_n_min": ["--spec-draft-n-min"],
    "n_gpu_layers": ["-ngl", "--n-gpu-layers", "--gpu-layers"],
    "n_cpu_moe": ["--n-cpu-moe", "-ncmoe"],
    "n_gpu_layers_draft": ["-ngld", "--n-gpu-layers-draft", "--gpu-layers-draft", "--spec-draft-ngl"],
    "n_cpu_moe_draft": ["--n-cpu-moe-draft", "-ncmoed", "--spec-draft-n-cpu-moe"],
    "override_tensor": ["--override-tensor", "-ot"],
    "override_tensor_draft": ["--override-tensor-draft", "-otd", "--spec-draft-override-tensor"],
    "cache_type_k": ["-ctk", "--cache-type-k"],
    "cache_type_v": ["-ctv", "--cache-type-v"],
    "cache_type_k_draft": ["-ctkd", "--cache-type-k-draft", "--spec-draft-type-k"],
    "cache_type_v_draft": ["-ctvd", "--cache-type-v-draft", "--spec-draft-type-v"],
    "flash_attn": ["-fa", "--flash-attn"],
    "ctx_size": ["-c", "--ctx-size"],
    "parallel": ["-np", "--parallel"],
    "mlock": ["--mlock"],
    "no_mmap": ["--no-mmap"],
    "load_mode": ["--load-mode", "-lm"],
    "host": ["--host"],
    "port": ["--port"],
    "api_key_file": ["--api-key-file"],
    "log_verbosity": ["-lv", "--log-verbosity", "--verbosity"],
}

# Which parsed value list constrains an option's value.
VALUES = {"cache_type_k": "cache_type", "cache_type_v": "cache_type_v", "cache_type_k_draft": "cache_type_draft",
          "cache_type_v_draft": "cache_type_v_draft", "flash_attn": "flash_attn"}

# The level at which load_tensors / KV / memory lines appear on each dialect (docs/fork.md): pre-sync
# prints them at its default (3), the newer ones only at trace level 4.
AUTO_VERBOSITY = {"pre-sync": None, "post-sync": 4, "upstream": 4, "unknown": 4}


class RenderError(Exception):
    """The settings cannot be expressed for this binary. Names the option, the binary and the fix."""

    def __init__(self, problems: list[str], binary: str, dialect: str):
        self.problems, self.binary, self.dialect = problems, binary, dialect
        super().__init__(
            f"serve: the llama-server at {binary} (dialect {dialect}) cannot take these settings:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\n  fix: change the setting (invoke serve --set serve.KEY=VALUE), build the fork that has the option "
              "(build.profile), or set serve.on_missing_option=drop to leave such options out (logged)")


@dataclass
class Rendered:
    argv: list[str]                                     # argv[0] is the binary
    dialect: str
    notes: list[str] = field(default_factory=list)      # translations made (e.g. draft_max has no post-sync flag)
    dropped: list[str] = field(default_factory=list)    # options left out under on_missing_option=drop
    pairs: list[tuple[str, str | None]] = field(default_factory=list)   # (flag, value) in order

    @property
    def args(self) -> list[str]:
        return self.argv[1:]


def render(serve: dict[str, Any], parsed: dict[str, Any], *, binary: str, model_path: str,
           draft_path: str = "") -> Rendered:
    """cfg["serve"] + paths (already resolved on the target) + the binary's parsed --help -> Rendered."""
    dialect = parsed.get("dialect") or helptext.detect_dialect(parsed)
    b = _Flags(parsed, drop=serve.get("on_missing_option", "error") == "drop")
    drafting = bool(draft_path) and serve.get("spec_type", "none") != "none"
    b.add("model", model_path, "models.files.model")
    if drafting:
        _drafting(b, serve, draft_path, dialect)
    elif serve.get("draft_model"):
        b.notes.append("drafting off: " + ("serve.spec_type is none" if draft_path else "no draft model path"))
    _placement(b, serve, drafting)
    _load_mode(b, serve)
    b.add("host", serve["host"])
    b.add("port", serve["port"])
    if serve.get("api_key_file"):   # the key stays in the file: never on the command line
        b.add("api_key_file", serve["api_key_file"])
    lv = serve.get("log_verbosity", "auto")
    if lv == "auto":
        lv = AUTO_VERBOSITY.get(dialect, 4)
    if lv is not None:
        b.add("log_verbosity", lv)
    # Every flag, once more against the binary's own list (a removed stub is not accepted).
    for flag, _ in b.pairs:
        if not helptext.accepts(parsed, flag):
            b.problems.append(f"{flag} is not accepted by this binary's --help")
    if b.problems:
        raise RenderError(b.problems, binary, dialect)
    argv = [binary]
    for flag, value in b.pairs:
        argv.append(flag)
        if value is not None:
            argv.append(value)
    return Rendered(argv=argv, dialect=dialect, notes=b.notes, dropped=b.dropped, pairs=b.pairs)


class _Flags:
    """The flags rendered so far, in the binary's own spelling, and what could not be rendered and why."""

    def __init__(self, parsed: dict[str, Any], drop: bool):
        self.parsed, self.drop = parsed, drop
        self.pairs: list[tuple[str, str | None]] = []
        self.notes: list[str] = []
        self.dropped: list[str] = []
        self.problems: list[str] = []

    def spelling(self, key: str) -> str | None:
        return next((s for s in SPELL[key] if helptext.accepts(self.parsed, s)), None)

    def missing(self, setting: str, value: Any, what: str) -> None:
        msg = f"serve.{setting} = {value!r}: {what}"
        if self.drop:
            self.dropped.append(msg + " -> left out (serve.on_missing_option=drop); the binary's default applies")
        else:
            self.problems.append(msg)

    def add(self, key: str, value: Any = None, setting: str | None = None) -> None:
        setting = setting or key
        flag = self.spelling(key)
        if flag is None:
            self.missing(setting, value if value is not None else True,
                         f"this binary has no {' / '.join(SPELL[key])} option")
            return
        if value is not None and key in VALUES:
            values = self.parsed["values"]
            allowed = values.get(VALUES[key]) or values.get("cache_type" if "cache" in key else "", [])
            if allowed and str(value) not in allowed:
                self.missing(setting, value, f"{flag} does not accept {value!r} on this binary "
                                             f"(allowed: {', '.join(allowed)})")
                return
        self.pairs.append((flag, None if value is None else str(value)))


def _drafting(b: _Flags, serve: dict[str, Any], draft_path: str, dialect: str) -> None:
    """The draft model, --spec-type in this binary's spelling, and the draft sizes in its dialect."""
    spec = serve["spec_type"]
    b.add("draft_model_mtp" if spec in ("mtp", "draft-mtp") else "draft_model", draft_path, "draft_model")
    known = b.parsed["values"].get("spec_type", [])
    name = next((n for n in SPEC_NAMES.get(spec, [spec]) if n in known), None)
    broken = BROKEN_SPEC.get((dialect, name))
    if name is None:
        b.missing("spec_type", spec, f"--spec-type on this binary accepts only: {', '.join(known) or '(no --spec-type)'}")
    elif broken:
        b.problems.append(f"serve.spec_type = {spec!r}: {broken}")
    else:
        if name != spec:
            b.notes.append(f"serve.spec_type {spec} is spelled {name} on this binary")
        b.add("spec_type", name)
    _draft_sizes(b, serve)


def _draft_sizes(b: _Flags, serve: dict[str, Any]) -> None:
    """Pre-sync --draft-block-size/--draft-max/--draft-min, post-sync --spec-draft-n-max (B-1)/--spec-draft-n-min."""
    size = serve["draft_block_size"]
    if helptext.accepts(b.parsed, "--draft-block-size"):
        b.add("draft_block_size", size)
    elif helptext.accepts(b.parsed, "--spec-draft-n-max"):
        b.add("spec_draft_n_max", size - 1, "draft_block_size")
        b.notes.append(f"serve.draft_block_size {size} -> --spec-draft-n-max {size - 1} (block B drafts B-1 tokens)")
    else:
        b.missing("draft_block_size", size, "this binary has neither --draft-block-size nor --spec-draft-n-max")
    if b.spelling("draft_max"):
        b.add("draft_max", serve["draft_max"])
    elif helptext.accepts(b.parsed, "--spec-draft-n-max"):
        b.notes.append(f"serve.draft_max {serve['draft_max']} not rendered: this dialect (post-sync fork, upstream) has "
                       "no equivalent (--draft-max is a removed stub there; the block size bounds the draft)")
    else:
        b.missing("draft_max", serve["draft_max"], "this binary has no --draft-max")
    if b.spelling("draft_min"):
        b.add("draft_min", serve["draft_min"])
    else:
        b.add("spec_draft_n_min", serve["draft_min"], "draft_min")


def _placement(b: _Flags, serve: dict[str, Any], drafting: bool) -> None:
    """Layers and experts on the GPU, tensor overrides, cache types, flash attention, context, slots."""
    b.add("n_gpu_layers", serve["n_gpu_layers"])
    if serve.get("n_cpu_moe"):
        b.add("n_cpu_moe", serve["n_cpu_moe"])
    if drafting:
        b.add("n_gpu_layers_draft", serve["n_gpu_layers_draft"])
        if serve.get("n_cpu_moe_draft"):
            b.add("n_cpu_moe_draft", serve["n_cpu_moe_draft"])
        if serve.get("override_tensor_draft"):
            b.add("override_tensor_draft", ",".join(serve["override_tensor_draft"]))
    if serve.get("override_tensor"):
        b.add("override_tensor", ",".join(serve["override_tensor"]))
    b.add("cache_type_k", serve["cache_type_k"])
    b.add("cache_type_v", serve["cache_type_v"])
    if drafting:
        b.add("cache_type_k_draft", serve["cache_type_k_draft"])
        b.add("cache_type_v_draft", serve["cache_type_v_draft"])
    b.add("flash_attn", serve["flash_attn"])
    b.add("ctx_size", serve["ctx_size"])
    b.add("parallel", serve["parallel"])


def _load_mode(b: _Flags, serve: dict[str, Any]) -> None:
    """--mlock / --no-mmap, or upstream's --load-mode that folded them."""
    mlock, mmap = bool(serve.get("mlock")), bool(serve.get("mmap", True))
    if b.spelling("mlock") or b.spelling("no_mmap") or not b.spelling("load_mode"):
        if mlock:
            b.add("mlock")
        if not mmap:
            b.add("no_mmap", None, "mmap")
        return
    if not (mlock or not mmap):
        return
    # Upstream folded --mlock/--no-mmap into --load-mode (seen in llama-cpp-python 0.3.36's llama.cpp).
    mode = {(True, True): "mmap+mlock", (True, False): "mlock", (False, False): "none"}[(mlock, mmap)]
    allowed = b.parsed["values"].get("load_mode", [])
    if allowed and mode not in allowed:
        b.missing("mlock" if mlock else "mmap", mlock if mlock else mmap,
                  f"--load-mode on this binary has no {mode!r} (allowed: {', '.join(allowed)})")
    else:
        b.notes.append(f"serve.mlock={str(mlock).lower()} serve.mmap={str(mmap).lower()} -> --load-mode {mode} "
                       "(this binary has no --mlock/--no-mmap)")
        b.add("load_mode", mode, "mlock")


def diff(old: list[str], new: list[str]) -> list[str]:
    """What changed between two argvs, flag by flag: ['-c 4096 -> 8192', '+ --mlock', '- --no-mmap']."""
    def as_map(argv: list[str]) -> dict[str, str | None]:
        m: dict[str, str | None] = {}
        i = 1
        while i < len(argv):
            a = argv[i]
            if i + 1 < len(argv) and not (argv[i + 1].startswith("-") and len(argv[i + 1]) > 1
                                          and not argv[i + 1][1:2].isdigit()):
                m[a] = argv[i + 1]
                i += 2
            else:
                m[a] = None
                i += 1
        return m

    out = []
    if old[:1] != new[:1]:
        out.append(f"binary {old[0] if old else '?'} -> {new[0]}")
    a, b = as_map(old), as_map(new)
    for k in b:
        if k not in a:
            out.append(f"+ {k}" + (f" {b[k]}" if b[k] is not None else ""))
        elif a[k] != b[k]:
            out.append(f"{k} {a[k]} -> {b[k]}")
    for k in a:
        if k not in b:
            out.append(f"- {k}" + (f" {a[k]}" if a[k] is not None else ""))
    return out
