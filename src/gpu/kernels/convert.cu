// Element conversions: bf16/f16 -> f32 widening (exact), f32 -> f16/bf16 narrowing (round to
// nearest even, as ggml and torch do it). One thread per element.

// dtype codes shared with merge.cu and the Rust side: 0 = f32, 1 = f16, 2 = bf16.
FT_DEV float ft_load_elem(const u8* FT_RESTRICT p, int dtype, u64 i) {
    if (dtype == 1) return ft_f16_to_f32((u16)(p[2 * i] | ((u16)p[2 * i + 1] << 8)));
    if (dtype == 2) return ft_bf16_to_f32((u16)(p[2 * i] | ((u16)p[2 * i + 1] << 8)));
    const u32 b = (u32)p[4 * i] | ((u32)p[4 * i + 1] << 8) | ((u32)p[4 * i + 2] << 16) |
                  ((u32)p[4 * i + 3] << 24);
    return ft_u2f(b);
}

FT_DEV void ft_store_elem(u8* FT_RESTRICT p, int dtype, u64 i, float v) {
    if (dtype == 1 || dtype == 2) {
        const u16 h = dtype == 1 ? ft_f32_to_f16(v) : ft_f32_to_bf16(v);
        p[2 * i] = (u8)(h & 0xffu);
        p[2 * i + 1] = (u8)(h >> 8);
        return;
    }
    const u32 b = ft_f2u(v);
    p[4 * i] = (u8)(b & 0xffu);
    p[4 * i + 1] = (u8)((b >> 8) & 0xffu);
    p[4 * i + 2] = (u8)((b >> 16) & 0xffu);
    p[4 * i + 3] = (u8)(b >> 24);
}

#ifdef FT_CUDA
// src: n little-endian elements of `dtype`; dst: n f32.
FT_KERNEL void ft_widen(const u8* FT_RESTRICT src, int dtype, u64 n, float* FT_RESTRICT dst) {
    const u64 i = ft_thread_id();
    if (i < n) dst[i] = ft_load_elem(src, dtype, i);
}

// src: n f32; dst: n little-endian elements of `dtype`.
FT_KERNEL void ft_narrow(const float* FT_RESTRICT src, u64 n, int dtype, u8* FT_RESTRICT dst) {
    const u64 i = ft_thread_id();
    if (i < n) ft_store_elem(dst, dtype, i, src[i]);
}
#endif
