"""Markdown tables of a suite's result rows, with footnoted skip reasons."""
from __future__ import annotations

from typing import Callable, Optional

from .common import DENSE, FA3_NAME, fmt_tflops
from .impls import ALL_ATTN_IMPL_NAMES, ALL_VARLEN_IMPL_NAMES, VARIANTS, ratio_field, variant_suffix

def _col_order(names, preferred) -> list[str]:
    seen = [n for n in preferred if n in names]
    return seen + sorted(n for n in names if n not in seen)


def _group(rows: list[dict], key) -> tuple[list, dict]:
    """Rows grouped by ``key(row)`` in first-seen order: (keys, {key: {impl: row}})."""
    keys, by = [], {}
    for r in rows:
        k = key(r)
        if k not in by:
            keys.append(k)
            by[k] = {}
        by[k][r["impl"]] = r
    return keys, by


class _Footnotes:
    """Numbered footnotes for table cells, each text once."""

    def __init__(self):
        self.notes: list[str] = []

    def __call__(self, text: str) -> int:
        if text not in self.notes:
            self.notes.append(text)
        return self.notes.index(text) + 1

    def lines(self) -> list[str]:
        return [f"[{i + 1}] {n}" for i, n in enumerate(self.notes)]


def _cell(r: Optional[dict], ok_text: Callable[[dict], str], footnote) -> str:
    """A table cell: '' for no row, ``ok_text(r)`` when it ran, else WRONG / skip with a footnoted reason."""
    if r is None:
        return ""
    if r["status"] == "ok":
        return ok_text(r)
    if r["status"] == "WRONG":
        return f"WRONG err {r['max_rel_err']:.1e}"
    return f"skip [{footnote(r.get('reason', '?'))}]"


def _finish(lines: list[str], legends: list[str], footnote: _Footnotes) -> str:
    """The table's lines, then (after a blank line, when there are any) its legend lines and footnotes."""
    if legends or footnote.notes:
        lines = lines + [""] + legends + footnote.lines()
    return "\n".join(lines)


def _dlabel(r: dict) -> str:
    """The head dim column: d, or d x d_v for MLA rows."""
    return f"{r['headdim']}x{r['headdim_v']}" if r.get("headdim_v") else str(r["headdim"])


def _hlabel(r: dict) -> str:
    """The heads column: h, or hq/hk for GQA rows."""
    return f"{r['heads']}/{r['heads_k']}" if r.get("heads_k") else str(r["heads"])


def attn_table(rows: list[dict]) -> str:
    """Markdown table: one row per config, one column per impl; cells 'TFLOPS / ms' and the speed ratio vs
    flash-attn3-jax (>1: faster) when it was timed; an ``<impl>+sinks`` (``--sinks``) or ``<impl>+det``
    (``--deterministic``) column next to its impl, its cells with the time ratio variant / plain instead."""
    impls = _col_order({r["impl"] for r in rows},
                       [x for n in ALL_ATTN_IMPL_NAMES for x in (n,) + tuple(n + v for v in VARIANTS)])
    keys, by = _group(rows, lambda r: (r["mode"], r["causal"], r["dtype"], _dlabel(r), _hlabel(r), r["seqlen"],
                                       r["batch"]))
    footnote = _Footnotes()

    head = ["mode", "causal", "dtype", "d", "h", "seqlen", "batch"] + impls
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        cells = [k[0], "yes" if k[1] else "no", k[2], str(k[3]), str(k[4]), str(k[5]), str(k[6])]
        fa3 = by[k].get(FA3_NAME)
        for name in impls:
            r = by[k].get(name)
            def ok(r, name=name):
                c = f"{fmt_tflops(r['tflops'])} TF / {r['ms']:.3f} ms"
                suffix = variant_suffix(name)
                if suffix:
                    ratio = r.get(ratio_field(suffix))
                    c += f" ({suffix.lstrip('+')} {ratio:.3f})" if ratio else ""
                elif fa3 is not None and fa3["status"] == "ok" and name != FA3_NAME:
                    c += f" (x{fa3['ms'] / r['ms']:.2f})"
                return c + (f" [{footnote(r['note'])}]" if r.get("note") else "")

            cells.append(_cell(r, ok, footnote))
        lines.append("| " + " | ".join(cells) + " |")
    legends = []
    if any(r["impl"] == FA3_NAME and r["status"] == "ok" for r in rows):
        legends.append("(xR): speed relative to flash-attn3-jax on the same row (>1: faster)")
    if any(r.get("sinks_ratio") for r in rows):
        legends.append("X+sinks: X called with sinks= (float32 (hq,) random; fwd+bwd also differentiates them); "
                       "(sinks R): time with sinks / time without, same row (1.03 = 3% cost)")
    if any(r.get("det_ratio") for r in rows):
        legends.append("X+det: X called with deterministic=True (fixed-order backward); "
                       "(det R): time deterministic / time without, same row (1.05 = 5% cost)")
    return _finish(lines, legends, footnote)


def _kvcache_order(n: str):
    """Column order of the KV-cache suites: fa3jax backends first, then flash-attn3-jax best, s1, s4, s16."""
    tail = n.rsplit(":", 1)[-1]
    return (not n.startswith("fa3jax"), n.split(":")[0], tail != "best",
            int(tail[1:]) if tail[:1] == "s" and tail[1:].isdigit() else 0, n)


