//! The GPU kernels (src/gpu/kernels/*.cu):
//! - NVRTC compiles every kernel for compute_80/compute_90 (PTX, through cudarc) and for
//!   sm_80/sm_90 (CUBIN, the run-time path). Skips when libnvrtc is absent unless
//!   FTCONV_REQUIRE_NVRTC=1 (scripts/nvrtc_check.sh sets it, with NVRTC from PyPI).
//! - Host emulation: the same kernel sources built as C++ by the host compiler (no GPU needed)
//!   reproduce llama.cpp's golden bytes for every GGUF type and bitsandbytes' golden NF4 bytes
//!   (fixtures/golden, made by those tools), and IEEE conversions checked against `half`.
//! - CLI without a driver: `--device auto` says why in one line and writes the CPU's bytes;
//!   `--device cuda` fails cleanly (exit 1, nothing written).
//! - On a GPU: GPU bytes == CPU bytes for every type (skipped when no GPU is usable).

mod common;
use common::*;
use ftconv::gpu::{self, DoubleQuantRounding, Dtype, FourBitTable, LoraLayout};
use ftconv::quant::{self, GgmlType};
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const QUANT_CASES: &[&str] = &["gauss", "heavy", "uniform", "wide", "edge"];
const NF4_CASES: &[&str] = &[
    "tiny_4x64",
    "outliers_96x128",
    "rowscaled_128x1024",
    "partial_300x40",
    "odd_3x5",
    "edge_6x64",
];

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn golden(rel: &str) -> Vec<u8> {
    std::fs::read(fixture(&format!("golden/{rel}"))).unwrap()
}

fn gtype(key: &str) -> GgmlType {
    GgmlType::ALL
        .into_iter()
        .find(|t| t.name().eq_ignore_ascii_case(key))
        .unwrap()
}

/// Every GGUF type the GPU handles (all but F32, a plain copy).
fn gpu_types() -> Vec<GgmlType> {
    GgmlType::ALL
        .into_iter()
        .filter(|t| *t != GgmlType::F32)
        .collect()
}

fn first_diff(a: &[u8], b: &[u8], unit: usize) -> Option<usize> {
    if a.len() != b.len() {
        return Some(usize::MAX);
    }
    a.chunks(unit).zip(b.chunks(unit)).position(|(x, y)| x != y)
}

// ---------------------------------------------------------------------------------------------
// NVRTC

fn require_nvrtc() -> bool {
    std::env::var("FTCONV_REQUIRE_NVRTC").as_deref() == Ok("1")
}

#[cfg(feature = "cuda")]
#[test]
fn nvrtc_compiles_every_kernel_for_sm80_and_sm90() {
    use cudarc::nvrtc::{CompileError, CompileOptions, compile_ptx_with_opts};
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        assert!(
            !require_nvrtc(),
            "FTCONV_REQUIRE_NVRTC=1 but libnvrtc.so.13/.12 was not found (LD_LIBRARY_PATH={:?})",
            std::env::var("LD_LIBRARY_PATH").unwrap_or_default()
        );
        eprintln!("skipped: libnvrtc not found (scripts/nvrtc_check.sh installs one from PyPI)");
        return;
    }
    let mut compiled = 0;
    for (name, src) in gpu::MODULES {
        let entries = gpu::ENTRY_POINTS
            .iter()
            .find(|(m, _)| *m == name)
            .map(|(_, e)| *e)
            .unwrap();
        for arch in ["compute_80", "compute_90"] {
            let opts = CompileOptions {
                arch: Some(arch),
                fmad: Some(false),
                prec_div: Some(true),
                prec_sqrt: Some(true),
                ftz: Some(false),
                ..Default::default()
            };
            let ptx = compile_ptx_with_opts(src, opts).unwrap_or_else(|e| match e {
                CompileError::CompileError { log, .. } => {
                    panic!("{name}.cu for {arch}: {}", log.to_string_lossy())
                }
                e => panic!("{name}.cu for {arch}: {e:?}"),
            });
            let text = ptx.to_src();
            for e in entries {
                assert!(
                    text.contains(&format!(".entry {e}(")),
                    "{name}.cu for {arch}: no kernel {e}"
                );
            }
            assert!(
                text.contains(&format!(".target sm_{}", &arch[8..])),
                "{name}.cu: PTX target"
            );
            compiled += 1;
        }
        for arch in ["sm_80", "sm_90"] {
            let cubin = gpu::compile_cubin(src, arch)
                .unwrap_or_else(|e| panic!("{name}.cu for {arch} (CUBIN): {e}"));
            assert!(
                cubin.starts_with(b"\x7fELF"),
                "{name}.cu {arch}: not a CUBIN"
            );
            compiled += 1;
        }
    }
    assert_eq!(compiled, gpu::MODULES.len() * 4);
    eprintln!("compiled {compiled} kernel images (5 modules x compute_80/90 PTX + sm_80/90 CUBIN)");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn nvrtc_check_needs_the_cuda_feature() {
    assert!(
        !require_nvrtc(),
        "FTCONV_REQUIRE_NVRTC=1 needs a build with the `cuda` feature"
    );
}

