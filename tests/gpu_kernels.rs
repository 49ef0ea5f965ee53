//! The GPU kernels (src/gpu/kernels/*.cu):
//! - NVRTC compiles every kernel for compute_80/compute_90 (PTX, through cudarc) and for
//!   sm_80/sm_90 (CUBIN, the run-time path). Skips when libnvrtc is absent unless
//!   FTCONV_REQUIRE_NVRTC=1 (scripts/nvrtc_check.sh sets it, with NVRTC from PyPI).
//! - Host emulation: the same kernel sources built as C++ by the host compiler (no GPU needed)
//!   reproduce llama.cpp's golden bytes for every GGUF type and bitsandbytes' golden NF4 bytes
//!   (fixtures/golden, made by those tools), and IEEE conversions checked against `half`.
//! - Host emulation of the merge kernels: the CPU merge's own steps (equal to PEFT's
//!   merge_and_unload bit for bit) give the same f32 bits through merge.cu.
//! - CLI without a driver: `--device auto` says why in one line and writes the CPU's bytes
//!   (quantize, merge, NF4 with and without adapters); `--device cuda` fails cleanly (exit 1,
//!   nothing written).
//! - On a GPU: GPU bytes == CPU bytes for every type (skipped when no GPU is usable).

mod common;
use common::*;
use ftconv::gpu::{self, DoubleQuantRounding, Dtype, FourBitTable, MergeStep};
use ftconv::lora::merge::{FloatType, Layout, LoraDelta, LoraTerm, Op, merge_dense};
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

/// Adapter merges built from the CPU merge's own steps (`lora::merge::Op`, which equals PEFT's
/// merge_and_unload bit for bit: tests/cli_merge.rs, scripts/interop/merge.sh) on a
/// [rows, cols] weight: every layout and dtype, one adapter and PEFT's two-adapter `cat`
/// combination, DoRA per row and per column, lora_bias and IA³ vectors, chained steps.
fn merge_cases(rows: usize, cols: usize) -> Vec<(String, FloatType, Vec<Op>)> {
    let term =
        |r: usize, a_cols: usize, b_rows: usize, seed: u64, scaling: f32, weight: f32| LoraTerm {
            a: gaussian(r * a_cols, 0.05, seed),
            b: gaussian(b_rows * r, 0.05, seed + 1),
            r,
            scaling,
            weight,
        };
    let positive = |n: usize, seed: u64| -> Vec<f32> {
        gaussian(n, 1.0, seed)
            .iter()
            .map(|v| v.abs() + 0.1)
            .collect()
    };
    let mut cases = vec![];
    for ty in [FloatType::BF16, FloatType::F16, FloatType::F32] {
        for layout in [Layout::Linear, Layout::Conv1D, Layout::Embedding] {
            // Linear: W [out, in] = [rows, cols]; Conv1D / Embedding: W [in, out] = [rows, cols]
            let (a_cols, b_rows) = if layout == Layout::Linear {
                (cols, rows)
            } else {
                (rows, cols)
            };
            let one = LoraDelta::new(layout, &[term(8, a_cols, b_rows, 1, 2.0, 1.0)]);
            let two = LoraDelta::new(
                layout,
                &[
                    term(8, a_cols, b_rows, 3, 0.5, 0.7),
                    term(4, a_cols, b_rows, 5, 4.0, 0.3),
                ],
            );
            let add = |d: LoraDelta| {
                if layout == Layout::Embedding {
                    Op::AddRounded(d)
                } else {
                    Op::Add(d)
                }
            };
            let name = |what: &str| format!("{ty:?} {layout:?} {what}");
            cases.push((name("one adapter"), ty, vec![add(one.clone())]));
            cases.push((name("two adapters"), ty, vec![add(two.clone())]));
            let per_column = layout.transposed();
            cases.push((
                name("DoRA"),
                ty,
                vec![Op::Dora {
                    delta: one,
                    magnitude: positive(if per_column { cols } else { rows }, 7),
                    per_column,
                }],
            ));
        }
        let d = LoraDelta::new(Layout::Linear, &[term(16, cols, rows, 9, 1.0, 1.0)]);
        cases.push((
            format!("{ty:?} LoRA, lora_bias, IA3 rows and columns"),
            ty,
            vec![
                Op::Add(d),
                Op::AddVec(gaussian(cols, 0.1, 11)),
                Op::Scale {
                    l: positive(rows, 12),
                    per_row: true,
                },
                Op::Scale {
                    l: positive(cols, 13),
                    per_row: false,
                },
            ],
        ));
    }
    cases
}

