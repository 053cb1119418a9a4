"""The probe table (text) and the same data as a picture (PNG, matplotlib's Agg backend: no display)."""

from __future__ import annotations

from typing import Any, Iterable, Optional


def _f(v: Any, fmt: str = "{}") -> str:
    return "-" if v is None or v == "" else fmt.format(v)


def table(rows: Iterable[dict[str, Any]], title: str = "") -> str:
    """One line per probe: value, predicted MiB, measured peak, outcome, tokens/s, seconds."""
    rows = list(rows)
    out = [title] if title else []
    out.append(f"  {'#':>2} {'n_cpu_moe':>9} {'predicted MiB':>13} {'peak MiB':>9} {'outcome':<9} "
               f"{'gen t/s':>8} {'prompt t/s':>10} {'seconds':>8}  note")
    for i, r in enumerate(rows, 1):
        note = r.get("detail") or ""
        if r.get("draft_n"):
            note = (note + "; " if note else "") + f"draft {r.get('draft_accepted')}/{r.get('draft_n')} accepted"
        if r.get("label"):
            note = (r["label"] + ("; " + note if note else ""))
        out.append(f"  {i:>2} {r['value']:>9} {_f(r.get('predicted_mib')):>13} {_f(r.get('peak_mib')):>9} "
                   f"{r['outcome']:<9} {_f(r.get('gen_tps'), '{:.1f}'):>8} {_f(r.get('prompt_tps'), '{:.1f}'):>10} "
                   f"{_f(r.get('seconds'), '{:.1f}'):>8}  {note[:110]}")
    return "\n".join(out)


def _on_line(predicted: Optional[dict[int, int]], k: int) -> Optional[float]:
    """The predicted line at k, interpolated between the values fit-params was asked about."""
    if not predicted:
        return None
    ks = sorted(predicted)
    if k <= ks[0] or k >= ks[-1]:
        return predicted[ks[0]] if k <= ks[0] else predicted[ks[-1]]
    for a, b in zip(ks, ks[1:]):
        if a <= k <= b:
            return predicted[a] + (predicted[b] - predicted[a]) * (k - a) / (b - a)
    return None


def plot(path: str, rows: list[dict[str, Any]], *, free_mib: int, margin_mib: int = 0,
         predicted: Optional[dict[int, int]] = None, title: str = "", chosen: Optional[int] = None,
         extra_series: Optional[dict[str, list[dict[str, Any]]]] = None) -> str:
    """Two panels against --n-cpu-moe: memory (predicted line, measured peaks by outcome, free and
    free - margin) and tokens/s (generation and prompt) where a probe ran. Returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7.5), sharex=True)
    if predicted:
        ks = sorted(predicted)
        ax1.plot(ks, [predicted[k] for k in ks], "-", color="tab:blue", lw=1.2,
                 label="predicted peak (fit-params + assistant + overhead)")
    series = {"": rows}
    series.update(extra_series or {})
    markers = {"ok": ("o", "tab:green"), "oom-load": ("x", "tab:red"), "oom-kv": ("x", "tab:purple"),
               "oom-run": ("X", "tab:red"), "abort": ("X", "darkred"), "segfault": ("s", "black")}
    for name, rs in series.items():
        for outcome, (mk, col) in markers.items():
            pts = [r for r in rs if r["outcome"] == outcome]
            if not pts:
                continue
            # A failed value has no peak: draw it on its prediction (or on the free line) so it stays readable.
            y = [r["peak_mib"] if r.get("peak_mib") is not None else (r.get("predicted_mib") or _on_line(predicted, r["value"])
                                                                        or free_mib) for r in pts]
            ax1.scatter([r["value"] for r in pts], y, marker=mk, color=col, s=46 if name else 60,
                        alpha=0.55 if name else 1.0, label=f"{name + ': ' if name else ''}{outcome}",
                        zorder=3 if name else 4, facecolors="none" if name and mk == "o" else None)
        pr = [r for r in rs if r.get("predicted_mib") is not None and not name]
        if pr:
            ax1.scatter([r["value"] for r in pr], [r["predicted_mib"] for r in pr], marker="_", s=200,
                        color="tab:blue", label="predicted at probe time", zorder=5)
    ax1.axhline(free_mib, color="gray", ls="--", lw=1, label=f"free before probing ({free_mib} MiB)")
    if margin_mib:
        ax1.axhline(free_mib - margin_mib, color="orange", ls=":", lw=1, label=f"free - margin ({margin_mib} MiB)")
    if chosen is not None:
        for ax in (ax1, ax2):
            ax.axvline(chosen, color="tab:green", ls="-.", lw=1)
        ax1.annotate(f"chosen {chosen}", (chosen, free_mib), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax1.set_ylabel("GPU memory (MiB); failures drawn at their prediction")
    ax1.set_title(title or "expert placement: predicted vs measured", fontsize=9)
    ax1.legend(fontsize=7, loc="upper right")
    ax1.grid(alpha=0.3)
    for name, rs in series.items():
        ok = sorted((r for r in rs if r["outcome"] == "ok" and r.get("gen_tps")), key=lambda r: r["value"])
        if ok:
            style = "--" if name else "-"
            ax2.plot([r["value"] for r in ok], [r["gen_tps"] for r in ok], style + "o", color="tab:green",
                     label=f"{name + ': ' if name else ''}generation t/s", ms=4)
            pts = [r for r in ok if r.get("prompt_tps")]
            ax2.plot([r["value"] for r in pts], [r["prompt_tps"] for r in pts], style + "s", color="tab:orange",
                     label=f"{name + ': ' if name else ''}prompt t/s", ms=4)
    ax2.set_yscale("log")
    ax2.set_xlabel("--n-cpu-moe (experts of the first N layers on the CPU)")
    ax2.set_ylabel("tokens/s (log)")
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_result(res: dict[str, Any], path: str) -> str:
    """The PNG of one tune result; returns a line to print (or why there is no picture)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return f"tune: no plot: matplotlib is not installed here (pip install matplotlib); the table above has the data"
    over = res.get("overhead_mib") or 0
    extra = (res.get("assistant") or {}).get("total_mib", 0)
    pred = {int(k): v + extra + over for k, v in (res.get("estimates") or {}).items()}
    rows = list(res.get("probes") or [])
    vf = res.get("valid_for") or {}
    title = (f"{res.get('card')}: context {vf.get('ctx_size')}, KV {vf.get('cache_type_k')}/{vf.get('cache_type_v')}, "
             f"margin {res.get('margin_mib')} MiB -> --n-cpu-moe {res.get('n_cpu_moe')}")
    plot(path, rows, free_mib=res.get("free_mib") or 0, margin_mib=res.get("margin_mib") or 0,
         predicted=pred, title=title, chosen=res.get("n_cpu_moe"))
    return f"tune: plot written to {path}"