// ---------------------------------------------------------------------------------------------
// Host emulation of the kernels

/// The kernel sources compiled as host C++ (tests/gpu_host/harness.cpp), or None (with a skip
/// line) when no C++ compiler is installed.
fn harness() -> Option<&'static Path> {
    static H: OnceLock<Option<PathBuf>> = OnceLock::new();
    H.get_or_init(|| {
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ftconv_gpu_host_harness");
        let src = repo().join("tests/gpu_host/harness.cpp");
        // x86-64 without -march: SSE2 scalar f32 and no FMA, like llama.cpp's reference build
        let r = Command::new(&cxx)
            .args([
                "-O2",
                "-std=c++17",
                "-ffp-contract=off",
                "-fno-fast-math",
                "-o",
            ])
            .arg(&out)
            .arg(&src)
            .output();
        match r {
            Err(e) => {
                eprintln!("skipped: no C++ compiler ({cxx}: {e})");
                None
            }
            Ok(o) => {
                assert!(
                    o.status.success(),
                    "the kernel sources do not build as host C++:\n{}",
                    String::from_utf8_lossy(&o.stderr)
                );
                Some(out)
            }
        }
    })
    .as_deref()
}

struct Scratch(tempfile::TempDir);

impl Scratch {
    fn new() -> Scratch {
        Scratch(tempfile::tempdir().unwrap())
    }
    fn put(&self, name: &str, data: &[u8]) -> String {
        let p = self.0.path().join(name);
        std::fs::write(&p, data).unwrap();
        p.to_string_lossy().into_owned()
    }
    fn path(&self, name: &str) -> String {
        self.0.path().join(name).to_string_lossy().into_owned()
    }
    fn get(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.0.path().join(name)).unwrap()
    }
}

