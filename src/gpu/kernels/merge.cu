// PEFT adapter merges exactly as the CPU path computes them (src/lora/merge.rs, which equals
// PEFT's merge_and_unload bit for bit; ../shared/specs/nf4-peft.md §2.2-2.4). The host side
// puts every LoRA step in one form, whatever the layout (Linear, Conv1D, Embedding) or the
// number of adapters combined: row i of the delta is
//   d[i][j] = post * (sum over k = 0..r-1, in order, of fma(coef[i][k], mat[k][j], acc))
// (one fused multiply-add per rank step from acc = 0, as torch's sgemm does for LoRA ranks;
// `post` is applied only when it is not 1). The rows X are the tensor's rows already rounded
// to its dtype; each step rounds its result to the dtype again.
//   LoRA mode 0 (Add):        X = round(X + d)
//   LoRA mode 1 (AddRounded): X = round(X + round(d))        (embeddings)
//   LoRA mode 2 (DoRA's V):   X = X + d, unrounded; a DoRA scale step follows
//   DoRA rows:    n_i = sqrt(sum_j X[i][j]^2 in f64, in order) as f32; X = round(X * (m_i / n_i))
//   DoRA columns: X[i][j] = round(X[i][j] * (m_j / n_j)) with the norms n_j given
//   vector ops:   mode 0 X[i][j] += v[j]; 1 X[i][j] *= v[i]; 2 X[i][j] *= v[j]; then round
// dtype codes: 0 = f32 (no rounding), 1 = f16, 2 = bf16.

FT_DEV float ft_round_to(int dtype, float v) {
    if (dtype == 1) return ft_f16_to_f32(ft_f32_to_f16(v));
    if (dtype == 2) return ft_bf16_to_f32(ft_f32_to_bf16(v));
    return v;
}

// d[i][j] for coef [rows, r] and mat [r, cols].
FT_DEV float ft_delta_elem(const float* FT_RESTRICT coef, const float* FT_RESTRICT mat, u32 r,
                           u64 cols, float post, u64 i, u64 j) {
    float acc = 0.0f;
    for (u32 k = 0; k < r; ++k) {
        acc = fmaf(coef[i * (u64)r + k], mat[(u64)k * cols + j], acc);
    }
    if (post != 1.0f) acc = acc * post;
    return acc;
}

FT_DEV float ft_lora_step(float x, float d, int mode, int dtype) {
    if (mode == 1) d = ft_round_to(dtype, d);
    const float v = x + d;
    return mode == 2 ? v : ft_round_to(dtype, v);
}

// m / ||row||, the norm accumulated in f64 in index order and rounded to f32.
FT_DEV float ft_dora_row_factor(const float* FT_RESTRICT row, u64 cols, float mag) {
    double s = 0.0;
    for (u64 k = 0; k < cols; ++k) {
        const double v = (double)row[k];
        s += v * v;
    }
    return mag / (float)sqrt(s);
}

// DoRA on one row with its own norm, in place.
FT_DEV void ft_dora_row(float* FT_RESTRICT row, u64 cols, float mag, int dtype) {
    const float f = ft_dora_row_factor(row, cols, mag);
    for (u64 j = 0; j < cols; ++j) row[j] = ft_round_to(dtype, row[j] * f);
}

// DoRA on one element with its column's magnitude and norm.
FT_DEV float ft_dora_col_step(float x, float mag, float norm, int dtype) {
    return ft_round_to(dtype, x * (mag / norm));
}

FT_DEV float ft_vec_step(float x, const float* FT_RESTRICT v, u64 vlen, int mode, int dtype,
                         u64 i, u64 j) {
    if (mode == 0) {
        if (j < vlen) x = x + v[j];
    } else if (mode == 1) {
        x = x * v[i];
    } else if (j < vlen) {
        x = x * v[j];
    }
    return ft_round_to(dtype, x);
}

#ifdef FT_CUDA
// X: rows x cols f32, in place; coef: [rows, r] (the rows of this batch); mat: [r, cols].
// One thread per element.
FT_KERNEL void ft_lora_rows(float* FT_RESTRICT X, u64 rows, u64 cols,
                            const float* FT_RESTRICT coef, const float* FT_RESTRICT mat, u32 r,
                            float post, int mode, int dtype) {
    const u64 t = ft_thread_id();
    if (t >= rows * cols) return;
    const u64 i = t / cols;
    const u64 j = t % cols;
    X[t] = ft_lora_step(X[t], ft_delta_elem(coef, mat, r, cols, post, i, j), mode, dtype);
}

// DoRA with one norm per row (Linear): mag holds this batch's rows. One thread per row.
FT_KERNEL void ft_dora_rows(float* FT_RESTRICT X, u64 rows, u64 cols,
                            const float* FT_RESTRICT mag, int dtype) {
    const u64 i = ft_thread_id();
    if (i < rows) ft_dora_row(X + i * cols, cols, mag[i], dtype);
}

// DoRA with one norm per column (Conv1D, Embedding), the norms computed over the whole
// tensor beforehand. One thread per element.
FT_KERNEL void ft_dora_cols(float* FT_RESTRICT X, u64 rows, u64 cols,
                            const float* FT_RESTRICT mag, const float* FT_RESTRICT norms,
                            int dtype) {
    const u64 t = ft_thread_id();
    if (t >= rows * cols) return;
    X[t] = ft_dora_col_step(X[t], mag[t % cols], norms[t % cols], dtype);
}

// lora_bias additions and IA3 scales (see ft_vec_step). One thread per element.
FT_KERNEL void ft_vec_op(float* FT_RESTRICT X, u64 rows, u64 cols, const float* FT_RESTRICT v,
                         u64 vlen, int mode, int dtype) {
    const u64 t = ft_thread_id();
    if (t >= rows * cols) return;
    X[t] = ft_vec_step(X[t], v, vlen, mode, dtype, t / cols, t % cols);
}
#endif
