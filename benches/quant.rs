//! Quantization throughput on a 4096×256 f32 matrix (256 rows of 4096), one row at a time as
//! the converter feeds them. Throughput is counted in input bytes (f32), so MB/s compare
//! across types. Add a type by adding it to `TYPES`.
//!
//! Time is this thread's CPU time (Linux `/proc/thread-self/schedstat`, nanoseconds) so that
//! numbers stay comparable on a loaded machine; wall time where that file is unreadable.

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ftconv::quant::{self, GgmlType};
use std::hint::black_box;
use std::time::Duration;

const COLS: usize = 4096;
const ROWS: usize = 256;

const TYPES: &[GgmlType] = &[
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q6_K,
];

/// Deterministic weight-like data: roughly Gaussian (sum of uniforms) with a few outliers.
fn matrix() -> Vec<f32> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut uni = move || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    (0..ROWS * COLS)
        .map(|i| {
            let g = (uni() + uni() + uni() + uni()) * 0.05;
            if i % 997 == 0 { g * 20.0 } else { g }
        })
        .collect()
}

/// Nanoseconds this thread has run on a CPU, if the kernel tells.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

struct ThreadCpuTime;
static WALL: WallTime = WallTime;

impl Measurement for ThreadCpuTime {
    type Intermediate = (Option<u64>, std::time::Instant);
    type Value = u64;
    fn start(&self) -> Self::Intermediate {
        (thread_cpu_ns(), std::time::Instant::now())
    }
    fn end(&self, (cpu, wall): Self::Intermediate) -> u64 {
        match (cpu, thread_cpu_ns()) {
            (Some(a), Some(b)) => b - a,
            _ => wall.elapsed().as_nanos() as u64,
        }
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, v: &u64) -> f64 {
        *v as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        WALL.formatter()
    }
}

fn bench_quantize(c: &mut Criterion<ThreadCpuTime>) {
    let x = matrix();
    let mut g = c.benchmark_group("quantize_4096x256");
    g.throughput(Throughput::Bytes((x.len() * 4) as u64));
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(3));
    for &ty in TYPES {
        let row_bytes = COLS / ty.block_size() * ty.type_size();
        let mut y = vec![0u8; ROWS * row_bytes];
        g.bench_function(ty.name(), |b| {
            b.iter(|| {
                for (xr, yr) in x.chunks_exact(COLS).zip(y.chunks_exact_mut(row_bytes)) {
                    quant::quantize(ty, black_box(xr), yr);
                }
                black_box(&mut y);
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_measurement(ThreadCpuTime);
    targets = bench_quantize
}
criterion_main!(benches);
