/* Fused CPU kernels of the gMLP block (gmlp_vision/fused.py builds and loads this file; see its docstring).
 *
 * h is (rows, width) and bias (width); the columns go to `parts` (1 or 2) outputs of width / parts columns each:
 * gelu_fwd:  out_p[r, c] = keep(i) ? GELU(h[i] + bias[j]) * scale : 0    where j = p * width / parts + c, i = r width + j
 * gelu_bwd:  gh[i]       = keep(i) ? grad_p[r, c] * scale * GELU'(h[i] + bias[j]) : 0
 * gate_fwd:  out[r, c] = u[r, c] * (z[r, c] + bias[r])                   (the spatial gating unit's product)
 * gate_bwd:  gu = g (z + bias[r]),  gz = g u,  gbias[r] = sum over c of g u
 * The *_bf16 kernels take bfloat16 tensors (bias and gbias stay float32), compute in float32 and round once.
 *
 * keep(i) is recomputed from (seed, i) by a counter-based hash, so the backward needs no stored mask; without dropout
 * every element is kept and scale is 1. GELU is the exact one (x * Phi(x)) or the tanh approximation, which equals
 * x * sigmoid(2 * sqrt(2 / pi) * (x + 0.044715 x^3)). exp and erf are evaluated with polynomials that the compiler
 * vectorises (relative errors near 1e-7, a few float32 ulps from PyTorch's kernels). Rows are split over `threads`
 * OpenMP threads (the process's libgomp: the one PyTorch loaded).
 */
#include <stdint.h>
#include <string.h>

#define SQRT_2_OVER_PI_X2 1.5957691216057308f /* 2 * sqrt(2 / pi) */
#define TANH_CUBIC 0.044715f
#define INV_SQRT_2 0.70710678118654752f
#define INV_SQRT_2PI 0.39894228040143268f

/* The murmur3 finaliser: a bijection of 32-bit words that mixes every input bit into every output bit. */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x85ebca6bU;
    x ^= x >> 13;
    x *= 0xc2b2ae35U;
    x ^= x >> 16;
    return x;
}

/* The seed keys both rounds, so the masks of two seeds are not shifts of one pattern. */
static inline int kept(int64_t i, uint32_t seed, uint32_t threshold) {
    uint32_t key = 0x9e3779b9U * seed + (uint32_t)((uint64_t)i >> 32);
    return mix32(mix32((uint32_t)i ^ seed) ^ key) < threshold;
}

static inline float bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* e^x for x in [-87, 88]: x = k ln2 + r with |r| <= ln2 / 2, e^r by its degree-7 Taylor polynomial, 2^k by exponent bits. */
static inline float exp_poly(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float k = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - k * 0.693145751953125f - k * 1.428606765330187045e-06f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.66666672e-1f + r * (4.16666679e-2f + r * (8.33333377e-3f
              + r * (1.38888892e-3f + r * 1.98412701e-4f))))));
    k = k == k ? k : 0.0f; /* a NaN x: p is NaN already; keep the integer conversion defined */
    return p * bits_to_float((uint32_t)((int32_t)k + 127) << 23);
}

/* Phi(x), the standard normal CDF, as 0.5 erfc(-x / sqrt 2); erfc(a) for a >= 0 by the Chebyshev fit of Numerical
 * Recipes' erfcc (relative error below 1.2e-7 everywhere, so the tails stay accurate too). */
static inline float normal_cdf(float x) {
    float z = -x * INV_SQRT_2;
    float a = z < 0.0f ? -z : z;
    float t = 1.0f / (1.0f + 0.5f * a);
    float poly = -1.26551223f + t * (1.00002368f + t * (0.37409196f + t * (0.09678418f + t * (-0.18628806f
                 + t * (0.27886807f + t * (-1.13520398f + t * (1.48851587f + t * (-0.82215223f + t * 0.17087277f))))))));
    float erfc_a = t * exp_poly(-a * a + poly);
    return z < 0.0f ? 1.0f - 0.5f * erfc_a : 0.5f * erfc_a;
}

/* Below this GELU and its slope are 0 in float32 (|GELU(-14)| < 1e-43); x * 0 keeps -inf -> NaN, as PyTorch. */
#define NEGLIGIBLE -14.0f

static inline float gelu_value(float x, int exact) {
    if (x < NEGLIGIBLE) return x * 0.0f;
    if (exact) return x * normal_cdf(x);
    float s = 1.0f / (1.0f + exp_poly(-SQRT_2_OVER_PI_X2 * (x + TANH_CUBIC * x * x * x)));
    return x * s;
}

static inline float gelu_slope(float x, int exact) {
    if (x < NEGLIGIBLE) return x * 0.0f;
    if (exact) {
        float density = INV_SQRT_2PI * exp_poly(-0.5f * x * x);
        return normal_cdf(x) + x * density;
    }
    float s = 1.0f / (1.0f + exp_poly(-SQRT_2_OVER_PI_X2 * (x + TANH_CUBIC * x * x * x)));
    return s + x * s * (1.0f - s) * SQRT_2_OVER_PI_X2 * (1.0f + 3.0f * TANH_CUBIC * x * x);
}

/* bfloat16 is the top half of a float32; stores round to nearest, ties to even (NaNs stay NaNs: quiet bit set). */
static inline float load_bf16(uint16_t v) { return bits_to_float((uint32_t)v << 16); }

static inline uint16_t store_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7fffU + ((u >> 16) & 1U)) >> 16;
    return (uint16_t)(f != f ? (u >> 16) | 0x40U : rounded);
}

