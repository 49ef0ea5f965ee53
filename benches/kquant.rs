//! K-quant quantizer throughput on a 4096×256 f32 matrix (4 MiB of input): the lane-parallel
//! fast paths against the scalar reference transcriptions. Throughput is f32 input bytes.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ftconv::quant::{q2_k, q4_k, q5_k};
use std::hint::black_box;
use std::time::Duration;

const ROWS: usize = 4096;
const COLS: usize = 256;

fn matrix() -> Vec<f32> {
    // deterministic pseudo-gaussian values (sum of uniforms), like a weight matrix
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    (0..ROWS * COLS)
        .map(|_| {
            let mut acc = 0.0f32;
            for _ in 0..4 {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                acc += (s >> 40) as f32 / (1u64 << 24) as f32;
            }
            (acc - 2.0) * 0.05
        })
        .collect()
}

type Quantizer = fn(&[f32], &mut [u8]);

fn bench(c: &mut Criterion) {
    let x = matrix();
    let cases: [(&str, Quantizer, Quantizer, usize); 3] = [
        ("q4_k", q4_k::quantize_ref, q4_k::quantize, 144),
        ("q5_k", q5_k::quantize_ref, q5_k::quantize, 176),
        ("q2_k", q2_k::quantize_ref, q2_k::quantize, 84),
    ];
    let mut g = c.benchmark_group("kquant_4096x256");
    g.throughput(Throughput::Bytes((x.len() * 4) as u64));
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(3));
    for (name, reference, fast, bs) in cases {
        let mut y = vec![0u8; ROWS * COLS / 256 * bs];
        g.bench_function(format!("{name}_ref"), |b| {
            b.iter(|| reference(black_box(&x), black_box(&mut y)))
        });
        g.bench_function(format!("{name}_fast"), |b| {
            b.iter(|| fast(black_box(&x), black_box(&mut y)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
