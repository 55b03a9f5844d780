// The Python module (moekit.cpu.build loads it).
#include "moekit_cpu.h"

#include <torch/extension.h>

#include <map>
#include <string>
#include <tuple>
#include <vector>

using namespace moekit;

namespace {

void check_scale(const c10::optional<Tensor>& scale, int64_t rows) {
  TORCH_CHECK(!scale || (scale->dim() == 1 && scale->size(0) == rows && scale->is_contiguous() &&
                         scale->scalar_type() == at::kFloat),
              "moekit swiglu: scale must be a contiguous fp32 vector of one weight per row");
}

}  // namespace

// The loop and the GEMM run without the GIL (they touch no Python object): other Python threads go on.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef MOEKIT_LOOP_PROFILE
  m.def(
      "profile",
      [] {
        std::map<std::string, std::pair<double, int64_t>> out;
        for (int op = 0; op < loop_profile::kOps; ++op)
          out[loop_profile::kNames[op]] = {loop_profile::ns[op] * 1e-9, loop_profile::calls[op].load()};
        return out;
      },
      "{kind of work: (seconds summed over threads, calls)} since the last profile_reset");
  m.def(
      "profile_reset",
      [] {
        for (int op = 0; op < loop_profile::kOps; ++op) loop_profile::ns[op] = loop_profile::calls[op] = 0;
      },
      "zeroes the profile");
