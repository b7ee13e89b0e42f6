// A CP block (1x1 S->G*R, kh x 1 depthwise, 1 x kw depthwise, 1x1 G*R->T) as one operator on NHWC data.
//
// Why: run as four layers, the R-channel intermediates of a batch stream through memory three times
// and each layer pays a dispatch; the two depthwise layers, which hold a few percent of the FLOPs, take
// a quarter of the time or more. Here a *work item* (one image, or a range of output rows of one image
// when there are fewer images than threads) is computed in bands of output rows, so the band's
// intermediates stay in L1/L2:
//   1. the first 1x1 layer (a GEMM) on the input rows the band needs that are not computed yet (rows
//      shared by consecutive bands are computed once),
//   2. the vertical taps, then the horizontal taps, vectorised over channels (contiguous in the NHWC
//      intermediates), 16 channels at a time over all the band's rows with the taps held in registers,
//      each loaded vector used by every tap that reads it (P outputs of K taps: P + K - 1 loads; measured
//      on the character network's conv2 at R=64, batch 32: the taps 2.9 -> 1.6 us an image, the block
//      18.9 -> 16.4-17.9 us), and zero rows/columns standing in for padding,
//   3. the last 1x1 layer (a GEMM, plus bias) straight into the band's rows of the output.
// With AVX-512, or AVX2 and FMA, the GEMMs are our own register-blocked micro-kernel on weights packed
// once by the caller (MKL's sgemm re-packs its operands on every call, and a band's GEMM is small:
// measured on AlexNet conv2 at R=100, the banded MKL GEMMs took 1.3x their whole-image time), and the
// taps run on vectors of 16 (AVX-512) or 8 (AVX2) channels; NCHW output, and builds with neither, use
// MKL and plain loops.
// Work items run in parallel over at::parallel_for; the GEMMs inside a parallel region are serial.
// Exact re-expression: zero padding, any stride and dilation, groups (block-diagonal 1x1 layers).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <dlfcn.h>
#include <algorithm>
#include <utility>
#include <cstdlib>
#include <memory>
#include <vector>

// The vector path: AVX-512 (16 floats a register, 32 registers), else AVX2 with FMA (8 floats, 16
// registers: most CPUs users run on without AVX-512 — AMD before Zen 4, Intel's client cores), else none.
#if defined(__AVX512F__)
#define CP_SIMD 1
#elif defined(__AVX2__) && defined(__FMA__)
#define CP_SIMD 1
#define CP_AVX2 1
#else
#define CP_SIMD 0
#endif

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

// MKL's per-thread thread count (Fortran interface, looked up at run time: absent with another BLAS).
// A block run on one thread sets it to 1 so that MKL does not wake its pool for each small GEMM.
using mkl_local_fn = int (*)(const int*);
mkl_local_fn mkl_local() {
  static mkl_local_fn fn = reinterpret_cast<mkl_local_fn>(dlsym(RTLD_DEFAULT, "mkl_set_num_threads_local_"));
  return fn;
}

// Row-major C (m x n, row stride ldc) = A (m x k, lda) * B (k x n, ldb) + beta * C, through the
// Fortran BLAS PyTorch links (MKL here): column-major C^T = B^T A^T. No dispatcher, no tensor views.
inline void gemm_rm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                    int64_t ldb, float beta, float* c, int64_t ldc) {
  const int M = (int)m, N = (int)n, K = (int)k, LDA = (int)lda, LDB = (int)ldb, LDC = (int)ldc;
  const float one = 1.f;
  sgemm_("N", "N", &N, &M, &K, &one, b, &LDB, a, &LDA, &beta, c, &LDC);
}

// Column-major C (m x n, ldc) = op(A) op(B), op = transpose where the flag says so (BLAS reads the
// transposed operand in place): how NCHW data enters and leaves without a copy.
inline void gemm_cm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                    const float* b, int64_t ldb, float* c, int64_t ldc) {
  const int M = (int)m, N = (int)n, K = (int)k, LDA = (int)lda, LDB = (int)ldb, LDC = (int)ldc;
  const float one = 1.f, zero = 0.f;
  sgemm_(ta ? "T" : "N", tb ? "T" : "N", &M, &N, &K, &one, a, &LDA, b, &LDB, &zero, c, &LDC);
}

// Scratch on cache-line boundaries (with rows of L floats, every pixel's channels start a line).
struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<float[], FreeDeleter>;
inline Buffer buffer(int64_t n) {
  const size_t bytes = ((size_t)std::max<int64_t>(n, 1) * sizeof(float) + 63) / 64 * 64;
  float* p = static_cast<float*>(std::aligned_alloc(64, bytes));
  TORCH_CHECK(p, "cp_fused: out of memory for ", bytes, " bytes of scratch");
  return Buffer(p);
}

struct Geo {
  int64_t N, H, W, S, G, Sg, R, GR, Rp, L, T, Tg, kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, Ho, Wo;
};