/// The GPU merge steps of `op` on all rows of `x` (the column norms of a per-column DoRA
/// step computed by the CPU, as `MergedRows` does), passed to `run`.
fn merge_with_steps(
    x: &mut Vec<f32>,
    cols: usize,
    ops: &[Op],
    mut run: impl FnMut(&mut Vec<f32>, &[MergeStep]),
) {
    let rows = x.len() / cols;
    for op in ops {
        let norms = matches!(
            op,
            Op::Dora {
                per_column: true,
                ..
            }
        )
        .then(|| ftconv::lora::merge::column_norms_dense(x, rows, cols, op));
        let mut steps = vec![];
        op.gpu_steps(0..rows, norms.as_deref(), &mut steps).unwrap();
        run(x, &steps);
    }
}

/// merge.cu's kernels built for the host, one harness call per step (as `Gpu::merge_rows`
/// launches them).
fn host_merge_steps(h: &Path, x: &mut Vec<f32>, cols: usize, dt: Dtype, steps: &[MergeStep]) {
    let rows = x.len() / cols;
    let s = Scratch::new();
    let (d, r, c) = ((dt as i32).to_string(), rows.to_string(), cols.to_string());
    for st in steps {
        let px = s.put("x", &f32_bytes(x));
        let out = s.path("y");
        let args: Vec<String> = match *st {
            MergeStep::Lora {
                coef,
                mat,
                r: rank,
                post_scale,
                mode,
            } => vec![
                "lora_rows".into(),
                (mode as i32).to_string(),
                d.clone(),
                r.clone(),
                c.clone(),
                rank.to_string(),
                format!("{:08x}", post_scale.to_bits()),
                px,
                s.put("coef", &f32_bytes(coef)),
                s.put("mat", &f32_bytes(mat)),
                out,
            ],
            MergeStep::DoraRows { magnitude } => vec![
                "dora_rows".into(),
                d.clone(),
                r.clone(),
                c.clone(),
                px,
                s.put("mag", &f32_bytes(magnitude)),
                out,
            ],
            MergeStep::DoraCols { magnitude, norms } => vec![
                "dora_cols".into(),
                d.clone(),
                r.clone(),
                c.clone(),
                px,
                s.put("mag", &f32_bytes(magnitude)),
                s.put("norms", &f32_bytes(norms)),
                out,
            ],
            MergeStep::AddVec(v) | MergeStep::ScaleRows(v) | MergeStep::ScaleCols(v) => {
                let mode = match *st {
                    MergeStep::AddVec(_) => 0,
                    MergeStep::ScaleRows(_) => 1,
                    _ => 2,
                };
                vec![
                    "vec_op".into(),
                    mode.to_string(),
                    d.clone(),
                    r.clone(),
                    c.clone(),
                    px,
                    s.put("v", &f32_bytes(v)),
                    out,
                ]
            }
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_harness(h, &args);
        *x = f32s(&s.get("y"));
    }
}

fn assert_same_f32(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got
        .iter()
        .zip(want)
        .position(|(a, b)| a.to_bits() != b.to_bits())
    {
        panic!("{what}: element {i}: {} vs {} (CPU)", got[i], want[i]);
    }
}

#[test]
fn host_merge_kernels_equal_the_cpu_merge() {
    let Some(h) = harness() else { return };
    let (rows, cols) = (37usize, 300usize);
    let w = gaussian(rows * cols, 0.02, 1);
    let cases = merge_cases(rows, cols);
    for (name, ty, ops) in &cases {
        let mut want = w.clone();
        merge_dense(&mut want, cols, *ty, ops);
        let mut x = w.clone();
        ty.round(&mut x);
        merge_with_steps(&mut x, cols, ops, |x, steps| {
            host_merge_steps(h, x, cols, ty.gpu_dtype(), steps)
        });
        assert_same_f32(&x, &want, name);
    }
    assert_eq!(cases.len(), 30);
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
}

/// A LoRA (or DoRA) adapter for tiny-llama on q_proj, gate_proj and embed_tokens.
fn tiny_adapter(dir: &Path, dora: bool) {
    let p = "base_model.model.model.";
    let (h, ff, vocab, r) = (256usize, 512usize, 512usize, 8usize);
    let mut ts = vec![
        (format!("{p}embed_tokens.lora_embedding_A"), vec![r, vocab]),
        (format!("{p}embed_tokens.lora_embedding_B"), vec![h, r]),
        (
            format!("{p}layers.0.self_attn.q_proj.lora_A.weight"),
            vec![r, h],
        ),
        (
            format!("{p}layers.0.self_attn.q_proj.lora_B.weight"),
            vec![h, r],
        ),
        (
            format!("{p}layers.1.mlp.gate_proj.lora_A.weight"),
            vec![r, h],
        ),
        (
            format!("{p}layers.1.mlp.gate_proj.lora_B.weight"),
            vec![ff, r],
        ),
    ];
    if dora {
        // per output row (Linear) and per column (the embedding)
        ts.push((format!("{p}embed_tokens.lora_magnitude_vector"), vec![h]));
        ts.push((
            format!("{p}layers.0.self_attn.q_proj.lora_magnitude_vector"),
            vec![h],
        ));
        ts.push((
            format!("{p}layers.1.mlp.gate_proj.lora_magnitude_vector"),
            vec![ff],
        ));
    }
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = ts
        .into_iter()
        .enumerate()
        .map(|(k, (n, shape))| {
            let len = shape.iter().product();
            let v = if n.ends_with("magnitude_vector") {
                vec![0.5; len]
            } else {
                gaussian(len, 0.1, 40 + k as u64)
            };
            (n, shape, v)
        })
        .collect();
    let config = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 16,
        "target_modules": ["q_proj", "gate_proj", "embed_tokens"],
        "base_model_name_or_path": "tiny-llama", "bias": "none", "fan_in_fan_out": false,
        "use_rslora": false, "use_dora": dora
    });
    write_f32_adapter(dir, &config, &tensors);
}

