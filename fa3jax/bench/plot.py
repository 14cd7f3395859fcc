"""The suites' plots (matplotlib, the ``bench`` extra, imported lazily): attn, varlen, prefill TFLOPS, decode TB/s."""
from __future__ import annotations

from pathlib import Path

import jax

INSTALL_HINT = 'pip install "fa3jax[bench]"'


def _values(rows: list[dict], key: str, fmt: str = "{}") -> str:
    """The values of ``key`` over the rows, sorted and joined with slashes, through ``fmt``."""
    return fmt.format("/".join(str(v) for v in sorted({r[key] for r in rows})))


def attn_plot_title(rows: list[dict]) -> str:
    """What the timed rows have in common, e.g. ``bf16, d=128, h=16, b*s=16384``; a value that varies is listed
    with slashes (the legend then names each series' dtype and head dim)."""
    tokens = sorted({r["batch"] * r["seqlen"] for r in rows})
    return ", ".join([_values(rows, "dtype"), _values(rows, "headdim", "d={}"), _values(rows, "heads", "h={}"),
                      "b*s=" + "/".join(str(x) for x in tokens)])


def varlen_plot_title(rows: list[dict]) -> str:
    """E.g. ``bf16, d=128, h=16, 16384 tokens``: what the varlen rows have in common (varying values with slashes)."""
    return ", ".join([_values(rows, "dtype"), _values(rows, "headdim", "d={}"), _values(rows, "heads", "h={}"),
                      _values(rows, "tokens", "{} tokens")])


def decode_plot_title(rows: list[dict]) -> str:
    """E.g. ``bf16, d=128, hq=32, hk=8``: what the decode rows have in common (varying values with slashes)."""
    return ", ".join([_values(rows, "dtype"), _values(rows, "headdim", "d={}"), _values(rows, "heads_q", "hq={}"),
                      _values(rows, "heads_k", "hk={}")])


def _pyplot():
    """(pyplot, '') or (None, why there is no plot)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # an optional dependency: the run's table and JSON do not need it
        return None, f"no plot: matplotlib not importable ({type(e).__name__}); {INSTALL_HINT}"
    return plt, ""


def _timed(rows: list[dict], keep=lambda r: True):
    """(pyplot, the timed rows that ``keep`` accepts, '') or (None, [], why no plot is written)."""
    plt, why = _pyplot()
    if plt is None:
        return None, [], why
    ok = [r for r in rows if r["status"] == "ok" and keep(r)]
    if not ok:
        return None, [], "no plot: nothing was timed"
    return plt, ok, ""


def _series_suffix(ok: list[dict]):
    """A legend suffix naming dtype and head dim, when the rows have more than one of them."""
    multi = len({(r["dtype"], r["headdim"]) for r in ok}) > 1
    return lambda r: f" {r['dtype']} d{r['headdim']}" if multi else ""


def _mode_panels(plt, ok: list[dict]):
    """One panel per (mode, causal): (figure, [(axes, the panel's rows, the panel's title)])."""
    keys = sorted({(r["mode"], r["causal"]) for r in ok})
    fig, axes = _panels(plt, len(keys))
    return fig, [(ax, [r for r in ok if (r["mode"], r["causal"]) == key],
                  f"{key[0]}, {'causal' if key[1] else 'non-causal'}") for ax, key in zip(axes, keys)]


def _panels(plt, n: int, width: float = 6.0):
    """A figure of ``n`` panels, two per row; the unused cells hidden. Returns (figure, the n axes)."""
    ncols = 2 if n > 2 else n
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _save(plt, fig, path: Path, title: str) -> None:
    """Suptitle with the device and jax version; the same text goes into the PNG's ``Title`` metadata."""
    title = f"{title}, on {jax.devices()[0].device_kind} (jax {jax.__version__})"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Title": title, "Software": "fa3jax bench"})
    plt.close(fig)


