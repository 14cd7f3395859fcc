"""A cheap guard on the C++ FFI sources (csrc/ffi, read as text; no build needed): no handler may declare CUDA-graph
compatibility (``xla::ffi::Traits::kCmdBufferCompatible``) while its file takes device memory from
``ffi::ScratchAllocator``. XLA traces a declared handler into a CUDA graph once and replays it; scratch memory is
freed when the handler returns, so the graph would keep writing to an address that XLA has since handed to other
buffers (RESULTS.md session 15: CUDA_ERROR_ILLEGAL_ADDRESS in 54 KV-cache tests). The workspace has to be an XLA
buffer instead (every handler's last result)."""
from __future__ import annotations

import pathlib
import re

import pytest

FFI_DIR = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "ffi"
_TRAIT = "kCmdBufferCompatible"
_SCRATCH = "ScratchAllocator"
_DEFINE = "XLA_FFI_DEFINE_HANDLER_SYMBOL("


def _code(text: str) -> str:
    """C++ text without comments (a comment may name what the code must not use)."""
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", text, flags=re.S))


def _handler_definitions(code: str) -> dict:
    """{handler symbol: the text of its XLA_FFI_DEFINE_HANDLER_SYMBOL(...) arguments}."""
    found = {}
    for m in re.finditer(re.escape(_DEFINE), code):
        depth, i = 1, m.end()
        while depth and i < len(code):
            depth += {"(": 1, ")": -1}.get(code[i], 0)
            i += 1
        body = code[m.end():i - 1]
        found[body.split(",", 1)[0].strip()] = body
    return found


def scan_ffi_sources(ffi_dir: pathlib.Path = FFI_DIR) -> dict:
    """{handler file name: {"handlers": {symbol: declares the trait}, "scratch": uses ScratchAllocator}} for the
    ``*.cc`` files of ``ffi_dir``. A handler declares the trait by naming it in its definition, directly or through
    a macro defined in that directory whose expansion names it; a file takes scratch if it, or a header of that
    directory that it includes, names ScratchAllocator outside comments."""
    headers = {p.name: _code(p.read_text()) for p in sorted(ffi_dir.glob("*.h"))}
    sources = {p.name: _code(p.read_text()) for p in sorted(ffi_dir.glob("*.cc"))}
    macros = {m.group(1) for text in [*headers.values(), *sources.values()]
              for m in re.finditer(rf"#define\s+(\w+)[^\n]*\b{_TRAIT}\b", text)}
    names = [_TRAIT, *macros]
    result = {}
    for name, code in sources.items():
        included = [headers[h] for h in re.findall(r'#include\s+"([^"]+)"', code) if h in headers]
        result[name] = {
            "handlers": {sym: any(re.search(rf"\b{n}\b", body) for n in names)
                         for sym, body in _handler_definitions(code).items()},
            "scratch": any(re.search(rf"\b{_SCRATCH}\b", t) for t in [code, *included]),
        }
    return result


def _sources():
    if not FFI_DIR.is_dir():
        pytest.skip("csrc/ffi not found next to the tests")
    found = scan_ffi_sources()
    assert found, f"no FFI handler sources in {FFI_DIR}"
    return found


def test_no_handler_declares_graph_capture_while_taking_scratch():
    for name, info in _sources().items():
        declared = sorted(s for s, d in info["handlers"].items() if d)
        assert not (declared and info["scratch"]), (
            f"csrc/ffi/{name}: {declared} declare {_TRAIT} but the file uses ffi::{_SCRATCH}; a captured CUDA graph "
            f"would keep the freed scratch address. Take the workspace as a result buffer instead.")


def test_every_handler_declares_graph_capture():
    """The six handlers (the Python backend's targets) all declare the trait: their workspaces are results."""
    handlers = {s: d for info in _sources().values() for s, d in info["handlers"].items()}
    assert set(handlers) == {"Fa3jaxCudaFwd", "Fa3jaxCudaFwdSinks", "Fa3jaxCudaFwdVarlen", "Fa3jaxCudaFwdKvcache",
                             "Fa3jaxCudaBwd", "Fa3jaxCudaBwdVarlen"}, sorted(handlers)
    assert all(handlers.values()), sorted(s for s, d in handlers.items() if not d)


def test_the_scan_sees_traits_through_macros_and_scratch_through_headers(tmp_path):
    """The scanner itself, on made-up sources: a handler declaring the trait through a header's macro in a file
    whose included header binds the scratch allocator is caught; comments naming either count for nothing."""
    (tmp_path / "common.h").write_text(
        "#define MY_TRAITS {xla::ffi::Traits::kCmdBufferCompatible}\n"
        "template <class B> auto bind(B b) { return b.template Ctx<ffi::ScratchAllocator>(); }\n")
    (tmp_path / "comments.h").write_text("// not ffi::ScratchAllocator any more\n")
    (tmp_path / "bad.cc").write_text(
        '#include "common.h"\nXLA_FFI_DEFINE_HANDLER_SYMBOL(Bad, Impl, bind(ffi::Ffi::Bind()).Arg<B>(),\n'
        "    MY_TRAITS);\n")
    (tmp_path / "plain.cc").write_text(
        '#include "comments.h"\n// kCmdBufferCompatible would be fine here\n'
        "XLA_FFI_DEFINE_HANDLER_SYMBOL(Plain, Impl, ffi::Ffi::Bind().Arg<B>().Ret<B>());\n"
        "XLA_FFI_DEFINE_HANDLER_SYMBOL(Declared, Impl, ffi::Ffi::Bind().Ret<B>(), {Traits::kCmdBufferCompatible});\n")
    found = scan_ffi_sources(tmp_path)
    assert found == {"bad.cc": {"handlers": {"Bad": True}, "scratch": True},
                     "plain.cc": {"handlers": {"Plain": False, "Declared": True}, "scratch": False}}
