// Legacy 32-element blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (llama.cpp's quantize_row_*_ref;
// ../shared/specs/gguf-and-k-quants.md §2.1 and §3.6). One thread per block.

#define FT_QK 32

// Q4_0 (18 bytes): d f16, qs[16].
FT_DEV void ft_block_q4_0(const float* FT_RESTRICT x, u8* FT_RESTRICT y) {
    float amax = 0.0f;
    float mx = 0.0f;
    for (int j = 0; j < FT_QK; j++) {
        const float v = x[j];
        if (amax < fabsf(v)) {
            amax = fabsf(v);
            mx = v;
        }
    }
    const float d = mx / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    ft_store_f16(y, d);
    for (int j = 0; j < FT_QK / 2; j++) {
        const float x0 = x[j] * id;
        const float x1 = x[FT_QK / 2 + j] * id;
        const i8 a = (i8)ft_cvt_trunc_i32(x0 + 8.5f);
        const i8 b = (i8)ft_cvt_trunc_i32(x1 + 8.5f);
        const u8 xi0 = (u8)(15 < a ? 15 : a);
        const u8 xi1 = (u8)(15 < b ? 15 : b);
        y[2 + j] = (u8)(xi0 | (u8)(xi1 << 4));
    }
}

// Q4_1 (20 bytes): d f16, m f16, qs[16].
FT_DEV void ft_block_q4_1(const float* FT_RESTRICT x, u8* FT_RESTRICT y) {
    float mn = FT_FLT_MAX;
    float mx = -FT_FLT_MAX;
    for (int j = 0; j < FT_QK; j++) {
        const float v = x[j];
        if (v < mn) mn = v;
        if (v > mx) mx = v;
    }
    const float d = (mx - mn) / 15.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    ft_store_f16(y, d);
    ft_store_f16(y + 2, mn);
    for (int j = 0; j < FT_QK / 2; j++) {
        const float x0 = (x[j] - mn) * id;
        const float x1 = (x[FT_QK / 2 + j] - mn) * id;
        const i8 a = (i8)ft_cvt_trunc_i32(x0 + 0.5f);
        const i8 b = (i8)ft_cvt_trunc_i32(x1 + 0.5f);
        const u8 xi0 = (u8)(15 < a ? 15 : a);
        const u8 xi1 = (u8)(15 < b ? 15 : b);
        y[4 + j] = (u8)(xi0 | (u8)(xi1 << 4));
    }
}

// Q5_0 (22 bytes): d f16, qh u32 LE, qs[16].
FT_DEV void ft_block_q5_0(const float* FT_RESTRICT x, u8* FT_RESTRICT y) {
    float amax = 0.0f;
    float mx = 0.0f;
    for (int j = 0; j < FT_QK; j++) {
        const float v = x[j];
        if (amax < fabsf(v)) {
            amax = fabsf(v);
            mx = v;
        }
    }
    const float d = mx / -16.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    ft_store_f16(y, d);
    u32 qh = 0;
    for (int j = 0; j < FT_QK / 2; j++) {
        const float x0 = x[j] * id;
        const float x1 = x[FT_QK / 2 + j] * id;
        const i8 a = (i8)ft_cvt_trunc_i32(x0 + 16.5f);
        const i8 b = (i8)ft_cvt_trunc_i32(x1 + 16.5f);
        const u8 xi0 = (u8)(31 < a ? 31 : a);
        const u8 xi1 = (u8)(31 < b ? 31 : b);
        y[6 + j] = (u8)((xi0 & 0x0f) | ((xi1 & 0x0f) << 4));
        qh |= ((u32)(xi0 & 0x10u) >> 4) << (j + 0);
        qh |= ((u32)(xi1 & 0x10u) >> 4) << (j + FT_QK / 2);
    }
    y[2] = (u8)(qh & 0xffu);
    y[3] = (u8)((qh >> 8) & 0xffu);
    y[4] = (u8)((qh >> 16) & 0xffu);
    y[5] = (u8)(qh >> 24);
}

// Q5_1 (24 bytes): d f16, m f16, qh u32 LE, qs[16].
FT_DEV void ft_block_q5_1(const float* FT_RESTRICT x, u8* FT_RESTRICT y) {
    float mn = FT_FLT_MAX;
    float mx = -FT_FLT_MAX;
    for (int j = 0; j < FT_QK; j++) {
        const float v = x[j];
        if (v < mn) mn = v;
        if (v > mx) mx = v;
    }
    const float d = (mx - mn) / 31.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    ft_store_f16(y, d);
    ft_store_f16(y + 2, mn);
    u32 qh = 0;
    for (int j = 0; j < FT_QK / 2; j++) {
        const float x0 = (x[j] - mn) * id;
        const float x1 = (x[FT_QK / 2 + j] - mn) * id;
        // (uint8_t)(float): no clamp to 31 in the reference
        const u8 xi0 = (u8)ft_cvt_trunc_i32(x0 + 0.5f);
        const u8 xi1 = (u8)ft_cvt_trunc_i32(x1 + 0.5f);
        y[8 + j] = (u8)((xi0 & 0x0f) | ((xi1 & 0x0f) << 4));
        qh |= ((u32)(xi0 & 0x10u) >> 4) << (j + 0);
        qh |= ((u32)(xi1 & 0x10u) >> 4) << (j + FT_QK / 2);
    }
    y[4] = (u8)(qh & 0xffu);
    y[5] = (u8)((qh >> 8) & 0xffu);
    y[6] = (u8)((qh >> 16) & 0xffu);
    y[7] = (u8)(qh >> 24);
}

// Q8_0 (34 bytes): d f16, qs i8[32]. roundf = half away from zero.
FT_DEV void ft_block_q8_0(const float* FT_RESTRICT x, u8* FT_RESTRICT y) {
    float amax = 0.0f;
    for (int j = 0; j < FT_QK; j++) {
        const float a = fabsf(x[j]);
        amax = amax > a ? amax : a;
    }
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    ft_store_f16(y, d);
    for (int j = 0; j < FT_QK; j++) {
        const float x0 = x[j] * id;
        y[2 + j] = (u8)(i8)ft_cvt_trunc_i32(roundf(x0));
    }
}

#ifdef FT_CUDA
#define FT_LEGACY_KERNEL(name, fn, bytes)                                                    \
    FT_KERNEL void name(const float* FT_RESTRICT x, u8* FT_RESTRICT y, u64 nblocks) {        \
        const u64 i = ft_thread_id();                                                        \
        if (i < nblocks) fn(x + i * FT_QK, y + i * (bytes));                                 \
    }
FT_LEGACY_KERNEL(ft_quantize_q4_0, ft_block_q4_0, 18)
FT_LEGACY_KERNEL(ft_quantize_q4_1, ft_block_q4_1, 20)
FT_LEGACY_KERNEL(ft_quantize_q5_0, ft_block_q5_0, 22)
FT_LEGACY_KERNEL(ft_quantize_q5_1, ft_block_q5_1, 24)
FT_LEGACY_KERNEL(ft_quantize_q8_0, ft_block_q8_0, 34)
#endif
