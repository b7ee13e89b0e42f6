// A CP block (1x1 S->G*R, kh x 1 depthwise, 1 x kw depthwise, 1x1 G*R->T) as one operator on NHWC data.
//
// Why: run as four layers, the R-channel intermediates of a batch stream through memory three times
// and each layer pays a dispatch; the two depthwise layers, which hold a few percent of the FLOPs, take
// a quarter of the time or more. Here a *work item* (one image, or a range of output rows of one image
// when there are fewer images than threads) is computed in bands of output rows, so the band's
// intermediates stay in L1/L2:
//   1. the first 1x1 layer (a GEMM, MKL via at::mm_out) on the input rows the band needs that are not
//      computed yet (rows shared by consecutive bands are computed once),
//   2. the vertical taps, then the horizontal taps, in plain loops vectorised over channels
//      (channels are contiguous in NHWC),
//   3. the last 1x1 layer (a GEMM, plus bias) straight into the band's rows of the output.
// Work items run in parallel over at::parallel_for; the GEMMs inside a parallel region are serial.
// Exact re-expression: zero padding, any stride and dilation, groups (block-diagonal 1x1 layers).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <dlfcn.h>
#include <algorithm>
#include <memory>
#include <vector>

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

struct Geo {
  int64_t N, H, W, S, G, Sg, R, GR, T, Tg, kh, kw, sh, sw, dh, dw, pt, pl, Ho, Wo;
};

// Depthwise taps over a list of pixels: out[p][c] = sum_k taps[k][c] * src[p][k][c], where src[p][k]
// is null for a tap that falls in the zero padding. Channels are contiguous; a block of channels keeps
// its taps and its accumulator in vector registers across all pixels (AVX-512 or AVX2 when compiled
// for them, a plain loop otherwise).
struct Taps {
  const float* taps;  // (nk, GR)
  int64_t nk, GR;
};

template <typename SrcFn>
inline void taps_pixels(float* __restrict out, int64_t npix, SrcFn src, const Taps& tp) {
  const int64_t GR = tp.GR, nk = tp.nk;
  int64_t c0 = 0;
#if defined(__AVX512F__)
  constexpr int64_t V = 16;
  for (; c0 < GR; c0 += V) {
    const __mmask16 m = GR - c0 >= V ? (__mmask16)0xFFFF : (__mmask16)((1u << (GR - c0)) - 1);
    __m512 t[16];
    const int64_t nr = std::min<int64_t>(nk, 16);
    for (int64_t k = 0; k < nr; ++k) t[k] = _mm512_maskz_loadu_ps(m, tp.taps + k * GR + c0);
    for (int64_t p = 0; p < npix; ++p) {
      const float* const* sp = src(p);
      __m512 acc = _mm512_setzero_ps();
      for (int64_t k = 0; k < nk; ++k) {
        if (!sp[k]) continue;
        const __m512 tk = k < 16 ? t[k] : _mm512_maskz_loadu_ps(m, tp.taps + k * GR + c0);
        acc = _mm512_fmadd_ps(tk, _mm512_maskz_loadu_ps(m, sp[k] + c0), acc);
      }
      _mm512_mask_storeu_ps(out + p * GR + c0, m, acc);
    }
  }
#elif defined(__AVX2__) && defined(__FMA__)
  constexpr int64_t V = 8;
  for (; c0 + V <= GR; c0 += V) {
    for (int64_t p = 0; p < npix; ++p) {
      const float* const* sp = src(p);
      __m256 acc = _mm256_setzero_ps();
      for (int64_t k = 0; k < nk; ++k)
        if (sp[k]) acc = _mm256_fmadd_ps(_mm256_loadu_ps(tp.taps + k * GR + c0), _mm256_loadu_ps(sp[k] + c0), acc);
      _mm256_storeu_ps(out + p * GR + c0, acc);
    }
  }
#endif
  for (; c0 < GR; ++c0) {
    for (int64_t p = 0; p < npix; ++p) {
      const float* const* sp = src(p);
      float acc = 0.f;
      for (int64_t k = 0; k < nk; ++k)
        if (sp[k]) acc += tp.taps[k * GR + c0] * sp[k][c0];
      out[p * GR + c0] = acc;
    }
  }
}

