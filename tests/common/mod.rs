//! Shared helpers for the integration tests: run the binary, build small inputs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary under test (FTCONV_BIN overrides the build path: test binaries carried to
/// another machine, scripts/gpu_device_check.sh).
pub fn ftconv() -> Command {
    match std::env::var_os("FTCONV_BIN") {
        Some(p) => Command::new(p),
        None => Command::new(env!("CARGO_BIN_EXE_ftconv")),
    }
}

/// The repository (FTCONV_REPO overrides the build path, as FTCONV_BIN does).
pub fn repo() -> PathBuf {
    match std::env::var_os("FTCONV_REPO") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    }
}

pub fn fixture(p: &str) -> PathBuf {
    repo().join("fixtures").join(p)
}

pub fn run(args: &[&str]) -> Output {
    ftconv().args(args).output().expect("run ftconv")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Assert a clean failure: the exit code, exactly one line on stderr containing `needle`,
/// and no panic. The one informational line `--device auto` prints about the GPU (using it, or
/// why not) is not part of the error.
pub fn assert_fails(o: &Output, code: i32, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "exit status; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            !(l.starts_with("ftconv: CUDA unavailable") || l.starts_with("ftconv: using CUDA"))
        })
        .collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {err}");
    assert!(
        err.contains(needle),
        "stderr {err:?} does not mention {needle:?}"
    );
}

/// Copy a folder (files only, one level).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Files in a folder (names), for "no partial output" checks.
pub fn list(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

/// A safetensors file from raw header JSON and data bytes.
pub fn raw_safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

/// A well-formed safetensors file of F32 tensors.
pub fn f32_safetensors(tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = vec![];
    for (name, shape, vals) in tensors {
        let start = data.len();
        for v in vals {
            data.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    raw_safetensors(&serde_json::Value::Object(header).to_string(), &data)
}

/// Deterministic pseudo-random values (xorshift + Box-Muller), N(0, std).
pub fn gaussian(n: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u, v) = (next(), next());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32 * std
        })
        .collect()
}

/// A PEFT adapter folder: `adapter_config.json` and `adapter_model.safetensors` of F32 tensors.
pub fn write_f32_adapter(
    dir: &Path,
    config: &serde_json::Value,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let refs: Vec<(&str, Vec<usize>, Vec<f32>)> = tensors
        .iter()
        .map(|(n, s, v)| (n.as_str(), s.clone(), v.clone()))
        .collect();
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        f32_safetensors(&refs),
    )
    .unwrap();
}