def decode_table(rows: list[dict], copy: dict) -> str:
    impls = sorted({r["impl"] for r in rows}, key=_kvcache_order)
    keys, by = _group(rows, lambda r: (r["layout"], r["batch"], r["cache"]))
    footnote = _Footnotes()

    head = ["layout", "batch", "cache", "K/V MiB"] + impls
    lines = []
    if copy.get("tbps"):
        lines.append(f"device copy (read+write, {copy['bytes_moved'] / 2**30:.2f} GiB moved): "
                     f"{copy['tbps']:.3g} TB/s; cells: TB/s of K/V read / time per decode step (fraction of copy TB/s)")
        lines.append("")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        any_row = next(iter(by[k].values()))
        cells = [k[0], str(k[1]), str(k[2]), f"{any_row['kv_bytes'] / 2**20:.0f}"]
        for name in impls:
            r = by[k].get(name)
            def ok(r):
                c = f"{r['tbps']:.3g} TB/s / {r['ms'] * 1e3:.1f} us"
                if r.get("copy_ratio"):
                    c += f" ({r['copy_ratio']:.2f})"
                c += f" {r['best_of'].rsplit(':', 1)[-1]}" if r.get("best_of") else ""
                if r.get("per_call_ms"):
                    c += f"; call {r['per_call_ms'] * 1e3:.1f} us"
                return c + (f" [{footnote(r['note'])}]" if r.get("note") else "")

            cells.append(_cell(r, ok, footnote))
        lines.append("| " + " | ".join(cells) + " |")
    legends = []
    if any(r.get("per_call_ms") for r in rows):
        legends.append("call X us (--per-call): time per step with one step per jitted call, issued back to back "
                       "from Python (dispatch included), next to the chained time per step")
    return _finish(lines, legends, footnote)


def prefill_table(rows: list[dict]) -> str:
    """Markdown table of the prefill suite: one row per (layout, batch, cache, new), one column per impl; cells
    'TFLOPS / ms' and (xR) = flash-attn3-jax:best time / this time."""
    impls = sorted({r["impl"] for r in rows}, key=_kvcache_order)
    keys, by = _group(rows, lambda r: (r["layout"], r["batch"], r["cache"], r["new"]))
    footnote = _Footnotes()

    head = ["layout", "batch", "cache", "new", "GFLOP"] + impls
    lines = ["cells: TFLOPS / ms per call; (xR): flash-attn3-jax:best time / this time (>= 1: as fast or faster); "
             "queries only (their keys already in the cache), causal bottom-right, FLOPs "
             "4*b*hq*d*sum_i(cache - new + i + 1)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        any_row = next(iter(by[k].values()))
        cells = [k[0], str(k[1]), str(k[2]), str(k[3]), f"{any_row['flops'] / 1e9:.1f}"]
        for name in impls:
            def ok(r):
                c = f"{fmt_tflops(r['tflops'])} TF / {r['ms']:.3f} ms"
                c += f" (x{r['fa3_ratio']:.2f})" if r.get("fa3_ratio") else ""
                c += f" {r['best_of'].rsplit(':', 1)[-1]}" if r.get("best_of") else ""
                return c + (f" [{footnote(r['note'])}]" if r.get("note") else "")

            cells.append(_cell(by[k].get(name), ok, footnote))
        lines.append("| " + " | ".join(cells) + " |")
    return _finish(lines, [], footnote)


def varlen_table(rows: list[dict]) -> str:
    """Markdown table: one row per config; per impl its varlen cell, its dense-equal-tokens cell and the ratio of
    their TFLOPS (varlen / dense)."""
    bases = _col_order({r["impl"][len(DENSE):] if r["kind"] == "dense" else r["impl"] for r in rows},
                       ALL_VARLEN_IMPL_NAMES)
    names = {r["impl"] for r in rows}
    keys, by = _group(rows, lambda r: (r["mode"], r["causal"], r["dtype"], r["headdim"], r["heads"], r["mean"],
                                       r["seqs"], r["max_seqlen"]))
    footnote = _Footnotes()

    cols = []  # (header, impl name or None for the ratio, base)
    for b in bases:
        cols += [(n, n, b) for n in (b, DENSE + b) if n in names]
        if b in names and DENSE + b in names:
            cols.append((f"{b} varlen/dense", None, b))
    head = ["mode", "causal", "dtype", "d", "h", "mean L", "seqs", "max L"] + [c[0] for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        cells = [k[0], "yes" if k[1] else "no", k[2], str(k[3]), str(k[4]), str(k[5]), str(k[6]), str(k[7])]
        for _, name, base in cols:
            r = by[k].get(name) if name else by[k].get(base)
            if name is None:
                cells.append(f"{r['dense_ratio']:.2f}" if r is not None and r.get("dense_ratio") else "")
            else:
                cells.append(_cell(r, lambda r: f"{fmt_tflops(r['tflops'])} TF / {r['ms']:.3f} ms"
                                   + (f" [{footnote(r['note'])}]" if r.get("note") else ""), footnote))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"{DENSE}X: X's flash_mha on batch tokens // L of seqlen L (dense at equal tokens); "
                  "X varlen/dense: varlen TFLOPS / dense TFLOPS"]
    lines += footnote.lines()
    return "\n".join(lines)
