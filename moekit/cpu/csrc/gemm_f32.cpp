// The loop's own fp32 GEMM (AVX-512), for the small experts' products inside the expert groups.
// Why: at E64-E128 every product is small ([~256, 512] x [512, 176] and the like) and there are ~1000 a
// step. ATen's oneDNN matmul spends ~10 us a call before any arithmetic (creating the primitive
// descriptor, even when the primitive is cached), builds a kernel per new row count (hence the
// bucketed rows, ~5% extra work), and on these shapes reached 170-254 GFLOP/s single-threaded; this
// kernel, a plain register-tiled loop over B's rows with A broadcast, reached 213-270 on the same
// shapes (E64's and E128's six products, `single_thread` of benchmarks/gemm_backends.py, one run) and
// has no per-call cost.
// C[M, N] (+)= A[M, K] B[K, N]: A(i, k) = a[i a_rs + k a_cs] (any strides: a transposed view needs no
// copy), B's rows contiguous (a transposed B is first packed by pack_transposed), C's rows contiguous.
// Each C tile of up to 12 rows by up to 64 columns sums over k in order, in registers (fp32 FMA).
#include "moekit_cpu.h"

#include <algorithm>
#include <vector>

namespace moekit {
namespace {

#ifdef MOEKIT_AVX512
template <int MR, int NV>
__attribute__((target("avx512f"))) void gemm_tile(int64_t K, const float* a, int64_t a_rs, int64_t a_cs,
                                                  const float* b, int64_t ldb, float* c, int64_t ldc,
                                                  __mmask16 last, bool accumulate) {
  __m512 acc[MR][NV];
  // (fully unrolled, so that acc stays in registers)
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * ldb;
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      bv[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(last, bk + 16 * v) : _mm512_loadu_ps(bk + 16 * v);
    const float* ak = a + k * a_cs;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(ak[i * a_rs]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* ci = c + i * ldc + 16 * v;
      const __mmask16 m = v == NV - 1 ? last : __mmask16(0xFFFF);
      const __m512 r = accumulate ? _mm512_add_ps(acc[i][v], _mm512_maskz_loadu_ps(m, ci)) : acc[i][v];
      _mm512_mask_storeu_ps(ci, m, r);
    }
}

// Rows per tile for NV vectors of columns: 24 accumulators (6 x 4, 8 x 3, 12 x 2), the rest of the 32
// registers for B's vectors and A's broadcast.
constexpr int tile_rows(int nv) { return nv == 4 ? 6 : nv == 3 ? 8 : nv == 2 ? 12 : 6; }

template <int NV, int MR = tile_rows(NV)>
void gemm_tile_rows(int mr, int64_t K, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t ldb,
                    float* c, int64_t ldc, __mmask16 last, bool accumulate) {
  if constexpr (MR > 1) {
    if (mr < MR) return gemm_tile_rows<NV, MR - 1>(mr, K, a, a_rs, a_cs, b, ldb, c, ldc, last, accumulate);
  }
  gemm_tile<MR, NV>(K, a, a_rs, a_cs, b, ldb, c, ldc, last, accumulate);
}

// Column panels of at most 4 vectors, as even as they come (88 columns: 48 + 40, not 64 + 24), each
// swept by tiles of tile_rows(NV) rows (B's panel, K x 16 NV, stays in L2 while they pass over it).
template <int NV>
void gemm_panel(int64_t M, int64_t K, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t ldb,
                float* c, int64_t ldc, __mmask16 last, bool accumulate) {
  constexpr int MR = tile_rows(NV);
  for (int64_t m0 = 0; m0 < M; m0 += MR)
    gemm_tile_rows<NV>(static_cast<int>(std::min<int64_t>(MR, M - m0)), K, a + m0 * a_rs, a_rs, a_cs, b, ldb,
                       c + m0 * ldc, ldc, last, accumulate);
}

void gemm_f32(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
              int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  const int64_t vectors = (N + 15) / 16, panels = (vectors + 3) / 4;
  int64_t n0 = 0;
  for (int64_t p = 0; p < panels; ++p) {
    const int nv = static_cast<int>((vectors - n0 / 16 + (panels - p) - 1) / (panels - p));  // of the rest
    const int64_t width = std::min<int64_t>(16 * nv, N - n0), tail = width - 16 * (nv - 1);
    const __mmask16 last = tail == 16 ? __mmask16(0xFFFF) : __mmask16((1u << tail) - 1);
    switch (nv) {
      case 1: gemm_panel<1>(M, K, a, a_rs, a_cs, b + n0, ldb, c + n0, ldc, last, accumulate); break;
      case 2: gemm_panel<2>(M, K, a, a_rs, a_cs, b + n0, ldb, c + n0, ldc, last, accumulate); break;
      case 3: gemm_panel<3>(M, K, a, a_rs, a_cs, b + n0, ldb, c + n0, ldc, last, accumulate); break;
      default: gemm_panel<4>(M, K, a, a_rs, a_cs, b + n0, ldb, c + n0, ldc, last, accumulate); break;
    }
    n0 += width;
  }
}

// dst[0:16, 0:16] (row stride ldd) = the transpose of src[0:16, 0:16] (row stride lds): unpacks of
// pairs of rows, then of pairs of pairs, then two rounds of 128-bit lane shuffles.
__attribute__((target("avx512f"))) void transpose16(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int h = 0; h < 16; h += 8)
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ldd, r[i]);
}

// dst [K, N] = src^T for src [N, K] with row stride lds: whole 16 x 16 blocks in registers, the edges
// element by element.
void pack_transposed(const float* src, int64_t N, int64_t K, int64_t lds, float* dst) {
  MOEKIT_PROFILE(kPack);
  const int64_t N16 = N - N % 16, K16 = K - K % 16;
  for (int64_t n0 = 0; n0 < N16; n0 += 16)
    for (int64_t k0 = 0; k0 < K16; k0 += 16) transpose16(src + n0 * lds + k0, lds, dst + k0 * N + n0, N);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = n < N16 ? K16 : 0; k < K; ++k) dst[k * N + n] = src[n * lds + k];
}
#endif

}  // namespace

