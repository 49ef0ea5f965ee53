// Host build of ftconv's CUDA kernel sources (tests/gpu_kernels.rs compiles and drives it).
// The block/element functions are the very code NVRTC compiles; here they run as plain C++ on
// the CPU, one call per block in place of one thread per block, so their arithmetic can be
// compared with llama.cpp's and bitsandbytes' outputs without a GPU. Build: x86-64, no -march
// (SSE2 scalar f32, no FMA), -ffp-contract=off, no fast math.
//
// Usage (all data little-endian, raw):
//   harness quant TYPE IN OUT                       TYPE: q4_0 q4_1 q5_0 q5_1 q8_0 q2_k q3_k
//                                                   q4_k q5_k q6_k f16 bf16; IN f32
//   harness 4bit BLOCKSIZE TABLE IN PACKED ABSMAX   TABLE: 16 f32 bounds + 16 u32 order
//   harness dq MODE OFFSET_BITS CODE ABSMAX Q NESTED  CODE: 256 f32; OFFSET_BITS: u32 hex
//   harness widen DTYPE IN OUT                      DTYPE 0 f32, 1 f16, 2 bf16
//   merge.cu's four kernels, in place on X (ROWS x COLS f32), result f32 in OUT:
//   harness lora_rows MODE DTYPE ROWS COLS RANK POST_BITS X COEF MAT OUT
//   harness dora_rows DTYPE ROWS COLS X MAG OUT
//   harness dora_cols DTYPE ROWS COLS X MAG NORMS OUT
//   harness vec_op MODE DTYPE ROWS COLS X V OUT

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../src/gpu/kernels/common.cuh"
#include "../../src/gpu/kernels/legacy.cu"
#include "../../src/gpu/kernels/kquants.cu"
#include "../../src/gpu/kernels/nf4.cu"
#include "../../src/gpu/kernels/convert.cu"
#include "../../src/gpu/kernels/merge.cu"