// The two depthwise layers for output rows [ho0, ho1), one row at a time: the vertical taps write one
// W x GR row into ``row`` (small enough for L1), the horizontal taps read it from there into that
// row of ``y3``. ``hptrs`` are the horizontal source pointers into ``row``, the same for every row.
inline void depthwise_rows(const float* y1, const float* tv, const float* th, float* row, float* y3,
                           const Geo& g, int64_t ho0, int64_t ho1, std::vector<const float*>& vptrs,
                           const std::vector<const float*>& hptrs) {
  vptrs.resize(g.W * g.kh);
  const int64_t kh = g.kh, kw = g.kw;
  for (int64_t ho = ho0; ho < ho1; ++ho) {
    for (int64_t k = 0; k < kh; ++k) {
      const int64_t r = ho * g.sh - g.pt + k * g.dh;
      for (int64_t w = 0; w < g.W; ++w)
        vptrs[w * kh + k] = r < 0 || r >= g.H ? nullptr : y1 + (r * g.W + w) * g.GR;
    }
    const float* const* vb = vptrs.data();
    taps_pixels(row, g.W, [vb, kh](int64_t p) { return vb + p * kh; }, Taps{tv, kh, g.GR});
    const float* const* hb = hptrs.data();
    taps_pixels(y3 + (ho - ho0) * g.Wo * g.GR, g.Wo, [hb, kw](int64_t p) { return hb + p * kw; },
                Taps{th, kw, g.GR});
  }
}

}  // namespace