// ---- Depthwise taps ------------------------------------------------------------------------------------
// Both depthwise layers are, for one block of (up to) 16 channels and ``lines`` lines of n pixels,
//   out[l*ols + i*os + c] = sum_k taps[k*GR + c] * src[k][l*sls + i*is + c]
// with every pointer already at the block's first channel (vertical: src[k] = the k-th source row of the
// first output row, a line = an output row; horizontal: src[k] = the row shifted by k dilated columns).
// Padding never reaches here: the first layer's rows sit between zero rows, and the vertical output
// between zero columns, so the loops have no branch. With K known at compile time the block's K taps
// stay in registers for all its lines. ``w`` = how many of the block's 16 channels exist.
inline void taps_lines_any(float* __restrict out, int64_t os, int64_t ols, const float* const* src, int64_t is,
                           int64_t sls, int64_t n, int64_t lines, int64_t nk, const float* __restrict taps,
                           int64_t GR, int64_t w);

#if CP_SIMD
#define CP_INLINE inline __attribute__((always_inline))
// One vector of channels and its operations. The taps below are written once over these traits; the
// 16-channel blocks of the intermediates take one AVX-512 vector or two AVX2 vectors (one pass each).
#if defined(CP_AVX2)
struct Vec {
  using T = __m256;
  using M = __m256i;
  static constexpr int lanes = 8, regs = 16;
  static CP_INLINE T zero() { return _mm256_setzero_ps(); }
  static CP_INLINE T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static CP_INLINE M mask(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)std::min<int64_t>(std::max<int64_t>(n, 0), 8)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  template <bool FULL>
  static CP_INLINE T load(const float* p, M m) { return FULL ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, m); }
  template <bool FULL>
  static CP_INLINE void store(float* p, T v, M m) {
    if (FULL)
      _mm256_storeu_ps(p, v);
    else
      _mm256_maskstore_ps(p, m, v);
  }
};
#else
struct Vec {
  using T = __m512;
  using M = __mmask16;
  static constexpr int lanes = 16, regs = 32;
  static CP_INLINE T zero() { return _mm512_setzero_ps(); }
  static CP_INLINE T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static CP_INLINE M mask(int64_t n) { return n >= 16 ? (M)0xFFFF : n <= 0 ? (M)0 : (M)((1u << n) - 1); }
  template <bool FULL>
  static CP_INLINE T load(const float* p, M m) { return FULL ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p); }
  template <bool FULL>
  static CP_INLINE void store(float* p, T v, M m) {
    if (FULL)
      _mm512_storeu_ps(p, v);
    else
      _mm512_mask_storeu_ps(p, m, v);
  }
};
#endif
using VT = Vec::T;
using VM = Vec::M;

// Outputs computed at once by the sliding kernels: K taps + P sums + the loaded vector must fit the
// registers (AVX2's 16 hold K <= 7 with 8 sums; beyond, 4 sums rather than spills).
template <int K>
constexpr int slide_width() { return K + 9 <= Vec::regs ? 8 : 4; }

// P outputs of a line of taps that slide: output j = sum_k t[k] * s[(j + k) * step], written at o + j * ostep.
// P + K - 1 loads for P * K multiply-adds, one loaded vector live at a time (K taps + P sums in registers).
template <int K, int P, bool FULL>
CP_INLINE void slide_group(float* __restrict o, int64_t ostep, const float* __restrict s, int64_t step,
                           const VT* t, VM m) {
  VT a[P];
#pragma GCC unroll 16
  for (int j = 0; j < P; ++j) a[j] = Vec::zero();
#pragma GCC unroll 32
  for (int q = 0; q < P + K - 1; ++q) {
    const VT v = Vec::load<FULL>(s + q * step, m);
#pragma GCC unroll 16
    for (int j = 0; j < P; ++j)
      if (q - j >= 0 && q - j < K) a[j] = Vec::fma(t[q - j], v, a[j]);
  }
#pragma GCC unroll 16
  for (int j = 0; j < P; ++j) Vec::store<FULL>(o + j * ostep, a[j], m);
}

// P pixels of a line at once. SLIDE: the sources are one line read at consecutive pixels (src[k] = src[0]
// + k*is: the horizontal taps with stride = dilation), so the P pixels' K taps read P + K - 1 vectors,
// each loaded once, instead of P * K. Masked loads and stores only for a partial block (a masked store
// does not forward to a later load of the same line). The taps and source pointers are copied into
// locals: a vector type may alias anything, so taps read through a pointer would be reloaded after every
// store.
template <int K, bool FULL, bool SLIDE>
void taps_block(float* __restrict o, int64_t os, int64_t ols, const float* const* src, int64_t is, int64_t sls,
                int64_t n, int64_t lines, const float* __restrict taps, int64_t GR, VM m) {
  constexpr int P = SLIDE ? slide_width<K>() : 4;
  VT t[K];
  const float* s[K];
#pragma GCC unroll 16
  for (int k = 0; k < K; ++k) {
    t[k] = Vec::load<FULL>(taps + k * GR, m);
    s[k] = src[k];
  }
  for (int64_t l = 0; l < lines; ++l, o += ols) {
    int64_t i = 0;
    for (; i + P <= n; i += P) {
      if (SLIDE) {
        slide_group<K, P, FULL>(o + i * os, os, s[0] + l * sls + i * is, is, t, m);
        continue;
      }
      VT a[P];
#pragma GCC unroll 16
      for (int j = 0; j < P; ++j) a[j] = Vec::zero();
#pragma GCC unroll 16
      for (int k = 0; k < K; ++k) {
        const float* sk = s[k] + l * sls + i * is;
#pragma GCC unroll 16
        for (int j = 0; j < P; ++j) a[j] = Vec::fma(t[k], Vec::load<FULL>(sk + j * is, m), a[j]);
      }
#pragma GCC unroll 16
      for (int j = 0; j < P; ++j) Vec::store<FULL>(o + (i + j) * os, a[j], m);
    }
    for (; i < n; ++i) {
      VT a0 = Vec::zero();
#pragma GCC unroll 16
      for (int k = 0; k < K; ++k) a0 = Vec::fma(t[k], Vec::load<FULL>(s[k] + l * sls + i * is, m), a0);
      Vec::store<FULL>(o + i * os, a0, m);
    }
  }
}