static unsigned char* read_file(const char* path, size_t* len) {
    FILE* f = fopen(path, "rb");
    if (!f) {
        perror(path);
        exit(1);
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char* buf = (unsigned char*)malloc(n > 0 ? (size_t)n : 1);
    if (n > 0 && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        perror(path);
        exit(1);
    }
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static void write_file(const char* path, const void* data, size_t len) {
    FILE* f = fopen(path, "wb");
    if (!f || fwrite(data, 1, len, f) != len) {
        perror(path);
        exit(1);
    }
    fclose(f);
}

static float bits_to_float(const char* hex) { return ft_u2f((u32)strtoul(hex, NULL, 16)); }

typedef void (*block_fn)(const float*, u8*);

int main(int argc, char** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: harness OP ...\n");
        return 2;
    }
    const char* op = argv[1];
    if (!strcmp(op, "quant") && argc == 5) {
        size_t len;
        float* x = (float*)read_file(argv[3], &len);
        const size_t n = len / 4;
        const char* t = argv[2];
        if (!strcmp(t, "f16") || !strcmp(t, "bf16")) {
            const int dt = !strcmp(t, "f16") ? 1 : 2;
            u8* y = (u8*)malloc(n * 2 + 1);
            for (size_t i = 0; i < n; ++i) ft_store_elem(y, dt, i, x[i]);
            write_file(argv[4], y, n * 2);
            return 0;
        }
        struct {
            const char* name;
            block_fn fn;
            int bs, ts;
        } types[] = {
            {"q4_0", ft_block_q4_0, 32, 18},   {"q4_1", ft_block_q4_1, 32, 20},
            {"q5_0", ft_block_q5_0, 32, 22},   {"q5_1", ft_block_q5_1, 32, 24},
            {"q8_0", ft_block_q8_0, 32, 34},   {"q2_k", ft_block_q2_k, 256, 84},
            {"q3_k", ft_block_q3_k, 256, 110}, {"q4_k", ft_block_q4_k, 256, 144},
            {"q5_k", ft_block_q5_k, 256, 176}, {"q6_k", ft_block_q6_k, 256, 210},
        };
        for (size_t k = 0; k < sizeof(types) / sizeof(types[0]); ++k) {
            if (strcmp(types[k].name, t)) continue;
            const size_t nb = n / types[k].bs;
            u8* y = (u8*)malloc(nb * types[k].ts + 1);
            for (size_t b = 0; b < nb; ++b) types[k].fn(x + b * types[k].bs, y + b * types[k].ts);
            write_file(argv[4], y, nb * types[k].ts);
            return 0;
        }
        fprintf(stderr, "unknown type %s\n", t);
        return 2;
    }
    if (!strcmp(op, "4bit") && argc == 7) {
        const int bs = atoi(argv[2]);
        size_t tl, len;
        unsigned char* tb = read_file(argv[3], &tl);
        FtNf4Table table;
        memcpy(&table, tb, sizeof(table));
        float* x = (float*)read_file(argv[4], &len);
        const size_t n = len / 4;
        const size_t nb = (n + bs - 1) / bs;
        u8* packed = (u8*)malloc((n + 1) / 2 + 1);
        float* absmax = (float*)malloc(nb * 4 + 4);
        for (size_t b = 0; b < nb; ++b) {
            const size_t start = b * bs;
            const int l = n - start < (size_t)bs ? (int)(n - start) : bs;
            ft_block_4bit(x + start, l, l == bs, &table, packed + start / 2, absmax + b);
        }
        write_file(argv[5], packed, (n + 1) / 2);
        write_file(argv[6], absmax, nb * 4);
        return 0;
    }
    if (!strcmp(op, "dq") && argc == 8) {
        const int mode = atoi(argv[2]);
        const float offset = bits_to_float(argv[3]);
        size_t cl, len;
        float* code = (float*)read_file(argv[4], &cl);
        float* absmax = (float*)read_file(argv[5], &len);
        const size_t nb = len / 4;
        const size_t groups = (nb + 255) / 256;
        u8* q = (u8*)malloc(nb + 1);
        float* nested = (float*)malloc(groups * 4 + 4);
        for (size_t g = 0; g < groups; ++g) {
            const size_t start = g * 256;
            const int l = nb - start < 256 ? (int)(nb - start) : 256;
            ft_group_dq(absmax + start, l, offset, code, mode, q + start, nested + g);
        }
        write_file(argv[6], q, nb);
        write_file(argv[7], nested, groups * 4);
        return 0;
    }
    if (!strcmp(op, "widen") && argc == 5) {
        const int dt = atoi(argv[2]);
        size_t len;
        u8* src = read_file(argv[3], &len);
        const size_t n = len / (dt == 0 ? 4 : 2);
        float* out = (float*)malloc(n * 4 + 4);
        for (size_t i = 0; i < n; ++i) out[i] = ft_load_elem(src, dt, i);
        write_file(argv[4], out, n * 4);
        return 0;
    }
    if (!strcmp(op, "lora_rows") && argc == 12) {
        const int mode = atoi(argv[2]);
        const int dt = atoi(argv[3]);
        const u64 rows = strtoull(argv[4], NULL, 10);
        const u64 cols = strtoull(argv[5], NULL, 10);
        const u32 rank = (u32)strtoul(argv[6], NULL, 10);
        const float post = bits_to_float(argv[7]);
        size_t l1, l2, l3;
        float* X = (float*)read_file(argv[8], &l1);
        float* coef = (float*)read_file(argv[9], &l2);
        float* mat = (float*)read_file(argv[10], &l3);
        for (u64 i = 0; i < rows; ++i)
            for (u64 j = 0; j < cols; ++j)
                X[i * cols + j] = ft_lora_step(
                    X[i * cols + j], ft_delta_elem(coef, mat, rank, cols, post, i, j), mode, dt);
        write_file(argv[11], X, rows * cols * 4);
        return 0;
    }
    if (!strcmp(op, "dora_rows") && argc == 8) {
        const int dt = atoi(argv[2]);
        const u64 rows = strtoull(argv[3], NULL, 10);
        const u64 cols = strtoull(argv[4], NULL, 10);
        size_t l1, l2;
        float* X = (float*)read_file(argv[5], &l1);
        float* mag = (float*)read_file(argv[6], &l2);
        for (u64 i = 0; i < rows; ++i) ft_dora_row(X + i * cols, cols, mag[i], dt);
        write_file(argv[7], X, rows * cols * 4);
        return 0;
    }
    if (!strcmp(op, "dora_cols") && argc == 9) {
        const int dt = atoi(argv[2]);
        const u64 rows = strtoull(argv[3], NULL, 10);
        const u64 cols = strtoull(argv[4], NULL, 10);
        size_t l1, l2, l3;
        float* X = (float*)read_file(argv[5], &l1);
        float* mag = (float*)read_file(argv[6], &l2);
        float* norms = (float*)read_file(argv[7], &l3);
        for (u64 t = 0; t < rows * cols; ++t)
            X[t] = ft_dora_col_step(X[t], mag[t % cols], norms[t % cols], dt);
        write_file(argv[8], X, rows * cols * 4);
        return 0;
    }
    if (!strcmp(op, "vec_op") && argc == 9) {
        const int mode = atoi(argv[2]);
        const int dt = atoi(argv[3]);
        const u64 rows = strtoull(argv[4], NULL, 10);
        const u64 cols = strtoull(argv[5], NULL, 10);
        size_t l1, l2;
        float* X = (float*)read_file(argv[6], &l1);
        float* v = (float*)read_file(argv[7], &l2);
        for (u64 t = 0; t < rows * cols; ++t)
            X[t] = ft_vec_step(X[t], v, l2 / 4, mode, dt, t / cols, t % cols);
        write_file(argv[8], X, rows * cols * 4);
        return 0;
    }
    fprintf(stderr, "bad arguments for %s\n", op);
    return 2;
}