// x (N, H, W, S) contiguous float32, or (N, S, H, W) with nchw; w_in (G, Sg, R); taps_v (kh, G*R);
// taps_h (kw, G*R); w_out (G, R, Tg); bias (T) or undefined. Returns (N, Ho, Wo, T) contiguous, or
// (N, T, Ho, Wo) with nchw. The intermediates are NHWC either way; NCHW data goes through the two GEMMs
// as transposed operands.
torch::Tensor cp_fused(torch::Tensor x, torch::Tensor w_in, torch::Tensor taps_v,
                       torch::Tensor taps_h, torch::Tensor w_out, c10::optional<torch::Tensor> bias,
                       int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t pt, int64_t pb,
                       int64_t pl, int64_t pr, int64_t band_bytes, int64_t min_parallel_macs, bool nchw) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "cp_fused: x must be a contiguous float32 tensor");
  for (const auto& t : {w_in, taps_v, taps_h, w_out})
    TORCH_CHECK(t.is_contiguous() && t.scalar_type() == at::kFloat, "cp_fused: weights must be contiguous float32");
  Geo g;
  g.N = x.size(0);
  if (nchw) {
    g.S = x.size(1); g.H = x.size(2); g.W = x.size(3);
  } else {
    g.H = x.size(1); g.W = x.size(2); g.S = x.size(3);
  }
  g.G = w_in.size(0); g.Sg = w_in.size(1); g.R = w_in.size(2); g.GR = g.G * g.R;
  g.Tg = w_out.size(2); g.T = g.G * g.Tg;
  g.kh = taps_v.size(0); g.kw = taps_h.size(0);
  g.sh = sh; g.sw = sw; g.dh = dh; g.dw = dw; g.pt = pt; g.pl = pl;
  TORCH_CHECK(g.S == g.G * g.Sg, "cp_fused: input has ", g.S, " channels, weights expect ", g.G * g.Sg);
  g.Ho = (g.H + pt + pb - dh * (g.kh - 1) - 1) / sh + 1;
  g.Wo = (g.W + pl + pr - dw * (g.kw - 1) - 1) / sw + 1;
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, "cp_fused: input smaller than the kernel's reach");

  auto out = nchw ? at::empty({g.N, g.T, g.Ho, g.Wo}, x.options()) : at::empty({g.N, g.Ho, g.Wo, g.T}, x.options());
  const int64_t band = std::max<int64_t>(1, band_bytes / std::max<int64_t>(1, 4 * g.Wo * (g.GR + g.T)));
  // Waking the pool's other threads costs tens of microseconds here (more with OMP_WAIT_POLICY=PASSIVE),
  // so a block with little work runs on the calling thread.
  const int64_t macs = g.N * (g.H * g.W * g.Sg * g.GR + g.Ho * g.W * g.kh * g.GR + g.Ho * g.Wo * g.kw * g.GR +
                              g.Ho * g.Wo * g.R * g.T);
  const int64_t threads = macs < min_parallel_macs ? 1 : at::get_num_threads();
  // Work items: whole images when there are enough of them, else row ranges of each image.
  const int64_t split = g.N >= threads ? 1 : std::min<int64_t>(g.Ho, (threads + g.N - 1) / g.N);
  const int64_t items = g.N * split;
  const float* tv = taps_v.data_ptr<float>();
  const float* th = taps_h.data_ptr<float>();

  const float* xp = x.data_ptr<float>();
  const float* win = w_in.data_ptr<float>();
  const float* wout = w_out.data_ptr<float>();
  const float* bp = bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();

  auto work = [&](int64_t begin, int64_t end) {
    // Inside the parallel region MKL sees omp_in_parallel() (one OpenMP runtime: PyTorch's libgomp)
    // and runs each thread's GEMMs on that thread alone.
    // uninitialised scratch: every element read is written first in the same band
    std::unique_ptr<float[]> y1(new float[g.H * g.W * g.GR]), y2(new float[g.W * g.GR]),
        y3(new float[band * g.Wo * g.GR]);
    float* y1p = y1.get();
    float* y2p = y2.get();
    float* y3p = y3.get();
    std::vector<const float*> vptrs, hptrs(g.Wo * g.kw);
    for (int64_t wo = 0; wo < g.Wo; ++wo)
      for (int64_t k = 0; k < g.kw; ++k) {
        const int64_t col = wo * g.sw - g.pl + k * g.dw;
        hptrs[wo * g.kw + k] = col < 0 || col >= g.W ? nullptr : y2p + col * g.GR;
      }
    for (int64_t it = begin; it < end; ++it) {
      const int64_t n = it / split, part = it % split;
      const int64_t a = g.Ho * part / split, b = g.Ho * (part + 1) / split;
      int64_t done = -1;  // input rows [first, done) of y1 hold the first layer's output
      for (int64_t ho0 = a; ho0 < b; ho0 += band) {
        const int64_t ho1 = std::min(b, ho0 + band);
        const int64_t lo = std::max<int64_t>(0, ho0 * sh - pt);
        const int64_t hi = std::min<int64_t>(g.H, (ho1 - 1) * sh - pt + (g.kh - 1) * dh + 1);
        const int64_t start = done < 0 ? lo : std::max(done, lo);
        if (hi > start) {
          const int64_t rows = (hi - start) * g.W;
          for (int64_t gi = 0; gi < g.G; ++gi) {
            float* y = y1p + start * g.W * g.GR + gi * g.R;
            const float* wg = win + gi * g.Sg * g.R;
            if (nchw) {  // y (rows x R) = X[group channels, rows]^T W_in: X is read transposed in place
              gemm_cm(false, true, g.R, rows, g.Sg, wg, g.R,
                      xp + (n * g.S + gi * g.Sg) * g.H * g.W + start * g.W, g.H * g.W, y, g.GR);
            } else {
              gemm_rm(rows, g.R, g.Sg, xp + (n * g.H * g.W + start * g.W) * g.S + gi * g.Sg, g.S, wg, g.R,
                      0.f, y, g.GR);
            }
          }
          done = hi;
        }
        depthwise_rows(y1p, tv, th, y2p, y3p, g, ho0, ho1, vptrs, hptrs);
        const int64_t m = (ho1 - ho0) * g.Wo;
        if (nchw) {  // out[t, band pixels] = (y3 W_out)^T, written column-major straight into NCHW
          const int64_t hw = g.Ho * g.Wo;
          float* o = op + n * g.T * hw + ho0 * g.Wo;
          for (int64_t gi = 0; gi < g.G; ++gi)
            gemm_cm(true, true, m, g.Tg, g.R, y3p + gi * g.R, g.GR, wout + gi * g.R * g.Tg, g.Tg,
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
        for (int64_t gi = 0; gi < g.G; ++gi) {
          gemm_rm(m, g.Tg, g.R, y3p + gi * g.R, g.GR, wout + gi * g.R * g.Tg, g.Tg, 0.f, o + gi * g.Tg, g.T);
        }
        if (bp) {
          for (int64_t i = 0; i < m; ++i) {
            float* __restrict oi = o + i * g.T;
            for (int64_t c = 0; c < g.T; ++c) oi[c] += bp[c];
          }
        }
      }
    }
  };
  if (threads > 1) {
    at::parallel_for(0, items, 1, work);
  } else {
    const int one = 1;
    const int before = mkl_local() ? mkl_local()(&one) : 0;
    work(0, items);
    if (mkl_local()) mkl_local()(&before);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cp_fused", &cp_fused, "CP block (1x1, kh x 1, 1 x kw, 1x1) fused over bands of rows, NHWC or NCHW");
}