// The vertical taps when stride = dilation, P output rows at once: output row j's tap k reads source row
// j + k (rows ``rs`` apart), so at each pixel the P rows' K taps read P + K - 1 vectors instead of P * K.
// Rows in groups of 8 (where the registers hold them), 4, 2, 1.
template <int K, int P, bool FULL>
CP_INLINE void vslide_rows(float* __restrict o, int64_t os, int64_t ors, const float* __restrict s, int64_t is,
                           int64_t rs, int64_t n, const VT* t, VM m) {
  for (int64_t i = 0; i < n; ++i) slide_group<K, P, FULL>(o + i * os, ors, s + i * is, rs, t, m);
}

template <int K, bool FULL>
void vslide(float* o, int64_t os, int64_t ors, const float* s, int64_t is, int64_t rs, int64_t n, int64_t rows,
            const float* __restrict taps, int64_t GR, VM m) {
  VT t[K];
#pragma GCC unroll 16
  for (int k = 0; k < K; ++k) t[k] = Vec::load<FULL>(taps + k * GR, m);
  int64_t j = 0;
  if constexpr (slide_width<K>() == 8)
    for (; j + 8 <= rows; j += 8) vslide_rows<K, 8, FULL>(o + j * ors, os, ors, s + j * rs, is, rs, n, t, m);
  for (; j + 4 <= rows; j += 4) vslide_rows<K, 4, FULL>(o + j * ors, os, ors, s + j * rs, is, rs, n, t, m);
  if (j + 2 <= rows) vslide_rows<K, 2, FULL>(o + j * ors, os, ors, s + j * rs, is, rs, n, t, m), j += 2;
  if (j < rows) vslide_rows<K, 1, FULL>(o + j * ors, os, ors, s + j * rs, is, rs, n, t, m);
}

// One vector's channels of a block (``w`` of them exist, ``w`` <= lanes or the vector is full).
template <int K>
void taps_vector(float* out, int64_t os, int64_t ols, const float* const* src, int64_t is, int64_t sls, int64_t n,
                 int64_t lines, const float* taps, int64_t GR, int64_t w, int64_t rs) {
  const bool full = w >= Vec::lanes;
  const VM m = Vec::mask(w);
  if (rs > 0) {
    if (full)
      vslide<K, true>(out, os, ols, src[0], is, rs, n, lines, taps, GR, m);
    else
      vslide<K, false>(out, os, ols, src[0], is, rs, n, lines, taps, GR, m);
    return;
  }
  bool slide = true;
  for (int k = 0; k < K; ++k) slide = slide && src[k] == src[0] + k * is;
  if (full) {
    if (slide)
      taps_block<K, true, true>(out, os, ols, src, is, sls, n, lines, taps, GR, m);
    else
      taps_block<K, true, false>(out, os, ols, src, is, sls, n, lines, taps, GR, m);
  } else {
    if (slide)
      taps_block<K, false, true>(out, os, ols, src, is, sls, n, lines, taps, GR, m);
    else
      taps_block<K, false, false>(out, os, ols, src, is, sls, n, lines, taps, GR, m);
  }
}
#endif

// One pass over a block's lines; ``rs`` > 0: the vertical pass with stride = dilation (src[k] = src[0]
// + k*rs), which takes the row-sliding kernel. A 16-channel block is one AVX-512 vector or two AVX2 ones.
template <int K>
void taps_lines_k(float* out, int64_t os, int64_t ols, const float* const* src, int64_t is, int64_t sls, int64_t n,
                  int64_t lines, const float* taps, int64_t GR, int64_t w, int64_t rs) {
#if CP_SIMD
  for (int64_t c = 0; c < 16 && c < w; c += Vec::lanes) {
    if (c == 0) {
      taps_vector<K>(out, os, ols, src, is, sls, n, lines, taps, GR, w, rs);
      continue;
    }
    const float* sc[K];
    for (int k = 0; k < K; ++k) sc[k] = src[k] + c;
    taps_vector<K>(out + c, os, ols, sc, is, sls, n, lines, taps + c, GR, w - c, rs);
  }
#else
  (void)rs;
  taps_lines_any(out, os, ols, src, is, sls, n, lines, K, taps, GR, w);
#endif
}