def _log2_seqlen_axis(ax, xs, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_ylim(bottom=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def plot_attn(rows: list[dict], path: Path) -> str:
    """TFLOPS vs seqlen per impl, one panel per (mode, causal). Returns '' or why no plot was written."""
    plt, ok, why = _timed(rows)
    if plt is None:
        return why
    suffix = _series_suffix(ok)
    fig, panels = _mode_panels(plt, ok)
    seqlens = sorted({r["seqlen"] for r in ok})
    for ax, panel, title in panels:
        series = {}
        for r in panel:
            series.setdefault(r["impl"] + suffix(r), []).append((r["seqlen"], r["tflops"]))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        _log2_seqlen_axis(ax, seqlens, "seqlen (batch = tokens / seqlen)", "TFLOPS", title)
    _save(plt, fig, path, f"attention TFLOPS, {attn_plot_title(ok)}")
    return ""


def plot_varlen(rows: list[dict], path: Path) -> str:
    """TFLOPS vs mean sequence length per impl, one panel per (mode, causal): each impl's varlen series solid, its
    dense-equal-tokens baseline (``dense:<impl>``) dashed in the same colour. Returns '' or why no plot."""
    plt, ok, why = _timed(rows)
    if plt is None:
        return why
    suffix = _series_suffix(ok)
    base = lambda r: r["impl"].split("dense:", 1)[-1]  # noqa: E731
    colour = {b: f"C{i % 10}" for i, b in enumerate(sorted({base(r) for r in ok}))}
    fig, panels = _mode_panels(plt, ok)
    means = sorted({r["mean"] for r in ok})
    for ax, panel, title in panels:
        series = {}  # (base impl, dense?, legend label) -> points; a base's varlen series before its dense one
        for r in panel:
            key = (base(r), r["kind"] != "varlen", r["impl"] + suffix(r))
            series.setdefault(key, []).append((r["mean"], r["tflops"]))
        for (b, dense, label), pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="s" if dense else "o",
                    linestyle="--" if dense else "-", color=colour[b], label=label)
        _log2_seqlen_axis(ax, means, "mean sequence length L (lengths uniform in [L/2, 3L/2])", "TFLOPS",
                          f"varlen {title}")
    _save(plt, fig, path, f"varlen TFLOPS (dense baseline dashed), {varlen_plot_title(ok)}")
    return ""


def plot_decode(rows: list[dict], copy: dict | None, path: Path) -> str:
    """TB/s of K/V read per impl, bars grouped by (batch, cache), one panel per layout, the device copy's TB/s as a
    dotted line. Grouped variants (flash-attn3-jax num_splits) appear as their ``:best`` row only. Returns '' or
    why no plot was written."""
    copy_tbps = (copy or {}).get("tbps")
    return _kvcache_bars(rows, path, ("batch", "cache"), lambda b, c: f"b={b}\ncache {c}", "tbps",
                         "TB/s of K/V read", "decode", "decode bandwidth",
                         (copy_tbps, f"device copy {copy_tbps:.3g} TB/s") if copy_tbps else None)


def plot_prefill(rows: list[dict], path: Path) -> str:
    """TFLOPS per impl, bars grouped by (batch, cache, new), one panel per layout; flash-attn3-jax as its ``:best``
    row. Returns '' or why no plot was written."""
    return _kvcache_bars(rows, path, ("batch", "cache", "new"), lambda b, c, n: f"b={b}\ncache {c}\nnew {n}",
                         "tflops", "TFLOPS (causal, bottom-right)", "chunked prefill", "chunked prefill TFLOPS")


def _kvcache_bars(rows, path, fields, tick, value, ylabel, panel, title, hline=None) -> str:
    """Bars of ``value`` per impl grouped by ``fields``, one panel per layout, an optional (y, label) line."""
    plt, ok, why = _timed(rows, keep=lambda r: not r.get("group"))
    if plt is None:
        return why
    layouts = sorted({r["layout"] for r in ok})
    impls = sorted({r["impl"] for r in ok}, key=lambda n: (not n.startswith("fa3jax"), n))
    groups = {lay: sorted({tuple(r[f] for f in fields) for r in ok if r["layout"] == lay}) for lay in layouts}
    width = max(6.0, 0.35 * max(len(g) for g in groups.values()) * len(impls) + 2)
    fig, axes = _panels(plt, len(layouts), width=width)
    bar = 0.8 / len(impls)
    for ax, lay in zip(axes, layouts):
        keys = groups[lay]
        vals = {(r["impl"],) + tuple(r[f] for f in fields): r[value] for r in ok if r["layout"] == lay}
        for i, name in enumerate(impls):
            xs = [j + (i - (len(impls) - 1) / 2) * bar for j in range(len(keys))]
            ax.bar(xs, [vals.get((name,) + key, float("nan")) for key in keys], bar, label=name, color=f"C{i % 10}")
        if hline:
            ax.axhline(hline[0], color="k", linestyle=":", linewidth=1, label=hline[1])
        ax.set_xticks(range(len(keys)), [tick(*key) for key in keys], fontsize=8)
        ax.set_ylim(bottom=0)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{panel}, {lay} cache")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    _save(plt, fig, path, f"{title}, {decode_plot_title(ok)}")
    return ""
