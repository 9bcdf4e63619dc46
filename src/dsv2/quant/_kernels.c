/* dsv2's CPU kernels for int8 / int4 / bf16 weights: plain C, compiled on first use by
 * dsv2/quant/native.py (cc -O3 -march=native -fopenmp) and called through ctypes: GEMVs for int8 and bf16
 * weights, and int8 / int4 dequantisation of row panels for the dense GEMM. The pure-PyTorch path (aten's
 * kernels, F.linear) is used wherever this library cannot be built; one-row int4 products stay on aten's
 * _weight_int4pack_mm_for_cpu, which was faster than a plain unpack-and-FMA kernel here.
 *
 * Shapes: M activation rows, N output features (rows of the weight), K input features, g int4 group.
 * Weights use the layouts dsv2/quant/kernels.py stores:
 *   int8: q (N, K) int8 row-major, scale (N,): w = q * scale. bf16: w (N, K) row-major, as stored.
 *   int4: aten's CPU pack, packed (Np, Kp/2) uint8 with Np % 16 == 0: rows in blocks of 64, each block a
 *         (Kp, 32) byte array whose low nibbles are rows 0..31 and high nibbles rows 32..63 of the block;
 *         a last block of t < 64 rows is a (Kp, t/2) array with row 2j in the low and row 2j+1 in the high
 *         nibble of byte j. sz (Kp/g, Np, 2) = (scale, zero): w = (q - 8) * scale + zero.
 * Scales are fp32 or bf16 (flag *_bf16), activations fp32, results fp32 (GEMV) or fp32 / bf16 (dequant).
 */
#include <stdint.h>
#include <string.h>

#ifndef PF_ROWS
#define PF_ROWS 8 /* the GEMVs prefetch the weight row this many rows ahead */
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
    __m256i u = _mm256_castps_si256(w); /* round to nearest even, as f2bf */
    u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF),
                                             _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
    u = _mm256_srli_epi32(u, 16);
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

/* The GEMV for up to 16 activation rows, for any weight element type W with a vector converter CVT and a
 * scalar one SCL: y (M, N) = x (M, K) @ (w * scale)^T (scale NULL: 1). Weight rows in fours, activation
 * rows in up to fours: every weight vector is converted once per pass and every activation vector loaded
 * once per 4 weight rows (a short last group of weight rows repeats its last row, never written). */
#define DEFINE_GEMV(NAME, W, CVT, SCL)                                                                        \
    static inline __attribute__((always_inline)) void NAME##_tile(const W *const *wr, const float *const *xr, \
                                                                  int mc, int64_t K, float out[4][4]) {       \
        const int64_t kv = K / VW * VW;                                                                       \
        vf acc[4][4];                                                                                         \
        for (int i = 0; i < 4; i++)                                                                           \
            for (int j = 0; j < mc; j++) acc[i][j] = vzero();                                                 \
        for (int64_t k = 0; k < kv; k += VW) {                                                                \
            vf w[4];                                                                                          \
            /* the next 4 rows, same columns: rows of a few KiB end at page boundaries, where the hardware   \
               prefetcher stops, so each new row would start cold */                                          \
            for (int i = 0; i < 4; i++) __builtin_prefetch(wr[i] + PF_ROWS * K + k, 0, 0);                       \
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
    void NAME(const float *x, const W *q, const void *scale, int scale_bf16, float *y, int64_t M, int64_t N,  \
              int64_t K, int nthreads) {                                                                      \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                                   \
        for (int64_t n0 = 0; n0 < N; n0 += 4) {                                                               \
            const W *wr[4];                                                                                   \
            for (int i = 0; i < 4; i++) wr[i] = q + (n0 + i < N ? n0 + i : N - 1) * K;                        \
            for (int64_t m0 = 0; m0 < M; m0 += 4) {                                                           \
                const float *xr[4];                                                                           \
                const int mc = M - m0 < 4 ? (int)(M - m0) : 4;                                                \
                for (int j = 0; j < mc; j++) xr[j] = x + (m0 + j) * K;                                        \
                float out[4][4];                                                                              \
                switch (mc) {                                                                                 \
                    case 1: NAME##_tile(wr, xr, 1, K, out); break;                                            \
                    case 2: NAME##_tile(wr, xr, 2, K, out); break;                                            \
                    case 3: NAME##_tile(wr, xr, 3, K, out); break;                                            \
                    default: NAME##_tile(wr, xr, 4, K, out); break;                                           \
                }                                                                                             \
                for (int i = 0; i < 4 && n0 + i < N; i++) {                                                   \
                    const float s = scale ? load(scale, n0 + i, scale_bf16) : 1.f;                            \
                    for (int j = 0; j < mc; j++) y[(m0 + j) * N + n0 + i] = out[i][j] * s;                    \
                }                                                                                             \
            }                                                                                                 \
        }                                                                                                     \
    }

static inline float i8f(int8_t v) { return (float)v; }

/* int8: w = q * scale per output row */
DEFINE_GEMV(dsv2_int8_gemv, int8_t, cvt_i8, i8f)
/* bf16 weights as stored (scale NULL): PyTorch's bf16 GEMV reads at a fraction of the bus speed on CPUs
 * without AMX; converting to fp32 in registers is a shift */
DEFINE_GEMV(dsv2_bf16_gemv, uint16_t, cvt_bf16, bf2f)

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

/* One dequantised row: codes (Kp,) one per byte, its group scales/zeros, written as fp32 or bf16. */
static inline void int4_row(const uint8_t *codes, const void *sz, int sz_bf16, int64_t r, int64_t Np, int64_t k0,
                            int64_t kn, int64_t g, void *out, int out_bf16) {
    for (int64_t k = k0; k < k0 + kn; k += g) {
        const int64_t i = ((k / g) * Np + r) * 2;
        const float s = load(sz, i, sz_bf16), base = load(sz, i + 1, sz_bf16) - 8.f * s;
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