// Any tap count, and builds without AVX-512: the same sum, a tap at a time (vectorised over c).
inline void taps_lines_any(float* __restrict out, int64_t os, int64_t ols, const float* const* src, int64_t is,
                           int64_t sls, int64_t n, int64_t lines, int64_t nk, const float* __restrict taps,
                           int64_t GR, int64_t w) {
  const int64_t c1 = std::min<int64_t>(w, 16);
  for (int64_t l = 0; l < lines; ++l) {
    for (int64_t i = 0; i < n; ++i) {
      float* __restrict o = out + l * ols + i * os;
      for (int64_t c = 0; c < c1; ++c) o[c] = 0.f;
      for (int64_t k = 0; k < nk; ++k) {
        const float* __restrict sk = src[k] + l * sls + i * is;
        const float* __restrict tk = taps + k * GR;
        for (int64_t c = 0; c < c1; ++c) o[c] += tk[c] * sk[c];
      }
    }
  }
}

inline void taps_lines(float* out, int64_t os, int64_t ols, const float* const* src, int64_t is, int64_t sls,
                       int64_t n, int64_t lines, int64_t nk, const float* taps, int64_t GR, int64_t w, int64_t rs = 0) {
  switch (nk) {
    case 1: return taps_lines_k<1>(out, os, ols, src, is, sls, n, lines, taps, GR, w, rs);
    case 2: return taps_lines_k<2>(out, os, ols, src, is, sls, n, lines, taps, GR, w, rs);
    case 3: return taps_lines_k<3>(out, os, ols, src, is, sls, n, lines, taps, GR, w, rs);
    case 4: return taps_lines_k<4>(out, os, ols, src, is, sls, n, lines, taps, GR, w, rs);
    case 5: return taps_lines_k<5>(out, os, ols, src, is, sls, n, lines, taps, GR, w, rs);
    case 7: return taps_lines_k<7>(out, os, ols, src, is, sls, n, lines, taps, GR, w, rs);
    case 9: return taps_lines_k<9>(out, os, ols, src, is, sls, n, lines, taps, GR, w, rs);
    case 11: return taps_lines_k<11>(out, os, ols, src, is, sls, n, lines, taps, GR, w, rs);
    default: return taps_lines_any(out, os, ols, src, is, sls, n, lines, nk, taps, GR, w);
  }
}

// The two depthwise layers for output rows [ho0, ho1), 16 channels at a time. ``y1``: the first layer's
// output with pt zero rows above and pb below (row r of the input is row pt + r), L floats a pixel.
// ``y2``: the block's vertical output, 16 floats a pixel, rows of wp = pl + W + pr pixels whose pl and
// pr end columns are zero. ``y3``: the horizontal output, L floats a pixel. Per block the vertical pass
// runs over all the band's rows, then the horizontal pass, each with its taps loaded once.
inline void depthwise_rows(const float* y1, const float* tv, const float* th, float* y2, float* y3, const Geo& g,
                           int64_t ho0, int64_t ho1) {
  const float* src[64];  // tap counts above 64 take the heap path below
  std::vector<const float*> big;
  const int64_t nk = std::max(g.kh, g.kw);
  const float** sp = nk <= 64 ? src : (big.resize(nk), big.data());
  const int64_t rows = ho1 - ho0, rs = g.W * g.L, wp = g.pl + g.W + g.pr, row2 = wp * 16;
  for (int64_t c0 = 0; c0 < g.L; c0 += 16) {
    // the block's channels: r0.. of group gi (c0 in the intermediates, gi*R + r0 in the taps)
    const int64_t gi = c0 / g.Rp, r0 = c0 % g.Rp, w = g.R - r0, tc = gi * g.R + r0;
    // output row ho, tap k: padded row ho*sh + k*dh
    for (int64_t k = 0; k < g.kh; ++k) sp[k] = y1 + (ho0 * g.sh + k * g.dh) * rs + c0;
    taps_lines(y2 + g.pl * 16, 16, row2, sp, g.L, g.sh * rs, g.W, rows, g.kh, tv + tc, g.GR, w,
               g.sh == g.dh ? g.dh * rs : 0);
    for (int64_t k = 0; k < g.kw; ++k) sp[k] = y2 + k * g.dw * 16;
    taps_lines(y3 + c0, g.L, g.Wo * g.L, sp, g.sw * 16, row2, g.Wo, rows, g.kw, th + tc, g.GR, w);
  }
}

