/* dsv2's CPU kernels for int8 / int4 / bf16 weights: plain C, compiled on first use by
 * dsv2/quant/native.py (cc -O3 -march=native -fopenmp) and called through ctypes: GEMVs for int8, int4 and
 * bf16 weights (batched over heads for bf16), and int8 / int4 dequantisation of row panels for the dense
 * GEMM, a GEMM on bf16 / int8 / int4 weights as stored (fp32 FMAs, for CPUs without native bf16), and one on
 * int4 weights with int8 activations (integer products, AVX2), MLA's absorbed decode attention over bf16 latent
 * rows, and a decode step's RMSNorm and RoPE in one call each. The
 * pure-PyTorch path (aten's kernels, F.linear) is used wherever this library cannot be built.
 * With AVX512_BF16 the bf16-activation paths multiply with vdpbf16ps (bf16 pairs, exact products, fp32
 * sums): weights that are not bf16 become bf16 in registers first (int4 codes and int8 nibbles as the
 * bf16 128 + code, the offset taken out with the activations' sums). The int4 GEMV has an AVX512_BF16 +
 * VBMI path and an AVX2 + FMA one; elsewhere dsv2_int4_gemv is a plain loop for tests. Without AVX512_BF16
 * one bf16 row (x in L1) also reads one weight row at a time, widened to fp32.
 *
 * Shapes: M activation rows, N output features (rows of the weight), K input features, g int4 group.
 * Weights use the layouts dsv2/quant/kernels.py stores:
 *   int8: q (N, K) int8 row-major, scale (N,): w = q * scale. bf16: w (N, K) row-major, as stored.
 *   int4: dsv2's pack (aten's CPU pack under AVX512), packed (Np, Kp/2) uint8 with Np % 16 == 0: rows in
 *         blocks of 64, each block a (Kp, 32) byte array whose low nibbles are rows 0..31 and high nibbles
 *         rows 32..63 of the block; a last block of t < 64 rows is a (Kp, t/2) array with row 2j in the low
 *         and row 2j+1 in the high nibble of byte j. sz (Kp/g, Np, 2) = (scale, zero):
 *         w = (q - 8) * scale + zero.
 * Scales are fp32 or bf16 (flag *_bf16), activations fp32 or bf16 (per kernel), results fp32 (GEMV) or fp32 /
 * bf16 (dequant).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef PF_ROWS
#define PF_ROWS 8 /* the 4-row GEMVs prefetch the weight row this many rows ahead */
#endif

static inline float bf2f(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f2bf(float f) { /* round to nearest even (weights are finite) */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#if defined(__AVX2__)
#include <immintrin.h>
/* 8 fp32 lanes rounded as f2bf (nearest even, finite inputs): the bf16 bits in each lane's high half */
static inline __m256i f2bf8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    return _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF),
                                                _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
}
#endif

static inline float load(const void *p, int64_t i, int is_bf16) {
    return is_bf16 ? bf2f(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* ---- int8 ------------------------------------------------------------------------------------ */

/* Vector helpers: VW fp32 lanes (AVX512: 16, AVX2: 8), with a scalar fallback of VW 1. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define VW 16
typedef __m512 vf;
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vset1(float a) { return _mm512_set1_ps(a); }
static inline vf vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline void vstore(float *p, vf a) { _mm512_storeu_ps(p, a); }
static inline vf cvt_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline vf cvt_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
typedef __m512i vi;
static inline vi gather32(const uint8_t *base) { /* VW dwords, 32 bytes apart */
    const __m512i idx = _mm512_setr_epi32(0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448, 480);
    return _mm512_i32gather_epi32(idx, (const void *)base, 1);
}
static inline vf nib(vi v, int shift) {
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, shift), _mm512_set1_epi32(15)));
}
static inline void store_w(void *out, int64_t i, vf w, int out_bf16) {
    if (!out_bf16) {
        _mm512_storeu_ps((float *)out + i, w);
        return;
    }
    __m512i u = _mm512_castps_si512(w); /* round to nearest even, as f2bf */
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                             _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    _mm256_storeu_si256((__m256i *)((uint16_t *)out + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VW 8
typedef __m256 vf;
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vset1(float a) { return _mm256_set1_ps(a); }
static inline vf vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
static inline void vstore(float *p, vf a) { _mm256_storeu_ps(p, a); }
static inline vf cvt_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline vf cvt_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
typedef __m256i vi;
static inline vi gather32(const uint8_t *base) { /* VW dwords, 32 bytes apart */
    const __m256i idx = _mm256_setr_epi32(0, 32, 64, 96, 128, 160, 192, 224);
    return _mm256_i32gather_epi32((const int *)base, idx, 1);
}
static inline vf nib(vi v, int shift) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, shift), _mm256_set1_epi32(15)));
}
static inline void store_w(void *out, int64_t i, vf w, int out_bf16) {
    if (!out_bf16) {
        _mm256_storeu_ps((float *)out + i, w);
        return;
    }
    __m256i u = _mm256_srli_epi32(f2bf8(w), 16);
    u = _mm256_permute4x64_epi64(_mm256_packus_epi32(u, u), 0x08); /* 8 x u16 in the low 128 bits */
    _mm_storeu_si128((__m128i *)((uint16_t *)out + i), _mm256_castsi256_si128(u));
}
#else
#define VW 1
typedef float vf;
static inline vf vzero(void) { return 0.f; }
static inline vf vset1(float a) { return a; }
static inline vf vload(const float *p) { return *p; }
static inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
static inline float vsum(vf a) { return a; }
static inline void vstore(float *p, vf a) { *p = a; }
static inline vf cvt_i8(const int8_t *p) { return (float)*p; }
static inline vf cvt_bf16(const uint16_t *p) { return bf2f(*p); }
#endif

/* The GEMV for a few activation rows, for any weight element type W with a vector converter CVT and a
 * scalar one SCL: y (M, N) = x (M, K) @ (w * scale)^T (scale NULL: 1), for B such products at once
 * (batch strides ldxb / ldwb / ldyb; weight rows ldw apart). Weight rows in fours, activation rows in up to
 * fours: every weight vector is converted once per pass and every activation vector loaded once per 4
 * weight rows (a short last group of weight rows repeats its last row, never written). */
#define DEFINE_GEMV(NAME, W, CVT, SCL)                                                                        \
    static inline __attribute__((always_inline)) void NAME##_tile(const W *const *wr, const float *const *xr, \
                                                                  int mc, int64_t K, int64_t ldw,             \
                                                                  float out[4][4]) {                          \
        const int64_t kv = K / VW * VW;                                                                       \
        vf acc[4][4];                                                                                         \
        for (int i = 0; i < 4; i++)                                                                           \
            for (int j = 0; j < mc; j++) acc[i][j] = vzero();                                                 \
        for (int64_t k = 0; k < kv; k += VW) {                                                                \
            vf w[4];                                                                                          \
            /* the next 4 rows, same columns: rows of a few KiB end at page boundaries, where the hardware   \
               prefetcher stops, so each new row would start cold */                                          \
            for (int i = 0; i < 4; i++) __builtin_prefetch(wr[i] + PF_ROWS * ldw + k, 0, 0);                     \
            for (int i = 0; i < 4; i++) w[i] = CVT(wr[i] + k);                                                \
            for (int j = 0; j < mc; j++) {                                                                    \
                vf xv = vload(xr[j] + k);                                                                     \
                for (int i = 0; i < 4; i++) acc[i][j] = vfma(w[i], xv, acc[i][j]);                           \
            }                                                                                                 \
        }                                                                                                     \
        for (int i = 0; i < 4; i++)                                                                           \
            for (int j = 0; j < mc; j++) {                                                                    \
                float a = vsum(acc[i][j]);                                                                    \
                for (int64_t k = kv; k < K; k++) a += xr[j][k] * SCL(wr[i][k]);                               \
                out[i][j] = a;                                                                                \
            }                                                                                                 \
    }                                                                                                         \
    static void NAME##_batched(const float *x, int64_t ldxb, const W *q, int64_t ldwb, int64_t ldw,           \
                               const void *scale, int scale_bf16, float *y, int64_t ldyb, int64_t B,          \
                               int64_t M, int64_t N, int64_t K, int nthreads) {                               \
        _Pragma("omp parallel for collapse(2) num_threads(nthreads) schedule(static)")                       \
        for (int64_t b = 0; b < B; b++)                                                                       \
            for (int64_t n0 = 0; n0 < N; n0 += 4) {                                                           \
                const W *wr[4];                                                                               \
                for (int i = 0; i < 4; i++) wr[i] = q + b * ldwb + (n0 + i < N ? n0 + i : N - 1) * ldw;       \
                for (int64_t m0 = 0; m0 < M; m0 += 4) {                                                       \
                    const float *xr[4];                                                                       \
                    const int mc = M - m0 < 4 ? (int)(M - m0) : 4;                                            \
                    for (int j = 0; j < mc; j++) xr[j] = x + b * ldxb + (m0 + j) * K;                         \
                    float out[4][4];                                                                          \
                    switch (mc) {                                                                             \
                        case 1: NAME##_tile(wr, xr, 1, K, ldw, out); break;                                   \
                        case 2: NAME##_tile(wr, xr, 2, K, ldw, out); break;                                   \
                        case 3: NAME##_tile(wr, xr, 3, K, ldw, out); break;                                   \
                        default: NAME##_tile(wr, xr, 4, K, ldw, out); break;                                  \
                    }                                                                                         \
                    float *yb = y + b * ldyb;                                                                 \
                    for (int i = 0; i < 4 && n0 + i < N; i++) {                                               \
                        const float s = scale ? load(scale, n0 + i, scale_bf16) : 1.f;                        \
                        for (int j = 0; j < mc; j++) yb[(m0 + j) * N + n0 + i] = out[i][j] * s;               \
                    }                                                                                         \
                }                                                                                             \
            }                                                                                                 \
    }                                                                                                         \
    void NAME(const float *x, const W *q, const void *scale, int scale_bf16, float *y, int64_t M, int64_t N,  \
              int64_t K, int nthreads) {                                                                      \
        NAME##_batched(x, 0, q, 0, K, scale, scale_bf16, y, 0, 1, M, N, K, nthreads);                         \
    }

static inline float i8f(int8_t v) { return (float)v; }

/* int8: w = q * scale per output row */
DEFINE_GEMV(dsv2_int8_gemv, int8_t, cvt_i8, i8f)
/* bf16 weights as stored (scale NULL): PyTorch's bf16 GEMV reads at a fraction of the bus speed on CPUs
 * without AMX; converting to fp32 in registers is a shift */
DEFINE_GEMV(bf16w_gemv, uint16_t, cvt_bf16, bf2f)

#if defined(__AVX512BF16__)
/* bf16 weights times bf16 activations: one vdpbf16ps multiplies 32 pairs (exactly, summed in fp32), so the
 * loop is a load and a dot product per 64 bytes of weight, and one weight row is read at a time: the
 * weight is one sequential stream, which the hardware prefetcher follows across pages (24 GB/s on one Zen 4
 * core, against 16 for 4 interleaved rows; the fp32 loops above are compute-bound and keep 4 rows) */
static inline __attribute__((always_inline)) void bf16dp_row(const uint16_t *wr, const uint16_t *const *xr, int mc,
                                                             int64_t K, float out[4]) {
    const int64_t kv = K / 64 * 64;
    __m512 acc[4][2];
    for (int j = 0; j < mc; j++) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kv; k += 64) {
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wr + k), w1 = (__m512bh)_mm512_loadu_si512(wr + k + 32);
        for (int j = 0; j < mc; j++) {
            acc[j][0] = _mm512_dpbf16_ps(acc[j][0], w0, (__m512bh)_mm512_loadu_si512(xr[j] + k));
            acc[j][1] = _mm512_dpbf16_ps(acc[j][1], w1, (__m512bh)_mm512_loadu_si512(xr[j] + k + 32));
        }
    }
    for (int j = 0; j < mc; j++) {
        float a = _mm512_reduce_add_ps(_mm512_add_ps(acc[j][0], acc[j][1]));
        for (int64_t k = kv; k < K; k++) a += bf2f(xr[j][k]) * bf2f(wr[k]);
        out[j] = a;
    }
}

static void bf16dp_gemv_batched(const uint16_t *x, int64_t ldxb, const uint16_t *q, int64_t ldwb, int64_t ldw,
                                float *y, int64_t ldyb, int64_t B, int64_t M, int64_t N, int64_t K, int nthreads) {
#pragma omp parallel for collapse(2) num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < B; b++)
        for (int64_t n = 0; n < N; n++) {
            const uint16_t *wr = q + b * ldwb + n * ldw;
            for (int64_t m0 = 0; m0 < M; m0 += 4) {
                const uint16_t *xr[4];
                const int mc = M - m0 < 4 ? (int)(M - m0) : 4;
                for (int j = 0; j < mc; j++) xr[j] = x + b * ldxb + (m0 + j) * K;
                float out[4];
                switch (mc) {
                    case 1: bf16dp_row(wr, xr, 1, K, out); break;
                    case 2: bf16dp_row(wr, xr, 2, K, out); break;
                    case 3: bf16dp_row(wr, xr, 3, K, out); break;
                    default: bf16dp_row(wr, xr, 4, K, out); break;
                }
                for (int j = 0; j < mc; j++) y[b * ldyb + (m0 + j) * N + n] = out[j];
            }
        }
}
#endif

/* One fp32 activation row against bf16 weights, one weight row at a time (the sequential stream of
 * bf16dp_row, for CPUs without AVX512_BF16: the weight widened to fp32 by a shift, 4 accumulators). Only
 * while x stays in L1 (ROW_STREAM_K columns, 16 KiB): beyond, every weight row would re-read x from L2, and
 * the 4-row tiles, which read it once per 4 rows, are faster (2x at K = 10944 on Zen 4 capped at AVX2). */
#define ROW_STREAM_K 4096
static void bf16f_row_gemv_batched(const float *x, int64_t ldxb, const uint16_t *q, int64_t ldwb, int64_t ldw,
                                   float *y, int64_t ldyb, int64_t B, int64_t N, int64_t K, int nthreads) {
    const int64_t kv = K / (4 * VW) * (4 * VW);
#pragma omp parallel for collapse(2) num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < B; b++)
        for (int64_t n = 0; n < N; n++) {
            const uint16_t *wr = q + b * ldwb + n * ldw;
            const float *xr = x + b * ldxb;
            vf acc[4] = {vzero(), vzero(), vzero(), vzero()};
            for (int64_t k = 0; k < kv; k += 4 * VW)
                for (int i = 0; i < 4; i++) acc[i] = vfma(cvt_bf16(wr + k + i * VW), vload(xr + k + i * VW), acc[i]);
            float a = 0.f;
            for (int i = 0; i < 4; i++) a += vsum(acc[i]);
            for (int64_t k = kv; k < K; k++) a += xr[k] * bf2f(wr[k]);
            y[b * ldyb + n] = a;
        }
}

