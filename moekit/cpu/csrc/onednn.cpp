// fp32 products on ATen's oneDNN matmul. PyTorch sends fp32 CPU products to its BLAS (MKL in the x86-64
// wheels, whose fp32 GEMM takes its AVX2 kernels on non-Intel CPUs) and only bf16 / fp16 to oneDNN;
// where oneDNN's fp32 GEMM is the faster one (python benchmarks/gemm_backends.py compares them), the
// loop and moekit.cpu.gemm call it directly, into preallocated outputs.
#include "moekit_cpu.h"

#include <ATen/Context.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>

#include <exception>

namespace moekit {

// Whether oneDNN's fp32 matmul runs here: a torch built without oneDNN keeps a stub that throws, and
// ATen's fp32 path checks the CPU (AVX-512 or AVX-NE-CONVERT on x86), so one small product, once,
// decides; torch.backends.mkldnn.enabled = False turns it off.
bool have_onednn() {
  if (!symbol_usable(Symbol::kMkldnnMatmul)) return false;
  static const bool runs = [] {
    if (!at::hasMKLDNN()) return false;
    try {
      auto a = at::ones({2, 3}), b = at::ones({3, 2}), out = at::zeros({2, 2});
      at::native::mkldnn_matmul(a, b, out, 0.0f, 1.0f);
      return out.eq(3).all().item<bool>();
    } catch (const std::exception&) {
      return false;
    }
  }();
  return runs && at::globalContext().userEnabledMkldnn();
}

bool on_onednn(bool onednn, const Tensor& out, const Tensor& a, const Tensor& b) {
  return onednn && have_onednn() && a.scalar_type() == at::kFloat && out.is_contiguous() && a.numel() > 0 &&
         b.numel() > 0;
}

void gemm(Tensor out, const Tensor& a, const Tensor& b, bool onednn, bool accumulate) {
  if (on_onednn(onednn, out, a, b)) at::native::mkldnn_matmul(a, b, out, accumulate ? 1.0f : 0.0f, 1.0f);
  else if (accumulate) out.addmm_(a, b);
  else at::mm_out(out, a, b);
}

}  // namespace moekit