// ---- GEMM micro-kernel (AVX-512, or AVX2 with FMA) ----------------------------------------------------
// C (MR x lanes*NV tile, row stride ldc) = A (MR x K; element (i, k) at a[i*ars + k*acs]) * Bp + bias,
// where Bp is a tile's columns of a K x 32 panel of the packed weights (32 columns per k, zero past the
// last column) and the masks say which of the tile's columns exist. The MR x NV accumulators stay in
// registers over K; each k loads NV weight vectors and broadcasts MR activations. AVX-512's 32 registers
// hold a 14 x 32 tile (28 sums); AVX2's 16 hold the classic 6 x 16 (12 sums, 2 weights, 1 broadcast), so
// there a panel is two tiles.
#if CP_SIMD
#if defined(CP_AVX2)
constexpr int64_t MR_MAX = 6;
CP_INLINE VT broadcast(const float* p) { return _mm256_broadcast_ss(p); }
CP_INLINE void stream_store(float* p, VT v) { _mm256_stream_ps(p, v); }
#else
constexpr int64_t MR_MAX = 14;
CP_INLINE VT broadcast(const float* p) { return _mm512_set1_ps(*p); }
CP_INLINE void stream_store(float* p, VT v) { _mm512_stream_ps(p, v); }
#endif
constexpr int64_t PANEL = 32;
constexpr int64_t TILE = 2 * Vec::lanes;  // columns of one micro-kernel call: 32 (AVX-512) or 16 (AVX2)

template <int MR, int NV, bool STREAM = false>
void micro(int64_t K, const float* __restrict a, int64_t ars, int64_t acs, const float* __restrict bp,
           float* __restrict c, int64_t ldc, VM m0, VM m1, const float* bias, bool whole) {
  VT acc[MR][NV];
  const VT b0 = bias ? Vec::load<false>(bias, m0) : Vec::zero();
  const VT b1 = NV > 1 && bias ? Vec::load<false>(bias + Vec::lanes, m1) : Vec::zero();
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    acc[i][0] = b0;
    if (NV > 1) acc[i][NV - 1] = b1;
  }
  for (int64_t k = 0; k < K; ++k) {
    const VT w0 = Vec::load<true>(bp + k * PANEL, m0);
    const VT w1 = NV > 1 ? Vec::load<true>(bp + k * PANEL + Vec::lanes, m1) : w0;
    const float* ak = a + k * acs;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const VT av = broadcast(ak + i * ars);
      acc[i][0] = Vec::fma(av, w0, acc[i][0]);
      if (NV > 1) acc[i][NV - 1] = Vec::fma(av, w1, acc[i][NV - 1]);
    }
  }
  if (STREAM) {  // whole, aligned lines straight to memory: no read-for-ownership of the output
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      stream_store(c + i * ldc, acc[i][0]);
      stream_store(c + i * ldc + Vec::lanes, acc[i][NV - 1]);
    }
    return;
  }
  if (whole) {  // every column of the tile exists (a masked store costs more than a plain one on AVX2)
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      Vec::store<true>(c + i * ldc, acc[i][0], m0);
      if (NV > 1) Vec::store<true>(c + i * ldc + Vec::lanes, acc[i][NV - 1], m1);
    }
    return;
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    Vec::store<false>(c + i * ldc, acc[i][0], m0);
    if (NV > 1) Vec::store<false>(c + i * ldc + Vec::lanes, acc[i][NV - 1], m1);
  }
}

using MicroFn = void (*)(int64_t, const float*, int64_t, int64_t, const float*, float*, int64_t, VM, VM,
                         const float*, bool);
template <int MR>
constexpr MicroFn micro_for(int nv) { return nv == 1 ? &micro<MR, 1> : nv == 2 ? &micro<MR, 2> : &micro<MR, 2, true>; }
template <int... MRs>
struct MicroTable {
  // nv: 1 or 2 vectors of columns; 3 = 2 vectors stored with non-temporal stores
  static MicroFn get(int64_t mr, int nv) {
    static const MicroFn one[] = {nullptr, micro_for<MRs>(1)...};
    static const MicroFn two[] = {nullptr, micro_for<MRs>(2)...};
    static const MicroFn streamed[] = {nullptr, micro_for<MRs>(3)...};
    return nv == 1 ? one[mr] : nv == 2 ? two[mr] : streamed[mr];
  }
};
#if defined(CP_AVX2)
using Micro = MicroTable<1, 2, 3, 4, 5, 6>;
#else
using Micro = MicroTable<1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14>;
#endif

// Row-major C (m x n, ldc) = A (m x K, strides ars/acs) * B + bias, B packed as ceil(n/32) panels of
// K x 32. The A tile (MR rows) stays in L1 while it meets every panel. ``stream``: write whole aligned
// tiles with non-temporal stores (for an output far larger than the caches; the caller fences).
// ``pf``: cache lines to bring into L2 meanwhile, a few before each micro-kernel call.
struct Prefetch {
  const char* p = nullptr;
  int64_t lines = 0;
};