static int bf16_rows16(const float *x, const uint16_t *w, int64_t ldw, float *y, int64_t M, int64_t N, int64_t K,
                       int nthreads);

/* B bf16 GEMVs at once: y[b] (M, N) fp32 = x[b] (M, K) @ w[b]^T, each weight (N, K) with rows ldw apart (one
 * weight: B = 1; MLA's per-head W_UK / W_UV: heads ldwb apart). x is bf16 (x_bf16) or fp32. One row reads one
 * weight row at a time: bf16 x on a CPU with AVX512_BF16 by the dot-product loop, else in fp32 (bf16 x
 * widened first); several rows take the 4-row fp32 loop, which reuses each weight vector in registers. */
void dsv2_bf16_bgemv(const void *x, int x_bf16, int64_t ldxb, const uint16_t *w, int64_t ldwb, int64_t ldw,
                     float *y, int64_t ldyb, int64_t B, int64_t M, int64_t N, int64_t K, int nthreads) {
#if defined(__AVX512BF16__)
    if (x_bf16 && M == 1) {
        bf16dp_gemv_batched((const uint16_t *)x, ldxb, w, ldwb, ldw, y, ldyb, B, M, N, K, nthreads);
        return;
    }
#endif
    const float *xw = (const float *)x; /* fp32 x as given, bf16 x widened into xf */
    float *xf = NULL;
    if (x_bf16) {
        xf = (float *)malloc((size_t)(B * M * K) * sizeof(float));
        if (!xf) { /* cannot happen for a GEMV's few rows; leave y as NaN rather than crash */
            for (int64_t i = 0; i < B * M * N; i++) y[i] = __builtin_nanf("");
            return;
        }
        for (int64_t b = 0; b < B; b++)
            for (int64_t i = 0; i < M * K; i++) xf[b * M * K + i] = bf2f(((const uint16_t *)x)[b * ldxb + i]);
        xw = xf, ldxb = M * K;
    }
    if (M == 1 && K <= ROW_STREAM_K)
        bf16f_row_gemv_batched(xw, ldxb, w, ldwb, ldw, y, ldyb, B, N, K, nthreads);
    else if (!(B == 1 && bf16_rows16(xw, w, ldw, y, M, N, K, nthreads)))
        bf16w_gemv_batched(xw, ldxb, w, ldwb, ldw, NULL, 0, y, ldyb, B, M, N, K, nthreads);
    free(xf);
}

#if defined(__AVX512BF16__)
#define INT8_BF16_FAST 1
/* int8 weights times bf16 activations. A byte q is u - 128 for u = q ^ 0x80 = 16 h + l (two nibbles); each
 * nibble becomes the bf16 128 + nibble in registers (a bit-select; the high one also flips u's top bit),
 * and vdpbf16ps sums 32 of them times x exactly in fp32:
 *   sum q x = 16 HI + LO - 2304 sum x,  HI = sum (128 + h) x, LO = sum (128 + l) x.
 * 8 instructions per 64 weights with no int-to-float conversion: ~1.4x the fp32 loop's bandwidth on one
 * Zen 4 core. One weight row at a time (one sequential stream), against up to 4 activation rows. */
static inline __attribute__((always_inline)) void int8bf_row(const int8_t *wr, const uint16_t *const *xr,
                                                             const float *xsum, int mc, int64_t K, float out[4]) {
    const __m512i m = _mm512_set1_epi16(0x000F), c = _mm512_set1_epi16(0x4300), c8 = _mm512_set1_epi16(0x4308);
    const int64_t kv = K / 32 * 32;
    __m512 lo[4], hi[4];
    for (int j = 0; j < mc; j++) lo[j] = hi[j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kv; k += 32) {
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(wr + k)));
        const __m512bh l = (__m512bh)_mm512_ternarylogic_epi32(v, m, c, 0xEA);                        /* (v & m) | c */
        const __m512bh h = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), m, c8, 0x6A); /* (. & m) ^ c8 */
        for (int j = 0; j < mc; j++) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(xr[j] + k);
            lo[j] = _mm512_dpbf16_ps(lo[j], l, xv);
            hi[j] = _mm512_dpbf16_ps(hi[j], h, xv);
        }
    }
    for (int j = 0; j < mc; j++) {
        float a = 16.f * _mm512_reduce_add_ps(hi[j]) + _mm512_reduce_add_ps(lo[j]) - 2304.f * xsum[j];
        for (int64_t k = kv; k < K; k++) a += (float)wr[k] * bf2f(xr[j][k]);
        out[j] = a;
    }
}
#else
#define INT8_BF16_FAST 0
#endif

/* 1 where dsv2_int8_gemv_bf16 has its vector path (else it widens x and runs the fp32 loop, for tests) */
int dsv2_int8_gemv_bf16_fast(void) { return INT8_BF16_FAST; }

/* y (M, N) fp32 = x (M, K) bf16 @ (q * scale)^T; xsum (M,) fp32 scratch (the sums of the rows of x that
 * lie in whole 32-column steps) */
void dsv2_int8_gemv_bf16(const uint16_t *x, const int8_t *q, const void *scale, int scale_bf16, float *xsum,
                         float *y, int64_t M, int64_t N, int64_t K, int nthreads) {
#if INT8_BF16_FAST
    const int64_t kv = K / 32 * 32;
    for (int64_t m = 0; m < M; m++) {
        float s = 0.f;
        for (int64_t k = 0; k < kv; k++) s += bf2f(x[m * K + k]);
        xsum[m] = s;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *wr = q + n * K;
        const float sc = load(scale, n, scale_bf16);
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const uint16_t *xr[4];
            const int mc = M - m0 < 4 ? (int)(M - m0) : 4;
            for (int j = 0; j < mc; j++) xr[j] = x + (m0 + j) * K;
            float out[4];
            switch (mc) {
                case 1: int8bf_row(wr, xr, xsum + m0, 1, K, out); break;
                case 2: int8bf_row(wr, xr, xsum + m0, 2, K, out); break;
                case 3: int8bf_row(wr, xr, xsum + m0, 3, K, out); break;
                default: int8bf_row(wr, xr, xsum + m0, 4, K, out); break;
            }
            for (int j = 0; j < mc; j++) y[(m0 + j) * N + n] = out[j] * sc;
        }
    }
#else
    float *xf = (float *)malloc((size_t)(M * K) * sizeof(float));
    if (!xf) {
        for (int64_t i = 0; i < M * N; i++) y[i] = __builtin_nanf("");
        return;
    }
    (void)xsum;
    for (int64_t i = 0; i < M * K; i++) xf[i] = bf2f(x[i]);
    dsv2_int8_gemv(xf, q, scale, scale_bf16, y, M, N, K, nthreads);
    free(xf);
#endif
}

/* rows [r0, r1) of q * scale into out ((r1 - r0), K), fp32 or bf16 */
void dsv2_int8_dequant(const int8_t *q, const void *scale, int scale_bf16, void *out, int out_bf16,
                       int64_t r0, int64_t r1, int64_t K, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *qr = q + r * K;
        const float s = load(scale, r, scale_bf16);
        if (out_bf16) {
            uint16_t *o = (uint16_t *)out + (r - r0) * K;
            for (int64_t k = 0; k < K; k++) o[k] = f2bf((float)qr[k] * s);
        } else {
            float *o = (float *)out + (r - r0) * K;
#pragma omp simd
            for (int64_t k = 0; k < K; k++) o[k] = (float)qr[k] * s;
        }
    }
}

/* ---- int4 ------------------------------------------------------------------------------------ */

/* int4 code of row r, column k in dsv2's pack of Np rows, Kp columns (see the top of this file) */
static inline int int4_code(const uint8_t *packed, int64_t Np, int64_t Kp, int64_t r, int64_t k) {
    const int64_t full = Np / 64, b = r / 64, jr = r % 64;
    const uint8_t *bp = packed + b * 32 * Kp;
    if (b < full) return (bp[k * 32 + (jr & 31)] >> (jr < 32 ? 0 : 4)) & 15;
    return (bp[k * ((Np - full * 64) / 2) + jr / 2] >> (4 * (jr & 1))) & 15;
}

/* group gi's scale and (zero - 8 scale) of row r: w = code * scale + base */
static inline void int4_sb(const void *sz, int sz_bf16, int64_t Np, int64_t gi, int64_t r, float *s, float *base) {
    const int64_t i = (gi * Np + r) * 2;
    *s = load(sz, i, sz_bf16);
    *base = load(sz, i + 1, sz_bf16) - 8.f * *s;
}

/* One dequantised row: codes (Kp,) one per byte, its group scales/zeros, written as fp32 or bf16. */
static inline void int4_row(const uint8_t *codes, const void *sz, int sz_bf16, int64_t r, int64_t Np, int64_t k0,
                            int64_t kn, int64_t g, void *out, int out_bf16) {
    for (int64_t k = k0; k < k0 + kn; k += g) {
        float s, base;
        int4_sb(sz, sz_bf16, Np, k / g, r, &s, &base);
        const uint8_t *c = codes + (k - k0);
        if (out_bf16) {
            uint16_t *o = (uint16_t *)out + k;
#pragma omp simd
            for (int64_t kk = 0; kk < g; kk++) o[kk] = f2bf((float)c[kk] * s + base);
        } else {
            float *o = (float *)out + k;
#pragma omp simd
            for (int64_t kk = 0; kk < g; kk++) o[kk] = (float)c[kk] * s + base;
        }
    }
}

/* rows [r0, r1) of the dequantised weight into out ((r1 - r0), Kp), fp32 or bf16. Works a 64-row block
 * (or the short last block) at a time, in chunks of KC columns (a multiple of g): the chunk's bytes are
 * transposed into one code row per weight row, then each row is scaled with contiguous loads/stores. */
#define KC 256
void dsv2_int4_dequant(const uint8_t *packed, const void *sz, int sz_bf16, void *out, int out_bf16,
                       int64_t r0, int64_t r1, int64_t Np, int64_t Kp, int64_t g, int nthreads) {
    const int64_t full = Np / 64, esz = out_bf16 ? 2 : 4;
    const int64_t kc = g >= KC ? g : KC / g * g;
    const int64_t b0 = r0 / 64, b1 = (r1 + 63) / 64;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = b0; b < b1; b++) {
        const int64_t rows = b < full ? 64 : Np - full * 64, half = rows / 2;
        const uint8_t *bp = packed + b * 32 * Kp; /* every earlier block is a full one */
        const int64_t bytes_per_k = b < full ? 32 : half;
#if VW > 1
        if (rows == 64) { /* a dword gather per VW columns reads 4 byte positions: 8 rows' codes */
            for (int64_t j = 0; j < 32; j += 4)
                for (int64_t k = 0; k < Kp; k += VW) {
                    const int64_t i0 = ((k / g) * Np + b * 64) * 2;
                    const vi v = gather32(bp + k * 32 + j);
                    for (int sub = 0; sub < 8; sub++) { /* rows j..j+3 (low nibbles), 32+j..32+j+3 (high) */
                        const int64_t jr = (sub < 4 ? 0 : 32) + j + (sub & 3), r = b * 64 + jr;
                        if (r < r0 || r >= r1) continue;
                        const float sc = load(sz, i0 + jr * 2, sz_bf16), z = load(sz, i0 + jr * 2 + 1, sz_bf16);
                        const vf w = vfma(nib(v, 8 * (sub & 3) + (sub < 4 ? 0 : 4)), vset1(sc), vset1(z - 8.f * sc));
                        store_w(out, (r - r0) * Kp + k, w, out_bf16);
                    }
                }
            continue;
        }
#endif
        uint8_t codes[64][KC > 256 ? KC : 256];
        for (int64_t k0 = 0; k0 < Kp; k0 += kc) {
            const int64_t kn = Kp - k0 < kc ? Kp - k0 : kc;
            for (int64_t kk = 0; kk < kn; kk++) {
                const uint8_t *c = bp + (k0 + kk) * bytes_per_k;
                if (rows == 64) {
                    for (int j = 0; j < 32; j++) {
                        codes[j][kk] = c[j] & 15;
                        codes[32 + j][kk] = c[j] >> 4;
                    }
                } else {
                    for (int64_t j = 0; j < half; j++) {
                        codes[2 * j][kk] = c[j] & 15;
                        codes[2 * j + 1][kk] = c[j] >> 4;
                    }
                }
            }
            for (int64_t j = 0; j < rows; j++) {
                const int64_t r = b * 64 + j;
                if (r < r0 || r >= r1) continue;
                int4_row(codes[j], sz, sz_bf16, r, Np, k0, kn, g, (char *)out + (r - r0) * Kp * esz, out_bf16);
            }
        }
    }
}

/* ---- int4 GEMV: bf16 activations, bf16 scales ------------------------------------------------- */

/* y (M, Np) fp32 = x (M, Kp) bf16 @ W^T for the int4 weight W above (packed, bf16 sz), summing per group
 *   y = sum_g [ scale * sum_k q*x + (zero - 8*scale) * sum_k x ],
 * the code sums exact (bf16 x times a small integer) and accumulated in fp32. xs (M, Kp/g) holds the
 * group sums of x. With AVX512_BF16 + VBMI the codes become bf16 (128 + q) in registers, by one byte
 * permutation, a shift and a bit-select, and two k columns of 16 rows meet their two activations in one
 * vdpbf16ps (the 128 * sum_k x it adds is taken out with the group's zero term); elsewhere, and for the
 * short last block, the plain loop below. */
/* xs (M, Kp / g): the sums of x (M, Kp), fp32 or bf16, over each group of g columns (the int4 zero terms) */
static void int4_group_sums(const void *x, int x_bf16, float *xs, int64_t M, int64_t Kp, int64_t g) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t i = 0; i < Kp / g; i++) {
            float s = 0.f;
            for (int64_t k = i * g; k < (i + 1) * g; k++) s += load(x, m * Kp + k, x_bf16);
            xs[m * (Kp / g) + i] = s;
        }
}

