// moekit's CPU extension, one file per concern:
//   symbols.cpp      the private libtorch symbols it uses, checked at load (moekit.cpu.build warns on a miss)
//   onednn.cpp       ATen's oneDNN fp32 matmul, or at::mm
//   gemm_f32.cpp     the loop's own fp32 GEMM kernel (AVX-512)
//   swiglu.cpp       the fused fp32 SwiGLU (AVX-512, SLEEF's expf)
//   block_cache.cpp  the cache of freed large step buffers
//   topk.cpp         top-k indices with ties to the lower index
//   loop.cpp         the expert slice loop, forward and backward
//   bindings.cpp     the Python module
// Built by moekit.cpu.build; every choice of what runs (oneDNN or not, the own kernel or not, thread
// groups) is made in Python (moekit.moe.backends.chooser) and passed in.
#pragma once

// (the light ATen headers: each file includes the operators it calls; ATen/ATen.h costs seconds a file)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#define MOEKIT_AVX512 1
#include <immintrin.h>
#endif

// A build with -DMOEKIT_LOOP_PROFILE (moekit.cpu.build with MOEKIT_LOOP_PROFILE=1, a library of its
// own) times the loop's kinds of work, summed over threads: benchmarks/loop_profile.py prints them.
// Nested timers count in both (a transposed weight's packing is also inside its product's time).
#ifdef MOEKIT_LOOP_PROFILE
#include <chrono>
namespace moekit::loop_profile {
enum Op { kProduct, kPack, kGather, kScatter, kActivation, kForward, kBackward, kOps };
inline const char* const kNames[kOps] = {"products", "packing", "gathers", "scatters", "activation", "forward",
                                         "backward"};
inline std::atomic<int64_t> ns[kOps], calls[kOps];

struct Timer {
  Op op;
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  explicit Timer(Op o) : op(o) {}
  ~Timer() {
    ns[op] += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count();
    ++calls[op];
  }
};
}  // namespace moekit::loop_profile
#define MOEKIT_PROFILE(op) ::moekit::loop_profile::Timer moekit_profile_timer_(::moekit::loop_profile::op)
#else
#define MOEKIT_PROFILE(op)
#endif

// ---- libtorch's private symbols ----------------------------------------------------------------------
// Neither is in an installed header; both are declared weak, so that a torch without them (or with
// another signature: the mangled name encodes it) still loads this library, with the address null.
// symbols.cpp lists them for moekit.cpu.build, which warns once, naming a missing one, and the
// pure-PyTorch path (at::mm, ATen's activations) runs instead.
namespace at::native {
// ATen's oneDNN matmul (ATen/native/mkldnn/Matmul.cpp): result = alpha a b + beta result, in place.
__attribute__((weak)) void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result,
                                         float beta, float alpha);
}  // namespace at::native

#ifdef MOEKIT_AVX512
// SLEEF's 16-lane expf (1-ULP), as ATen's AVX-512 kernels call it; exported by libtorch_cpu on x86-64.
extern "C" __attribute__((weak, target("avx512f"))) __m512 Sleef_expf16_u10(__m512);
#endif

namespace moekit {
using at::Tensor;

// ---- symbols.cpp ----
enum class Symbol { kMkldnnMatmul, kSleefExpf16 };
// Whether the symbol was found and is not hidden (hide_symbol: a test's way to simulate its absence).
bool symbol_usable(Symbol s);
// (name, found and not hidden) of each private symbol this build uses.
std::vector<std::pair<std::string, bool>> private_symbols();
// Treats the named symbol as missing from now on; false for a name this build does not use.
bool hide_symbol(const std::string& name);

// ---- onednn.cpp ----
bool have_onednn();
bool on_onednn(bool onednn, const Tensor& out, const Tensor& a, const Tensor& b);
// out = a b, or out += a b; fp32 on oneDNN with `onednn` (where on_onednn holds), else ATen's mm.
void gemm(Tensor out, const Tensor& a, const Tensor& b, bool onednn, bool accumulate = false);

// ---- gemm_f32.cpp ----
bool have_own_gemm();
bool own_gemm_takes(const Tensor& out, const Tensor& a, const Tensor& b);
void own_gemm(Tensor& out, const Tensor& a, const Tensor& b, bool accumulate);

// The loop's products: on its own kernel (`own`: fp32 inside the expert groups) where it takes the
// operands, else on oneDNN (`onednn`) or ATen's mm.
struct Gemm {
  bool onednn = false, own = false;

