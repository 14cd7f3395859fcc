// C symbols of the XLA FFI handlers (defined in csrc/ffi/). Only needs the XLA FFI C API header.
#pragma once

#include "xla/ffi/api/c_api.h"

extern "C" {
XLA_FFI_Error* Fa3jaxCudaFwd(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* Fa3jaxCudaFwdSinks(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* Fa3jaxCudaFwdVarlen(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* Fa3jaxCudaBwd(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* Fa3jaxCudaBwdVarlen(XLA_FFI_CallFrame* call_frame);
}