static void int4_block_ref(const uint16_t *x, const int8_t *xq, const float *xd, const float *xs,
                           const uint8_t *packed, const uint16_t *sz, float *y, int64_t M, int64_t Np, int64_t Kp,
                           int64_t g, int64_t b) {
    /* x (bf16) for the exact product; or xq / xd, x rounded to int8 per 32 columns (dsv2_quant_q8): then
       scale * sum_b d_b * sum_{k in b} q_k xq_k, the zero term still from the exact sums xs */
    const int64_t full = Np / 64, rows = b < full ? 64 : Np - full * 64;
    for (int64_t j = 0; j < rows; j++) {
        const int64_t r = b * 64 + j;
        for (int64_t m = 0; m < M; m++) {
            float acc = 0.f;
            for (int64_t k0 = 0; k0 < Kp; k0 += g) {
                float s, base;
                int4_sb(sz, 1, Np, k0 / g, r, &s, &base);
                float dot = 0.f;
                for (int64_t kb = k0; kb < k0 + g; kb += 32) {
                    if (xq) {
                        int32_t t = 0;
                        for (int64_t k = kb; k < kb + 32; k++)
                            t += (int32_t)int4_code(packed, Np, Kp, r, k) * xq[m * Kp + k];
                        dot += (float)t * xd[m * (Kp / 32) + kb / 32];
                    } else {
                        for (int64_t k = kb; k < kb + 32; k++)
                            dot += (float)int4_code(packed, Np, Kp, r, k) * bf2f(x[m * Kp + k]);
                    }
                }
                acc += s * dot + base * xs[m * (Kp / g) + k0 / g];
            }
            y[m * Np + r] = acc;
        }
    }
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* the group closing step for 8 rows r..r+7 of MC activation rows: y += acc * scale + xs * (zero - 8 scale) */
static inline __attribute__((always_inline)) void int4_close8(const __m256 *acc, int64_t acc_stride, int MC,
                                                              const uint16_t *sz, const float *xs, int64_t ng,
                                                              int64_t grp, float *y, int64_t Np, int64_t r) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)(sz + (grp * Np + r) * 2)); /* 8 (scale, zero) pairs */
    const __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    const __m256 z = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000)));
    const __m256 c = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), s, z);
    for (int m = 0; m < MC; m++) {
        float *yr = y + m * Np + r;
        const __m256 o = _mm256_fmadd_ps(acc[m * acc_stride], s, _mm256_loadu_ps(yr));
        _mm256_storeu_ps(yr, _mm256_fmadd_ps(_mm256_set1_ps(xs[m * ng + grp]), c, o));
    }
}
#endif

#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
#define INT4_GEMV_FAST 1
/* one full 64-row block for MC (1..4) activation rows: acc[m][0..3] = rows 0-15, 16-31, 32-47, 48-63 */
static inline __attribute__((always_inline)) void int4_block_fast(const uint16_t *x, const float *xs,
                                                                  const uint8_t *bp, const uint16_t *sz, float *y,
                                                                  const int MC, int64_t Np, int64_t Kp, int64_t g,
                                                                  int64_t row0) {
    /* bytes k*32 + i (k even) hold the codes of column k; k*32 + 32 + i those of column k + 1. Dword lane i
       of A = [byte i of column k, 0, byte i of column k+1, 0], of B the same for byte 16 + i */
    __m512i ia, ib;
    {
        int8_t a[64], bb[64];
        for (int i = 0; i < 16; i++) {
            a[4 * i] = (int8_t)i, a[4 * i + 2] = (int8_t)(32 + i), a[4 * i + 1] = a[4 * i + 3] = 0;
            bb[4 * i] = (int8_t)(16 + i), bb[4 * i + 2] = (int8_t)(48 + i), bb[4 * i + 1] = bb[4 * i + 3] = 0;
        }
        ia = _mm512_loadu_si512(a), ib = _mm512_loadu_si512(bb);
    }
    const __mmask64 even_bytes = 0x5555555555555555ULL;
    const __m512i nib = _mm512_set1_epi32(0x000F000F), bias = _mm512_set1_epi32(0x43004300); /* bf16 128 */
    const __m512i hi16 = _mm512_set1_epi32((int)0xFFFF0000);
    const __m512 c136 = _mm512_set1_ps(136.f);
    const int64_t ng = Kp / g;
    for (int64_t grp = 0; grp < ng; grp++) {
        __m512 acc[4][4];
        for (int m = 0; m < MC; m++)
            for (int q = 0; q < 4; q++) acc[m][q] = _mm512_setzero_ps();
        const uint8_t *p = bp + grp * g * 32;
        /* this group's scales for the next block: a group's (scale, zero) rows lie Np * 4 bytes apart, too
           far for the hardware prefetcher, so each would start a miss */
        for (int q = 0; q < 4; q++) __builtin_prefetch(sz + (grp * Np + row0 + 64 + 16 * q) * 2, 0, 0);
        for (int64_t k = grp * g; k < grp * g + g; k += 2, p += 64) {
            if (MC >= 3) /* the next block's line, so that DRAM stays busy while this one computes (a pass of 1-2 rows
                            is fast enough for the hardware prefetcher alone) */
                __builtin_prefetch(p + 32 * Kp, 0, 0);
            const __m512i src = _mm512_loadu_si512(p);
            const __m512i a = _mm512_maskz_permutexvar_epi8(even_bytes, ia, src);
            const __m512i b = _mm512_maskz_permutexvar_epi8(even_bytes, ib, src);
            __m512bh w[4];
            w[0] = (__m512bh)_mm512_ternarylogic_epi32(a, nib, bias, 0xEA); /* (a & nib) | bias */
            w[1] = (__m512bh)_mm512_ternarylogic_epi32(b, nib, bias, 0xEA);
            w[2] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(a, 4), nib, bias, 0xEA);
            w[3] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(b, 4), nib, bias, 0xEA);
            for (int m = 0; m < MC; m++) {
                int32_t pair;
                memcpy(&pair, x + m * Kp + k, 4);
                const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
                for (int q = 0; q < 4; q++) acc[m][q] = _mm512_dpbf16_ps(acc[m][q], w[q], xb);
            }
        }
        for (int q = 0; q < 4; q++) {
            const int64_t r = row0 + 16 * q;
            const __m512i v = _mm512_loadu_si512(sz + (grp * Np + r) * 2); /* 16 (scale, zero) bf16 pairs */
            const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            const __m512 z = _mm512_castsi512_ps(_mm512_and_si512(v, hi16));
            const __m512 c = _mm512_fnmadd_ps(c136, s, z); /* zero - 136 * scale */
            for (int m = 0; m < MC; m++) {
                float *yr = y + m * Np + r;
                __m512 o = _mm512_fmadd_ps(acc[m][q], s, _mm512_loadu_ps(yr));
                _mm512_storeu_ps(yr, _mm512_fmadd_ps(_mm512_set1_ps(xs[m * ng + grp]), c, o));
            }
        }
    }
}
typedef uint16_t int4_xt; /* the activations the AVX512 path reads: bf16 as given */
static inline void int4_tile(const uint16_t *x, const float *xs, const uint8_t *bp, const uint16_t *sz, float *y,
                             int mc, int64_t Np, int64_t Kp, int64_t g, int64_t row0) {
    switch (mc) {
        case 1: int4_block_fast(x, xs, bp, sz, y, 1, Np, Kp, g, row0); break;
        case 2: int4_block_fast(x, xs, bp, sz, y, 2, Np, Kp, g, row0); break;
        case 3: int4_block_fast(x, xs, bp, sz, y, 3, Np, Kp, g, row0); break;
        default: int4_block_fast(x, xs, bp, sz, y, 4, Np, Kp, g, row0); break;
    }
}
#elif defined(__AVX2__) && defined(__FMA__)
#define INT4_GEMV_FAST 2
/* AVX2: the activations widened to fp32 once (xf), 8 codes at a time zero-extended to dwords, masked or
 * shifted to one nibble, and converted to fp32 (exact), then one FMA per activation row; per group the
 * same closing step as above (no 128 offset here). One activation row: all 64 rows of the block in one pass
 * (8 accumulators). Two to four: the block a quarter (16 rows: 16 bytes' low or high nibbles) at a time, so
 * that 4 rows' accumulators stay in the 16 registers. */
static inline __m256 int4_codes8(const uint8_t *p, int high) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    return _mm256_cvtepi32_ps(high ? _mm256_srli_epi32(v, 4) : _mm256_and_si256(v, _mm256_set1_epi32(15)));
}

static void int4_block_avx2_1(const float *x, const float *xs, const uint8_t *bp, const uint16_t *sz, float *y,
                              int64_t Np, int64_t Kp, int64_t g, int64_t row0) {
    const int64_t ng = Kp / g;
    for (int64_t grp = 0; grp < ng; grp++) {
        __m256 acc[8];
        for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
        for (int i = 0; i < 8; i += 2) __builtin_prefetch(sz + (grp * Np + row0 + 64 + 8 * i) * 2, 0, 0);
        const uint8_t *p = bp + grp * g * 32;
        for (int64_t k = grp * g; k < grp * g + g; k++, p += 32) {
            if ((k & 1) == 0) __builtin_prefetch(p + 32 * Kp, 0, 0); /* the next block, one line per 2 columns */
            const __m256 xv = _mm256_broadcast_ss(x + k);
            for (int i = 0; i < 4; i++) { /* bytes 8i..8i+7: rows 8i.. (low nibbles), 32 + 8i.. (high) */
                const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8 * i)));
                const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
                const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
                acc[i] = _mm256_fmadd_ps(lo, xv, acc[i]);
                acc[4 + i] = _mm256_fmadd_ps(hi, xv, acc[4 + i]);
            }
        }
        for (int i = 0; i < 8; i++) int4_close8(acc + i, 1, 1, sz, xs, ng, grp, y, Np, row0 + 8 * i);
    }
}

static inline __attribute__((always_inline)) void int4_block_avx2_q(const float *x, const float *xs,
                                                                    const uint8_t *bp, const uint16_t *sz, float *y,
                                                                    const int MC, int64_t Np, int64_t Kp, int64_t g,
                                                                    int64_t row0) {
    const int64_t ng = Kp / g;
    for (int quarter = 0; quarter < 4; quarter++) {
        const int64_t off = (quarter & 1) * 16, r = row0 + 16 * (quarter & 1) + 32 * (quarter >> 1);
        const int high = quarter >> 1;
        for (int64_t grp = 0; grp < ng; grp++) {
            __m256 acc[4][2];
            for (int m = 0; m < MC; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
            const uint8_t *p = bp + grp * g * 32 + off;
            for (int64_t k = grp * g; k < grp * g + g; k++, p += 32) {
                if ((k & 7) == 0) /* a quarter of the next block's lines per quarter pass: DRAM stays busy */
                    __builtin_prefetch(bp + 32 * Kp + (quarter * (Kp / 8) + k / 8) * 64, 0, 0);
                const __m256 w0 = int4_codes8(p, high), w1 = int4_codes8(p + 8, high);
                for (int m = 0; m < MC; m++) {
                    const __m256 xv = _mm256_broadcast_ss(x + m * Kp + k);
                    acc[m][0] = _mm256_fmadd_ps(w0, xv, acc[m][0]);
                    acc[m][1] = _mm256_fmadd_ps(w1, xv, acc[m][1]);
                }
            }
            int4_close8(&acc[0][0], 2, MC, sz, xs, ng, grp, y, Np, r);
            int4_close8(&acc[0][1], 2, MC, sz, xs, ng, grp, y, Np, r + 8);
        }
    }
}
typedef float int4_xt; /* the activations the AVX2 path reads: widened to fp32 once */
static inline void int4_tile(const float *x, const float *xs, const uint8_t *bp, const uint16_t *sz, float *y, int mc,
                             int64_t Np, int64_t Kp, int64_t g, int64_t row0) {
    switch (mc) {
        case 1: int4_block_avx2_1(x, xs, bp, sz, y, Np, Kp, g, row0); break;
        case 2: int4_block_avx2_q(x, xs, bp, sz, y, 2, Np, Kp, g, row0); break;
        case 3: int4_block_avx2_q(x, xs, bp, sz, y, 3, Np, Kp, g, row0); break;
        default: int4_block_avx2_q(x, xs, bp, sz, y, 4, Np, Kp, g, row0); break;
    }
}
#else
#define INT4_GEMV_FAST 0
#endif

/* where dsv2_int4_gemv has a vector path: 1 AVX512_BF16 + VBMI, 2 AVX2 + FMA, 0 none (the plain loop, for
 * tests) */
int dsv2_int4_gemv_fast(void) { return INT4_GEMV_FAST; }

void dsv2_int4_gemv(const uint16_t *x, const uint8_t *packed, const uint16_t *sz, float *xs, float *y, int64_t M,
                    int64_t Np, int64_t Kp, int64_t g, int nthreads) {
    const int64_t nb = (Np + 63) / 64;
    int4_group_sums(x, 1, xs, M, Kp, g);
#if INT4_GEMV_FAST == 2
    float *xf = (float *)malloc((size_t)(M * Kp) * sizeof(float));
    if (!xf) { /* cannot happen for a GEMV's rows; leave y as NaN rather than crash */
        for (int64_t i = 0; i < M * Np; i++) y[i] = __builtin_nanf("");
        return;
    }
    for (int64_t i = 0; i < M * Kp; i++) xf[i] = bf2f(x[i]);
    const int4_xt *xv = xf;
#elif INT4_GEMV_FAST
    const int4_xt *xv = x;
#endif
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < nb; b++) {
#if INT4_GEMV_FAST
        if (b < Np / 64) {
            const uint8_t *bp = packed + b * 32 * Kp;
            for (int64_t m0 = 0; m0 < M; m0 += 4) { /* the block stays in L2 across row tiles */
                float *yb = y + m0 * Np + b * 64;
                const int mc = M - m0 < 4 ? (int)(M - m0) : 4;
                for (int m = 0; m < mc; m++) memset(yb + m * Np, 0, 64 * sizeof(float));
                int4_tile(xv + m0 * Kp, xs + m0 * (Kp / g), bp, sz, y + m0 * Np, mc, Np, Kp, g, b * 64);
            }
            continue;
        }
#endif
        int4_block_ref(x, NULL, NULL, xs, packed, sz, y, M, Np, Kp, g, b);
    }
#if INT4_GEMV_FAST == 2
    free(xf);
#endif
}


