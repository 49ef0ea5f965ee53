//! Every tensor in fixtures/golden/quant (made by llama.cpp's own `ggml_quantize_chunk` with no imatrix, and
//! that type's `to_float`; see fixtures/golden/SOURCE.md) reproduced byte for byte by our quantizers and bit
//! for bit by our dequantizers.

use ftconv::quant::{self, GgmlType};
use safetensors::SafeTensors;
use std::path::PathBuf;

const CASES: &[&str] = &["gauss", "heavy", "uniform", "wide", "edge"];

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn check(ty: GgmlType, key: &str) {
    let mut checked = 0;
    for case in CASES {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(format!("fixtures/golden/quant/{case}.safetensors"));
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let input = st.tensor("input").unwrap();
        let (rows, cols) = (input.shape()[0], input.shape()[1]);
        let x = f32s(input.data());
        let want = st.tensor(key).unwrap();
        let row_bytes = want.shape()[1];
        assert_eq!(
            row_bytes,
            cols / ty.block_size() * ty.type_size(),
            "{case} {key} row size"
        );
        for r in 0..rows {
            let mut got = vec![0u8; row_bytes];
            quant::quantize(ty, &x[r * cols..(r + 1) * cols], &mut got);
            let exp = &want.data()[r * row_bytes..(r + 1) * row_bytes];
            if got != exp {
                let blk = got
                    .chunks(ty.type_size())
                    .zip(exp.chunks(ty.type_size()))
                    .position(|(a, b)| a != b);
                panic!("{case} {key}: row {r} differs (first differing block {blk:?})");
            }
        }
        let deq_want = f32s(st.tensor(&format!("{key}.dequant")).unwrap().data());
        let mut deq = vec![0f32; rows * cols];
        quant::dequantize(ty, want.data(), &mut deq);
        for (i, (a, b)) in deq.iter().zip(&deq_want).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{case} {key}.dequant element {i}: {a} vs {b}"
            );
        }
        checked += rows;
    }
    assert!(checked > 0);
}

#[test]
fn golden_f16() {
    check(GgmlType::F16, "f16");
}
#[test]
fn golden_bf16() {
    check(GgmlType::BF16, "bf16");
}
#[test]
fn golden_q4_0() {
    check(GgmlType::Q4_0, "q4_0");
}
#[test]
fn golden_q4_1() {
    check(GgmlType::Q4_1, "q4_1");
}
#[test]
fn golden_q5_0() {
    check(GgmlType::Q5_0, "q5_0");
}
#[test]
fn golden_q5_1() {
    check(GgmlType::Q5_1, "q5_1");
}
#[test]
fn golden_q8_0() {
    check(GgmlType::Q8_0, "q8_0");
}
#[test]
fn golden_q2_k() {
    check(GgmlType::Q2_K, "q2_k");
}
#[test]
fn golden_q3_k() {
    check(GgmlType::Q3_K, "q3_k");
}
#[test]
fn golden_q4_k() {
    check(GgmlType::Q4_K, "q4_k");
}
#[test]
fn golden_q5_k() {
    check(GgmlType::Q5_K, "q5_k");
}
#[test]
fn golden_q6_k() {
    check(GgmlType::Q6_K, "q6_k");
}