fn run_harness(h: &Path, args: &[&str]) {
    let o = Command::new(h).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "harness {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Host build of the quantize kernel for `ty` on `x`.
fn host_quantize(h: &Path, ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let s = Scratch::new();
    let input = s.put("in", &f32_bytes(x));
    let key = ty.name().to_ascii_lowercase();
    run_harness(h, &["quant", &key, &input, &s.path("out")]);
    s.get("out")
}

/// Host build of the 4-bit kernel: (packed, absmax).
fn host_4bit(h: &Path, x: &[f32], blocksize: usize, t: &FourBitTable) -> (Vec<u8>, Vec<f32>) {
    let s = Scratch::new();
    let mut tb = f32_bytes(&t.bounds);
    tb.extend(t.order.iter().flat_map(|v| v.to_le_bytes()));
    let table = s.put("table", &tb);
    let input = s.put("in", &f32_bytes(x));
    run_harness(
        h,
        &[
            "4bit",
            &blocksize.to_string(),
            &table,
            &input,
            &s.path("p"),
            &s.path("a"),
        ],
    );
    (s.get("p"), f32s(&s.get("a")))
}

fn host_dq(
    h: &Path,
    absmax: &[f32],
    offset: f32,
    code: &[f32],
    mode: DoubleQuantRounding,
) -> (Vec<u8>, Vec<f32>) {
    let s = Scratch::new();
    let c = s.put("code", &f32_bytes(code));
    let a = s.put("absmax", &f32_bytes(absmax));
    run_harness(
        h,
        &[
            "dq",
            &(mode as i32).to_string(),
            &format!("{:08x}", offset.to_bits()),
            &c,
            &a,
            &s.path("q"),
            &s.path("n"),
        ],
    );
    (s.get("q"), f32s(&s.get("n")))
}

#[test]
fn host_kernels_reproduce_llama_cpp_golden_bytes() {
    let Some(h) = harness() else { return };
    let mut checked = 0;
    for case in QUANT_CASES {
        let bytes = golden(&format!("quant/{case}.safetensors"));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let x = f32s(st.tensor("input").unwrap().data());
        for ty in gpu_types() {
            let key = ty.name().to_ascii_lowercase();
            let want = st.tensor(&key).unwrap();
            let got = host_quantize(h, gtype(&key), &x);
            assert!(
                got == want.data(),
                "{case} {key}: kernel bytes differ from llama.cpp's (first differing block {:?})",
                first_diff(&got, want.data(), ty.type_size())
            );
            checked += 1;
        }
    }
    assert_eq!(checked, QUANT_CASES.len() * 12);
}

/// Random rows with the awkward blocks mixed in: all-zero, constant, tiny (~1e-7), an outlier,
/// one sign only, exact 4-bit decision thresholds.
fn awkward(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut x = gaussian(rows * cols, 0.02, seed);
    for (r, row) in x.chunks_mut(cols).enumerate() {
        match r % 7 {
            1 => row[..cols.min(256)].iter_mut().for_each(|v| *v = 0.0),
            2 => row[..cols.min(64)].iter_mut().for_each(|v| *v = 0.25),
            3 => row.iter_mut().for_each(|v| *v *= 1e-5),
            4 => row[5 % cols] = 300.0,
            5 => row.iter_mut().for_each(|v| *v = v.abs()),
            6 => {
                let t = quant::nf4::QuantType::Nf4.table();
                for (k, v) in row.iter_mut().enumerate() {
                    // the first value sets absmax 1.0; then midpoints of neighbours (ties)
                    *v = if k % 64 == 0 {
                        1.0
                    } else {
                        let i = k % 15;
                        (t[i] + t[i + 1]) / 2.0
                    };
                }
            }
            _ => {}
        }
    }
    x
}

#[test]
fn host_kernels_equal_the_cpu_quantizers_on_random_tensors() {
    let Some(h) = harness() else { return };
    for (rows, cols, seed) in [(14usize, 256usize, 1u64), (9, 768, 2), (3, 4096, 3)] {
        let x = awkward(rows, cols, seed);
        for ty in gpu_types() {
            let mut cpu = vec![0u8; x.len() / ty.block_size() * ty.type_size()];
            quant::quantize(ty, &x, &mut cpu);
            let got = host_quantize(h, ty, &x);
            assert!(
                got == cpu,
                "{ty} {rows}x{cols}: kernel bytes differ from the CPU quantizer (first differing block {:?})",
                first_diff(&got, &cpu, ty.type_size())
            );
        }
    }
}

#[test]
fn host_4bit_kernels_equal_the_cpu_nf4_module() {
    use quant::nf4::{self, QuantType};
    let Some(h) = harness() else { return };
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        let table = FourBitTable::for_type(qt);
        for (k, n) in [15usize, 64, 1000, 1001, 64 * 300 + 32, 7 * 4096]
            .into_iter()
            .enumerate()
        {
            let x = awkward(1, n, 40 + k as u64);
            let (cp, ca) = nf4::quantize_4bit(qt, &x);
            let (hp, ha) = host_4bit(h, &x, nf4::BLOCKSIZE, &table);
            assert!(hp == cp, "{} n={n}: packed codes differ", qt.name());
            assert_eq!(
                ha.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                ca.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{} n={n}: absmax",
                qt.name()
            );
            let nested = nf4::double_quant(&ca);
            let (q, na) = host_dq(
                h,
                &ca,
                nested.offset,
                nf4::dynamic_map(),
                DoubleQuantRounding::CpuLut,
            );
            assert_eq!(q, nested.codes, "{} n={n}: absmax codes", qt.name());
            assert_eq!(
                na.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                nested
                    .nested_absmax
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                "{} n={n}: nested absmax",
                qt.name()
            );
        }
    }
}

fn nf4_table(st: &SafeTensors) -> FourBitTable {
    let map = f32s(st.tensor("quant_map").unwrap().data());
    let values: [f32; 16] = map.try_into().unwrap();
    FourBitTable::from_values(&values)
}