/* ---- int8 activations (opt-in): x rounded to int8 per 32 columns, integer dot products ---------------------
 *
 * The exact products above convert every weight to fp32 or bf16 before multiplying; on CPUs without
 * AVX512_BF16 that conversion, not the memory, bounds the int8 / int4 GEMVs. Here the activations are rounded
 * instead, once per call, to int8 codes with one fp32 scale per 32 columns (d = amax / 127: llama.cpp's Q8_0
 * rounding, d kept in fp32), and the weights meet them in vpmaddubsw (32 byte products, summed in pairs into
 * int16) without conversion. The result is that of the exact product with x replaced by its rounded copy
 * xq * d, up to fp32 summation order; int4's zero-point term uses the exact group sums of x. */

/* one block of n <= 32 values x[k0 .. k0 + n) rounded: q = rint(x * (1 / d)) to nearest even, d = amax / 127
 * returned (a block of zeros: d = 0, q = 0) */
static inline float q8_block(const void *x, int x_bf16, int64_t k0, int64_t n, int8_t *q) {
    float v[32], amax = 0.f;
    for (int64_t i = 0; i < n; i++) {
        v[i] = load(x, k0 + i, x_bf16);
        amax = fabsf(v[i]) > amax ? fabsf(v[i]) : amax;
    }
    const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
    for (int64_t i = 0; i < n; i++) q[i] = (int8_t)__builtin_rintf(v[i] * id);
    return d;
}

/* x (M, K) fp32 or bf16 -> xq (M, K) int8 and xd (M, ceil(K / 32)) fp32, per 32 columns (a last block may be
 * shorter) */
void dsv2_quant_q8(const void *x, int x_bf16, int8_t *xq, float *xd, int64_t M, int64_t K) {
    const int64_t nb = (K + 31) / 32;
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nb; b++) {
            const int64_t k0 = m * K + b * 32;
            xd[m * nb + b] = q8_block(x, x_bf16, k0, K - b * 32 < 32 ? K - b * 32 : 32, xq + k0);
        }
}

/* x (M, K) replaced by its rounded copy q * d (dsv2_quant_q8's q and d, the product in fp32) into out, fp32 or
 * bf16 (rounded to nearest even): the activations of the rows that take the exact path; one row per thread */
void dsv2_round_q8(const void *x, int x_bf16, void *out, int out_bf16, int64_t M, int64_t K, int nthreads) {
    const int64_t nb = (K + 31) / 32;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nb; b++) {
            const int64_t k0 = m * K + b * 32, n = K - b * 32 < 32 ? K - b * 32 : 32;
            int8_t q[32];
            const float d = q8_block(x, x_bf16, k0, n, q);
            for (int64_t i = 0; i < n; i++) {
                const float r = (float)q[i] * d;
                if (out_bf16)
                    ((uint16_t *)out)[k0 + i] = f2bf(r);
                else
                    ((float *)out)[k0 + i] = r;
            }
        }
}

#if defined(__AVX2__) && defined(__FMA__)
#define Q8_FAST 1
static inline float hsum256(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* 8 int32 partial sums of the 32 products w . x (both int8 in [-127, 127]; ax = |x|) */
static inline __m256i q8_dot32(__m256i w, __m256i x, __m256i ax) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, _mm256_sign_epi8(w, x));
#else /* |x| (unsigned) times w with x's sign: pairs summed into int16 (|sum| <= 2 * 127 * 127), then into int32 */
    const __m256i p = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w, x));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
#endif
}

/* NW (1 or 2) int8 weight rows against up to 4 rounded activation rows: each activation block is loaded
 * once per NW rows, each weight block once per activation rows; the weight rows are sequential streams */
static inline __attribute__((always_inline)) void int8q8_rows(const int8_t *const *wr, const int NW,
                                                              const int8_t *const *xr, const float *const *dr,
                                                              int mc, int64_t K, float out[2][4]) {
    const int64_t nb = K / 32;
    __m256 acc[2][4];
    for (int i = 0; i < NW; i++)
        for (int j = 0; j < mc; j++) acc[i][j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i w[2];
        for (int i = 0; i < NW; i++) w[i] = _mm256_loadu_si256((const __m256i *)(wr[i] + 32 * b));
        for (int j = 0; j < mc; j++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xr[j] + 32 * b)), ax = _mm256_abs_epi8(xv);
            const __m256 d = _mm256_set1_ps(dr[j][b]);
            for (int i = 0; i < NW; i++)
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q8_dot32(w[i], xv, ax)), d, acc[i][j]);
        }
    }
    for (int i = 0; i < NW; i++)
        for (int j = 0; j < mc; j++) {
            int32_t tail = 0; /* a last block of fewer than 32 columns */
            for (int64_t k = nb * 32; k < K; k++) tail += (int32_t)wr[i][k] * xr[j][k];
            out[i][j] = hsum256(acc[i][j]) + (nb * 32 < K ? (float)tail * dr[j][nb] : 0.f);
        }
}
#else
#define Q8_FAST 0
#endif

/* 1 where the int8-activation kernels have their vector path (AVX2), else plain loops for tests */
int dsv2_q8_fast(void) { return Q8_FAST; }

/* y (M, N) fp32 = (xq * xd) (M, K) @ (q * scale)^T for activations rounded by dsv2_quant_q8 */
void dsv2_int8_gemv_q8(const int8_t *xq, const float *xd, const int8_t *q, const void *scale, int scale_bf16,
                       float *y, int64_t M, int64_t N, int64_t K, int nthreads) {
    const int64_t nb = (K + 31) / 32;
    /* one weight row at a time (a single stream: few rows are memory-bound), two from 32 activation rows (each
     * activation block then serves two weight rows: 1.1-1.25x at 64-512 rows, 0.6x at 4, capped at AVX2) */
    const int NW = M >= 32 ? 2 : 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += NW) {
        const int nw = N - n0 < NW ? 1 : NW;
        const int8_t *wr[2] = {q + n0 * K, q + (n0 + nw - 1) * K};
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int mc = M - m0 < 4 ? (int)(M - m0) : 4;
            float out[2][4];
#if Q8_FAST
            const int8_t *xr[4];
            const float *dr[4];
            for (int j = 0; j < mc; j++) xr[j] = xq + (m0 + j) * K, dr[j] = xd + (m0 + j) * nb;
            if (nw == 1) {
                switch (mc) {
                    case 1: int8q8_rows(wr, 1, xr, dr, 1, K, out); break;
                    case 2: int8q8_rows(wr, 1, xr, dr, 2, K, out); break;
                    case 3: int8q8_rows(wr, 1, xr, dr, 3, K, out); break;
                    default: int8q8_rows(wr, 1, xr, dr, 4, K, out); break;
                }
            } else {
                switch (mc) {
                    case 1: int8q8_rows(wr, 2, xr, dr, 1, K, out); break;
                    case 2: int8q8_rows(wr, 2, xr, dr, 2, K, out); break;
                    case 3: int8q8_rows(wr, 2, xr, dr, 3, K, out); break;
                    default: int8q8_rows(wr, 2, xr, dr, 4, K, out); break;
                }
            }
#else
            for (int i = 0; i < nw; i++)
                for (int j = 0; j < mc; j++) {
                    float a = 0.f;
                    for (int64_t b = 0; b < nb; b++) {
                        int32_t s = 0;
                        for (int64_t k = b * 32; k < K && k < b * 32 + 32; k++)
                            s += (int32_t)wr[i][k] * xq[(m0 + j) * K + k];
                        a += (float)s * xd[(m0 + j) * nb + b];
                    }
                    out[i][j] = a;
                }
#endif
            for (int i = 0; i < nw; i++) {
                const float sc = load(scale, n0 + i, scale_bf16);
                for (int j = 0; j < mc; j++) y[(m0 + j) * N + n0 + i] = out[i][j] * sc;
            }
        }
    }
}

#if Q8_FAST
static inline __m256i q8_pair(const int8_t *p) { /* x_k, x_k+1 in every 16-bit lane */
    int16_t v;
    memcpy(&v, p, 2);
    return _mm256_set1_epi16(v);
}

/* int16 sums of 8 column pairs (|sum| <= 8 * 2 * 15 * 127 < 2^15) scaled by the block's d into fp32 */
static inline __m256 q8_widen(__m256i s, int high, __m256 d, __m256 f) {
    const __m128i h = high ? _mm256_extracti128_si256(s, 1) : _mm256_castsi256_si128(s);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(h)), d, f);
}

/* One full 64-row block, one activation row, all rows in one pass. Columns k, k+1 (32 bytes each: the codes
 * of rows 0-31 in the low nibbles, 32-63 in the high) are interleaved bytewise, so that vpmaddubsw multiplies
 * each row's two codes by x_k, x_k+1: unpacklo gives rows 0-7 | 16-23, unpackhi rows 8-15 | 24-31 (lanes of
 * 128 bits), the high nibbles the same 32 rows on. */
static void int4q8_block_1(const int8_t *xq, const float *xd, const float *xs, const uint8_t *bp,
                           const uint16_t *sz, float *y, int64_t Np, int64_t Kp, int64_t g, int64_t row0) {
    static const int oct[4][2] = {{0, 2}, {1, 3}, {4, 6}, {5, 7}}; /* the 8-row groups of s[i]'s two halves */
    const int64_t ng = Kp / g;
    const __m256i m4 = _mm256_set1_epi8(15);
    for (int64_t grp = 0; grp < ng; grp++) {
        __m256 f[8];
        for (int i = 0; i < 8; i++) f[i] = _mm256_setzero_ps();
        for (int i = 0; i < 8; i += 2) __builtin_prefetch(sz + (grp * Np + row0 + 64 + 8 * i) * 2, 0, 0);
        const uint8_t *p = bp + grp * g * 32;
        for (int64_t k0 = grp * g; k0 < grp * g + g; k0 += 16) {
            __m256i s[4];
            for (int i = 0; i < 4; i++) s[i] = _mm256_setzero_si256();
            for (int64_t k = k0; k < k0 + 16; k += 2, p += 64) {
                __builtin_prefetch(p + 32 * Kp, 0, 0); /* the next block's line (one per column pair) */
                const __m256i a = _mm256_loadu_si256((const __m256i *)p), b = _mm256_loadu_si256((const __m256i *)(p + 32));
                const __m256i la = _mm256_and_si256(a, m4), lb = _mm256_and_si256(b, m4);
                const __m256i ha = _mm256_and_si256(_mm256_srli_epi16(a, 4), m4);
                const __m256i hb = _mm256_and_si256(_mm256_srli_epi16(b, 4), m4);
                const __m256i xp = q8_pair(xq + k);
                s[0] = _mm256_add_epi16(s[0], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(la, lb), xp));
                s[1] = _mm256_add_epi16(s[1], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(la, lb), xp));
                s[2] = _mm256_add_epi16(s[2], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(ha, hb), xp));
                s[3] = _mm256_add_epi16(s[3], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(ha, hb), xp));
            }
            const __m256 d = _mm256_set1_ps(xd[k0 / 32]);
            for (int i = 0; i < 4; i++) {
                f[oct[i][0]] = q8_widen(s[i], 0, d, f[oct[i][0]]);
                f[oct[i][1]] = q8_widen(s[i], 1, d, f[oct[i][1]]);
            }
        }
        for (int i = 0; i < 8; i++) int4_close8(f + i, 1, 1, sz, xs, ng, grp, y, Np, row0 + 8 * i);
    }
}

/* One full block, 2-4 activation rows: a quarter (16 rows) at a time, so that the rows' sums fit the registers:
 * 16 bytes of columns k and k+1 interleaved (128-bit unpacks: rows r..r+7, r+8..r+15) make one vector. */
static inline __attribute__((always_inline)) void int4q8_block_q(const int8_t *xq, const float *xd, const float *xs,
                                                                 const uint8_t *bp, const uint16_t *sz, float *y,
                                                                 const int MC, int64_t Np, int64_t Kp, int64_t g,
                                                                 int64_t row0) {
    const int64_t ng = Kp / g, nb = Kp / 32;
    const __m128i m4 = _mm_set1_epi8(15);
    for (int quarter = 0; quarter < 4; quarter++) {
        const int64_t off = (quarter & 1) * 16, r = row0 + 16 * (quarter & 1) + 32 * (quarter >> 1);
        const int shift = 4 * (quarter >> 1);
        for (int64_t grp = 0; grp < ng; grp++) {
            __m256 f[4][2];
            for (int m = 0; m < MC; m++) f[m][0] = f[m][1] = _mm256_setzero_ps();
            const uint8_t *p = bp + grp * g * 32 + off;
            for (int64_t k0 = grp * g; k0 < grp * g + g; k0 += 16) {
                __m256i s[4];
                for (int m = 0; m < MC; m++) s[m] = _mm256_setzero_si256();
                for (int64_t k = k0; k < k0 + 16; k += 2, p += 64) {
                    if ((k & 7) == 0) /* a quarter of the next block's lines per quarter pass */
                        __builtin_prefetch(bp + 32 * Kp + (quarter * (Kp / 8) + k / 8) * 64, 0, 0);
                    const __m128i a = _mm_and_si128(_mm_srli_epi16(_mm_loadu_si128((const __m128i *)p), shift), m4);
                    const __m128i b = _mm_and_si128(_mm_srli_epi16(_mm_loadu_si128((const __m128i *)(p + 32)), shift), m4);
                    const __m256i w = _mm256_set_m128i(_mm_unpackhi_epi8(a, b), _mm_unpacklo_epi8(a, b));
                    for (int m = 0; m < MC; m++)
                        s[m] = _mm256_add_epi16(s[m], _mm256_maddubs_epi16(w, q8_pair(xq + m * Kp + k)));
                }
                for (int m = 0; m < MC; m++) {
                    const __m256 d = _mm256_set1_ps(xd[m * nb + k0 / 32]);
                    f[m][0] = q8_widen(s[m], 0, d, f[m][0]);
                    f[m][1] = q8_widen(s[m], 1, d, f[m][1]);
                }
            }
            int4_close8(&f[0][0], 2, MC, sz, xs, ng, grp, y, Np, r);
            int4_close8(&f[0][1], 2, MC, sz, xs, ng, grp, y, Np, r + 8);
        }
    }
}
#endif

/* The int4 int8-activation kernels' view of x (M, Kp), fp32 or bf16: its int8 codes xq and scales xd per 32
 * columns (dsv2_quant_q8) and its exact group sums xs (M, Kp / g), a row per thread */
static void int4_q8_prepare(const void *x, int x_bf16, int8_t *xq, float *xd, float *xs, int64_t M, int64_t Kp,
                            int64_t g, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const char *xm = (const char *)x + m * Kp * (x_bf16 ? 2 : 4);
        int4_group_sums(xm, x_bf16, xs + m * (Kp / g), 1, Kp, g);
        dsv2_quant_q8(xm, x_bf16, xq + m * Kp, xd + m * (Kp / 32), 1, Kp);
    }
}