void gemm_packed(int64_t m, int64_t n, int64_t K, const float* a, int64_t ars, int64_t acs, const float* bp,
                 float* c, int64_t ldc, const float* bias, bool stream = false, Prefetch* pf = nullptr) {
  stream = stream && ldc % 16 == 0 && reinterpret_cast<uintptr_t>(c) % 64 == 0;
  const int64_t np = (n + PANEL - 1) / PANEL;
  const int64_t calls = (m + MR_MAX - 1) / MR_MAX * ((n + TILE - 1) / TILE);
  const int64_t per_call = pf && pf->lines > 0 ? (pf->lines + calls - 1) / calls : 0;
  for (int64_t i = 0; i < m; i += MR_MAX) {
    const int64_t mr = std::min(MR_MAX, m - i);
    for (int64_t j = 0; j < np; ++j) {
      for (int64_t h = 0; h < PANEL; h += TILE) {
        const int64_t rem = n - j * PANEL - h;
        if (rem <= 0) break;
        for (int64_t q = 0; q < per_call && pf->lines > 0; ++q, --pf->lines, pf->p += 64)
          _mm_prefetch(pf->p, _MM_HINT_T1);
        const int nv = rem > Vec::lanes ? (stream && rem >= TILE ? 3 : 2) : 1;
        Micro::get(mr, nv)(K, a + i * ars, ars, acs, bp + j * K * PANEL + h, c + i * ldc + j * PANEL + h, ldc,
                           Vec::mask(rem), Vec::mask(rem - Vec::lanes), bias ? bias + j * PANEL + h : nullptr,
                           rem >= (nv == 1 ? 1 : 2) * Vec::lanes);
      }
    }
  }
}
#endif

}  // namespace

// x (N, S, H, W) float32, in NCHW or channels-last memory (anything else is made NCHW-contiguous);
// w_in (G, Sg, R); taps_v (kh, G*R); taps_h (kw, G*R); w_out (G, R, Tg); bias (T) or undefined;
// w_in_packed (G, ceil(R/32), Sg, 32) and w_out_packed (G, ceil(Tg/32), R, 32): the same weights in
// micro-kernel panels (see pack_panels in fused.py), used where this build has AVX-512. Returns
// (N, T, Ho, Wo) in x's memory format. The intermediates are NHWC either way; NCHW data goes through
// the two GEMMs as transposed operands. Layout and checks are here, not in Python, because at batch 1
// a small block's whole run is ~20 us and each Python-side tensor operation costs ~1 us.
torch::Tensor cp_fused(torch::Tensor x, const torch::Tensor& w_in, const torch::Tensor& taps_v,
                       const torch::Tensor& taps_h, const torch::Tensor& w_out, const c10::optional<torch::Tensor>& bias,
                       const torch::Tensor& w_in_packed, const torch::Tensor& w_out_packed,
                       int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t pt, int64_t pb,
                       int64_t pl, int64_t pr, int64_t band_bytes, int64_t min_parallel_macs, int64_t cache_bytes) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "cp_fused: x must be a 4-d float32 CPU tensor");
  TORCH_CHECK(!(x.requires_grad() && at::GradMode::is_enabled()), "cp_fused: inference only (no autograd)");
  const bool nchw = x.is_contiguous() || !x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (nchw) x = x.contiguous();
  for (const auto& t : {w_in, taps_v, taps_h, w_out})
    TORCH_CHECK(t.is_contiguous() && t.scalar_type() == at::kFloat, "cp_fused: weights must be contiguous float32");
  Geo g;
  g.N = x.size(0); g.S = x.size(1); g.H = x.size(2); g.W = x.size(3);
  g.G = w_in.size(0); g.Sg = w_in.size(1); g.R = w_in.size(2); g.GR = g.G * g.R;
  // Each group's R channels start a cache line (Rp = R rounded up to 16) and so does every pixel (L = G*Rp):
  // no vector load or store of the intermediates splits a line, and no 16-channel block spans two groups.
  g.Rp = (g.R + 15) / 16 * 16;
  g.L = g.G * g.Rp;
  g.Tg = w_out.size(2); g.T = g.G * g.Tg;
  g.kh = taps_v.size(0); g.kw = taps_h.size(0);
  g.sh = sh; g.sw = sw; g.dh = dh; g.dw = dw; g.pt = pt; g.pl = pl;
  g.pb = std::max<int64_t>(0, pb);  // negative: rows cropped, never read
  g.pr = std::max<int64_t>(0, pr);
  TORCH_CHECK(pt >= 0 && pl >= 0, "cp_fused: negative padding");
  TORCH_CHECK(g.S == g.G * g.Sg, "cp_fused: input has ", g.S, " channels, weights expect ", g.G * g.Sg);
  g.Ho = (g.H + pt + pb - dh * (g.kh - 1) - 1) / sh + 1;
  g.Wo = (g.W + pl + pr - dw * (g.kw - 1) - 1) / sw + 1;
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, "cp_fused: input smaller than the kernel's reach");

  auto out = at::empty({g.N, g.T, g.Ho, g.Wo},
                       x.options().memory_format(nchw ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast));
  const int64_t band = std::max<int64_t>(1, band_bytes / std::max<int64_t>(1, 4 * g.Wo * (g.GR + g.T)));
  // Waking the pool's other threads costs tens of microseconds here (more with OMP_WAIT_POLICY=PASSIVE),
  // so a block with little work runs on the calling thread.
  const int64_t macs = g.N * (g.H * g.W * g.Sg * g.GR + g.Ho * g.W * g.kh * g.GR + g.Ho * g.Wo * g.kw * g.GR +
                              g.Ho * g.Wo * g.R * g.T);
  const int64_t threads = macs < min_parallel_macs ? 1 : at::get_num_threads();
  // An output much larger than the caches is written around them (it would be evicted before it is read).
  const bool stream = 4 * out.numel() > cache_bytes;
  const bool prefetch = 4 * x.numel() > cache_bytes;  // else the input is likely in cache already
  // Work items: whole images when there are enough of them, else row ranges of each image.
  const int64_t split = g.N >= threads ? 1 : std::min<int64_t>(g.Ho, (threads + g.N - 1) / g.N);
  const int64_t items = g.N * split;
  const float* tv = taps_v.data_ptr<float>();
  const float* th = taps_h.data_ptr<float>();

  const float* xp = x.data_ptr<float>();
  const float* win = w_in.data_ptr<float>();
  const float* wout = w_out.data_ptr<float>();
  const float* bp = bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
