"""Pair rules: can this target and this MTP head be served together by this binary? Checked before launch.

    problems = check(target_summary, head_summary, dialect="post-sync")

The summaries are provision/ggufhead.py's (read on the target, header only). Each problem names the rule,
what the files say, and the fix. The rules (docs/serve-mtp.md, "Pair rules") come from how the head is wired
to the target: it views the target's KV cache (its sliding layers the target's layer n-2, its full layer
n-1, with the head's own head sizes and KV head counts), and its input is the target's token embedding plus the
target's last hidden state:

  arch        target `gemma4`; head `gemma4_assistant` for a pre-sync build, `gemma4-assistant` for a post-sync
              or upstream one (a head of the other format does not load, or is refused);
  width       head embedding_length_out (pre-sync: n_embd_backbone) == target embedding_length;
  pattern     the target's sliding_window_pattern ends [..., sliding, full];
  kv          head key/value lengths (full and sliding) and per-layer KV head counts == those of the target
              layers it views;
  nextn       post-sync / upstream: head nextn_predict_layers == block_count;
  vocab       post-sync / upstream: the head's vocabulary no larger than the target's; pre-sync: equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ASSISTANT_ARCH

TARGET_ARCH = "gemma4"


@dataclass
class Problem:
    rule: str
    cause: str
    fix: str

    def text(self) -> str:
        return f"{self.rule}: {self.cause}; fix: {self.fix}"


def _layers(value: Any, n: int) -> list[Any] | None:
    """A per-layer key as a list of n values (a scalar applies to every layer); None when absent/unreadable."""
    if value is None:
        return None
    if isinstance(value, list):
        return list(value) if len(value) == n else None
    if isinstance(value, dict):         # a summarized (very long) array
        return None
    return [value] * n


def _name(s: dict[str, Any]) -> str:
    return s.get("path") or s.get("name") or "?"


def check(target: dict[str, Any], head: dict[str, Any], *, dialect: str) -> list[Problem]:
    out: list[Problem] = []
    tname, hname = _name(target), _name(head)
    t_arch, h_arch = target.get("arch", ""), head.get("arch", "")
    want = ASSISTANT_ARCH.get(dialect)

    if t_arch != TARGET_ARCH:
        out.append(Problem("arch", f"the target {tname} has general.architecture {t_arch!r}; the MTP head needs a "
                           f"{TARGET_ARCH!r} target", "serve the Gemma 4 model (models.files.model) or serve "
                           "without the head: serve.spec_type=none"))
        return out
    presync_head = h_arch == "gemma4_assistant"
    if want and h_arch != want:
        if h_arch in ASSISTANT_ARCH.values():
            side = "pre-sync" if presync_head else "post-sync"
            fix = (f"pin the assistant revision made for this build (general.architecture {want!r}): "
                   "--set models.files.assistant.revision=<commit> and --set models.update=true, "
                   f"or build the fork that reads {h_arch!r}: --set build.profile="
                   + ("recipe (pre-sync)" if presync_head else "current (post-sync)"))
            out.append(Problem("arch", f"the head {hname} is a {side} assistant ({h_arch!r}) but the built "
                               f"llama-server is {dialect} and loads {want!r}", fix))
        else:
            out.append(Problem("arch", f"the head {hname} has general.architecture {h_arch!r}, not an MTP "
                               f"assistant ({want!r} for this {dialect} build)",
                               "point serve.draft_model at the Gemma 4 assistant file, or use "
                               "serve.spec_type=none"))
        return out                       # the other rules read keys of the right format only

    n_t = int(target.get("block_count") or 0)
    width = target.get("embedding_length")
    h_width = head.get("n_embd_backbone") if presync_head else head.get("embedding_length_out")
    key = "n_embd_backbone" if presync_head else "embedding_length_out"
    if h_width is None:
        out.append(Problem("width", f"the head {hname} has no {h_arch}.{key}", "re-download the assistant file "
                           "(models.update=true); it is not a complete MTP head"))
    elif width is not None and int(h_width) != int(width):
        out.append(Problem("width", f"the head {hname} was made for a target {h_width} wide ({key}), the target "
                           f"{tname} is {width} wide (embedding_length)", "use the assistant published with this "
                           "model (models.files.assistant.repo / revision), or the model it belongs to"))

    pat = _layers(target.get("sliding_window_pattern"), n_t) if n_t else None
    if n_t < 2 or pat is None:
        out.append(Problem("pattern", f"the target {tname} has no per-layer sliding_window_pattern over its "
                           f"{n_t} layers", "use the Gemma 4 model file the head belongs to"))
        pat = None
    elif not (bool(pat[-2]) and not bool(pat[-1])):
        kinds = ", ".join("sliding" if x else "full" for x in pat[-2:])
        out.append(Problem("pattern", f"the target {tname} ends with layers [{kinds}]; the head's sliding layers "
                           f"view the target's layer {n_t - 2} (must be sliding) and its full layer "
                           f"{n_t - 1} (must be full)", "use the Gemma 4 model the head was made for "
                           "(models.files.model)"))
        pat = None

    # KV geometry: the head lays its own sizes over the target's cache tensors.
    for k in ("key_length", "value_length", "key_length_swa", "value_length_swa"):
        tv, hv = target.get(k), head.get(k)
        if tv is not None and hv is not None and int(tv) != int(hv):
            out.append(Problem("kv", f"{k}: head {hv}, target {tv} (the head reads the target's KV cache with its "
                               "own head sizes)", "use the assistant made for this model"))
    n_h = int(head.get("block_count") or 0)
    h_pat = _layers(head.get("sliding_window_pattern"), n_h) if n_h else None
    h_kv = _layers(head.get("head_count_kv"), n_h) if n_h else None
    t_kv = _layers(target.get("head_count_kv"), n_t) if n_t else None
    if pat is not None and h_pat is not None and h_kv is not None and t_kv is not None:
        for i, (swa, kv) in enumerate(zip(h_pat, h_kv)):
            src = n_t - 2 if swa else n_t - 1
            if int(kv) != int(t_kv[src]):
                out.append(Problem("kv", f"head layer {i} ({'sliding' if swa else 'full'}) has {kv} KV heads, the "
                                   f"target layer {src} it views has {t_kv[src]}",
                                   "use the assistant made for this model"))

    if not presync_head:
        nl = head.get("nextn_predict_layers")
        if nl is None or int(nl) != n_h:
            out.append(Problem("nextn", f"the head {hname} has nextn_predict_layers {nl} and block_count {n_h}: they "
                               "must be equal (the head's layer loop runs over its nextn layers)",
                               "re-download the regenerated assistant (models.update=true)"))

    tv, hv = target.get("n_vocab"), head.get("n_vocab")
    if tv and hv:
        if presync_head and int(tv) != int(hv):
            out.append(Problem("vocab", f"head vocabulary {hv} tokens, target {tv}: the pre-sync fork needs the same "
                               "vocabulary", "use the assistant made for this model"))
        elif not presync_head and int(hv) > int(tv):
            out.append(Problem("vocab", f"head vocabulary {hv} tokens, target {tv}: drafted token ids would fall "
                               "outside the target's embedding", "use the assistant made for this model"))
    return out