/* y (M, Np) fp32 = x (M, Kp) @ W^T for the int4 weight (packed, bf16 sz) with x rounded to int8 per 32
 * columns (into the scratch xq (M, Kp), xd (M, Kp / 32)); xs (M, Kp / g) the exact group sums of x. x is
 * bf16 (x_bf16) or fp32. */
void dsv2_int4_gemv_q8(const void *x, int x_bf16, const uint8_t *packed, const uint16_t *sz, int8_t *xq, float *xd,
                       float *xs, float *y, int64_t M, int64_t Np, int64_t Kp, int64_t g, int nthreads) {
    const int64_t nb = (Np + 63) / 64;
    int4_q8_prepare(x, x_bf16, xq, xd, xs, M, Kp, g, nthreads);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < nb; b++) {
#if Q8_FAST
        if (b < Np / 64) {
            const uint8_t *bp = packed + b * 32 * Kp;
            for (int64_t m0 = 0; m0 < M; m0 += 4) { /* the block stays in L2 across row tiles */
                const int mc = M - m0 < 4 ? (int)(M - m0) : 4;
                for (int m = 0; m < mc; m++) memset(y + (m0 + m) * Np + b * 64, 0, 64 * sizeof(float));
                const int8_t *xm = xq + m0 * Kp;
                const float *dm = xd + m0 * (Kp / 32), *sm = xs + m0 * (Kp / g);
                float *ym = y + m0 * Np;
                switch (mc) {
                    case 1: int4q8_block_1(xm, dm, sm, bp, sz, ym, Np, Kp, g, b * 64); break;
                    case 2: int4q8_block_q(xm, dm, sm, bp, sz, ym, 2, Np, Kp, g, b * 64); break;
                    case 3: int4q8_block_q(xm, dm, sm, bp, sz, ym, 3, Np, Kp, g, b * 64); break;
                    default: int4q8_block_q(xm, dm, sm, bp, sz, ym, 4, Np, Kp, g, b * 64); break;
                }
            }
            continue;
        }
#endif
        int4_block_ref(NULL, xq, xd, xs, packed, sz, y, M, Np, Kp, g, b);
    }
}


/* ---- GEMM on bf16 / int8 / int4 weights as stored, fp32 FMA (CPUs without native bf16 GEMMs) ---------- */

/* y (M, N) fp32 = x (M, K) @ Wᵀ with fp32 products and sums, W as stored: bf16 (N, K); int8 codes times a
 * per-row scale (y = (x @ qᵀ) * scale); int4 in dsv2's pack (dequantised to fp32 as dsv2_int4_dequant does).
 * What PyTorch computes on an fp32 copy of the weight, without the copy.
 * BLIS-style blocking: per thread, a chunk of up to GM_NC weight rows is packed KC columns at a time into
 * panels of 16 rows, [k][16]: as bf16 for bf16 and int8 (int8 codes are exact in bf16), rows i and i + 8
 * sharing a 32-bit lane so that one shift and one mask give the two fp32 vectors; as fp32 for int4. MC rows
 * of x are packed [k][6] as fp32 once per chunk and K block. A 6 x 16 tile of y is 12 fp32 accumulators,
 * each k one or two weight loads, 6 broadcasts and 12 FMAs. */
#define GM_MR 6
#define GM_NR 16
#define GM_KC 512 /* columns per block (bf16 panels: 16 KiB, with 12 KiB of x in L1) */
#define GM_KC4 256 /* ... for fp32 (int4) panels */
#define GM_MC 96
#define GM_NC 1024 /* weight rows per chunk at most (a thread's unit of work; x is packed once per chunk) */
enum { GM_BF16 = 0, GM_INT8 = 1, GM_INT4 = 2 };

#if defined(__AVX2__) && defined(__FMA__)
#define GEMM_FAST 1

/* 8 values of one weight row from column k as 8 bf16 in a 128-bit register */
static inline __m128i gm_row8(const void *w, int w_int8, int64_t k) {
    if (!w_int8) return _mm_loadu_si128((const __m128i *)((const uint16_t *)w + k));
    const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)w + k))));
    const __m256i u = _mm256_srli_epi32(_mm256_castps_si256(f), 16); /* |q| <= 127: exact in bf16 */
    return _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
}

static inline uint16_t gm_one(const void *w, int w_int8, int64_t k) {
    return w_int8 ? f2bf((float)((const int8_t *)w)[k]) : ((const uint16_t *)w)[k];
}

/* n <= 16 weight rows (elements ldw apart, int8 or bf16), columns [k0, k0 + kc) -> one [kc][16] bf16 panel */
static void gm_pack_w(const void *w, int w_int8, int64_t ldw, int64_t n, int64_t k0, int64_t kc, uint16_t *dst) {
    static const uint16_t zero[GM_KC] = {0};
    const void *r[16];
    int wi[16];
    const int esz = w_int8 ? 1 : 2;
    for (int i = 0; i < 16; i++) {
        r[i] = i < n ? (const void *)((const char *)w + (i * ldw + k0) * esz) : (const void *)zero;
        wi[i] = i < n ? w_int8 : 0;
    }
    int64_t k = 0;
    for (; k + 8 <= kc; k += 8) {
        __m256 v[8];
        for (int i = 0; i < 8; i++) {
            const __m128i lo = gm_row8(r[i], wi[i], k), hi = gm_row8(r[i + 8], wi[i + 8], k);
            v[i] = _mm256_castsi256_ps(_mm256_set_m128i(_mm_unpackhi_epi16(lo, hi), _mm_unpacklo_epi16(lo, hi)));
        }
        /* v[i] holds lanes k..k+7 of panel lane i: transpose 8 x 8 dwords */
        const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
        const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
        const __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
        const __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
        const __m256 s[8] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xEE),
                             _mm256_shuffle_ps(t1, t3, 0x44), _mm256_shuffle_ps(t1, t3, 0xEE),
                             _mm256_shuffle_ps(t4, t6, 0x44), _mm256_shuffle_ps(t4, t6, 0xEE),
                             _mm256_shuffle_ps(t5, t7, 0x44), _mm256_shuffle_ps(t5, t7, 0xEE)};
        float *d = (float *)(dst + k * 16);
        for (int j = 0; j < 4; j++) {
            _mm256_store_ps(d + j * 8, _mm256_permute2f128_ps(s[j], s[j + 4], 0x20));
            _mm256_store_ps(d + (j + 4) * 8, _mm256_permute2f128_ps(s[j], s[j + 4], 0x31));
        }
    }
    for (; k < kc; k++)
        for (int i = 0; i < 8; i++) {
            dst[k * 16 + 2 * i] = gm_one(r[i], wi[i], k);
            dst[k * 16 + 2 * i + 1] = gm_one(r[i + 8], wi[i + 8], k);
        }
}

/* int4 rows [j, j + 16) (j % 16 == 0, all stored), columns [k0, k0 + kc) -> one [kc][16] fp32 panel */
static void gm_pack_w4(const uint8_t *packed, const void *sz, int sz_bf16, int64_t Np, int64_t Kp, int64_t g,
                       int64_t j, int64_t k0, int64_t kc, float *dst) {
    float s[16], base[16];
    const int64_t jr = j % 64, full_block = j / 64 < Np / 64;
    const uint8_t *bp = packed + (j / 64) * 32 * Kp + (jr & 31);
    for (int64_t k = k0; k < k0 + kc;) {
        const int64_t gi = k / g, kend = (gi + 1) * g < k0 + kc ? (gi + 1) * g : k0 + kc;
        for (int i = 0; i < 16; i++) int4_sb(sz, sz_bf16, Np, gi, j + i, s + i, base + i);
        const __m256 s0 = _mm256_loadu_ps(s), s1 = _mm256_loadu_ps(s + 8);
        const __m256 z0 = _mm256_loadu_ps(base), z1 = _mm256_loadu_ps(base + 8);
        for (; k < kend; k++) {
            float *d = dst + (k - k0) * 16;
            if (full_block) { /* 16 consecutive bytes: the rows' codes in the low or the high nibbles */
                __m128i v = _mm_loadu_si128((const __m128i *)(bp + k * 32));
                v = _mm_and_si128(jr < 32 ? v : _mm_srli_epi16(v, 4), _mm_set1_epi8(15));
                const __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
                const __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)));
                _mm256_store_ps(d, _mm256_fmadd_ps(q0, s0, z0));
                _mm256_store_ps(d + 8, _mm256_fmadd_ps(q1, s1, z1));
            } else {
                for (int i = 0; i < 16; i++) d[i] = (float)int4_code(packed, Np, Kp, j + i, k) * s[i] + base[i];
            }
        }
    }
}

/* m rows of x (fp32 or bf16, ldx apart), columns [k0, k0 + kc) -> [m/6][kc][6] fp32, missing rows zero */
static void gm_pack_x(const void *x, int x_bf16, int64_t ldx, int64_t m, int64_t k0, int64_t kc, float *dst) {
    for (int64_t i0 = 0; i0 < m; i0 += GM_MR) {
        float *d = dst + i0 * kc;
        for (int i = 0; i < GM_MR; i++) {
            if (i0 + i < m) {
                const int64_t o = (i0 + i) * ldx + k0;
                if (x_bf16)
                    for (int64_t k = 0; k < kc; k++) d[k * GM_MR + i] = bf2f(((const uint16_t *)x)[o + k]);
                else
                    for (int64_t k = 0; k < kc; k++) d[k * GM_MR + i] = ((const float *)x)[o + k];
            } else {
                for (int64_t k = 0; k < kc; k++) d[k * GM_MR + i] = 0.f;
            }
        }
    }
}

/* one row of a tile into y (nr <= 16 columns): [y +] (v0, v1), then times the per-column scale s where given */
static inline __attribute__((always_inline)) void gm_put(float *yi, __m256 v0, __m256 v1, int accum, const float *s,
                                                         int nr) {
    if (nr == GM_NR) {
        if (accum) v0 = _mm256_add_ps(v0, _mm256_loadu_ps(yi)), v1 = _mm256_add_ps(v1, _mm256_loadu_ps(yi + 8));
        if (s) v0 = _mm256_mul_ps(v0, _mm256_loadu_ps(s)), v1 = _mm256_mul_ps(v1, _mm256_loadu_ps(s + 8));
        _mm256_storeu_ps(yi, v0);
        _mm256_storeu_ps(yi + 8, v1);
    } else {
        float t[16];
        _mm256_storeu_ps(t, v0);
        _mm256_storeu_ps(t + 8, v1);
        for (int j = 0; j < nr; j++) {
            const float r = accum ? yi[j] + t[j] : t[j];
            yi[j] = s ? r * s[j] : r;
        }
    }
}

/* column k of a weight panel as two fp32 vectors (panel rows 0-7, 8-15): fp32 panels as stored, bf16 pairs
 * split by a shift (row i) and a mask (row i + 8) */
static inline __attribute__((always_inline)) void gm_col(const int f32, const void *b, int64_t k, __m256 *b0,
                                                         __m256 *b1) {
    if (f32) {
        *b0 = _mm256_load_ps((const float *)b + k * 16);
        *b1 = _mm256_load_ps((const float *)b + k * 16 + 8);
    } else {
        const __m256i raw = _mm256_load_si256((const __m256i *)((const uint16_t *)b + k * 16));
        *b0 = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
        *b1 = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32((int)0xFFFF0000u)));
    }
}

/* y tile (mr <= 6, nr <= 16) = [prev +] a (kc, 6) . b (kc, 16: bf16 pairs, or fp32 when f32); then times the
 * per-column scale s where given (the last K block) */
static inline __attribute__((always_inline)) void gm_tile(const int f32, int64_t kc, const float *a, const void *b,
                                                          float *y, int64_t ldy, int accum, const float *s, int mr,
                                                          int nr) {
    /* twelve named accumulators: an indexed array is not always kept in registers */
    /* y's rows (a line each): in DRAM or L3 for big outputs; fetched now, they are in L1 by the tile's end (+1-13%
     * at 128-512 rows, one Zen 3 core 1.1-1.17x) */
    for (int i = 0; i < mr; i++) _mm_prefetch((const char *)(y + i * ldy), _MM_HINT_T0);
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int64_t k = 0; k < kc; k++) {
        __m256 b0, b1;
        gm_col(f32, b, k, &b0, &b1);
        const float *ak = a + k * GM_MR;
#define GM_ROW(i)                                                                                                   \
    do {                                                                                                            \
        const __m256 av = _mm256_broadcast_ss(ak + i);                                                              \
        c##i##0 = _mm256_fmadd_ps(av, b0, c##i##0);                                                                 \
        c##i##1 = _mm256_fmadd_ps(av, b1, c##i##1);                                                                 \
    } while (0)
        GM_ROW(0); GM_ROW(1); GM_ROW(2); GM_ROW(3); GM_ROW(4); GM_ROW(5);
#undef GM_ROW
    }
    const __m256 c[GM_MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    for (int i = 0; i < mr; i++) gm_put(y + i * ldy, c[i][0], c[i][1], accum, s, nr);
}

/* The last 1-3 rows of x's 6-row blocks (mr, a constant where inlined), against two weight panels at once (b,
 * nr columns; b2, nr2 columns, 0: none): up to 3 x 32 columns in 12 accumulators. gm_tile on 1-3 rows would
 * spend a whole tile's time (its 12 FMA chains run to the end whatever mr is; fewer chains would wait on the
 * FMAs' latency): 32 rows of x cost what 36 did. Each sum runs over k in gm_tile's order: a row's result does
 * not depend on where it falls in x. */
