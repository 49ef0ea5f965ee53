// K-quants on 256-element super-blocks: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (llama.cpp's
// quantize_row_*_ref, non-imatrix; ../shared/specs/gguf-and-k-quants.md §2.2-2.5, §3.1-3.7).
// One thread per super-block; inside a block every operation is the reference's, in its order.

#define FT_QK_K 256

// make_qkx2_quants: asymmetric fit x ~ scale*L + min, L in [0, nmax], min <= 0.
// Returns the scale, writes -min to *the_min. `mn` is one variable that accepted candidates
// overwrite (later candidates use it), exactly as in the reference.
FT_DEV float ft_make_qkx2_quants(int n, int nmax, const float* FT_RESTRICT x,
                                 const float* FT_RESTRICT w, u8* FT_RESTRICT L,
                                 float* FT_RESTRICT the_min, u8* FT_RESTRICT Laux, float rmin,
                                 float rdelta, int nstep, bool use_mad) {
    float mn = x[0];
    float mx = x[0];
    float sum_w = w[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < mn) mn = x[i];
        if (x[i] > mx) mx = x[i];
        const float wi = w[i];
        sum_w += wi;
        sum_x += wi * x[i];
    }
    if (mn > 0) mn = 0;
    if (mx == mn) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        *the_min = -mn;
        return 0.0f;
    }
    float iscale = (float)nmax / (mx - mn);
    float scale = 1.0f / iscale;
    float best_error = 0;
    for (int i = 0; i < n; ++i) {
        const int l = ft_nearest_int(iscale * (x[i] - mn));
        L[i] = (u8)ft_max_i(0, ft_min_i(nmax, l));
        float diff = scale * (float)L[i] + mn - x[i];
        diff = use_mad ? fabsf(diff) : diff * diff;
        best_error += w[i] * diff;
    }
    if (nstep < 1) {
        *the_min = -mn;
        return scale;
    }
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * (float)is + (float)nmax) / (mx - mn);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            int l = ft_nearest_int(iscale * (x[i] - mn));
            l = ft_max_i(0, ft_min_i(nmax, l));
            Laux[i] = (u8)l;
            const float wi = w[i];
            const float fl = (float)l;
            sum_l += wi * fl;
            sum_l2 += wi * fl * fl;
            sum_xl += wi * fl * x[i];
        }
        const float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float cur_error = 0;
            for (int i = 0; i < n; ++i) {
                float diff = this_scale * (float)Laux[i] + this_min - x[i];
                diff = use_mad ? fabsf(diff) : diff * diff;
                cur_error += w[i] * diff;
            }
            if (cur_error < best_error) {
                for (int i = 0; i < n; ++i) L[i] = Laux[i];
                best_error = cur_error;
                scale = this_scale;
                mn = this_min;
            }
        }
    }
    *the_min = -mn;
    return scale;
}