#endif
  m.def("forward", &loop_experts_forward, "the expert slice loop: (out, h)", py::arg("x"), py::arg("tok"),
        py::arg("w"), py::arg("w_in"), py::arg("w_out"), py::arg("b_in"), py::arg("b_out"), py::arg("meta"),
        py::arg("bounds"), py::arg("act"), py::arg("h_rows"), py::arg("hidx") = py::none(),
        py::arg("tok_b") = py::none(), py::arg("w_b") = py::none(), py::arg("blocks") = py::none(),
        py::arg("block_bounds") = std::vector<int64_t>{}, py::arg("onednn") = false, py::arg("own_gemm") = false,
        py::call_guard<py::gil_scoped_release>());
  m.def("backward", &loop_experts_backward,
        "its backward: (grad_x, grad_weights, grad_w_in, grad_w_out, grad_b_in, grad_b_out)", py::arg("grad_out"),
        py::arg("x"), py::arg("tok"), py::arg("w"), py::arg("w_in"), py::arg("w_out"), py::arg("b_in"),
        py::arg("b_out"), py::arg("h"), py::arg("meta"), py::arg("bounds"), py::arg("act"), py::arg("need_x"),
        py::arg("num_assignments"), py::arg("hidx") = py::none(), py::arg("tok_b") = py::none(),
        py::arg("w_b") = py::none(), py::arg("blocks") = py::none(),
        py::arg("block_bounds") = std::vector<int64_t>{}, py::arg("onednn") = false, py::arg("own_gemm") = false,
        py::call_guard<py::gil_scoped_release>());
  m.def(
      "release_cache", [] { return block_cache::release(); }, "frees the cached blocks; returns their bytes");
  m.def(
      "cache_bytes", [] { return block_cache::bytes(); }, "bytes of freed blocks cached for reuse");
  m.def(
      "cache_limit", [] { return block_cache::limit(); }, "the most bytes of freed blocks kept");
  m.def(
      "set_cache_limit", [](size_t bytes) { block_cache::set_limit(bytes); },
      "bounds the bytes of freed blocks kept (0: none), freeing the oldest above it", py::arg("bytes"));
  m.def(
      "cache_min_bytes", [] { return block_cache::min_bytes(); }, "the smallest block the cache keeps");
  m.def(
      "set_cache_min_bytes", [](size_t bytes) { block_cache::set_min_bytes(bytes); },
      "the smallest block the cache keeps (smaller buffers come from the allocator)", py::arg("bytes"));
  m.def("have_fused_swiglu", &have_fused_swiglu, "whether the fused fp32 SwiGLU runs here (AVX-512, SLEEF found)");
  m.def(
      "swiglu",
      [](const Tensor& h, const c10::optional<Tensor>& scale) {
        TORCH_CHECK(h.dim() == 2 && h.size(1) % 2 == 0 && h.stride(1) == 1 &&
                        h.scalar_type() == at::kFloat && have_fused_swiglu(),
                    "moekit swiglu: needs an fp32 [r, 2F] tensor, AVX-512 and SLEEF");
        check_scale(scale, h.size(0));
        auto a = h.new_empty({h.size(0), h.size(1) / 2});
        swiglu(h, a, scale ? &*scale : nullptr);
        return a;
      },
      "the fused kernel alone: silu(h[:, :F]) * h[:, F:] (* scale[:, None])", py::arg("h"),
      py::arg("scale") = py::none());
  m.def(
      "swiglu_backward",
      [](const Tensor& h, const Tensor& grad_a, const c10::optional<Tensor>& scale, int64_t n_dot) {
        TORCH_CHECK(h.dim() == 2 && h.stride(1) == 1 && h.scalar_type() == at::kFloat && have_fused_swiglu() &&
                        grad_a.scalar_type() == at::kFloat && grad_a.stride(1) == 1 && grad_a.size(0) == h.size(0) &&
                        2 * grad_a.size(1) == h.size(1) && n_dot >= 0 && n_dot <= h.size(0),
                    "moekit swiglu_backward: needs fp32 h [r, 2F] and grad_a [r, F], 0 <= n_dot <= r, AVX-512 and "
                    "SLEEF");
        check_scale(scale, h.size(0));
        auto grad_h = at::empty_like(h, at::MemoryFormat::Contiguous);
        auto dot = h.new_empty({n_dot});
        swiglu_backward(h, grad_a, grad_h, scale ? &*scale : nullptr, &dot);
        return std::make_tuple(grad_h, dot);
      },
      "the fused backward alone: (dL/dh from dL/d(a * scale), <dL/d(a * scale), a> of the first n_dot rows)",
      py::arg("h"), py::arg("grad_a"), py::arg("scale") = py::none(), py::arg("n_dot") = 0);
  m.def("have_own_gemm", &have_own_gemm, "whether the loop's own fp32 GEMM runs here (AVX-512)");
  m.def(
      "own_mm",
      [](const Tensor& a, const Tensor& b, c10::optional<Tensor> out, bool accumulate) {
        TORCH_CHECK(have_own_gemm() && a.dim() == 2 && b.dim() == 2 && (!out || out->dim() == 2),
                    "moekit own_mm: needs AVX-512 and matrices");
        TORCH_CHECK(out || !accumulate, "moekit own_mm: accumulate needs out");
        if (!out) out = a.new_empty({a.size(0), b.size(1)});
        at::assert_no_overlap(*out, a);  // (a later column panel reads rows of a an earlier one wrote)
        at::assert_no_overlap(*out, b);
        own_gemm(*out, a, b, accumulate);
        return *out;
      },
      "a @ b on the loop's own fp32 kernel, single-threaded (a any strides; b's rows contiguous or b "
      "transposed), into out (out += a @ b with accumulate)",
      py::arg("a"), py::arg("b"), py::arg("out") = py::none(), py::arg("accumulate") = false,
      py::call_guard<py::gil_scoped_release>());
  m.def("topk", &topk_indices,
        "indices of the k largest of each row, largest first, ties to the lower index, NaN largest",
        py::arg("scores"), py::arg("k"), py::call_guard<py::gil_scoped_release>());
  m.def("have_onednn", &have_onednn, "whether ATen's oneDNN matmul was found in this torch and runs fp32 here");
  m.def("private_symbols", &private_symbols,
        "[(name, usable)] of the private libtorch symbols this build uses (usable: found and not hidden)");
  m.def("hide_symbol", &hide_symbol, "treats the named private symbol as missing from now on (tests); False: unknown",
        py::arg("name"));
  m.def(
      "mm_out",
      [](Tensor out, const Tensor& a, const Tensor& b, bool accumulate) { gemm(out, a, b, true, accumulate); },
      "out = a b (out += a b with accumulate): oneDNN for fp32 where found, else at::mm", py::arg("out"), py::arg("a"),
      py::arg("b"), py::arg("accumulate") = false, py::call_guard<py::gil_scoped_release>());
}