static inline __attribute__((always_inline)) void gm_tile2(const int f32, const int mr, int64_t kc, const float *a,
                                                           const void *b, const void *b2, float *y, int64_t ldy,
                                                           int accum, const float *s, int nr, int nr2) {
    for (int i = 0; i < mr; i++) {
        _mm_prefetch((const char *)(y + i * ldy), _MM_HINT_T0);
        if (nr2) _mm_prefetch((const char *)(y + i * ldy + GM_NR), _MM_HINT_T0);
    }
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00;
    __m256 c13 = c00, c20 = c00, c21 = c00, c22 = c00, c23 = c00;
    for (int64_t k = 0; k < kc; k++) {
        __m256 b0, b1, b2v, b3;
        gm_col(f32, b, k, &b0, &b1);
        gm_col(f32, b2, k, &b2v, &b3);
        const float *ak = a + k * GM_MR;
#define GM_ROW2(i)                                                                                                  \
    do {                                                                                                            \
        const __m256 av = _mm256_broadcast_ss(ak + i);                                                              \
        c##i##0 = _mm256_fmadd_ps(av, b0, c##i##0);                                                                 \
        c##i##1 = _mm256_fmadd_ps(av, b1, c##i##1);                                                                 \
        c##i##2 = _mm256_fmadd_ps(av, b2v, c##i##2);                                                                \
        c##i##3 = _mm256_fmadd_ps(av, b3, c##i##3);                                                                 \
    } while (0)
        GM_ROW2(0);
        if (mr > 1) GM_ROW2(1);
        if (mr > 2) GM_ROW2(2);
#undef GM_ROW2
    }
    const __m256 c[3][4] = {{c00, c01, c02, c03}, {c10, c11, c12, c13}, {c20, c21, c22, c23}};
    for (int i = 0; i < mr; i++) {
        gm_put(y + i * ldy, c[i][0], c[i][1], accum, s, nr);
        if (nr2) gm_put(y + i * ldy + GM_NR, c[i][2], c[i][3], accum, s ? s + GM_NR : NULL, nr2);
    }
}
#else
#define GEMM_FAST 0
#endif

#if GEMM_FAST
/* The GEMMs' units of work: chunks of whole 16-row panels (up to GM_NC rows), a multiple of the thread count
 * where there are enough panels; *per = panels per chunk (the last chunk may have fewer) */
static int64_t gm_chunks(int64_t panels, int nthreads, int64_t *per) {
    int64_t chunks = (panels + GM_NC / GM_NR - 1) / (GM_NC / GM_NR);
    if (chunks % nthreads) chunks += nthreads - chunks % nthreads;
    if (chunks > panels) chunks = panels;
    *per = (panels + chunks - 1) / chunks;
    return (panels + *per - 1) / *per;
}
#endif

/* 2: the vector path, on a build without AVX512F (where it is the fastest fp32 GEMM: MKL / oneDNN run the same
 * 256-bit FMAs, on an fp32 copy); 1: the vector path beside AVX512F (tests call it; the callers keep
 * PyTorch's 512-bit GEMMs there); 0: a plain loop */
int dsv2_gemm_fast(void) {
#if GEMM_FAST && !defined(__AVX512F__)
    return 2;
#else
    return GEMM_FAST;
#endif
}

/* y (M, N) fp32, ldy apart = x (M, K; fp32 or bf16, ldx apart) @ Wᵀ for W of kind w_kind:
 *   GM_BF16: w (N, K) bf16, rows ldw elements apart;
 *   GM_INT8: w (N, K) int8 codes, rows ldw apart, scale (N,) fp32/bf16: y = (x @ qᵀ) * scale;
 *   GM_INT4: w dsv2's pack of ldw (= Np >= N, a multiple of 16) rows and K columns, scale its
 *            scales_and_zeros (K/g, Np, 2) fp32/bf16, g the group size. */
void dsv2_gemm(const void *x, int x_bf16, int64_t ldx, const void *w, int w_kind, int64_t ldw, const void *scale,
               int scale_bf16, int64_t g, float *y, int64_t ldy, int64_t M, int64_t N, int64_t K, int nthreads) {
    if (M <= 0 || N <= 0) return;
    float *sf = NULL;
    if (w_kind == GM_INT8) {
        sf = (float *)malloc((size_t)N * sizeof(float));
        if (!sf) { /* no memory for N floats: a result that cannot be mistaken for one */
            for (int64_t i = 0; i < M; i++)
                for (int64_t j = 0; j < N; j++) y[i * ldy + j] = __builtin_nanf("");
            return;
        }
        for (int64_t j = 0; j < N; j++) sf[j] = load(scale, j, scale_bf16);
    }
#if GEMM_FAST
    /* one packing buffer pair per thread, allocated here (an allocation that fails leaves the plain loop below) */
    const int64_t panels = (N + GM_NR - 1) / GM_NR;
    int64_t per; /* panels per chunk */
    const int64_t chunks = gm_chunks(panels, nthreads, &per);
    const int f32 = w_kind == GM_INT4, esz = w_kind == GM_INT8 ? 1 : 2;
    const int64_t kb = f32 ? GM_KC4 : GM_KC, pesz = f32 ? 4 : 2; /* K block, panel element bytes */
    const size_t wsz = (size_t)(per * GM_NR * kb * pesz), xsz = (size_t)(GM_MC * kb) * sizeof(float);
    char *wbuf = K > 0 ? (char *)aligned_alloc(64, wsz * (size_t)nthreads) : NULL;
    char *xbuf = K > 0 ? (char *)aligned_alloc(64, xsz * (size_t)nthreads) : NULL;
    if (wbuf && xbuf) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int t = 0; t < nthreads; t++) {
            char *wp = wbuf + wsz * (size_t)t;
            float *xp = (float *)(xbuf + xsz * (size_t)t);
            for (int64_t ch = t; ch < chunks; ch += nthreads) {
                const int64_t j0 = ch * per * GM_NR, j1 = j0 + per * GM_NR < N ? j0 + per * GM_NR : N;
                for (int64_t k0 = 0; k0 < K; k0 += kb) {
                    const int64_t kc = K - k0 < kb ? K - k0 : kb;
                    const int last = k0 + kc == K;
                    for (int64_t j = j0; j < j1; j += GM_NR) {
                        char *panel = wp + (j - j0) * kc * pesz;
                        if (f32)
                            gm_pack_w4((const uint8_t *)w, scale, scale_bf16, ldw, K, g, j, k0, kc, (float *)panel);
                        else
                            gm_pack_w((const char *)w + j * ldw * esz, w_kind == GM_INT8, ldw,
                                      j1 - j < GM_NR ? j1 - j : GM_NR, k0, kc, (uint16_t *)panel);
                    }
                    for (int64_t i0 = 0; i0 < M; i0 += GM_MC) {
                        const int64_t mc = M - i0 < GM_MC ? M - i0 : GM_MC;
                        gm_pack_x((const char *)x + i0 * ldx * (x_bf16 ? 2 : 4), x_bf16, ldx, mc, k0, kc, xp);
                        /* a last block of 1-3 rows goes two panels at a time (gm_tile2), the rest in 6 x 16 tiles */
                        const int64_t rest = mc % GM_MR <= 3 ? mc % GM_MR : 0, mt = mc - rest;
                        for (int64_t j = j0; j < j1; j += GM_NR) {
                            const char *panel = wp + (j - j0) * kc * pesz;
                            const int nr = j1 - j < GM_NR ? (int)(j1 - j) : GM_NR;
                            const float *s = last && sf ? sf + j : NULL;
                            for (int64_t i = 0; i < mt; i += GM_MR) {
                                const int mr = mt - i < GM_MR ? (int)(mt - i) : GM_MR;
                                float *yt = y + (i0 + i) * ldy + j;
                                if (f32)
                                    gm_tile(1, kc, xp + i * kc, panel, yt, ldy, k0 > 0, NULL, mr, nr);
                                else
                                    gm_tile(0, kc, xp + i * kc, panel, yt, ldy, k0 > 0, s, mr, nr);
                            }
                        }
                        for (int64_t j = j0; rest && j < j1; j += 2 * GM_NR) {
                            const char *panel = wp + (j - j0) * kc * pesz;
                            const int nr = j1 - j < GM_NR ? (int)(j1 - j) : GM_NR;
                            const int nr2 = j1 - j <= GM_NR ? 0 : j1 - j - GM_NR < GM_NR ? (int)(j1 - j - GM_NR) : GM_NR;
                            const char *panel2 = nr2 ? panel + GM_NR * kc * pesz : panel; /* none: the first again */
                            const float *s = last && sf ? sf + j : NULL, *a = xp + mt * kc;
                            float *yt = y + (i0 + mt) * ldy + j;
#define GM_REST(F, MR) gm_tile2(F, MR, kc, a, panel, panel2, yt, ldy, k0 > 0, F ? NULL : s, nr, nr2)
                            if (f32)
                                rest == 1 ? GM_REST(1, 1) : rest == 2 ? GM_REST(1, 2) : GM_REST(1, 3);
                            else
                                rest == 1 ? GM_REST(0, 1) : rest == 2 ? GM_REST(0, 2) : GM_REST(0, 3);
#undef GM_REST
                        }
                    }
                }
            }
        }
        free(wbuf), free(xbuf), free(sf);
        return;
    }
    free(wbuf), free(xbuf);
#endif
    /* the plain loop: builds without AVX2 + FMA (tests), K = 0, or no memory for the packing buffers */
#pragma omp parallel for collapse(2) num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < N; j++) {
            float acc = 0.f, s, base;
            for (int64_t k = 0; k < K; k++) {
                float wv;
                if (w_kind == GM_INT4) {
                    int4_sb(scale, scale_bf16, ldw, k / g, j, &s, &base);
                    wv = (float)int4_code((const uint8_t *)w, ldw, K, j, k) * s + base;
                } else {
                    wv = w_kind == GM_INT8 ? (float)((const int8_t *)w)[j * ldw + k]
                                           : bf2f(((const uint16_t *)w)[j * ldw + k]);
                }
                acc += load(x, i * ldx + k, x_bf16) * wv;
            }
            y[i * ldy + j] = sf ? acc * sf[j] : acc;
        }
    free(sf);
}


/* ---- 9-16 rows of x against bf16 weights as stored (AVX2) ------------------------------------------------- */

/* The GEMV's 4 x 4 tiles spill on 16 registers and re-read x from L2 for every 4 weight rows; here x (up to 16
 * rows) is packed once, [k][16] fp32, and each weight row's bf16 pairs (k, k + 1) are broadcast as one 32-bit
 * load, a shift and a mask giving the two fp32 broadcasts: a tile of 6 weight rows x 16 rows of x is 12
 * accumulators, per two columns 6 broadcasts, 4 x loads and 24 FMAs; no packing of the weight. 1.15-1.18x the
 * GEMV at 16 rows (three MLP / lm_head shapes, 2 Zen 4 cores capped at AVX2). Returns 0 (nothing done) where
 * it does not apply: M outside 9..16, odd K, a build without the vector path or with AVX512F (the GEMV's
 * 512-bit tiles do not spill there), or no memory for the packed x. */
