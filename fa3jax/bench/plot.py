"""The attention suite's plot: TFLOPS against seqlen per impl (matplotlib, the ``bench`` extra, imported lazily)."""
from __future__ import annotations

from pathlib import Path

import jax

INSTALL_HINT = 'pip install "fa3jax[bench]"'


def attn_plot_title(rows: list[dict]) -> str:
    """What the timed rows have in common, e.g. ``bf16, d=128, h=16, b*s=16384``; a value that varies is listed
    with slashes (the legend then names each series' dtype and head dim)."""
    parts = []
    for key, fmt in (("dtype", "{}"), ("headdim", "d={}"), ("heads", "h={}")):
        parts.append(fmt.format("/".join(str(v) for v in sorted({r[key] for r in rows}))))
    tokens = sorted({r["batch"] * r["seqlen"] for r in rows})
    return ", ".join(parts + ["b*s=" + "/".join(str(x) for x in tokens)])

def plot_attn(rows: list[dict], path: Path) -> str:
    """TFLOPS vs seqlen per impl, one panel per (mode, causal). Returns '' or why no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # an optional dependency: the run's table and JSON do not need it
        return f"no plot: matplotlib not importable ({type(e).__name__}); {INSTALL_HINT}"
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return "no plot: nothing was timed"
    panels = sorted({(r["mode"], r["causal"]) for r in ok})
    multi = len({(r["dtype"], r["headdim"]) for r in ok}) > 1
    ncols = 2 if len(panels) > 2 else len(panels)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    seqlens = sorted({r["seqlen"] for r in ok})
    for ax, (mode, causal) in zip(axes.flat, panels):
        series = {}
        for r in ok:
            if (r["mode"], r["causal"]) != (mode, causal):
                continue
            label = r["impl"] + (f" {r['dtype']} d{r['headdim']}" if multi else "")
            series.setdefault(label, []).append((r["seqlen"], r["tflops"]))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqlens, [str(x) for x in seqlens])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("seqlen (batch = tokens / seqlen)")
        ax.set_ylabel("TFLOPS")
        ax.set_title(f"{mode}, {'causal' if causal else 'non-causal'}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"attention TFLOPS, {attn_plot_title(ok)}, on {jax.devices()[0].device_kind} (jax {jax.__version__})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return ""