#if CP_SIMD
  const int64_t in_panel = (g.R + PANEL - 1) / PANEL * g.Sg * PANEL, out_panel = (g.Tg + PANEL - 1) / PANEL * g.R * PANEL;
  TORCH_CHECK(w_in_packed.is_contiguous() && w_in_packed.numel() == g.G * in_panel && w_out_packed.is_contiguous() &&
                  w_out_packed.numel() == g.G * out_panel,
              "cp_fused: packed weights have the wrong shape");
  const float* winp = w_in_packed.data_ptr<float>();
  const float* woutp = w_out_packed.data_ptr<float>();
#endif
  float* op = out.data_ptr<float>();

  // The input rows [lo, hi) that output rows [ho0, ho1) read.
  auto input_rows = [&](int64_t ho0, int64_t ho1) {
    return std::pair<int64_t, int64_t>(std::max<int64_t>(0, ho0 * sh - pt),
                                       std::min<int64_t>(g.H, (ho1 - 1) * sh - pt + (g.kh - 1) * dh + 1));
  };
  auto work = [&](int64_t begin, int64_t end) {
    // Inside the parallel region MKL sees omp_in_parallel() (one OpenMP runtime: PyTorch's libgomp)
    // and runs each thread's GEMMs on that thread alone.
    // Uninitialised scratch, except the padding: every other element read is written first in the same
    // band. y1 has pt zero rows above the first layer's H rows and pb below; the vertical output y2 (a
    // band of rows, one 16-channel block) has pl zero columns before the W computed ones and pr after.
    const int64_t wp = g.pl + g.W + g.pr, rs = g.W * g.L;
    Buffer y1 = buffer((g.pt + g.H + g.pb) * rs), y2 = buffer(band * wp * 16), y3 = buffer(band * g.Wo * g.L);
    float* y1p = y1.get();
    float* y2p = y2.get();
    float* y3p = y3.get();
    std::fill(y1p, y1p + g.pt * rs, 0.f);
    std::fill(y1p + (g.pt + g.H) * rs, y1p + (g.pt + g.H + g.pb) * rs, 0.f);
    for (int64_t r = 0; r < band; ++r) {
      std::fill(y2p + r * wp * 16, y2p + (r * wp + g.pl) * 16, 0.f);
      std::fill(y2p + (r * wp + g.pl + g.W) * 16, y2p + (r + 1) * wp * 16, 0.f);
    }
    for (int64_t it = begin; it < end; ++it) {
      const int64_t n = it / split, part = it % split;
      const int64_t next_n = (it + 1) / split, next_a = g.Ho * ((it + 1) % split) / split;
      const int64_t a = g.Ho * part / split, b = g.Ho * (part + 1) / split;
      int64_t done = -1;  // input rows [first, done) of y1 hold the first layer's output
      for (int64_t ho0 = a; ho0 < b; ho0 += band) {
        const int64_t ho1 = std::min(b, ho0 + band);
        const auto [lo, hi] = input_rows(ho0, ho1);
        const int64_t start = done < 0 ? lo : std::max(done, lo);
        if (hi > start) {
          const int64_t rows = (hi - start) * g.W;
          for (int64_t gi = 0; gi < g.G; ++gi) {
            float* y = y1p + (g.pt + start) * rs + gi * g.Rp;
            // NCHW: y (rows x R) = X[group channels, rows]^T W_in, X read transposed in place
            const float* xg = nchw ? xp + (n * g.S + gi * g.Sg) * g.H * g.W + start * g.W
                                   : xp + (n * g.H * g.W + start * g.W) * g.S + gi * g.Sg;
#if CP_SIMD
            gemm_packed(rows, g.R, g.Sg, xg, nchw ? 1 : g.S, nchw ? g.H * g.W : 1, winp + gi * in_panel, y, g.L,
                        nullptr);
#else
            const float* wg = win + gi * g.Sg * g.R;
            if (nchw)
              gemm_cm(false, true, g.R, rows, g.Sg, wg, g.R, xg, g.H * g.W, y, g.L);
            else
              gemm_rm(rows, g.R, g.Sg, xg, g.S, wg, g.R, 0.f, y, g.L);
#endif
          }
          done = hi;
        }
        depthwise_rows(y1p, tv, th, y2p, y3p, g, ho0, ho1);
        const int64_t m = (ho1 - ho0) * g.Wo;
        if (nchw) {  // out[t, band pixels] = (y3 W_out)^T, written column-major straight into NCHW
          const int64_t hw = g.Ho * g.Wo;
          float* o = op + n * g.T * hw + ho0 * g.Wo;
          for (int64_t gi = 0; gi < g.G; ++gi)
            gemm_cm(true, true, m, g.Tg, g.R, y3p + gi * g.Rp, g.L, wout + gi * g.R * g.Tg, g.Tg,
                    o + gi * g.Tg * hw, hw);
          if (bp) {
            for (int64_t t = 0; t < g.T; ++t) {
              float* __restrict ot = o + t * hw;
              const float bt = bp[t];
              for (int64_t i = 0; i < m; ++i) ot[i] += bt;
            }
          }
          continue;
        }
        float* o = op + (n * g.Ho * g.Wo + ho0 * g.Wo) * g.T;
#if CP_SIMD
        // While the last layer runs, bring the input rows the next band (of this item, or the next
        // item's first) will read into L2: in a large batch they come from memory, and the first layer's
        // GEMM would otherwise wait for them (measured without: VGG-16 conv3_1 at batch 32 spent 1.5x its
        // batch-1 time per image in that GEMM). NHWC rows are contiguous; NCHW input is not prefetched.
        Prefetch pf;
        if (prefetch && !nchw && (ho1 < b || it + 1 < end)) {
          const int64_t pn = ho1 < b ? n : next_n;
          const int64_t p0 = ho1 < b ? ho1 : next_a;
          auto [plo, phi] = input_rows(p0, std::min(ho1 < b ? b : g.Ho, p0 + band));
          if (ho1 < b) plo = std::max(plo, hi);
          if (phi > plo) {
            pf.p = reinterpret_cast<const char*>(xp + (pn * g.H * g.W + plo * g.W) * g.S);
            pf.lines = ((phi - plo) * g.W * g.S * 4 + 63) / 64;
          }
        }
        for (int64_t gi = 0; gi < g.G; ++gi)
          gemm_packed(m, g.Tg, g.R, y3p + gi * g.Rp, g.L, 1, woutp + gi * out_panel, o + gi * g.Tg, g.T,
                      bp ? bp + gi * g.Tg : nullptr, stream, &pf);
        continue;  // bias added in the micro-kernel
#else
        for (int64_t gi = 0; gi < g.G; ++gi) {
          gemm_rm(m, g.Tg, g.R, y3p + gi * g.Rp, g.L, wout + gi * g.R * g.Tg, g.Tg, 0.f, o + gi * g.Tg, g.T);
        }
#endif
        if (bp) {
          for (int64_t i = 0; i < m; ++i) {
            float* __restrict oi = o + i * g.T;
            for (int64_t c = 0; c < g.T; ++c) oi[c] += bp[c];
          }
        }
      }
    }
#if CP_SIMD
    if (stream) _mm_sfence();  // the streamed output is visible before the work item counts as done
#endif
  };
  if (threads > 1) {
    at::parallel_for(0, items, 1, work);
  } else {
#if CP_SIMD
    const bool mkl = nchw;  // only the NCHW output's last layer calls MKL in a build with the micro-kernel
#else
    const bool mkl = true;
#endif
    const int one = 1;
    const int before = mkl && mkl_local() ? mkl_local()(&one) : 0;
    work(0, items);
    if (mkl && mkl_local()) mkl_local()(&before);
  }
  return out;
}