bool have_own_gemm() {
#ifdef MOEKIT_AVX512
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
#else
  return false;
#endif
}

// Whether own_gemm takes these operands: fp32, out's rows contiguous, b's rows contiguous or b a
// transposed view (other layouts, e.g. strided weights, go to the library GEMM).
bool own_gemm_takes(const Tensor& out, const Tensor& a, const Tensor& b) {
  return a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat &&
         out.stride(1) == 1 && (b.stride(1) == 1 || b.stride(0) == 1);
}

// out (+)= a b on the kernel above: own_gemm_takes(out, a, b); a any strides; a transposed b is packed
// into a buffer of the calling thread first (kept for the next call: at most one expert's weights).
void own_gemm(Tensor& out, const Tensor& a, const Tensor& b, bool accumulate) {
#ifdef MOEKIT_AVX512
  TORCH_CHECK(own_gemm_takes(out, a, b) && a.size(1) == b.size(0) && out.size(0) == a.size(0) &&
                  out.size(1) == b.size(1),
              "moekit loop_experts: own_gemm needs fp32 [M, K] x [K, N] into rows of N, got ", a.sizes(), " x ",
              b.sizes(), " into ", out.sizes());
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  const float* bp = b.data_ptr<float>();
  int64_t ldb = b.stride(0);
  if (b.stride(1) != 1 && N > 1) {  // b = w.t() for a row-major w [N, K]
    thread_local std::vector<float> packed;
    packed.resize(static_cast<size_t>(K * N));
    pack_transposed(bp, N, K, b.stride(1), packed.data());
    bp = packed.data();
    ldb = N;
  }
  gemm_f32(M, N, K, a.data_ptr<float>(), a.stride(0), a.stride(1), bp, ldb, out.data_ptr<float>(), out.stride(0),
           accumulate);
#else
  TORCH_CHECK(false, "moekit loop_experts: no own GEMM on this CPU");
#endif
}

}  // namespace moekit