// make_qx_quants with rmse_type = 1 and no importance weights (the Q6_K path).
FT_DEV float ft_make_qx_quants(int n, int nmax, const float* FT_RESTRICT x, i8* FT_RESTRICT L) {
    float mx = 0;
    float amax = 0;
    for (int i = 0; i < n; ++i) {
        const float ax = fabsf(x[i]);
        if (ax > amax) {
            amax = ax;
            mx = x[i];
        }
    }
    if (amax < FT_GROUP_MAX_EPS) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.0f;
    }
    float iscale = (float)(-nmax) / mx;
    float sumlx = 0;
    float suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = ft_nearest_int(iscale * x[i]);
        l = ft_max_i(-nmax, ft_min_i(nmax - 1, l));
        L[i] = (i8)(l + nmax);
        const float w = x[i] * x[i];
        const float fl = (float)l;
        sumlx += w * x[i] * fl;
        suml2 += w * fl * fl;
    }
    float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        iscale = -((float)nmax + 0.1f * (float)is) / mx;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; ++i) {
            int l = ft_nearest_int(iscale * x[i]);
            l = ft_max_i(-nmax, ft_min_i(nmax - 1, l));
            const float w = x[i] * x[i];
            const float fl = (float)l;
            sumlx += w * x[i] * fl;
            suml2 += w * fl * fl;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; ++i) {
                const int l = ft_nearest_int(iscale * x[i]);
                L[i] = (i8)(nmax + ft_max_i(-nmax, ft_min_i(nmax - 1, l)));
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

// make_q3_quants with do_rmse = true (the Q3_K path). L holds signed levels during the search
// and level + nmax on return.
FT_DEV float ft_make_q3_quants(int n, int nmax, const float* FT_RESTRICT x, i8* FT_RESTRICT L) {
    float mx = 0;
    float amax = 0;
    for (int i = 0; i < n; ++i) {
        const float ax = fabsf(x[i]);
        if (ax > amax) {
            amax = ax;
            mx = x[i];
        }
    }
    if (amax < FT_GROUP_MAX_EPS) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.0f;
    }
    const float iscale = (float)(-nmax) / mx;
    float sumlx = 0;
    float suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = ft_nearest_int(iscale * x[i]);
        l = ft_max_i(-nmax, ft_min_i(nmax - 1, l));
        L[i] = (i8)l;
        const float w = x[i] * x[i];
        const float fl = (float)l;
        sumlx += w * x[i] * fl;
        suml2 += w * fl * fl;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int n_changed = 0;
        for (int i = 0; i < n; ++i) {
            const float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * (float)L[i];
            if (slx > 0) {
                float sl2 = suml2 - w * (float)L[i] * (float)L[i];
                int new_l = ft_nearest_int(x[i] * sl2 / slx);
                new_l = ft_max_i(-nmax, ft_min_i(nmax - 1, new_l));
                if (new_l != L[i]) {
                    const float fnl = (float)new_l;
                    slx += w * x[i] * fnl;
                    sl2 += w * fnl * fnl;
                    if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (i8)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        ++n_changed;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    for (int i = 0; i < n; ++i) L[i] = (i8)(L[i] + nmax);
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

FT_DEV void ft_get_scale_min_k4(int j, const u8* FT_RESTRICT q, u8* FT_RESTRICT d,
                                u8* FT_RESTRICT m) {
    if (j < 4) {
        *d = (u8)(q[j] & 63);
        *m = (u8)(q[j + 4] & 63);
    } else {
        *d = (u8)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (u8)((q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4));
    }
}

// Q2_K (84 bytes): scales[16] @0, qs[64] @16, d f16 @80, dmin f16 @82.
FT_DEV void ft_block_q2_k(const float* FT_RESTRICT x, u8* FT_RESTRICT y) {
    u8 L[FT_QK_K];
    u8 Laux[16];
    float weights[16];
    float mins[FT_QK_K / 16];
    float scales[FT_QK_K / 16];
    u8* ysc = y;
    u8* yqs = y + 16;
    const float q4scale = 15.0f;
    float max_scale = 0;
    float max_min = 0;
    for (int j = 0; j < FT_QK_K / 16; ++j) {
        for (int l = 0; l < 16; ++l) weights[l] = fabsf(x[16 * j + l]);
        scales[j] = ft_make_qkx2_quants(16, 3, x + 16 * j, weights, L + 16 * j, &mins[j], Laux,
                                        -0.5f, 0.1f, 15, true);
        const float scale = scales[j];
        if (scale > max_scale) max_scale = scale;
        const float mn = mins[j];
        if (mn > max_min) max_min = mn;
    }
    float d_store, dmin_store;
    if (max_scale > 0) {
        const float iscale = q4scale / max_scale;
        for (int j = 0; j < FT_QK_K / 16; ++j) {
            const int l = ft_nearest_int(iscale * scales[j]);
            ysc[j] = (u8)l;
        }
        d_store = max_scale / q4scale;
    } else {
        for (int j = 0; j < FT_QK_K / 16; ++j) ysc[j] = 0;
        d_store = 0.0f;
    }
    if (max_min > 0) {
        const float iscale = q4scale / max_min;
        for (int j = 0; j < FT_QK_K / 16; ++j) {
            const int l = ft_nearest_int(iscale * mins[j]);
            ysc[j] = (u8)(ysc[j] | (u8)(l << 4));
        }
        dmin_store = max_min / q4scale;
    } else {
        dmin_store = 0.0f;
    }
    ft_store_f16(y + 80, d_store);
    ft_store_f16(y + 82, dmin_store);
    const float dd = ft_load_f16(y + 80);
    const float dmin = ft_load_f16(y + 82);
    for (int j = 0; j < FT_QK_K / 16; ++j) {
        const float d = dd * (float)(ysc[j] & 0xF);
        if (d == 0.0f) continue;
        const float dm = dmin * (float)(ysc[j] >> 4);
        for (int ii = 0; ii < 16; ++ii) {
            int l = ft_nearest_int((x[16 * j + ii] + dm) / d);
            l = ft_max_i(0, ft_min_i(3, l));
            L[16 * j + ii] = (u8)l;
        }
    }
    for (int j = 0; j < FT_QK_K; j += 128) {
        for (int l = 0; l < 32; ++l) {
            yqs[j / 4 + l] = (u8)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) |
                                  (L[j + l + 96] << 6));
        }
    }
}

// Q3_K (110 bytes): hmask[32] @0, qs[64] @32, scales[12] @96, d f16 @108.
FT_DEV void ft_block_q3_k(const float* FT_RESTRICT x, u8* FT_RESTRICT y) {
    i8 L[FT_QK_K];
    float scales[FT_QK_K / 16];
    u8* hmask = y;
    u8* qs = y + 32;
    u8* sc12 = y + 96;
    float max_scale = 0;
    float amax = 0;
    for (int j = 0; j < FT_QK_K / 16; ++j) {
        scales[j] = ft_make_q3_quants(16, 4, x + 16 * j, L + 16 * j);
        const float scale = fabsf(scales[j]);
        if (scale > amax) {
            amax = scale;
            max_scale = scales[j];
        }
    }
    for (int j = 0; j < 12; ++j) sc12[j] = 0;
    if (max_scale != 0.0f) {
        const float iscale = -32.0f / max_scale;
        for (int j = 0; j < FT_QK_K / 16; ++j) {
            i8 l = (i8)ft_nearest_int(iscale * scales[j]);
            l = (i8)(ft_max_i(-32, ft_min_i(31, l)) + 32);
            if (j < 8) {
                sc12[j] = (u8)(l & 0xF);
            } else {
                sc12[j - 8] = (u8)(sc12[j - 8] | ((l & 0xF) << 4));
            }
            l = (i8)(l >> 4);
            sc12[j % 4 + 8] = (u8)(sc12[j % 4 + 8] | (l << (2 * (j / 4))));
        }
        ft_store_f16(y + 108, 1.0f / iscale);
    } else {
        ft_store_f16(y + 108, 0.0f);
    }
    const float dd = ft_load_f16(y + 108);
    for (int j = 0; j < FT_QK_K / 16; ++j) {
        i8 sc = (i8)(j < 8 ? (sc12[j] & 0xF) : (sc12[j - 8] >> 4));
        sc = (i8)((sc | (((sc12[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32);
        const float d = dd * (float)sc;
        if (d == 0.0f) continue;
        for (int ii = 0; ii < 16; ++ii) {
            int l = ft_nearest_int(x[16 * j + ii] / d);
            l = ft_max_i(-4, ft_min_i(3, l));
            L[16 * j + ii] = (i8)(l + 4);
        }
    }
    for (int j = 0; j < FT_QK_K / 8; ++j) hmask[j] = 0;
    int m = 0;
    u8 hm = 1;
    for (int j = 0; j < FT_QK_K; ++j) {
        if (L[j] > 3) {
            hmask[m] = (u8)(hmask[m] | hm);
            L[j] = (i8)(L[j] - 4);
        }
        if (++m == FT_QK_K / 8) {
            m = 0;
            hm = (u8)(hm << 1);
        }
    }
    for (int j = 0; j < FT_QK_K; j += 128) {
        for (int l = 0; l < 32; ++l) {
            qs[j / 4 + l] = (u8)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) |
                                 (L[j + l + 96] << 6));
        }
    }
}

// Shared by Q4_K (nmax 15, rmin -1, nstep 20) and Q5_K (nmax 31, rmin -0.5, nstep 15): the
// sub-block fit, the 6-bit k4 scale packing into sc12, d/dmin, and the final levels in L.
FT_DEV void ft_kquant_45(const float* FT_RESTRICT x, u8* FT_RESTRICT dptr, u8* FT_RESTRICT sc12,
                         u8* FT_RESTRICT L, int nmax, float rmin, int nstep) {
    u8 Laux[32];
    float weights[32];
    float mins[FT_QK_K / 32];
    float scales[FT_QK_K / 32];
    float max_scale = 0;
    float max_min = 0;
    for (int j = 0; j < FT_QK_K / 32; ++j) {
        float sum_x2 = 0;
        for (int l = 0; l < 32; ++l) sum_x2 += x[32 * j + l] * x[32 * j + l];
        const float av_x = sqrtf(sum_x2 / 32.0f);
        for (int l = 0; l < 32; ++l) weights[l] = av_x + fabsf(x[32 * j + l]);
        scales[j] = ft_make_qkx2_quants(32, nmax, x + 32 * j, weights, L + 32 * j, &mins[j], Laux,
                                        rmin, 0.1f, nstep, false);
        const float scale = scales[j];
        if (scale > max_scale) max_scale = scale;
        const float mn = mins[j];
        if (mn > max_min) max_min = mn;
    }
    const float inv_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
    const float inv_min = max_min > 0 ? 63.0f / max_min : 0.0f;
    for (int j = 0; j < FT_QK_K / 32; ++j) {
        u8 ls = (u8)ft_nearest_int(inv_scale * scales[j]);
        u8 lm = (u8)ft_nearest_int(inv_min * mins[j]);
        ls = (u8)(63 < ls ? 63 : ls);
        lm = (u8)(63 < lm ? 63 : lm);
        if (j < 4) {
            sc12[j] = ls;
            sc12[j + 4] = lm;
        } else {
            sc12[j + 4] = (u8)((ls & 0xF) | ((lm & 0xF) << 4));
            sc12[j - 4] = (u8)(sc12[j - 4] | ((ls >> 4) << 6));
            sc12[j - 0] = (u8)(sc12[j - 0] | ((lm >> 4) << 6));
        }
    }
    ft_store_f16(dptr, max_scale / 63.0f);
    ft_store_f16(dptr + 2, max_min / 63.0f);
    const float dd = ft_load_f16(dptr);
    const float dmin = ft_load_f16(dptr + 2);
    for (int j = 0; j < FT_QK_K / 32; ++j) {
        u8 sc, m;
        ft_get_scale_min_k4(j, sc12, &sc, &m);
        const float d = dd * (float)sc;
        if (d == 0.0f) continue;
        const float dm = dmin * (float)m;
        for (int ii = 0; ii < 32; ++ii) {
            int l = ft_nearest_int((x[32 * j + ii] + dm) / d);
            l = ft_max_i(0, ft_min_i(nmax, l));
            L[32 * j + ii] = (u8)l;
        }
    }
}

// Q4_K (144 bytes): d f16 @0, dmin f16 @2, scales[12] @4, qs[128] @16.
FT_DEV void ft_block_q4_k(const float* FT_RESTRICT x, u8* FT_RESTRICT y) {
    u8 L[FT_QK_K];
    // the reference ORs high bits into scales bytes 0..7 written earlier in the same loop;
    // bytes 8..11 are written before they are read, so no zeroing is needed, as there
    for (int j = 0; j < 12; ++j) y[4 + j] = 0;
    ft_kquant_45(x, y, y + 4, L, 15, -1.0f, 20);
    u8* q = y + 16;
    for (int j = 0; j < FT_QK_K; j += 64) {
        for (int l = 0; l < 32; ++l) q[l] = (u8)(L[j + l] | (L[j + l + 32] << 4));
        q += 32;
    }
}

// Q5_K (176 bytes): d f16 @0, dmin f16 @2, scales[12] @4, qh[32] @16, qs[128] @48.
FT_DEV void ft_block_q5_k(const float* FT_RESTRICT x, u8* FT_RESTRICT y) {
    u8 L[FT_QK_K];
    for (int j = 0; j < 12; ++j) y[4 + j] = 0;
    ft_kquant_45(x, y, y + 4, L, 31, -0.5f, 15);
    u8* qh = y + 16;
    u8* ql = y + 48;
    for (int j = 0; j < FT_QK_K / 8; ++j) qh[j] = 0;
    u8 m1 = 1, m2 = 2;
    for (int n = 0; n < FT_QK_K; n += 64) {
        for (int j = 0; j < 32; ++j) {
            int l1 = L[n + j];
            if (l1 > 15) {
                l1 -= 16;
                qh[j] = (u8)(qh[j] | m1);
            }
            int l2 = L[n + j + 32];
            if (l2 > 15) {
                l2 -= 16;
                qh[j] = (u8)(qh[j] | m2);
            }
            ql[j] = (u8)(l1 | (l2 << 4));
        }
        m1 = (u8)(m1 << 2);
        m2 = (u8)(m2 << 2);
        ql += 32;
    }
}

// Q6_K (210 bytes): ql[128] @0, qh[64] @128, scales i8[16] @192, d f16 @208.
FT_DEV void ft_block_q6_k(const float* FT_RESTRICT x, u8* FT_RESTRICT y) {
    i8 L[FT_QK_K];
    float scales[FT_QK_K / 16];
    float max_scale = 0;
    float max_abs_scale = 0;
    for (int ib = 0; ib < FT_QK_K / 16; ++ib) {
        const float scale = ft_make_qx_quants(16, 32, x + 16 * ib, L + 16 * ib);
        scales[ib] = scale;
        const float abs_scale = fabsf(scale);
        if (abs_scale > max_abs_scale) {
            max_abs_scale = abs_scale;
            max_scale = scale;
        }
    }
    if (max_abs_scale < FT_GROUP_MAX_EPS) {
        for (int j = 0; j < 210; ++j) y[j] = 0;
        return;
    }
    i8* ysc = (i8*)(y + 192);
    const float iscale = -128.0f / max_scale;
    ft_store_f16(y + 208, 1.0f / iscale);
    for (int ib = 0; ib < FT_QK_K / 16; ++ib) {
        ysc[ib] = (i8)ft_min_i(127, ft_nearest_int(iscale * scales[ib]));
    }
    const float dd = ft_load_f16(y + 208);
    for (int j = 0; j < FT_QK_K / 16; ++j) {
        const float d = dd * (float)ysc[j];
        if (d == 0.0f) continue;
        for (int ii = 0; ii < 16; ++ii) {
            int l = ft_nearest_int(x[16 * j + ii] / d);
            l = ft_max_i(-32, ft_min_i(31, l));
            L[16 * j + ii] = (i8)(l + 32);
        }
    }
    u8* ql = y;
    u8* qh = y + 128;
    for (int j = 0; j < FT_QK_K; j += 128) {
        for (int l = 0; l < 32; ++l) {
            const u8 q1 = (u8)(L[j + l + 0] & 0xF);
            const u8 q2 = (u8)(L[j + l + 32] & 0xF);
            const u8 q3 = (u8)(L[j + l + 64] & 0xF);
            const u8 q4 = (u8)(L[j + l + 96] & 0xF);
            ql[l + 0] = (u8)(q1 | (q3 << 4));
            ql[l + 32] = (u8)(q2 | (q4 << 4));
            qh[l] = (u8)((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) |
                         ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6));
        }
        ql += 64;
        qh += 32;
    }
}

#ifdef FT_CUDA
#define FT_KQUANT_KERNEL(name, fn, bytes)                                                    \
    FT_KERNEL void name(const float* FT_RESTRICT x, u8* FT_RESTRICT y, u64 nblocks) {        \
        const u64 i = ft_thread_id();                                                        \
        if (i < nblocks) fn(x + i * FT_QK_K, y + i * (bytes));                               \
    }
FT_KQUANT_KERNEL(ft_quantize_q2_k, ft_block_q2_k, 84)
FT_KQUANT_KERNEL(ft_quantize_q3_k, ft_block_q3_k, 110)
FT_KQUANT_KERNEL(ft_quantize_q4_k, ft_block_q4_k, 144)
FT_KQUANT_KERNEL(ft_quantize_q5_k, ft_block_q5_k, 176)
FT_KQUANT_KERNEL(ft_quantize_q6_k, ft_block_q6_k, 210)
#endif