#[test]
fn host_kernels_reproduce_bitsandbytes_nf4_golden_bytes() {
    let Some(h) = harness() else { return };
    let emu = golden("nf4/nf4_emulated_cuda_nested.safetensors");
    let emu = SafeTensors::deserialize(&emu).unwrap();
    for case in NF4_CASES {
        for dq in [0, 1] {
            let bytes = golden(&format!("nf4/nf4_{case}_dq{dq}.safetensors"));
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let x = f32s(st.tensor("input").unwrap().data());
            let (packed, absmax) = host_4bit(h, &x, 64, &nf4_table(&st));
            assert_eq!(
                packed,
                st.tensor("packed").unwrap().data(),
                "{case} dq{dq}: packed codes"
            );
            if dq == 0 {
                let want = f32s(st.tensor("absmax").unwrap().data());
                let (a, b): (Vec<u32>, Vec<u32>) = (
                    absmax.iter().map(|v| v.to_bits()).collect(),
                    want.iter().map(|v| v.to_bits()).collect(),
                );
                assert_eq!(a, b, "{case}: absmax");
                continue;
            }
            // the offset is the stored torch mean (decisions.md: fed in, not recomputed)
            let offset = f32s(st.tensor("nested_offset").unwrap().data())[0];
            let code = f32s(st.tensor("nested_quant_map").unwrap().data());
            let (q, nested) = host_dq(h, &absmax, offset, &code, DoubleQuantRounding::CpuLut);
            assert_eq!(q, st.tensor("absmax_q").unwrap().data(), "{case}: absmax_q");
            let want = f32s(st.tensor("nested_absmax").unwrap().data());
            assert_eq!(
                nested.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{case}: nested_absmax"
            );
            // true-nearest rounding agrees with the generator's port of bitsandbytes' CUDA
            // dQuantize, except in an all-zero group (CUDA: 0·(1/0) = NaN → code 0; torch:
            // the absmax is clamped to 1e-38 → 0.0 → code 127)
            let centred = f32s(
                emu.tensor(&format!("{case}.absmax_centred"))
                    .unwrap()
                    .data(),
            );
            let (qn, _) = host_dq(h, &absmax, offset, &code, DoubleQuantRounding::Nearest);
            let cuda = emu
                .tensor(&format!("{case}.absmax_q_cuda_emulated"))
                .unwrap();
            assert_eq!(centred.len(), qn.len());
            for (i, (a, b)) in qn.iter().zip(cuda.data()).enumerate() {
                let g = i / 256 * 256;
                if centred[g..(g + 256).min(centred.len())]
                    .iter()
                    .any(|v| *v != 0.0)
                {
                    assert_eq!(a, b, "{case}: nearest nested code {i}");
                } else {
                    assert_eq!(*a, 127, "{case}: all-zero group code {i}");
                }
            }
        }
    }
}

/// Values covering every f16 exponent (normal, subnormal, underflow, overflow) and exact ties.
fn conversion_probe_values() -> Vec<f32> {
    let mut v = Vec::new();
    let mut s: u32 = 0x1234_5678;
    for e in 90u32..=160 {
        for k in 0..600u32 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let mant = match k {
                0 => 0,
                1 => 0x7f_ffff,
                2..=40 => (s & 0x7f_e000) | 0x1000,  // f16 ties
                41..=80 => (s & 0x7f_0000) | 0x8000, // bf16 ties
                _ => s & 0x7f_ffff,
            };
            let bits = (e << 23) | mant;
            v.push(f32::from_bits(bits));
            v.push(-f32::from_bits(bits));
        }
    }
    v.extend([
        0.0,
        -0.0,
        65504.0,
        65519.99,
        65520.0,
        f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MIN_POSITIVE,
        1e-45,
        5.960_464_5e-8,
        2.980_232_2e-8,
        2.980_232_3e-8,
    ]);
    v
}

#[test]
fn host_conversions_are_ieee_round_to_nearest_even() {
    let Some(h) = harness() else { return };
    let x = conversion_probe_values();
    let f16 = host_quantize(h, GgmlType::F16, &x);
    let bf16 = host_quantize(h, GgmlType::BF16, &x);
    for (i, v) in x.iter().enumerate() {
        let g16 = u16::from_le_bytes([f16[2 * i], f16[2 * i + 1]]);
        let gbf = u16::from_le_bytes([bf16[2 * i], bf16[2 * i + 1]]);
        assert_eq!(g16, half::f16::from_f32(*v).to_bits(), "f16 of {v:e}");
        assert_eq!(gbf, half::bf16::from_f32(*v).to_bits(), "bf16 of {v:e}");
    }
    // widening: every f16 and bf16 bit pattern
    let all: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
    for (dt, name) in [(1, "f16"), (2, "bf16")] {
        let s = Scratch::new();
        let input = s.put("in", &all);
        run_harness(h, &["widen", &dt.to_string(), &input, &s.path("out")]);
        let got = f32s(&s.get("out"));
        for (k, g) in got.iter().enumerate() {
            let want = if dt == 1 {
                half::f16::from_bits(k as u16).to_f32()
            } else {
                half::bf16::from_bits(k as u16).to_f32()
            };
            if want.is_nan() {
                assert!(g.is_nan(), "{name} {k:#06x}");
            } else {
                assert_eq!(g.to_bits(), want.to_bits(), "{name} {k:#06x}");
            }
        }
    }
}