// Registered twice: as the torch operator <namespace>::cp_fused (schema below, CPU kernel), which
// torch.compile and torch.export see and trace through the fake implementation registered in fused.py;
// and as a plain Python function, which eager calls take (the dispatcher adds a few microseconds, and a
// small block's whole run at batch 1 is ~10 us). The namespace is "cpbench" for the native build; other
// builds of the same source (another -march) load into the same process and need their own.
#ifndef CPBENCH_OP_NAMESPACE
#define CPBENCH_OP_NAMESPACE cpbench
#endif
#define CP_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define CP_TORCH_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

CP_TORCH_LIBRARY(CPBENCH_OP_NAMESPACE, m) {
  m.def("cp_fused(Tensor x, Tensor w_in, Tensor taps_v, Tensor taps_h, Tensor w_out, Tensor? bias, "
        "Tensor w_in_packed, Tensor w_out_packed, int sh, int sw, int dh, int dw, int pt, int pb, int pl, "
        "int pr, int band_bytes, int min_parallel_macs, int cache_bytes) -> Tensor");
}

CP_TORCH_LIBRARY_IMPL(CPBENCH_OP_NAMESPACE, CPU, m) { m.impl("cp_fused", TORCH_FN(cp_fused)); }

#define CP_STR2(x) #x
#define CP_STR(x) CP_STR2(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cp_fused", &cp_fused, "CP block (1x1, kh x 1, 1 x kw, 1x1) fused over bands of rows, NHWC or NCHW");
  m.attr("op_namespace") = CP_STR(CPBENCH_OP_NAMESPACE);
#if CP_SIMD
  m.attr("panel") = PANEL;
#if defined(CP_AVX2)
  m.attr("simd") = "avx2";
#else
  m.attr("simd") = "avx512";
#endif
#else
  m.attr("simd") = "none";
  m.attr("panel") = 0;  // no micro-kernel in this build (neither AVX-512 nor AVX2): packed weights not read
#endif
}
