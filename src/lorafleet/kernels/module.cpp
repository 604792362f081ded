// The Python module of lorafleet's CPU kernels (kernels/__init__.py loads it through build.py).

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lorafleet's CPU kernels (gemv.cpp, decode.cpp, stack.cpp state their semantics)";
  m.def("linear_dense", &linear_dense, "y = x @ W^T (+ b); W float32 or bfloat16");
  m.def("linear_int8", &linear_int8, "y = x @ (q * scales)^T (+ b); q int8 [N, K], scales [N]");
  m.def("rms_norm", &rms_norm, "Llama's RMSNorm of x [M, d] with weight w [d]");
  m.def("add_rms_norm", &add_rms_norm, "(h + delta, rms_norm(h + delta, w))");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of gate_up [M, 2I] -> [M, I]");
  m.def("decode_attention", &decode_attention,
        "RoPE on q, k; k, v into the cache; each row's attention over its cached keys");
  m.def("decode_stack", &decode_stack,
        "every layer of a Llama-layout decoder for a few decode rows (stack.cpp)");
}