fn bf16_round(v: f32) -> f32 {
    half::bf16::from_f32(v).to_f32()
}

/// PEFT's merge, written out in the test: delta = (B·A) accumulated over the rank in order,
/// times the scale, in the weight's layout (embedding: delta rounded to bf16 first).
#[allow(clippy::too_many_arguments)]
fn merge_expected(
    w: &[f32],
    a: &[f32],
    b: &[f32],
    rows: usize,
    cols: usize,
    r: usize,
    scale: f32,
    layout: LoraLayout,
) -> Vec<f32> {
    let mut v = vec![0f32; rows * cols];
    for row in 0..rows {
        for col in 0..cols {
            let (o, i, a_cols) = match layout {
                LoraLayout::Linear => (row, col, cols),
                LoraLayout::Conv1D | LoraLayout::Embedding => (col, row, rows),
            };
            let mut acc = 0f32;
            for k in 0..r {
                acc += b[o * r + k] * a[k * a_cols + i];
            }
            let mut d = acc * scale;
            if layout == LoraLayout::Embedding {
                d = bf16_round(d);
            }
            v[row * cols + col] = w[row * cols + col] + d;
        }
    }
    v
}

#[test]
fn host_lora_merge_and_dora_follow_peft_formula() {
    let Some(h) = harness() else { return };
    let (rows, cols, r) = (24usize, 40usize, 4usize);
    let scale = 16.0f32 / 4.0;
    let w: Vec<f32> = gaussian(rows * cols, 0.02, 1)
        .into_iter()
        .map(bf16_round)
        .collect();
    for (li, layout) in [
        LoraLayout::Linear,
        LoraLayout::Conv1D,
        LoraLayout::Embedding,
    ]
    .into_iter()
    .enumerate()
    {
        let (a_len, b_len) = match layout {
            LoraLayout::Linear => (r * cols, rows * r),
            _ => (r * rows, cols * r),
        };
        let a = gaussian(a_len, 0.05, 10 + li as u64);
        let b = gaussian(b_len, 0.05, 20 + li as u64);
        let s = Scratch::new();
        let (pw, pa, pb) = (
            s.put("w", &f32_bytes(&w)),
            s.put("a", &f32_bytes(&a)),
            s.put("b", &f32_bytes(&b)),
        );
        run_harness(
            h,
            &[
                "merge",
                &(layout as i32).to_string(),
                &(Dtype::BF16 as i32).to_string(),
                &rows.to_string(),
                &cols.to_string(),
                &r.to_string(),
                &format!("{:08x}", scale.to_bits()),
                &pw,
                &pa,
                &pb,
                &s.path("v"),
            ],
        );
        let got = f32s(&s.get("v"));
        let want = merge_expected(&w, &a, &b, rows, cols, r, scale, layout);
        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), e.to_bits(), "{layout:?} element {i}");
        }
        // DoRA on the merged V: norm per row (Linear) or per column, then (m / n)·V in bf16
        let by_row = layout == LoraLayout::Linear;
        let count = if by_row { rows } else { cols };
        let mag: Vec<f32> = gaussian(count, 1.0, 30).iter().map(|v| v.abs()).collect();
        let pv = s.put("vin", &f32_bytes(&got));
        let pm = s.put("m", &f32_bytes(&mag));
        run_harness(
            h,
            &[
                "dora",
                if by_row { "1" } else { "0" },
                &(Dtype::BF16 as i32).to_string(),
                &rows.to_string(),
                &cols.to_string(),
                &pv,
                &pm,
                &s.path("d"),
            ],
        );
        let d = s.get("d");
        let norms: Vec<f32> = (0..count)
            .map(|t| {
                let mut acc = 0f32;
                for k in 0..(if by_row { cols } else { rows }) {
                    let x = if by_row {
                        got[t * cols + k]
                    } else {
                        got[k * cols + t]
                    };
                    acc += x * x;
                }
                acc.sqrt()
            })
            .collect();
        for i in 0..rows * cols {
            let k = if by_row { i / cols } else { i % cols };
            let e = half::bf16::from_f32((mag[k] / norms[k]) * got[i]).to_bits();
            assert_eq!(
                u16::from_le_bytes([d[2 * i], d[2 * i + 1]]),
                e,
                "{layout:?} DoRA element {i}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CLI on a machine without a usable GPU

fn gpu_present() -> bool {
    gpu::probe().is_ok()
}

#[test]
fn device_auto_without_gpu_says_why_in_one_line_and_writes_the_cpu_bytes() {
    if gpu_present() {
        eprintln!("skipped: a GPU is usable here");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let src = fixture("tiny-llama");
    for ty in ["f16", "bf16", "q8_0", "q4_k_m"] {
        let mut outs = Vec::new();
        for dev in ["auto", "cpu"] {
            let out = d.path().join(format!("{ty}-{dev}.gguf"));
            let o = run(&[
                "quantize",
                src.to_str().unwrap(),
                "--to",
                ty,
                "-o",
                out.to_str().unwrap(),
                "--device",
                dev,
            ]);
            let err = stderr(&o);
            assert!(o.status.success(), "{ty} --device {dev}: {err}");
            let lines: Vec<&str> = err.lines().filter(|l| l.contains("CUDA")).collect();
            if dev == "auto" {
                assert_eq!(lines.len(), 1, "one CUDA line: {err}");
                assert!(
                    lines[0].starts_with("ftconv: CUDA unavailable (")
                        && lines[0].contains("); using CPU ("),
                    "{}",
                    lines[0]
                );
                assert!(!err.contains("panicked"), "{err}");
            } else {
                assert!(lines.is_empty(), "--device cpu says nothing: {err}");
            }
            outs.push(std::fs::read(&out).unwrap());
        }
        assert!(outs[0] == outs[1], "{ty}: auto and cpu bytes differ");
    }
    // --quiet silences the line
    let out = d.path().join("q.gguf");
    let o = run(&[
        "quantize",
        src.to_str().unwrap(),
        "--to",
        "f16",
        "-o",
        out.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success());
    assert_eq!(stderr(&o), "");
}

#[test]
fn device_cuda_without_gpu_fails_cleanly() {
    if gpu_present() {
        eprintln!("skipped: a GPU is usable here");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out.gguf");
    let o = run(&[
        "quantize",
        fixture("tiny-llama").to_str().unwrap(),
        "--to",
        "f16",
        "-o",
        out.to_str().unwrap(),
        "--device",
        "cuda",
    ]);
    assert_fails(&o, 1, "--device cuda: no usable GPU (");
    assert!(list(d.path()).is_empty(), "nothing written");
}

#[test]
fn device_flag_rejects_unknown_values() {
    let o = run(&[
        "quantize",
        fixture("tiny-llama").to_str().unwrap(),
        "--to",
        "f16",
        "--device",
        "tpu",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    // NF4/FP4 are written on the CPU: asking for the GPU is a usage error, not a silent CPU run
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("nf4");
    let o = run(&[
        "quantize",
        fixture("tiny-llama").to_str().unwrap(),
        "--to",
        "nf4",
        "-o",
        out.to_str().unwrap(),
        "--device",
        "cuda",
    ]);
    assert_fails(&o, 2, "--device cuda: --to NF4 runs on the CPU");
    assert!(list(d.path()).is_empty());
}

// ---------------------------------------------------------------------------------------------
// On a GPU (skipped without one)

fn gpu_or_skip() -> Option<std::sync::Arc<gpu::Gpu>> {
    match gpu::probe() {
        Ok(g) => Some(g),
        Err(why) => {
            eprintln!("skipped: no usable GPU ({why})");
            None
        }
    }
}

/// (name, rows, cols) of random tensors: rows not a multiple of 256, a wide one, and one
/// larger than a GPU chunk (16 Mi values) so the two streams alternate.
const RANDOM_SHAPES: &[(&str, usize, usize)] = &[
    ("7x256", 7, 256),
    ("33x512", 33, 512),
    ("300x768", 300, 768),
    ("2x4096", 2, 4096),
    ("4100x4096", 4100, 4096),
];

#[test]
fn gpu_bytes_equal_cpu_bytes_for_every_type() {
    let Some(g) = gpu_or_skip() else { return };
    let mut inputs: Vec<(String, Vec<f32>)> = Vec::new();
    for case in QUANT_CASES {
        let bytes = golden(&format!("quant/{case}.safetensors"));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        inputs.push((case.to_string(), f32s(st.tensor("input").unwrap().data())));
    }
    for (k, (name, rows, cols)) in RANDOM_SHAPES.iter().enumerate() {
        inputs.push((
            name.to_string(),
            gaussian(rows * cols, 0.02, 100 + k as u64),
        ));
    }
    for ty in gpu_types() {
        for (name, x) in &inputs {
            let n = x.len() / ty.block_size() * ty.type_size();
            let mut cpu = vec![0u8; n];
            quant::quantize(ty, x, &mut cpu);
            let mut dev = vec![0u8; n];
            g.quantize(ty, x, &mut dev).unwrap();
            assert!(
                cpu == dev,
                "{ty} on {name}: GPU bytes differ from the CPU's (first differing block {:?})",
                first_diff(&cpu, &dev, ty.type_size())
            );
        }
    }
    // and the golden files themselves
    for case in QUANT_CASES {
        let bytes = golden(&format!("quant/{case}.safetensors"));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let x = f32s(st.tensor("input").unwrap().data());
        for ty in gpu_types() {
            let key = ty.name().to_ascii_lowercase();
            let want = st.tensor(&key).unwrap();
            let mut dev = vec![0u8; want.data().len()];
            g.quantize(ty, &x, &mut dev).unwrap();
            assert!(
                dev == want.data(),
                "{case} {key}: GPU differs from llama.cpp"
            );
        }
    }
}

#[test]
fn gpu_4bit_equals_bitsandbytes_and_host_bytes() {
    let Some(g) = gpu_or_skip() else { return };
    for case in NF4_CASES {
        let bytes = golden(&format!("nf4/nf4_{case}_dq1.safetensors"));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let x = f32s(st.tensor("input").unwrap().data());
        let table = nf4_table(&st);
        let (packed, absmax) = g.quantize_4bit(&x, 64, &table).unwrap();
        assert_eq!(
            packed,
            st.tensor("packed").unwrap().data(),
            "{case}: packed"
        );
        let offset = f32s(st.tensor("nested_offset").unwrap().data())[0];
        let code: [f32; 256] = f32s(st.tensor("nested_quant_map").unwrap().data())
            .try_into()
            .unwrap();
        let (q, _) = g
            .double_quant(&absmax, offset, &code, DoubleQuantRounding::CpuLut)
            .unwrap();
        assert_eq!(q, st.tensor("absmax_q").unwrap().data(), "{case}: absmax_q");
    }
    // random tensors, including a partial last block and an odd count, against the CPU module
    use quant::nf4::{self, QuantType};
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        let table = FourBitTable::for_type(qt);
        for (k, n) in [64usize, 1000, 1001, 4096 * 11, (16 << 20) + 77]
            .into_iter()
            .enumerate()
        {
            let x = awkward(1, n, 200 + k as u64);
            let dev = g.quantize_4bit(&x, nf4::BLOCKSIZE, &table).unwrap();
            let cpu = nf4::quantize_4bit(qt, &x);
            assert!(dev.0 == cpu.0, "{} {n} values: packed differ", qt.name());
            assert_eq!(
                dev.1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                cpu.1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{} {n} values: absmax differ",
                qt.name()
            );
            let nested = nf4::double_quant(&cpu.1);
            let (q, na) = g
                .double_quant(
                    &cpu.1,
                    nested.offset,
                    nf4::dynamic_map(),
                    DoubleQuantRounding::CpuLut,
                )
                .unwrap();
            assert_eq!(q, nested.codes, "{} {n}: absmax codes", qt.name());
            assert!(
                na.iter()
                    .zip(&nested.nested_absmax)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
        }
    }
}

#[test]
fn gpu_widen_and_merge_equal_the_host_build() {
    let Some(g) = gpu_or_skip() else { return };
    let all: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
    for dt in [Dtype::F16, Dtype::BF16] {
        let got = g.widen(&all, dt).unwrap();
        for (k, v) in got.iter().enumerate() {
            let want = if dt == Dtype::F16 {
                half::f16::from_bits(k as u16).to_f32()
            } else {
                half::bf16::from_bits(k as u16).to_f32()
            };
            assert!(v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan()));
        }
    }
    let (rows, cols, r) = (96usize, 80usize, 8usize);
    let w: Vec<f32> = gaussian(rows * cols, 0.02, 1)
        .into_iter()
        .map(bf16_round)
        .collect();
    for layout in [
        LoraLayout::Linear,
        LoraLayout::Conv1D,
        LoraLayout::Embedding,
    ] {
        let (a_len, b_len) = match layout {
            LoraLayout::Linear => (r * cols, rows * r),
            _ => (r * rows, cols * r),
        };
        let a = gaussian(a_len, 0.05, 2);
        let b = gaussian(b_len, 0.05, 3);
        let v = g
            .lora_merge(&w, &a, &b, rows, cols, r, 2.0, layout, Dtype::BF16)
            .unwrap();
        let want = merge_expected(&w, &a, &b, rows, cols, r, 2.0, layout);
        assert!(
            v.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{layout:?} merge"
        );
        let by_row = layout == LoraLayout::Linear;
        let count = if by_row { rows } else { cols };
        let mag: Vec<f32> = gaussian(count, 1.0, 4).iter().map(|x| x.abs()).collect();
        let out = g
            .dora_apply(&v, &mag, rows, cols, by_row, Dtype::BF16)
            .unwrap();
        assert_eq!(out.len(), rows * cols * 2);
    }
}

/// Throughput on a GPU (run explicitly: `cargo test --release --test gpu_kernels -- --ignored
/// --nocapture`): one 7B-shaped llama layer (q/k/v/o 4096x4096, gate/up/down 4096x11008,
/// 202 M values) quantized by the GPU and by the CPU (all threads), bytes compared, seconds and
/// GB/s of bf16 input printed.
#[test]
#[ignore]
fn gpu_throughput_report() {
    use rayon::prelude::*;
    let Some(g) = gpu_or_skip() else { return };
    eprintln!("{}", g.describe());
    let shapes = [
        (4096usize, 4096usize),
        (4096, 4096),
        (4096, 4096),
        (4096, 4096),
        (11008, 4096),
        (11008, 4096),
        (4096, 11008),
    ];
    let tensors: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(k, (r, c))| {
            gaussian(r * c, 0.02, 500 + k as u64)
                .into_iter()
                .map(bf16_round)
                .collect()
        })
        .collect();
    let values: usize = tensors.iter().map(|t| t.len()).sum();
    for ty in [
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::Q5_K,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
    ] {
        let outs: Vec<usize> = tensors
            .iter()
            .map(|t| t.len() / ty.block_size() * ty.type_size())
            .collect();
        // warm-up (module compilation)
        let mut tmp = vec![0u8; outs[0]];
        g.quantize(ty, &tensors[0], &mut tmp).unwrap();
        let t0 = std::time::Instant::now();
        let mut gpu_out: Vec<Vec<u8>> = Vec::new();
        for (t, n) in tensors.iter().zip(&outs) {
            let mut y = vec![0u8; *n];
            g.quantize(ty, t, &mut y).unwrap();
            gpu_out.push(y);
        }
        let gs = t0.elapsed().as_secs_f64();
        let t1 = std::time::Instant::now();
        let cpu_out: Vec<Vec<u8>> = tensors
            .iter()
            .zip(&outs)
            .map(|(t, n)| {
                let mut y = vec![0u8; *n];
                let bs = 256 * 64;
                let ob = bs / ty.block_size() * ty.type_size();
                t.par_chunks(bs)
                    .zip(y.par_chunks_mut(ob))
                    .for_each(|(x, o)| quant::quantize(ty, x, o));
                y
            })
            .collect();
        let cs = t1.elapsed().as_secs_f64();
        assert!(gpu_out == cpu_out, "{ty}: GPU bytes differ from the CPU's");
        let gb = values as f64 * 2.0 / 1e9;
        eprintln!(
            "{ty}: {values} values; GPU {gs:.3} s ({:.1} GB/s of bf16), CPU {} threads {cs:.3} s ({:.2} GB/s); GPU/CPU speed-up {:.1}x; bytes identical",
            gb / gs,
            rayon::current_num_threads(),
            gb / cs,
            cs / gs
        );
    }
}