/* One loop per (exact, dropout) pair, so each is a straight vectorisable loop. */
#define FORWARD(EXACT, DROP, T, LOAD, STORE)                                                                      \
    int64_t part_width = width / parts;                                                                           \
    _Pragma("omp parallel for schedule(static) num_threads(threads)") for (int64_t r = 0; r < rows; r++) {        \
        for (int p = 0; p < parts; p++) {                                                                         \
            const T *hp = (const T *)h + r * width + p * part_width;                                              \
            const float *bp = bias + p * part_width;                                                              \
            T *op = (T *)(p ? out1 : out0) + r * part_width;                                                      \
            int64_t base = r * width + p * part_width;                                                            \
            _Pragma("omp simd") for (int64_t c = 0; c < part_width; c++) {                                         \
                float g = gelu_value(LOAD(hp[c]) + bp[c], EXACT);                                                 \
                op[c] = STORE((!(DROP) || kept(base + c, seed, threshold)) ? g * scale : 0.0f);                   \
            }                                                                                                     \
        }                                                                                                         \
    }

#define BACKWARD(EXACT, DROP, T, LOAD, STORE)                                                                     \
    int64_t part_width = width / parts;                                                                           \
    _Pragma("omp parallel for schedule(static) num_threads(threads)") for (int64_t r = 0; r < rows; r++) {        \
        for (int p = 0; p < parts; p++) {                                                                         \
            const T *hp = (const T *)h + r * width + p * part_width;                                              \
            const T *gp = (const T *)(p ? grad1 : grad0) + r * part_width;                                        \
            const float *bp = bias + p * part_width;                                                              \
            T *ghp = (T *)gh + r * width + p * part_width;                                                        \
            int64_t base = r * width + p * part_width;                                                            \
            _Pragma("omp simd") for (int64_t c = 0; c < part_width; c++) {                                         \
                float d = gelu_slope(LOAD(hp[c]) + bp[c], EXACT);                                                 \
                ghp[c] = STORE((!(DROP) || kept(base + c, seed, threshold)) ? LOAD(gp[c]) * scale * d : 0.0f);    \
            }                                                                                                     \
        }                                                                                                         \
    }

#define SAME(x) (x)

#define GELU_KERNELS(SUFFIX, T, LOAD, STORE)                                                                      \
    void gelu_fwd##SUFFIX(const void *h, const float *bias, void *out0, void *out1, int64_t rows, int64_t width,  \
                          int parts, int exact, int dropout, uint32_t seed, uint32_t threshold, float scale,      \
                          int threads) {                                                                          \
        if (exact && dropout) { FORWARD(1, 1, T, LOAD, STORE) }                                                   \
        else if (exact) { FORWARD(1, 0, T, LOAD, STORE) }                                                         \
        else if (dropout) { FORWARD(0, 1, T, LOAD, STORE) }                                                       \
        else { FORWARD(0, 0, T, LOAD, STORE) }                                                                    \
    }                                                                                                             \
    void gelu_bwd##SUFFIX(const void *grad0, const void *grad1, const void *h, const float *bias, void *gh,       \
                          int64_t rows, int64_t width, int parts, int exact, int dropout, uint32_t seed,          \
                          uint32_t threshold, float scale, int threads) {                                         \
        if (exact && dropout) { BACKWARD(1, 1, T, LOAD, STORE) }                                                  \
        else if (exact) { BACKWARD(1, 0, T, LOAD, STORE) }                                                        \
        else if (dropout) { BACKWARD(0, 1, T, LOAD, STORE) }                                                      \
        else { BACKWARD(0, 0, T, LOAD, STORE) }                                                                   \
    }

/* The gate: rows are tokens, so bias[r] is one value per row, and the bias gradient is a row sum (in float32). */
#define GATE_KERNELS(SUFFIX, T, LOAD, STORE)                                                                      \
    void gate_fwd##SUFFIX(const void *u, const void *z, const float *bias, void *out, int64_t rows, int64_t cols,  \
                          int threads) {                                                                          \
        _Pragma("omp parallel for schedule(static) num_threads(threads)") for (int64_t r = 0; r < rows; r++) {    \
            const T *ur = (const T *)u + r * cols, *zr = (const T *)z + r * cols;                                 \
            T *o = (T *)out + r * cols;                                                                           \
            float b = bias[r];                                                                                    \
            _Pragma("omp simd") for (int64_t c = 0; c < cols; c++) o[c] = STORE(LOAD(ur[c]) * (LOAD(zr[c]) + b)); \
        }                                                                                                         \
    }                                                                                                             \
    void gate_bwd##SUFFIX(const void *grad, const void *u, const void *z, const float *bias, void *gu, void *gz,  \
                          float *gbias, int64_t rows, int64_t cols, int threads) {                                \
        _Pragma("omp parallel for schedule(static) num_threads(threads)") for (int64_t r = 0; r < rows; r++) {    \
            const T *g = (const T *)grad + r * cols, *ur = (const T *)u + r * cols, *zr = (const T *)z + r * cols; \
            T *gur = (T *)gu + r * cols, *gzr = (T *)gz + r * cols;                                               \
            float b = bias[r], sum = 0.0f;                                                                        \
            _Pragma("omp simd reduction(+ : sum)") for (int64_t c = 0; c < cols; c++) {                           \
                float gc = LOAD(g[c]), uc = LOAD(ur[c]);                                                          \
                gur[c] = STORE(gc * (LOAD(zr[c]) + b));                                                           \
                gzr[c] = STORE(gc * uc);                                                                          \
                sum += gc * uc;                                                                                   \
            }                                                                                                     \
            gbias[r] = sum;                                                                                       \
        }                                                                                                         \
    }

GELU_KERNELS(, float, SAME, SAME)
GELU_KERNELS(_bf16, uint16_t, load_bf16, store_bf16)
GATE_KERNELS(, float, SAME, SAME)
GATE_KERNELS(_bf16, uint16_t, load_bf16, store_bf16)