static int bf16_rows16(const float *x, const uint16_t *w, int64_t ldw, float *y, int64_t M, int64_t N, int64_t K,
                       int nthreads) {
#if GEMM_FAST && !defined(__AVX512F__)
    if (M < 9 || M > 16 || K % 2 || K == 0) return 0;
    float *xp = (float *)aligned_alloc(64, (size_t)K * 16 * sizeof(float));
    if (!xp) return 0;
    for (int64_t k = 0; k < K; k++)
        for (int64_t m = 0; m < 16; m++) xp[k * 16 + m] = m < M ? x[m * K + k] : 0.f;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += 6) {
        const int nr = N - n0 < 6 ? (int)(N - n0) : 6;
        const uint16_t *wr[6];
        for (int i = 0; i < 6; i++) wr[i] = w + (n0 + (i < nr ? i : 0)) * ldw; /* a short tile repeats its first row */
        const uint16_t *w0 = wr[0], *w1 = wr[1], *w2 = wr[2], *w3 = wr[3], *w4 = wr[4], *w5 = wr[5];
        const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000u);
        __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
        __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
        for (int64_t k = 0; k < K; k += 2) {
            const float *xk = xp + k * 16;
            const __m256 a0 = _mm256_load_ps(xk), a1 = _mm256_load_ps(xk + 8); /* column k, rows 0-7 / 8-15 */
            const __m256 b0 = _mm256_load_ps(xk + 16), b1 = _mm256_load_ps(xk + 24); /* column k + 1 */
#define R16_ROW(i)                                                                                                  \
    do {                                                                                                            \
        const __m256i p = _mm256_castps_si256(_mm256_broadcast_ss((const float *)(w##i + k)));                      \
        const __m256 lo = _mm256_castsi256_ps(_mm256_slli_epi32(p, 16));  /* w[k] */                                \
        const __m256 hh = _mm256_castsi256_ps(_mm256_and_si256(p, hi));   /* w[k + 1] */                            \
        c##i##0 = _mm256_fmadd_ps(lo, a0, c##i##0);                                                                 \
        c##i##1 = _mm256_fmadd_ps(lo, a1, c##i##1);                                                                 \
        c##i##0 = _mm256_fmadd_ps(hh, b0, c##i##0);                                                                 \
        c##i##1 = _mm256_fmadd_ps(hh, b1, c##i##1);                                                                 \
    } while (0)
            R16_ROW(0); R16_ROW(1); R16_ROW(2); R16_ROW(3); R16_ROW(4); R16_ROW(5);
#undef R16_ROW
        }
        const __m256 c[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
        float t[16];
        for (int i = 0; i < nr; i++) {
            _mm256_storeu_ps(t, c[i][0]);
            _mm256_storeu_ps(t + 8, c[i][1]);
            for (int64_t m = 0; m < M; m++) y[m * N + n0 + i] = t[m];
        }
    }
    free(xp);
    return 1;
#else
    (void)x, (void)w, (void)ldw, (void)y, (void)M, (void)N, (void)K, (void)nthreads;
    return 0;
#endif
}


/* ---- int4 weights x int8 activations: an integer GEMM (AVX2) --------------------------------------------- */

/* y (M, Np) fp32 = what dsv2_int4_gemv_q8 computes (x rounded to int8 per 32 columns, the zero-point term
 * from the exact group sums), for many rows: BLIS-style like dsv2_gemm. Per thread a chunk of up to GM_NC
 * weight rows is unpacked GQ_KC columns at a time into panels of 16 rows of one code per byte, four columns
 * of a row side by side ([k/4][16][4]: rows 0-7, then 8-15), beside the groups' scales and bases as fp32;
 * the int8 codes of x as four-column words [k/4][3]. A 3 x 16 tile: per four columns two weight loads,
 * three broadcasts and six vpmaddubsw (codes 0..15 times x in [-127, 127]: 32 products each) summed in
 * int16 over the 32-column block (|sum| <= 8 * 2 * 15 * 127 < 2^15), widened, times the block's d into
 * fp32, and at each group's end times the scale into y with the base times x's group sum. vpmaddubsw
 * makes 32 products per instruction where an fp32 FMA makes 8: ~1.3x the fp32 GEMM's rate measured
 * (2 Zen 4 cores capped at AVX2). */
#define GQ_MR 3
#define GQ_KC 512 /* a multiple of every group size up to 256 (larger ones do not exist) */

#if Q8_FAST
/* rows [j, j + 16) (j % 16 == 0) of the pack, columns [k0, k0 + kc): codes -> dst [kc/4][16][4]; the groups'
 * scales and bases -> sb [kc/g][2][16] */
static void gq_pack_w(const uint8_t *packed, const uint16_t *sz, int64_t Np, int64_t Kp, int64_t g, int64_t j,
                      int64_t k0, int64_t kc, uint8_t *dst, float *sb) {
    for (int64_t gi = k0 / g; gi < (k0 + kc) / g; gi++)
        for (int i = 0; i < 16; i++) {
            float *o = sb + (gi - k0 / g) * 32;
            int4_sb(sz, 1, Np, gi, j + i, o + i, o + 16 + i);
        }
    if (j / 64 < Np / 64) { /* a full block: the 16 rows' codes are 16 consecutive low or high nibbles */
        const uint8_t *bp = packed + (j / 64) * 32 * Kp + (j % 64 & 31);
        const int sh = j % 64 < 32 ? 0 : 4;
        const __m128i m4 = _mm_set1_epi8(15);
        for (int64_t k = k0; k < k0 + kc; k += 4) {
            __m128i a[4];
            for (int c = 0; c < 4; c++)
                a[c] = _mm_and_si128(_mm_srli_epi16(_mm_loadu_si128((const __m128i *)(bp + (k + c) * 32)), sh), m4);
            const __m128i l01 = _mm_unpacklo_epi8(a[0], a[1]), h01 = _mm_unpackhi_epi8(a[0], a[1]);
            const __m128i l23 = _mm_unpacklo_epi8(a[2], a[3]), h23 = _mm_unpackhi_epi8(a[2], a[3]);
            __m128i *d = (__m128i *)(dst + (k - k0) * 16);
            _mm_store_si128(d, _mm_unpacklo_epi16(l01, l23));     /* rows 0-3 */
            _mm_store_si128(d + 1, _mm_unpackhi_epi16(l01, l23)); /* rows 4-7 */
            _mm_store_si128(d + 2, _mm_unpacklo_epi16(h01, h23)); /* rows 8-11 */
            _mm_store_si128(d + 3, _mm_unpackhi_epi16(h01, h23)); /* rows 12-15 */
        }
    } else {
        for (int64_t k = k0; k < k0 + kc; k++)
            for (int i = 0; i < 16; i++)
                dst[(k - k0) / 4 * 64 + i * 4 + k % 4] = (uint8_t)int4_code(packed, Np, Kp, j + i, k);
    }
}

/* y tile (mr <= 3, nr <= 16) [+]= the product over columns [0, kc) of one K block */
static inline __attribute__((always_inline)) void gq_tile(int64_t kc, int64_t g, const int32_t *a, const float *d,
                                                          const float *xs, const uint8_t *b, const float *sb,
                                                          float *y, int64_t ldy, int accum, int mr, int nr) {
    float t[GQ_MR][16];
    for (int i = 0; i < GQ_MR; i++)
        for (int j = 0; j < 16; j++) t[i][j] = accum && i < mr && j < nr ? y[i * ldy + j] : 0.f;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t k0 = 0; k0 < kc; k0 += g) {
        __m256 f00 = _mm256_setzero_ps(), f01 = f00, f10 = f00, f11 = f00, f20 = f00, f21 = f00;
        for (int64_t kb = k0; kb < k0 + g; kb += 32) {
            __m256i s00 = _mm256_setzero_si256(), s01 = s00, s10 = s00, s11 = s00, s20 = s00, s21 = s00;
            for (int64_t kq = kb / 4; kq < kb / 4 + 8; kq++) {
                const __m256i b0 = _mm256_load_si256((const __m256i *)(b + kq * 64));
                const __m256i b1 = _mm256_load_si256((const __m256i *)(b + kq * 64 + 32));
#define GQ_ROW(i)                                                                                                   \
    do {                                                                                                            \
        const __m256i av = _mm256_set1_epi32(a[kq * GQ_MR + i]);                                                    \
        s##i##0 = _mm256_add_epi16(s##i##0, _mm256_maddubs_epi16(b0, av));                                          \
        s##i##1 = _mm256_add_epi16(s##i##1, _mm256_maddubs_epi16(b1, av));                                          \
    } while (0)
                GQ_ROW(0); GQ_ROW(1); GQ_ROW(2);
#undef GQ_ROW
            }
            const float *db = d + kb / 32 * GQ_MR;
#define GQ_WIDEN(i)                                                                                                 \
    do {                                                                                                            \
        const __m256 dv = _mm256_broadcast_ss(db + i);                                                              \
        f##i##0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s##i##0, ones)), dv, f##i##0);               \
        f##i##1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s##i##1, ones)), dv, f##i##1);               \
    } while (0)
            GQ_WIDEN(0); GQ_WIDEN(1); GQ_WIDEN(2);
#undef GQ_WIDEN
        }
        const float *sg = sb + k0 / g * 32, *xg = xs + k0 / g * GQ_MR;
        const __m256 s0 = _mm256_loadu_ps(sg), s1 = _mm256_loadu_ps(sg + 8);
        const __m256 z0 = _mm256_loadu_ps(sg + 16), z1 = _mm256_loadu_ps(sg + 24);
        const __m256 fs[GQ_MR][2] = {{f00, f01}, {f10, f11}, {f20, f21}};
        for (int i = 0; i < GQ_MR; i++) {
            const __m256 xv = _mm256_broadcast_ss(xg + i);
            _mm256_storeu_ps(t[i], _mm256_fmadd_ps(xv, z0, _mm256_fmadd_ps(fs[i][0], s0, _mm256_loadu_ps(t[i]))));
            _mm256_storeu_ps(t[i] + 8, _mm256_fmadd_ps(xv, z1, _mm256_fmadd_ps(fs[i][1], s1, _mm256_loadu_ps(t[i] + 8))));
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) y[i * ldy + j] = t[i][j];
}
#endif

/* y (M, Np) fp32 = dsv2_int4_gemv_q8's product (same arguments and scratch), by the integer GEMM above; the
 * GEMVs where it is not built or its buffers cannot be allocated */
void dsv2_int4_gemm_q8(const void *x, int x_bf16, const uint8_t *packed, const uint16_t *sz, int8_t *xq, float *xd,
                       float *xs, float *y, int64_t M, int64_t Np, int64_t Kp, int64_t g, int nthreads) {
#if Q8_FAST
    const int64_t panels = Np / 16, nb = Kp / 32, ng = Kp / g, kb = g > GQ_KC ? g : GQ_KC;
    int64_t per;
    const int64_t chunks = gm_chunks(panels, nthreads, &per);
    const int64_t mcs = (GM_MC + GQ_MR - 1) / GQ_MR; /* micro-panels of x per MC block */
    /* per thread (64-byte multiples): the chunk's panels + scales and bases; MC rows of x's micro-panels */
    const size_t wsz = ((size_t)(per * 16 * kb + per * 32 * (kb / g) * sizeof(float)) + 63) / 64 * 64;
    const size_t xsz = ((size_t)mcs * GQ_MR * (size_t)(kb + (kb / 32 + kb / g) * sizeof(float)) + 63) / 64 * 64;
    char *wbuf = M > 0 && Kp > 0 ? (char *)aligned_alloc(64, wsz * (size_t)nthreads) : NULL;
    char *xbuf = M > 0 && Kp > 0 ? (char *)aligned_alloc(64, xsz * (size_t)nthreads) : NULL;
    if (wbuf && xbuf) {
        int4_q8_prepare(x, x_bf16, xq, xd, xs, M, Kp, g, nthreads);
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int t = 0; t < nthreads; t++) {
            uint8_t *wp = (uint8_t *)(wbuf + wsz * (size_t)t);
            char *xp = xbuf + xsz * (size_t)t;
            for (int64_t ch = t; ch < chunks; ch += nthreads) {
                const int64_t j0 = ch * per * 16, j1 = j0 + per * 16 < Np ? j0 + per * 16 : Np;
                for (int64_t k0 = 0; k0 < Kp; k0 += kb) {
                    const int64_t kc = Kp - k0 < kb ? Kp - k0 : kb, gc = kc / g;
                    float *sbp = (float *)(wp + per * 16 * kc);
                    for (int64_t j = j0; j < j1; j += 16)
                        gq_pack_w(packed, sz, Np, Kp, g, j, k0, kc, wp + (j - j0) * kc, sbp + (j - j0) / 16 * 32 * gc);
                    for (int64_t i0 = 0; i0 < M; i0 += GM_MC) {
                        const int64_t mc = M - i0 < GM_MC ? M - i0 : GM_MC;
                        /* x micro-panels: [kc/4][3] code words, then [kc/32][3] d, then [kc/g][3] group sums */
                        const size_t psz = GQ_MR * (size_t)(kc + (kc / 32 + gc) * sizeof(float));
                        for (int64_t i = 0; i < mc; i += GQ_MR) {
                            int32_t *pa = (int32_t *)(xp + (size_t)(i / GQ_MR) * psz);
                            float *pd = (float *)(pa + kc / 4 * GQ_MR), *ps = pd + kc / 32 * GQ_MR;
                            for (int r = 0; r < GQ_MR; r++) {
                                const int64_t m = i0 + i + r;
                                for (int64_t q = 0; q < kc / 4; q++) {
                                    int32_t v = 0;
                                    if (m < M) memcpy(&v, xq + m * Kp + k0 + 4 * q, 4);
                                    pa[q * GQ_MR + r] = v;
                                }
                                for (int64_t q = 0; q < kc / 32; q++) pd[q * GQ_MR + r] = m < M ? xd[m * nb + k0 / 32 + q] : 0.f;
                                for (int64_t q = 0; q < gc; q++) ps[q * GQ_MR + r] = m < M ? xs[m * ng + k0 / g + q] : 0.f;
                            }
                        }
                        for (int64_t j = j0; j < j1; j += 16) {
                            const uint8_t *pw = wp + (j - j0) * kc;
                            const float *psb = sbp + (j - j0) / 16 * 32 * gc;
                            const int nr = j1 - j < 16 ? (int)(j1 - j) : 16;
                            for (int64_t i = 0; i < mc; i += GQ_MR) {
                                const int32_t *pa = (const int32_t *)(xp + (size_t)(i / GQ_MR) * psz);
                                const float *pd = (const float *)(pa + kc / 4 * GQ_MR), *ps = pd + kc / 32 * GQ_MR;
                                const int mr = mc - i < GQ_MR ? (int)(mc - i) : GQ_MR;
                                /* the next tile's rows of y (in DRAM or L3 for big outputs), while this one runs */
                                const int64_t ni = i + GQ_MR < mc ? i + GQ_MR : 0, nj = i + GQ_MR < mc ? j : j + 16;
                                for (int64_t r = ni; nj < j1 && r < ni + GQ_MR && r < mc; r++)
                                    _mm_prefetch((const char *)(y + (i0 + r) * Np + nj), _MM_HINT_T0);
                                gq_tile(kc, g, pa, pd, ps, pw, psb, y + (i0 + i) * Np + j, Np, k0 > 0, mr, nr);
                            }
                        }
                    }
                }
            }
        }
        free(wbuf), free(xbuf);
        return;
    }
    free(wbuf), free(xbuf);
#endif
    dsv2_int4_gemv_q8(x, x_bf16, packed, sz, xq, xd, xs, y, M, Np, Kp, g, nthreads);
}


/* ---- MLA decode attention over bf16 latent rows, in fp32 (CPUs without native bf16 GEMMs) ---------------- */

/* e^x, Cephes' polynomial: ~2 ulp; branch-free, so loops of it vectorise. Arguments are clamped to
 * [-87.3, 88]: e^x underflows to ~1e-38 below and stays finite above (softmax terms s - max are <= 0; SwiGLU's
 * silu(x) = x / (1 + e^-x) is then x / 1.6e38 ~ 0 for x < -88). A NaN stays NaN. */
static inline float lat_exp(float x) {
    x = x < -87.3f ? -87.3f : x > 88.f ? 88.f : x;
    const float n = __builtin_rintf(x * 1.44269504088896341f);
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const int32_t e = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &e, 4);
    return p * s;
}

#if defined(__AVX2__) && defined(__FMA__)
#define LAT_VEXP 1
/* lat_exp on 8 lanes (the same clamps and polynomial, with FMAs): the scalar form does not vectorise (GCC keeps
 * its clamps as branches), and a softmax or SwiGLU spends more time in e^x than in the products around it */
static inline __m256 lat_exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.f)); /* NaN: -87.3 here */
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f),
                                     _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x));
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#else
#define LAT_VEXP 0
#endif

#define LAT_TILE 12 /* rows widened to fp32 at a time (27 KiB at W = 576: beside q's panel, in L1 / L2) */
#define LAT_HG 4    /* heads per register tile */
#define LAT_RR 3    /* rows (scores) or vectors of columns (output) per register tile: 4 x 3 accumulators */

/* One thread's rows [a, b) of the chunks: running max m (Hp,), sum l (Hp,) and unnormalised output o (Hp, Cp).
 * rf: LAT_TILE widened rows of Wr floats (Wr >= W and >= Cp, zero-padded), sp: scores / weights (Hp, LAT_TILE).
 * Both products run on tiles of 4 heads x 3 rows (or 3 vectors of output columns): 12 accumulators, per step 7
 * loads for 12 FMAs (the tile and q's panel are read from L1 / L2, not registers). */