/// Every file of a folder, by name.
fn folder_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    list(dir)
        .into_iter()
        .map(|n| {
            let b = std::fs::read(dir.join(&n)).unwrap();
            (n, b)
        })
        .collect()
}

#[test]
fn merge_and_nf4_device_auto_without_gpu_write_the_cpu_bytes() {
    if gpu_present() {
        eprintln!("skipped: a GPU is usable here");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let base = fixture("tiny-llama");
    let ad = d.path().join("adapter");
    tiny_adapter(&ad, true);
    let (b, a) = (base.to_str().unwrap(), ad.to_str().unwrap());
    let jobs: [(&str, Vec<&str>); 3] = [
        ("merge", vec!["merge", b, a]),
        ("nf4", vec!["quantize", b, "--to", "nf4"]),
        (
            "nf4+adapter",
            vec!["quantize", b, "--to", "nf4", "--adapter", a],
        ),
    ];
    for (name, args) in jobs {
        let mut outs = vec![];
        for dev in ["auto", "cpu"] {
            let out = d.path().join(format!("{name}-{dev}"));
            let mut full = args.clone();
            full.extend(["-o", out.to_str().unwrap(), "--device", dev]);
            let o = run(&full);
            let err = stderr(&o);
            assert!(o.status.success(), "{name} --device {dev}: {err}");
            let lines: Vec<&str> = err.lines().filter(|l| l.contains("CUDA")).collect();
            assert_eq!(lines.len(), usize::from(dev == "auto"), "{name}: {err}");
            if dev == "auto" {
                assert!(lines[0].starts_with("ftconv: CUDA unavailable ("), "{err}");
            }
            outs.push(folder_bytes(&out));
        }
        assert!(!outs[0].is_empty());
        assert!(outs[0] == outs[1], "{name}: auto and cpu outputs differ");
    }
}

#[test]
fn merge_and_nf4_device_cuda_without_gpu_fail_cleanly() {
    if gpu_present() {
        eprintln!("skipped: a GPU is usable here");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let base = fixture("tiny-llama");
    let ad = d.path().join("adapter");
    tiny_adapter(&ad, false);
    let out_dir = d.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("x");
    let (b, a, o_) = (
        base.to_str().unwrap(),
        ad.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    for args in [
        vec!["merge", b, a, "-o", o_],
        vec!["merge", b, a, "--to", "q8_0", "-o", o_],
        vec!["quantize", b, "--to", "nf4", "-o", o_],
        vec!["quantize", b, "--to", "fp4", "--adapter", a, "-o", o_],
    ] {
        let mut full = args.clone();
        full.extend(["--device", "cuda"]);
        let o = run(&full);
        assert_fails(&o, 1, "--device cuda: no usable GPU (");
        assert!(list(&out_dir).is_empty(), "{args:?}: nothing written");
    }
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
fn gpu_widen_and_merge_equal_the_cpu() {
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
    // every merge case, and one tensor larger than a GPU chunk (16 Mi values: two chunks)
    for (rows, cols) in [(37usize, 300usize), (4100, 4096)] {
        let w = gaussian(rows * cols, 0.02, 1);
        let cases = merge_cases(rows, cols);
        let n = if rows > 1000 { 1 } else { cases.len() };
        for (name, ty, ops) in cases.iter().take(n) {
            let mut want = w.clone();
            merge_dense(&mut want, cols, *ty, ops);
            let mut x = w.clone();
            ty.round(&mut x);
            merge_with_steps(&mut x, cols, ops, |x, steps| {
                g.merge_rows(x, cols, ty.gpu_dtype(), steps).unwrap()
            });
            assert_same_f32(&x, &want, &format!("{name} ({rows}x{cols})"));
        }
    }
}

#[test]
fn gpu_cli_merge_nf4_and_package_equal_the_cpu() {
    let Some(_) = gpu_or_skip() else { return };
    let d = tempfile::tempdir().unwrap();
    let base = fixture("tiny-llama");
    let ad = d.path().join("adapter");
    tiny_adapter(&ad, true);
    let (b, a) = (base.to_str().unwrap(), ad.to_str().unwrap());
    let jobs: [(&str, Vec<&str>); 5] = [
        ("merge", vec!["merge", b, a]),
        ("merge-q4km", vec!["merge", b, a, "--to", "q4_k_m"]),
        ("nf4", vec!["quantize", b, "--to", "nf4"]),
        (
            "fp4+adapter",
            vec!["quantize", b, "--to", "fp4", "--adapter", a],
        ),
        (
            "q6k+adapter",
            vec!["quantize", b, "--to", "q6_k", "--adapter", a],
        ),
    ];
    for (name, args) in jobs {
        let mut outs = vec![];
        for dev in ["cuda", "cpu"] {
            let out = d.path().join(format!("{name}-{dev}"));
            let mut full = args.clone();
            full.extend(["-o", out.to_str().unwrap(), "--device", dev]);
            let o = run(&full);
            assert!(o.status.success(), "{name} --device {dev}: {}", stderr(&o));
            outs.push(if out.is_dir() {
                folder_bytes(&out)
            } else {
                vec![(name.to_string(), std::fs::read(&out).unwrap())]
            });
        }
        assert!(outs[0] == outs[1], "{name}: GPU and CPU outputs differ");
        eprintln!("{name}: GPU output identical to the CPU's");
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
