// Shared helpers for ftconv's kernels. Prepended to every kernel file before NVRTC compiles it
// (NVRTC gets no include paths, so nothing here includes a header).
//
// The same sources also compile as plain C++ on the host (tests/gpu_host/harness.cpp): block
// functions are ordinary functions, and only the __global__ wrappers are CUDA-only. That lets the
// test suite check the kernels' arithmetic against llama.cpp's and bitsandbytes' own outputs on a
// machine without a GPU.
//
// Numeric rules (../shared/specs/gguf-and-k-quants.md §3.0): f32 everywhere, the reference's
// operation order, no contraction into fused multiply-adds (NVRTC gets --fmad=false; where the
// reference itself fuses, as the LoRA merge's sgemm does, the kernel calls fmaf explicitly),
// IEEE division and sqrt (the NVRTC defaults -prec-div=true -prec-sqrt=true, no fast math), no
// flush-to-zero.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef short i16;
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;
typedef long long i64;

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define FT_CUDA 1
#define FT_DEV __device__ __forceinline__
#define FT_DEV_NOINLINE __device__ __noinline__
#define FT_KERNEL extern "C" __global__
#define FT_CONST __constant__
#define FT_RESTRICT __restrict__
FT_DEV u32 ft_f2u(float f) { return __float_as_uint(f); }
FT_DEV float ft_u2f(u32 u) { return __uint_as_float(u); }
FT_DEV u64 ft_thread_id() { return (u64)blockIdx.x * (u64)blockDim.x + (u64)threadIdx.x; }
#else
#define FT_DEV static inline
#define FT_DEV_NOINLINE static
#define FT_CONST static const
#define FT_RESTRICT
static inline u32 ft_f2u(float f) { u32 u; memcpy(&u, &f, 4); return u; }
static inline float ft_u2f(u32 u) { float f; memcpy(&f, &u, 4); return f; }
#endif

#define FT_FLT_MAX 3.402823466e+38f
#define FT_GROUP_MAX_EPS 1e-15f

FT_DEV int ft_min_i(int a, int b) { return a < b ? a : b; }
FT_DEV int ft_max_i(int a, int b) { return a > b ? a : b; }

// llama.cpp's nearest_int: add 1.5*2^23 in f32, keep the low 23 mantissa bits, subtract 2^22.
// Round-half-to-even for |f| < 2^22 - 0.5 and the same silent wrap-around outside.
FT_DEV int ft_nearest_int(float f) {
    float v = f + 12582912.0f;
    return (int)(ft_f2u(v) & 0x007fffffu) - 0x00400000;
}

// C's roundf: nearest integer, halfway cases away from zero. Written out (truncation is exact
// and x - trunc(x) is exact) so the device and the host library cannot differ.
FT_DEV float ft_roundf(float x) {
    const float t = truncf(x);
    if (fabsf(x - t) >= 0.5f) {
        return t + copysignf(1.0f, x);
    }
    return t;
}

// C's float -> int conversion as x86-64 executes it (cvttss2si): truncation toward zero, and
// the "integer indefinite" value INT_MIN for NaN and anything outside the i32 range. The
// reference is built for x86-64, so its (int8_t)(float) / (uint8_t)(float) casts of out-of-range
// values (only possible for pathological blocks) keep the low byte of this.
FT_DEV int ft_cvt_trunc_i32(float f) {
    if (f > -2147483904.0f && f < 2147483648.0f) {
        return (int)f;
    }
    return (int)0x80000000u;
}

// f32 -> IEEE binary16 bits, round to nearest even; overflow to infinity; subnormal halves;
// NaN -> 0x7E00 | sign (the canonical quiet NaN ggml produces).
FT_DEV u16 ft_f32_to_f16(float f) {
    u32 x = ft_f2u(f);
    u32 sign = (x >> 16) & 0x8000u;
    u32 ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) {
        return (u16)(sign | 0x7e00u);
    }
    if (ax >= 0x477ff000u) {
        // >= 65520 (the midpoint between 65504 and 2^16) rounds to infinity
        return (u16)(sign | 0x7c00u);
    }
    if (ax >= 0x38800000u) {
        // normal half: rebias the exponent (127 -> 15), round 23 -> 10 mantissa bits
        u32 m = ax - 0x38000000u;
        u32 r = m + 0x0fffu + ((m >> 13) & 1u);
        return (u16)(sign | (r >> 13));
    }
    // subnormal half (unit 2^-24) or zero
    u32 e = ax >> 23;
    if (e < 102u) {
        return (u16)sign; // below 2^-25: rounds to zero
    }
    u32 mant = (ax & 0x007fffffu) | 0x00800000u;
    u32 shift = 126u - e; // 14..24
    u32 q = mant >> shift;
    u32 rem = mant & ((1u << shift) - 1u);
    u32 half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) {
        q += 1u;
    }
    return (u16)(sign | q);
}

// IEEE binary16 bits -> f32 (exact).
FT_DEV float ft_f16_to_f32(u16 h) {
    u32 sign = ((u32)h & 0x8000u) << 16;
    u32 e = ((u32)h >> 10) & 0x1fu;
    u32 m = (u32)h & 0x3ffu;
    u32 bits;
    if (e == 0x1fu) {
        bits = sign | 0x7f800000u | (m << 13);
    } else if (e != 0u) {
        bits = sign | ((e + 112u) << 23) | (m << 13);
    } else if (m == 0u) {
        bits = sign;
    } else {
        // subnormal: normalise
        u32 ee = 113u;
        while ((m & 0x400u) == 0u) {
            m <<= 1;
            ee -= 1u;
        }
        bits = sign | (ee << 23) | ((m & 0x3ffu) << 13);
    }
    return ft_u2f(bits);
}

// f32 -> bf16 bits as ggml and gguf-py do it: round to nearest even; NaN quietened with 0x0040.
FT_DEV u16 ft_f32_to_bf16(float f) {
    u32 b = ft_f2u(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return (u16)((b >> 16) | 0x0040u);
    }
    return (u16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

FT_DEV float ft_bf16_to_f32(u16 h) { return ft_u2f((u32)h << 16); }

FT_DEV void ft_store_f16(u8* p, float v) {
    u16 h = ft_f32_to_f16(v);
    p[0] = (u8)(h & 0xffu);
    p[1] = (u8)(h >> 8);
}

FT_DEV float ft_load_f16(const u8* p) { return ft_f16_to_f32((u16)(p[0] | ((u16)p[1] << 8))); }