static void lat_part(const float *qp, int64_t Hp, int64_t W, int64_t Wr, int64_t Cp, const uint16_t *const *chunks,
                     const int64_t *lens, int64_t ld, int64_t a, int64_t b, float *m, float *l, float *o,
                     float *rf, float *sp) {
    for (int64_t h = 0; h < Hp; h++) m[h] = -INFINITY, l[h] = 0.f;
    memset(o, 0, (size_t)(Hp * Cp) * sizeof(float));
    memset(rf, 0, (size_t)(LAT_TILE * Wr) * sizeof(float));
    int64_t ci = 0, base = 0; /* the chunk holding row a */
    while (base + lens[ci] <= a) base += lens[ci++];
    for (int64_t g = a; g < b;) {
        int64_t n = 0;
        for (; n < LAT_TILE && g < b; n++, g++) { /* widen the tile's rows; a tile may span chunks */
            while (g - base >= lens[ci]) base += lens[ci++];
            const uint16_t *row = chunks[ci] + (g - base) * ld;
            float *dst = rf + n * Wr;
#pragma omp simd
            for (int64_t k = 0; k < W; k++) dst[k] = bf2f(row[k]);
        }
        for (int64_t i = 0; i < n; i += LAT_RR) /* scores (q pre-scaled) */
            for (int64_t hg = 0; hg < Hp; hg += LAT_HG) {
                const float *r0 = rf + i * Wr, *r1 = i + 1 < n ? r0 + Wr : r0, *r2 = i + 2 < n ? r0 + 2 * Wr : r0;
                const float *q0 = qp + hg * Wr;
                vf acc[LAT_HG][LAT_RR];
                for (int j = 0; j < LAT_HG; j++) acc[j][0] = acc[j][1] = acc[j][2] = vzero();
                for (int64_t k = 0; k < Wr; k += VW) {
                    const vf x0 = vload(r0 + k), x1 = vload(r1 + k), x2 = vload(r2 + k);
                    for (int j = 0; j < LAT_HG; j++) {
                        const vf qv = vload(q0 + j * Wr + k);
                        acc[j][0] = vfma(qv, x0, acc[j][0]);
                        acc[j][1] = vfma(qv, x1, acc[j][1]);
                        acc[j][2] = vfma(qv, x2, acc[j][2]);
                    }
                }
                for (int j = 0; j < LAT_HG; j++) /* rows past n: scores never read */
                    for (int r = 0; r < LAT_RR && i + r < n; r++) sp[(hg + j) * LAT_TILE + i + r] = vsum(acc[j][r]);
            }
        for (int64_t h = 0; h < Hp; h++) { /* online softmax */
            float *s = sp + h * LAT_TILE, mx = m[h];
            for (int64_t i = 0; i < n; i++) mx = s[i] > mx ? s[i] : mx;
            if (mx > m[h]) {
                const float alpha = m[h] == -INFINITY ? 0.f : lat_exp(m[h] - mx);
                float *oh = o + h * Cp;
#pragma omp simd
                for (int64_t c = 0; c < Cp; c++) oh[c] *= alpha;
                l[h] *= alpha, m[h] = mx;
            }
            float sum = 0.f;
            int64_t i = 0;
#if LAT_VEXP
            for (; i + 8 <= n; i += 8) {
                const __m256 e = lat_exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), _mm256_set1_ps(mx)));
                _mm256_storeu_ps(s + i, e);
                __m128 t = _mm_add_ps(_mm256_castps256_ps128(e), _mm256_extractf128_ps(e, 1));
                t = _mm_add_ps(t, _mm_movehl_ps(t, t));
                sum += _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
            }
#endif
            for (; i < n; i++) {
                s[i] = lat_exp(s[i] - mx);
                sum += s[i];
            }
            l[h] += sum;
        }
        /* o += p @ rows[:, :C], three vectors of columns at a time, every head group on them while in L1 */
        for (int64_t c = 0; c < Cp; c += LAT_RR * VW)
            for (int64_t hg = 0; hg < Hp; hg += LAT_HG) {
                float *o0 = o + hg * Cp + c;
                vf acc[LAT_HG][LAT_RR];
                for (int j = 0; j < LAT_HG; j++)
                    for (int r = 0; r < LAT_RR; r++) acc[j][r] = vload(o0 + j * Cp + r * VW);
                for (int64_t i = 0; i < n; i++) {
                    const float *ri = rf + i * Wr + c;
                    const vf x0 = vload(ri), x1 = vload(ri + VW), x2 = vload(ri + 2 * VW);
                    for (int j = 0; j < LAT_HG; j++) {
                        const vf p = vset1(sp[(hg + j) * LAT_TILE + i]);
                        acc[j][0] = vfma(p, x0, acc[j][0]);
                        acc[j][1] = vfma(p, x1, acc[j][1]);
                        acc[j][2] = vfma(p, x2, acc[j][2]);
                    }
                }
                for (int j = 0; j < LAT_HG; j++)
                    for (int r = 0; r < LAT_RR; r++) vstore(o0 + j * Cp + r * VW, acc[j][r]);
            }
    }
}

/* Absorbed MLA attention of one decoding sequence over its bf16 latent rows, all in fp32:
 *   out (H, C) = softmax(scale * q rows^T) rows[:, :C],   q (H, W) fp32, rows (S, W) bf16,
 * the rows given as nchunks runs (chunks[i]: lens[i] rows, ld elements apart, the same ld for all). Each row is
 * widened once, LAT_TILE at a time, and used by every head for both products (where PyTorch would upcast all
 * rows into a buffer and run two GEMMs). The rows are split between threads, whose partial softmaxes are merged
 * at the end. */
void dsv2_latent_decode_bf16(const float *q, int64_t H, int64_t W, int64_t C, const uint16_t *const *chunks,
                             const int64_t *lens, int64_t nchunks, int64_t ld, float scale, float *out,
                             int nthreads) {
    int64_t total = 0;
    for (int64_t i = 0; i < nchunks; i++) total += lens[i];
    const int64_t Hp = (H + LAT_HG - 1) / LAT_HG * LAT_HG;
    const int64_t Cp = (C + LAT_RR * VW - 1) / (LAT_RR * VW) * (LAT_RR * VW);
    const int64_t Wp = (W + VW - 1) / VW * VW > Cp ? (W + VW - 1) / VW * VW : Cp; /* widened row stride */
    int nt = nthreads < 1 ? 1 : nthreads;
    if (nt > total / 64) nt = total / 64 > 0 ? (int)(total / 64) : 1; /* at least 64 rows a thread */
    float *qp = (float *)calloc((size_t)(Hp * Wp), sizeof(float));
    float *part = (float *)malloc((size_t)(nt * (2 * Hp + Hp * Cp)) * sizeof(float));
    if (!qp || !part || total == 0) {
        for (int64_t i = 0; i < H * C; i++) out[i] = total == 0 ? 0.f : __builtin_nanf("");
        free(qp), free(part);
        return;
    }
    for (int64_t h = 0; h < H; h++)
        for (int64_t k = 0; k < W; k++) qp[h * Wp + k] = q[h * W + k] * scale;
#pragma omp parallel for num_threads(nt) schedule(static) /* one part a thread (a loop: fewer threads than asked
                                                                still cover every part) */
    for (int t = 0; t < nt; t++) {
        float *m = part + t * (2 * Hp + Hp * Cp), *l = m + Hp, *o = l + Hp;
        float *rf = (float *)malloc((size_t)(LAT_TILE * Wp + Hp * LAT_TILE) * sizeof(float));
        if (rf) {
            lat_part(qp, Hp, W, Wp, Cp, chunks, lens, ld, total * t / nt, total * (t + 1) / nt, m, l, o, rf,
                     rf + LAT_TILE * Wp);
            free(rf);
        } else {
            for (int64_t h = 0; h < Hp; h++) m[h] = __builtin_nanf(""), l[h] = 1.f;
        }
    }
    for (int64_t h = 0; h < H; h++) { /* merge the threads' partial softmaxes */
        float mx = -INFINITY, sum = 0.f;
        for (int t = 0; t < nt; t++) {
            const float mt = part[t * (2 * Hp + Hp * Cp) + h];
            mx = mt > mx || mt != mt ? mt : mx; /* a NaN (a part that could not run) makes the result NaN */
        }
        float *oh = out + h * C;
        for (int64_t c = 0; c < C; c++) oh[c] = 0.f;
        for (int t = 0; t < nt; t++) {
            const float *m = part + t * (2 * Hp + Hp * Cp), *ot = m + 2 * Hp + h * Cp;
            const float w = m[h] == -INFINITY ? 0.f : expf(m[h] - mx);
            sum += w * m[Hp + h];
            for (int64_t c = 0; c < C; c++) oh[c] += w * ot[c];
        }
        for (int64_t c = 0; c < C; c++) oh[c] /= sum;
    }
    free(qp), free(part);
}


/* ---- the elementwise work of a decode step: RMSNorm and RoPE ------------------------------------------------
 * Each is a handful of PyTorch ops (casts, a reduction, broadcasts) costing ~25-35 us of dispatch per call at
 * batch 1, against ~2 us of work. Both compute in fp32 as the model's PyTorch code does, rounding where it
 * rounds (RoPE with fp contraction off: each product rounded as PyTorch's separate multiplies round it). */

static inline uint16_t f2bf_any(float f) { /* f2bf; NaN -> the quiet NaN PyTorch gives */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0u : f2bf(f); /* a select: loops vectorise */
}

/* y (M, D) = w * cast(x * r), r = 1 / sqrt(mean(x^2) + eps) per row, in fp32: cast rounds to bf16 when x is bf16
 * (x_bf16), the product with w is rounded to bf16 when y is (y_bf16). x rows ldx elements apart, y contiguous. */
void dsv2_rms_norm(const void *x, int x_bf16, int64_t ldx, const void *w, int w_bf16, void *y, int y_bf16,
                   int64_t M, int64_t D, float eps, int nthreads) {
    const int nt = M * D >= (1 << 16) && nthreads > 1 ? nthreads : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < M; i++) {
        float ss = 0.f;
        if (x_bf16) {
            const uint16_t *xr = (const uint16_t *)x + i * ldx;
#pragma omp simd reduction(+ : ss)
            for (int64_t k = 0; k < D; k++) ss += bf2f(xr[k]) * bf2f(xr[k]);
        } else {
            const float *xr = (const float *)x + i * ldx;
#pragma omp simd reduction(+ : ss)
            for (int64_t k = 0; k < D; k++) ss += xr[k] * xr[k];
        }
        const float r = 1.f / sqrtf(ss / (float)D + eps);
        for (int64_t k = 0; k < D; k++) {
            float t = load(x, i * ldx + k, x_bf16) * r;
            if (x_bf16) t = bf2f(f2bf_any(t));
            const float v = load(w, k, w_bf16) * t;
            if (y_bf16)
                ((uint16_t *)y)[i * D + k] = f2bf_any(v);
            else
                ((float *)y)[i * D + k] = v;
        }
    }
}

/* Rotary embedding of interleaved pairs: for each of N tokens and H heads, the R values of x (token n, head h at
 * x + n * sn + h * sh, unit stride) as R/2 pairs (a, b) rotated by the token's angles: (a cos - b sin,
 * a sin + b cos), cos / sin (N, R/2) fp32. out (N, H, R) contiguous, bf16 when x is (bf16). */
__attribute__((optimize("fp-contract=off")))
void dsv2_rope(const void *x, int bf16, int64_t sn, int64_t sh, const float *cs, const float *sn_, void *out,
               int64_t N, int64_t H, int64_t R) {
    const int64_t P = R / 2;
    for (int64_t n = 0; n < N; n++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t xo = n * sn + h * sh, oo = (n * H + h) * R;
            for (int64_t p = 0; p < P; p++) {
                const float a = load(x, xo + 2 * p, bf16), b = load(x, xo + 2 * p + 1, bf16);
                const float c = cs[n * P + p], s = sn_[n * P + p];
                const float ac = a * c, bs = b * s, as = a * s, bc = b * c;
                const float e = ac - bs, o = as + bc;
                if (bf16) {
                    ((uint16_t *)out)[oo + 2 * p] = f2bf_any(e);
                    ((uint16_t *)out)[oo + 2 * p + 1] = f2bf_any(o);
                } else {
                    ((float *)out)[oo + 2 * p] = e;
                    ((float *)out)[oo + 2 * p + 1] = o;
                }
            }
        }
}


#if LAT_VEXP
/* 8 fp32 lanes rounded to bf16 (nearest even; NaN -> 0x7FC0, as f2bf_any), still as fp32 */
static inline __m256 lat_round_bf16(__m256 v) {
    const __m256i r = _mm256_and_si256(f2bf8(v), _mm256_set1_epi32((int)0xFFFF0000u));
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    return _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)), nan);
}

/* 8 fp32 lanes -> 8 bf16 (rounded as lat_round_bf16) */
static inline __m128i lat_pack_bf16(__m256 v) {
    const __m256i u = _mm256_srli_epi32(_mm256_castps_si256(lat_round_bf16(v)), 16);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(u, u), 0x08));
}
#endif

/* SwiGLU's gating out (M, N) = silu(g) * u, computed in fp32 as PyTorch's ops do: silu(g) = g / (1 + e^-g),
 * rounded to bf16 when the inputs are (bf16), then times u, rounded again; g and u rows ldg / ldu elements apart
 * (halves of one gate-up product), out contiguous. */
void dsv2_silu_mul(const void *g, const void *u, int bf16, int64_t ldg, int64_t ldu, void *out, int64_t M,
                   int64_t N, int nthreads) {
    const int nt = M > 1 && M * N >= (1 << 16) && nthreads > 1 ? nthreads : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < M; i++) {
        int64_t k = 0;
#if LAT_VEXP
        for (; k + 8 <= N; k += 8) {
            __m256 a, b;
            if (bf16) {
                const __m128i ga = _mm_loadu_si128((const __m128i *)((const uint16_t *)g + i * ldg + k));
                const __m128i ub = _mm_loadu_si128((const __m128i *)((const uint16_t *)u + i * ldu + k));
                a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(ga), 16));
                b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(ub), 16));
            } else {
                a = _mm256_loadu_ps((const float *)g + i * ldg + k);
                b = _mm256_loadu_ps((const float *)u + i * ldu + k);
            }
            const __m256 e = lat_exp8(_mm256_sub_ps(_mm256_setzero_ps(), a));
            __m256 sl = _mm256_div_ps(a, _mm256_add_ps(_mm256_set1_ps(1.f), e));
            sl = _mm256_blendv_ps(sl, a, _mm256_cmp_ps(a, a, _CMP_UNORD_Q)); /* NaN in, NaN out */
            if (bf16) {
                sl = lat_round_bf16(sl);
                _mm_storeu_si128((__m128i *)((uint16_t *)out + i * N + k), lat_pack_bf16(_mm256_mul_ps(sl, b)));
            } else {
                _mm256_storeu_ps((float *)out + i * N + k, _mm256_mul_ps(sl, b));
            }
        }
#endif
        if (bf16) {
            const uint16_t *gi = (const uint16_t *)g + i * ldg, *ui = (const uint16_t *)u + i * ldu;
            uint16_t *oi = (uint16_t *)out + i * N;
            for (; k < N; k++) {
                const float a = bf2f(gi[k]);
                const float s = bf2f(f2bf_any(a / (1.f + lat_exp(-a))));
                oi[k] = f2bf_any(s * bf2f(ui[k]));
            }
        } else {
            const float *gi = (const float *)g + i * ldg, *ui = (const float *)u + i * ldu;
            float *oi = (float *)out + i * N;
            for (; k < N; k++) oi[k] = gi[k] / (1.f + lat_exp(-gi[k])) * ui[k];
        }
    }
}
