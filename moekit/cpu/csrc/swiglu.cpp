// The gated SiLU (SwiGLU) fused, for fp32 on AVX-512: one pass over h instead of ATen's three
// (gate copy, silu, mul) forward and four backward, the same formulas as ATen's vectorized kernels
// (silu(g) = g / (1 + exp(-g)), sigmoid(g) = 1 / (1 + exp(-g)), SLEEF's expf). The sigmoid is
// recomputed in the backward from h, as the ATen path recomputes act(gate).
#include "moekit_cpu.h"

#include <algorithm>
#include <climits>

namespace moekit {
namespace {

#ifdef MOEKIT_AVX512
__attribute__((target("avx512f"))) inline __m512 exp_neg16(__m512 x) {  // exp(-x), the sign flipped as ATen's neg()
  return Sleef_expf16_u10(_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN))));
}

inline __mmask16 lanes(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1); }

// a[i] = silu(h[i, :F]) * h[i, F:2F] * scale[i] (scale: the routing weights, or null for 1) for rows i0..i1
__attribute__((target("avx512f"))) void swiglu_rows(const float* h, int64_t h_ld, const float* scale, float* a,
                                                    int64_t a_ld, int64_t F, int64_t i0, int64_t i1) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = i0; i < i1; ++i) {
    const float* g = h + i * h_ld;
    float* o = a + i * a_ld;
    if (i + kAheadRows < i1) prefetch_row(g + kAheadRows * h_ld, 2 * F * sizeof(float), false);
    const __m512 sv = _mm512_set1_ps(scale ? scale[i] : 1.f);
    for (int64_t j = 0; j < F; j += 16) {
      const __mmask16 m = lanes(F - j);
      const __m512 gv = _mm512_maskz_loadu_ps(m, g + j), uv = _mm512_maskz_loadu_ps(m, g + F + j);
      const __m512 act = _mm512_div_ps(gv, _mm512_add_ps(one, exp_neg16(gv)));
      __m512 av = _mm512_mul_ps(act, uv);
      if (scale) av = _mm512_mul_ps(av, sv);
      _mm512_mask_storeu_ps(o + j, m, av);
    }
  }
}

// The backward of swiglu_rows for rows i0..i1, from dL/d(a·scale) = da: with a = silu(g) up and
// da' = da scale[i], dL/dgate = (da' up) sigmoid(g) (1 + g (1 - sigmoid(g))), dL/dup = silu(g) da';
// and for rows i < n_dot, dot[i] = <da[i], a[i]> (dL/dscale: the routing weight's gradient).
__attribute__((target("avx512f"))) void swiglu_backward_rows(const float* h, int64_t h_ld, const float* da,
                                                             int64_t da_ld, const float* scale, float* dot,
                                                             int64_t n_dot, float* gh, int64_t gh_ld, int64_t F,
                                                             int64_t i0, int64_t i1) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = i0; i < i1; ++i) {
    const float *g = h + i * h_ld, *d = da + i * da_ld;
    float* o = gh + i * gh_ld;
    if (i + kAheadRows < i1) prefetch_row(g + kAheadRows * h_ld, 2 * F * sizeof(float), false);
    const bool want_dot = dot != nullptr && i < n_dot;
    const __m512 sv = _mm512_set1_ps(scale ? scale[i] : 1.f);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < F; j += 16) {
      const __mmask16 m = lanes(F - j);
      const __m512 gv = _mm512_maskz_loadu_ps(m, g + j), uv = _mm512_maskz_loadu_ps(m, g + F + j);
      __m512 dv = _mm512_maskz_loadu_ps(m, d + j);
      const __m512 denom = _mm512_add_ps(one, exp_neg16(gv));
      const __m512 sig = _mm512_div_ps(one, denom), act = _mm512_div_ps(gv, denom);
      if (want_dot) acc = _mm512_fmadd_ps(dv, _mm512_mul_ps(act, uv), acc);  // (masked lanes are 0)
      if (scale) dv = _mm512_mul_ps(dv, sv);
      const __m512 dsilu = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(dv, uv), sig),
                                         _mm512_add_ps(one, _mm512_mul_ps(gv, _mm512_sub_ps(one, sig))));
      _mm512_mask_storeu_ps(o + j, m, dsilu);
      _mm512_mask_storeu_ps(o + F + j, m, _mm512_mul_ps(act, dv));
    }
    if (want_dot) dot[i] = _mm512_reduce_add_ps(acc);
  }
}
#endif

// Rows split over the intra-op threads when called outside a parallel region (one group), inline
// inside one (at::parallel_for does not nest).
template <typename Rows>
void for_rows(int64_t r, int64_t F, const Rows& rows) {
  at::parallel_for(0, r, std::max<int64_t>(1, 16384 / std::max<int64_t>(F, 1)), rows);
}

const float* rows_of(const Tensor* t) { return t != nullptr ? t->data_ptr<float>() : nullptr; }

}  // namespace

bool have_fused_swiglu() {
#ifdef MOEKIT_AVX512
  static const bool cpu = __builtin_cpu_supports("avx512f");
  return cpu && symbol_usable(Symbol::kSleefExpf16);
#else
  return false;
#endif
}

void swiglu(const Tensor& h, Tensor& a, const Tensor* scale) {
#ifdef MOEKIT_AVX512
  const int64_t F = a.size(1);
  for_rows(h.size(0), F, [&](int64_t i0, int64_t i1) {
    swiglu_rows(h.data_ptr<float>(), h.stride(0), rows_of(scale), a.data_ptr<float>(), a.stride(0), F, i0, i1);
  });
#else
  TORCH_CHECK(false, "moekit swiglu: no fused SwiGLU on this CPU");
#endif
}

void swiglu_backward(const Tensor& h, const Tensor& grad_a, Tensor& grad_h, const Tensor* scale, Tensor* dot) {
#ifdef MOEKIT_AVX512
  const int64_t F = grad_a.size(1);
  float* dot_p = dot != nullptr ? dot->data_ptr<float>() : nullptr;
  const int64_t n_dot = dot != nullptr ? dot->size(0) : 0;
  for_rows(h.size(0), F, [&](int64_t i0, int64_t i1) {
    swiglu_backward_rows(h.data_ptr<float>(), h.stride(0), grad_a.data_ptr<float>(), grad_a.stride(0),
                         rows_of(scale), dot_p, n_dot, grad_h.data_ptr<float>(), grad_h.stride(0), F, i0, i1);
  });
#else
  TORCH_CHECK(false, "moekit swiglu: no fused SwiGLU on this CPU");
#endif
}

}  // namespace moekit
