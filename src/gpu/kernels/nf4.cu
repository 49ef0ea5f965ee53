// bitsandbytes blockwise 4-bit quantization (NF4 and FP4) as its CPU path computes it, and the
// 8-bit double quantization of the absmax statistics (../shared/specs/nf4-peft.md §3.3-3.6).
//
// The 4-bit code of a scaled value y is torch.bucketize(y, bounds, right=False) = the number of
// bounds strictly below y, mapped through `order` (identity for NF4; FP4's table is not sorted,
// so bitsandbytes sorts it and maps the bucket back). The caller supplies both, so the tie rules
// live in one place (the CPU module's tables).

struct FtNf4Table {
    float bounds[16]; // 15 used, ascending
    u32 order[16];
};

FT_DEV u32 ft_bucketize(const float* FT_RESTRICT bounds, int nb, float y) {
    u32 c = 0;
    for (int k = 0; k < nb; ++k) {
        c += bounds[k] < y ? 1u : 0u;
    }
    return c;
}

FT_DEV float ft_clamp1(float v) {
    // torch.clamp(v, -1, 1)
    v = v < -1.0f ? -1.0f : v;
    return v > 1.0f ? 1.0f : v;
}

// One 4-bit block: elements [start, start + len) of x (len <= blocksize; only the last block of
// a tensor is shorter). Writes ceil(len / 2) bytes at y (first element in the HIGH nibble; an
// odd tail is padded with the code of 0.0) and the block's absmax.
FT_DEV void ft_block_4bit(const float* FT_RESTRICT x, int len, int full, const FtNf4Table* t,
                          u8* FT_RESTRICT y, float* FT_RESTRICT absmax_out) {
    float am = 0.0f;
    for (int i = 0; i < len; ++i) {
        const float a = fabsf(x[i]);
        // torch's max: NaN propagates; inputs are finite here, so a plain max
        am = a > am ? a : am;
    }
    float s = 0.0f;
    if (full) {
        *absmax_out = am; // stored unclamped
        const float c = am < 1e-38f ? 1e-38f : am;
        s = 1.0f / c;
    } else {
        am = am < 1e-38f ? 1e-38f : am;
        *absmax_out = am; // stored clamped
    }
    const u32 pad = t->order[ft_bucketize(t->bounds, 15, 0.0f)];
    for (int i = 0; i < len; i += 2) {
        const float y0 = full ? ft_clamp1(x[i] * s) : ft_clamp1(x[i] / am);
        const u32 c0 = t->order[ft_bucketize(t->bounds, 15, y0)];
        u32 c1 = pad;
        if (i + 1 < len) {
            const float y1 = full ? ft_clamp1(x[i + 1] * s) : ft_clamp1(x[i + 1] / am);
            c1 = t->order[ft_bucketize(t->bounds, 15, y1)];
        }
        y[i / 2] = (u8)((c0 << 4) | c1);
    }
}

// Double quantization of one 256-group of (absmax - offset) with the signed dynamic map `code`
// (256 ascending entries). mode 0: bitsandbytes' native CPU kernel (the value snapped to a
// 65536-step grid, then the code of that grid point); mode 1: torch's bucketize on the f32
// midpoints (true nearest, ties to the lower code).
FT_DEV u32 ft_count_mid_below(const float* FT_RESTRICT code, float v) {
    // number of midpoints 0.5f*(code[k]+code[k+1]) (k = 0..254) strictly below v
    int lo = 0, hi = 255;
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        const float m = 0.5f * (code[mid] + code[mid + 1]);
        if (m < v) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return (u32)lo;
}

FT_DEV u32 ft_count_bound_below(const float* FT_RESTRICT code, float v) {
    // torch: bounds = (code[:-1] + code[1:]) / 2
    int lo = 0, hi = 255;
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        const float m = (code[mid] + code[mid + 1]) / 2.0f;
        if (m < v) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return (u32)lo;
}

FT_DEV void ft_group_dq(const float* FT_RESTRICT absmax, int len, float offset,
                        const float* FT_RESTRICT code, int mode, u8* FT_RESTRICT q,
                        float* FT_RESTRICT nested) {
    float am = 0.0f;
    for (int i = 0; i < len; ++i) {
        const float c = absmax[i] - offset;
        const float a = fabsf(c);
        am = a > am ? a : am;
    }
    if (mode == 0) {
        *nested = am;
        if (am == 0.0f) {
            for (int i = 0; i < len; ++i) q[i] = 0;
            return;
        }
        const float inv = 1.0f / am;
        for (int i = 0; i < len; ++i) {
            const float y = ft_clamp1((absmax[i] - offset) * inv);
            const int idx = (int)((y + 1.0f) * 0.5f * 65535.0f + 0.5f);
            const float v = -1.0f + (2.0f * (float)idx) / 65535.0f;
            q[i] = (u8)ft_count_mid_below(code, v);
        }
    } else {
        // torch default backend, with its partial-block rule (the last group divides)
        const float c = am < 1e-38f ? 1e-38f : am;
        *nested = len == 256 ? am : c;
        const float inv = 1.0f / c;
        for (int i = 0; i < len; ++i) {
            const float d = absmax[i] - offset;
            const float y = len == 256 ? ft_clamp1(d * inv) : ft_clamp1(d / c);
            q[i] = (u8)ft_count_bound_below(code, y);
        }
    }
}

#ifdef FT_CUDA
// x: n values; one thread per block of `blocksize` (even) values; packed: ceil(n/2) bytes.
FT_KERNEL void ft_quantize_4bit(const float* FT_RESTRICT x, u64 n, u32 blocksize,
                                FtNf4Table table, u8* FT_RESTRICT packed,
                                float* FT_RESTRICT absmax) {
    const u64 b = ft_thread_id();
    const u64 start = b * (u64)blocksize;
    if (start >= n) return;
    const u64 rest = n - start;
    const int len = rest < (u64)blocksize ? (int)rest : (int)blocksize;
    ft_block_4bit(x + start, len, len == (int)blocksize, &table, packed + start / 2,
                  absmax + b);
}

// absmax: nb values; one thread per group of 256.
FT_KERNEL void ft_double_quant(const float* FT_RESTRICT absmax, u64 nb, float offset,
                               const float* FT_RESTRICT code, int mode, u8* FT_RESTRICT q,
                               float* FT_RESTRICT nested) {
    const u64 g = ft_thread_id();
    const u64 start = g * 256u;
    if (start >= nb) return;
    const u64 rest = nb - start;
    const int len = rest < 256u ? (int)rest : 256;
    ft_group_dq(absmax + start, len, offset, code, mode, q + start, nested + g);
}
#endif
