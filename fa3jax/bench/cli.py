"""The ``python -m fa3jax bench`` command: options, presets, and the run that prints and saves a suite."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import time
from pathlib import Path

from .attn import attn_configs, run_attn
from .common import DTYPES, WRONG_TOL
from .decode import decode_configs, run_decode
from .env import environment, on_gpu
from .impls import attn_impls, decode_impls, prefill_impls, varlen_impls, with_variants
from .plot import plot_attn, plot_decode, plot_prefill, plot_varlen
from .prefill import prefill_configs, run_prefill
from .record import markdown_section, record_markdown
from .tables import attn_table, decode_table, prefill_table, varlen_table
from .timing import TimingOptions
from .varlen import run_varlen, varlen_configs

def _csv(s, conv=str):
    return [conv(x) for x in s.split(",") if x.strip()] if s else None


def build_parser(prog: str = "python -m fa3jax bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Time attention implementations side by side.")
    p.add_argument("--suite", choices=("attn", "decode", "prefill", "varlen"), default="attn",
                   help="attn: dense training shapes; decode: one query against a KV cache (TB/s); prefill: a "
                        "chunk of new queries against a KV cache, causal (TFLOPS vs flash-attn3-jax's best); "
                        "varlen: packed random lengths vs dense at equal tokens")
    p.add_argument("--small", action="store_true",
                   help="CPU-sized preset (the default on CPU unless sizes are given or --full)")
    p.add_argument("--full", action="store_true", help="full sizes even on CPU")
    g = p.add_argument_group("attn suite (--heads, --headdims, --dtypes, --causal, --modes: also varlen)")
    g.add_argument("--seqlens", help="comma list (default 512,...,16384)")
    g.add_argument("--tokens", type=int, help="batch * seqlen (default 16384)")
    g.add_argument("--heads", type=int, help="default 16")
    g.add_argument("--heads-k", type=int, help="k's and v's heads, fewer than --heads (GQA/MQA rows; attn suite); "
                   "FLOPs count the query heads")
    g.add_argument("--headdims", help="comma list of 64,128,256 (default 128)")
    g.add_argument("--headdim-v", type=int, help="v's head dim, below each --headdims entry (MLA; attn suite); "
                   "FLOPs then count 2*b*s^2*h*(d + d_v)")
    g.add_argument("--mla", action="store_true", help="MLA rows: d=192, d_v=128, bf16, seqlens 2048,16384 (8x2k, "
                   "1x16k at 16k tokens); explicit options override")
    g.add_argument("--dtypes", help="comma list of bf16,fp16 (default both; varlen: bf16)")
    g.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    g.add_argument("--modes", help="comma list of fwd,fwd+bwd (default both)")
    g.add_argument("--sinks", action="store_true",
                   help="attn suite: also time each fa3jax impl with sinks= (a float32 (hq,) random array; fwd+bwd "
                        "differentiates it too) as column <impl>+sinks, with the ratio time with / without")
    g.add_argument("--deterministic", action="store_true",
                   help="attn suite: also time each fa3jax impl with deterministic=True as column <impl>+det, "
                        "with the ratio time deterministic / without (the cost lies in fwd+bwd); with --sinks, "
                        "both columns, +det without sinks")
    g = p.add_argument_group("decode and prefill suites (KV cache: hq=32, hk=8, d=128, bf16, page 256)")
    g.add_argument("--batches", help="comma list (default decode 1,8,64; prefill 1,8)")
    g.add_argument("--caches", help="comma list of cache lengths (default decode 4096,32768,131072; "
                                    "prefill 8192,32768)")
    g.add_argument("--layouts", help="comma list of contiguous,paged (default both)")
    g.add_argument("--new-tokens", help="prefill: comma list of new queries per sequence, the last positions of "
                                        "the full cache (default 512,2048)")
    g.add_argument("--per-call", action="store_true",
                   help="decode: also time one step per jitted call, issued back to back from Python as a "
                        "generation loop does (dispatch included): field per_call_ms, 'call X us' in the cells")
    g.add_argument("--copy-mib", type=int, help="size of the copy-bandwidth buffer (default 1024 GPU, 32 CPU)")
    g.add_argument("--unroll", type=int, help="decode steps chained in one jitted call (default 16 GPU, 2 CPU)")
    g = p.add_argument_group("varlen suite")
    g.add_argument("--varlen-means", help="comma list of mean sequence lengths L; lengths are drawn uniformly in "
                                          "[L/2, 3L/2] (default 512,1024,2048,4096,8192)")
    g.add_argument("--varlen-tokens", type=int, help="total packed tokens, also the dense baseline's batch * L "
                                                     "(default 16384)")
    g.add_argument("--varlen-seed", type=int, default=0, help="seed of the length draw (default 0)")
    g = p.add_argument_group("common")
    g.add_argument("--impls", help="comma list of impl names or parts (e.g. fa3jax, xla, flash-attn3-jax, "
                                   "jax.nn:cudnn); default all")
    g.add_argument("--repeats", type=int, help="timed trials, median reported (default 5; 3 small)")
    g.add_argument("--min-time", type=float, help="seconds per trial (default 0.05 GPU, 0.01 CPU)")
    g.add_argument("--max-calls", type=int, help="max calls per trial (default 1000 GPU, 4 CPU)")
    g.add_argument("--warmup", type=int, default=3)
    g.add_argument("--input-sets", type=int, default=2, help=">= 2 input sets rotated during timing")
    g.add_argument("--no-check", action="store_true", help="skip the correctness guard")
    g.add_argument("--budget-s", type=float, help="start no new config after this many seconds (the rest is "
                                                  "recorded as skipped); partial JSON is saved after every config")
    g.add_argument("--out-dir", "--out", default="bench_out",
                   help="where JSON, PNG and the markdown section go (default ./bench_out)")
    g.add_argument("--json", help="JSON path (default OUT_DIR/<suite>-<timestamp>.json)")
    g.add_argument("--plot", help="PNG path (default next to the JSON)")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--record", action="store_true", help="append a section to benchmarks/RESULTS.md")
    g.add_argument("--results-md", help="markdown file for --record (default benchmarks/RESULTS.md)")
    return p


SMALL = dict(heads=2, headdims=[64], tokens=1024, seqlens=[256, 512], dtypes=["bf16"], impls=["xla"],
             repeats=3, batches=[1, 2], caches=[256, 1024], varlen_means=[64, 128], varlen_tokens=512)
FULL = dict(heads=16, headdims=[128], tokens=16384, seqlens=[512, 1024, 2048, 4096, 8192, 16384],
            dtypes=["bf16", "fp16"], impls=None, repeats=5, batches=[1, 8, 64], caches=[4096, 32768, 131072],
            varlen_means=[512, 1024, 2048, 4096, 8192], varlen_tokens=16384)
# the prefill suite's own sizes (issue 20's rows), over the presets' decode sizes
PREFILL_SMALL = dict(batches=[1, 2], caches=[256, 1024], new_tokens=[16, 64])
PREFILL_FULL = dict(batches=[1, 8], caches=[8192, 32768], new_tokens=[512, 2048])


def resolve(args) -> dict:
    """Merge explicit options over the preset (``--small`` on CPU unless sizes were given or ``--full``)."""
    sized = any(getattr(args, a) is not None for a in ("seqlens", "tokens", "heads", "heads_k", "headdims",
                                                      "batches", "caches", "new_tokens", "varlen_means",
                                                      "varlen_tokens")) or args.mla
    small = args.small or (not args.full and not sized and not on_gpu())
    base = dict(SMALL if small else FULL)
    if args.suite == "prefill":
        base.update(PREFILL_SMALL if small else PREFILL_FULL)
    if args.suite == "varlen":
        base["dtypes"] = ["bf16"]  # the target is bf16 only; fp16 on request
    if args.mla:  # the MLA row set (issue 22): DeepSeek's 192/128 at 16k tokens
        base.update(headdims=[192], headdim_v=128, dtypes=["bf16"], seqlens=[2048, 16384])
    explicit = dict(seqlens=_csv(args.seqlens, int), tokens=args.tokens, heads=args.heads, heads_k=args.heads_k,
                    headdims=_csv(args.headdims, int), headdim_v=args.headdim_v, dtypes=_csv(args.dtypes),
                    impls=_csv(args.impls),
                    repeats=args.repeats, batches=_csv(args.batches, int), caches=_csv(args.caches, int),
                    copy_mib=args.copy_mib, unroll=args.unroll, varlen_means=_csv(args.varlen_means, int),
                    varlen_tokens=args.varlen_tokens, new_tokens=_csv(args.new_tokens, int))
    gpu = on_gpu()
    base.update(copy_mib=1024 if gpu else 32, unroll=16 if gpu else 2)  # platform, not preset, defaults
    base.update({k: v for k, v in explicit.items() if v is not None})
    base["small"] = small
    base["modes"] = _csv(args.modes) or ["fwd", "fwd+bwd"]
    base["causal"] = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    base["layouts"] = _csv(args.layouts) or ["contiguous", "paged"]
    base["varlen_seed"] = args.varlen_seed
    base["sinks"] = args.sinks
    base["deterministic"] = args.deterministic
    base["per_call"] = args.per_call
    if args.heads_k is not None and (args.suite != "attn" or args.heads_k < 1 or base["heads"] % args.heads_k):
        raise SystemExit(f"--heads-k: attn suite only, a divisor of the query heads ({args.heads_k=}, "
                         f"heads={base['heads']})")
    if args.sinks and args.suite != "attn":
        raise SystemExit("--sinks: attn suite only")
    if args.deterministic and args.suite != "attn":
        raise SystemExit("--deterministic: attn suite only")
    if args.per_call and args.suite != "decode":
        raise SystemExit("--per-call: decode suite only")
    base["timing"] = TimingOptions(
        warmup=args.warmup, repeats=base["repeats"],
        min_time=args.min_time if args.min_time is not None else (0.05 if gpu else 0.01),
        max_calls=args.max_calls if args.max_calls is not None else (1000 if gpu else 4),
        input_sets=max(2, args.input_sets))
    for m in base["modes"]:
        if m not in ("fwd", "fwd+bwd"):
            raise SystemExit(f"unknown mode {m!r} (fwd, fwd+bwd)")
    for d in base["dtypes"]:
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r} ({', '.join(DTYPES)})")
    dv = base.get("headdim_v")
    if dv is not None:
        if args.suite != "attn":
            raise SystemExit("--headdim-v / --mla: attn suite only")
        if not all(0 < dv < d for d in base["headdims"]):
            raise SystemExit(f"--headdim-v {dv} must be below every --headdims entry {base['headdims']}")
    return base


def _selected(name: str, tokens) -> bool:
    if not tokens:
        return True
    for t in tokens:
        if name == t or name.startswith(t + ":") or name.endswith(":" + t):
            return True
    return False


def main(argv=None, prog: str = "python -m fa3jax bench") -> int:
    args = build_parser(prog).parse_args(argv)
    o = resolve(args)
    env = environment()
    t_start = time.perf_counter()
    tags = [t for t in ("sinks", "deterministic", "per call") if o[t.replace(" ", "_")]]
    title = args.suite + "".join(f" ({t})" for t in tags)
    print(f"fa3jax bench ({title}{', small preset' if o['small'] else ''}) on {env['device_kind']} "
          f"[{env['platform']}], jax {env['jax']}, commit {env['commit']}")
    log = lambda s: print(s, flush=True)  # noqa: E731
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = Path(args.json) if args.json else out_dir / f"{args.suite}-{stamp}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    options = {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in o.items()}
    print(f"JSON (updated after every config): {json_path}")

    def save(rows, copy=None, table=None, complete=False):
        doc = {"suite": args.suite, "complete": complete, "env": env, "options": options,
               "elapsed_s": time.perf_counter() - t_start, "wrong_tol": WRONG_TOL,
               "flops_convention": "fwd 4*b*s^2*h*d (varlen: sum_i 4*s_i^2*h*d; halved if causal); "
                                   "fwd+bwd 3.5x fwd" + ("; MLA: 2*b*s^2*h*(d + d_v) for 4*b*s^2*h*d"
                                                         if o.get("headdim_v") else "")
                                   + ("; prefill: 4*b*hq*d*sum_i(cache - new + i + 1), i < new (causal "
                                      "bottom-right)" if args.suite == "prefill" else ""),
               "results": rows, "copy": copy, "table": table}
        tmp = json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        tmp.replace(json_path)

    deadline = t_start + args.budget_s if args.budget_s else None
    impls, unavailable = {"attn": attn_impls, "varlen": varlen_impls, "decode": decode_impls,
                          "prefill": prefill_impls}[args.suite]()
    # decode variants (flash-attn3-jax num_splits) are also selected by their group name
    impls = [i for i in impls if _selected(i.name, o["impls"]) or _selected(getattr(i, "group", ""), o["impls"])]
    if o["sinks"] or o["deterministic"]:  # (attn suite) each fa3jax impl also with sinks= / deterministic=True
        impls = with_variants(impls, sinks=o["sinks"], deterministic=o["deterministic"])
    unavailable = {k: v for k, v in unavailable.items() if _selected(k, o["impls"])}
    for name, why in unavailable.items():
        print(f"  {name}: unavailable: {why}")
    copy = None
    kw = dict(check=not args.no_check, log=log, progress=save, deadline=deadline)
    if args.suite == "attn":
        rows = run_attn(attn_configs(o), impls, o["timing"], **kw)
    elif args.suite == "varlen":
        rows = run_varlen(varlen_configs(o), impls, o["timing"], **kw)
    elif args.suite == "prefill":
        rows = run_prefill(prefill_configs(o), impls, o["timing"], **kw)
    else:
        rows, copy = run_decode(decode_configs(o), impls, o["timing"], o["copy_mib"] << 20, unroll=o["unroll"],
                                per_call=o["per_call"], **kw)
    for name, why in unavailable.items():
        rows.append({"impl": name, "status": "unavailable", "reason": why})
    shown = [r for r in rows if r["status"] != "unavailable"]
    table = decode_table(shown, copy) if args.suite == "decode" else \
        {"attn": attn_table, "varlen": varlen_table, "prefill": prefill_table}[args.suite](shown)
    elapsed = time.perf_counter() - t_start
    print()
    print(table)
    if unavailable:
        print()
        for name, why in unavailable.items():
            print(f"unavailable: {name}: {why}")

    save(rows, copy, table, complete=True)
    print(f"\nJSON: {json_path}")
    if not args.no_plot:
        png = Path(args.plot) if args.plot else json_path.with_suffix(".png")
        png.parent.mkdir(parents=True, exist_ok=True)
        why = plot_decode(rows, copy, png) if args.suite == "decode" else \
            {"attn": plot_attn, "varlen": plot_varlen, "prefill": plot_prefill}[args.suite](rows, png)
        print(why or f"plot: {png}")
    section = json_path.with_suffix(".md")  # the RESULTS.md section, also kept with the JSON
    section.write_text(markdown_section(table, env, title))
    if args.record:
        md = record_markdown(table, env, title, args.results_md)
        print(f"recorded in {md}")
    print(f"elapsed {elapsed:.1f} s")
    bad = [r for r in rows if r["status"] == "WRONG"]
    timed = [r for r in rows if r["status"] == "ok"]
    if bad:
        print(f"{len(bad)} WRONG result(s)")
    if not timed:
        print("nothing was timed")
    return 1 if (bad or not timed) else 0

