// LoRA merge as PEFT's merge_and_unload computes it (../shared/specs/nf4-peft.md §2.2-2.4):
//   delta[o][i] = (sum over k = 0..r-1, in order, of B[o][k] * A[k][i]) * scale   (f32)
//   Linear:    V[o][i] = W[o][i] + delta[o][i]
//   Conv1D:    V[i][o] = W[i][o] + delta[o][i]           (fan_in_fan_out: W is [in, out])
//   Embedding: V[v][d] = W[v][d] + round(dtype, delta[d][v])   (delta cast to the base dtype first)
// DoRA: n = L2 norm of V per output row (Linear) or per column (Conv1D, Embedding), then
//   W' = (m / n) * V. Sums of squares run sequentially in f32 in index order.
// Each thread computes one output element (or one row/column norm).

// layout: 0 = Linear [out, in], 1 = Conv1D [in, out], 2 = Embedding [vocab, dim] with
// A [r, vocab], B [dim, r].
FT_DEV float ft_lora_dot(const float* FT_RESTRICT A, const float* FT_RESTRICT B, u64 cols_a,
                         u32 r, u64 o, u64 i) {
    float acc = 0.0f;
    for (u32 k = 0; k < r; ++k) {
        acc += B[o * (u64)r + k] * A[(u64)k * cols_a + i];
    }
    return acc;
}

// Element (row, col) of the merged f32 weight V = W + delta in W's own layout.
FT_DEV float ft_lora_elem(const float* FT_RESTRICT W, const float* FT_RESTRICT A,
                          const float* FT_RESTRICT B, u64 rows, u64 cols, u32 r, float scale,
                          int layout, int dtype, u64 row, u64 col) {
    (void)rows;
    const float w = W[row * cols + col];
    if (layout == 0) {
        return w + ft_lora_dot(A, B, cols, r, row, col) * scale;
    }
    if (layout == 1) {
        // W [in, out]: row = input index, col = output index; A [r, in], B [out, r]
        return w + ft_lora_dot(A, B, rows, r, col, row) * scale;
    }
    // Embedding: W [vocab, dim], A [r, vocab], B [dim, r]: delta^T[v][d] = (B A)[d][v]
    float d = ft_lora_dot(A, B, rows, r, col, row) * scale;
    if (dtype == 1) d = ft_f16_to_f32(ft_f32_to_f16(d));
    if (dtype == 2) d = ft_bf16_to_f32(ft_f32_to_bf16(d));
    return w + d;
}

// DoRA norm number t: one per row (by_row, Linear) or per column.
FT_DEV float ft_dora_norm(const float* FT_RESTRICT V, u64 rows, u64 cols, int by_row, u64 t) {
    const u64 len = by_row ? cols : rows;
    float s = 0.0f;
    for (u64 k = 0; k < len; ++k) {
        const float v = by_row ? V[t * cols + k] : V[k * cols + t];
        s += v * v;
    }
    return sqrtf(s);
}

// Element t of W' = (m / n) * V.
FT_DEV float ft_dora_elem(const float* FT_RESTRICT V, const float* FT_RESTRICT mag,
                          const float* FT_RESTRICT norms, u64 cols, int by_row, u64 t) {
    const u64 k = by_row ? t / cols : t % cols;
    const float factor = mag[k] / norms[k];
    return factor * V[t];
}

#ifdef FT_CUDA
// W, V: rows x cols f32 (V may alias W). One thread per element.
FT_KERNEL void ft_lora_merge(const float* W, const float* FT_RESTRICT A,
                             const float* FT_RESTRICT B, u64 rows, u64 cols, u32 r, float scale,
                             int layout, int dtype, float* V) {
    const u64 t = ft_thread_id();
    if (t >= rows * cols) return;
    const u64 row = t / cols;
    const u64 col = t % cols;
    V[t] = ft_lora_elem(W, A, B, rows, cols, r, scale, layout, dtype, row, col);
}

// DoRA norms. by_row = 1: one norm per row (Linear); 0: one per column. One thread per norm.
FT_KERNEL void ft_dora_norms(const float* FT_RESTRICT V, u64 rows, u64 cols, int by_row,
                             float* FT_RESTRICT norms) {
    const u64 t = ft_thread_id();
    const u64 count = by_row ? rows : cols;
    if (t < count) norms[t] = ft_dora_norm(V, rows, cols, by_row, t);
}

// W' = (m / n) * V, broadcast along the normed axis; result written as `dtype`.
FT_KERNEL void ft_dora_apply(const float* FT_RESTRICT V, const float* FT_RESTRICT mag,
                             const float* FT_RESTRICT norms, u64 rows, u64 cols, int by_row,
                             int dtype, u8* FT_RESTRICT out) {
    const u64 t = ft_thread_id();
    if (t >= rows * cols) return;
    ft_store_elem(out, dtype, t, ft_dora_elem(V, mag, norms, cols, by_row, t));
}
#endif