  bool own_takes(const Tensor& out, const Tensor& a, const Tensor& b) const {
    return own && own_gemm_takes(out, a, b);
  }

  void operator()(Tensor out, const Tensor& a, const Tensor& b, bool accumulate = false) const {
    MOEKIT_PROFILE(kProduct);
    if (own_takes(out, a, b)) own_gemm(out, a, b, accumulate);
    else gemm(out, a, b, onednn, accumulate);
  }
};

// ---- block_cache.cpp ----
namespace block_cache {
Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options);
size_t release();
size_t bytes();
size_t limit();
void set_limit(size_t bytes);
size_t min_bytes();
void set_min_bytes(size_t bytes);
}  // namespace block_cache

// ---- swiglu.cpp ----
bool have_fused_swiglu();  // AVX-512 and SLEEF's expf usable
// a = silu(h[:, :F]) * h[:, F:] (* scale[i] per row); only where have_fused_swiglu, rows of unit column stride
void swiglu(const Tensor& h, Tensor& a, const Tensor* scale = nullptr);
// dL/dh from dL/d(a * scale); dot: null, or n_dot contiguous fp32 to take <grad_a[i], a[i]> of the first rows
void swiglu_backward(const Tensor& h, const Tensor& grad_a, Tensor& grad_h, const Tensor* scale = nullptr,
                     Tensor* dot = nullptr);

// NOTE: the fused SwiGLU streams h from memory (E64's is 46 MB), and with exp and a division per 16
// lanes between its loads the hardware prefetcher fell behind: over [32768, 352] in 128-row blocks,
// cold, the fused kernel took 8.2 ms against ATen's 5.1 (a copy streams at full speed), 2.0 ms with the
// rows kAheadRows ahead prefetched (single-threaded, one-off). Gathers and scatters prefetch as far ahead.
constexpr int64_t kAheadRows = 4;

inline void prefetch_row(const void* row, size_t bytes, bool write) {
  const char* p = static_cast<const char*>(row);
  for (size_t b = 0; b < bytes; b += 64) {
    if (write) __builtin_prefetch(p + b, 1, 3);
    else __builtin_prefetch(p + b, 0, 3);
  }
}

// ---- topk.cpp ----
Tensor topk_indices(const Tensor& scores, int64_t k);

// ---- loop.cpp ----
std::vector<Tensor> loop_experts_forward(const Tensor& x, const Tensor& tok, const Tensor& w, const Tensor& w_in,
                                         const Tensor& w_out, const c10::optional<Tensor>& b_in,
                                         const c10::optional<Tensor>& b_out, const Tensor& meta,
                                         const std::vector<int64_t>& bounds, const std::string& act_name,
                                         int64_t h_rows, const c10::optional<Tensor>& hidx,
                                         const c10::optional<Tensor>& tok_b, const c10::optional<Tensor>& w_b,
                                         const c10::optional<Tensor>& blocks,
                                         const std::vector<int64_t>& block_bounds, bool onednn, bool own_gemm);
std::vector<c10::optional<Tensor>> loop_experts_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& tok, const Tensor& w, const Tensor& w_in,
    const Tensor& w_out, const c10::optional<Tensor>& b_in, const c10::optional<Tensor>& b_out, const Tensor& h,
    const Tensor& meta, const std::vector<int64_t>& bounds, const std::string& act_name, bool need_x,
    int64_t num_assignments, const c10::optional<Tensor>& hidx, const c10::optional<Tensor>& tok_b,
    const c10::optional<Tensor>& w_b, const c10::optional<Tensor>& blocks,
    const std::vector<int64_t>& block_bounds, bool onednn, bool own_gemm);

}  // namespace moekit
