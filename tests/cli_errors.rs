//! Malformed inputs: each is one clear line on stderr naming what is wrong, exit status 1
//! (2 for usage), no panic, and no output file left behind.

mod common;
use common::*;
use std::path::Path;

fn quantize_to(src: &Path, out_dir: &Path, ty: &str) -> std::process::Output {
    let out = out_dir.join("out.gguf");
    run(&[
        "quantize",
        src.to_str().unwrap(),
        "--to",
        ty,
        "-o",
        out.to_str().unwrap(),
    ])
}

fn check_st(bytes: &[u8], needle: &str) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("bad.safetensors");
    std::fs::write(&p, bytes).unwrap();
    let o = quantize_to(&p, d.path(), "q8_0");
    assert_fails(&o, 1, needle);
    assert!(
        stderr(&o).contains("bad.safetensors"),
        "names the file: {}",
        stderr(&o)
    );
    assert_eq!(
        list(d.path()),
        vec!["bad.safetensors"],
        "no output left behind"
    );
}

#[test]
fn safetensors_header_length_past_end() {
    let mut b = (1000u64).to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    check_st(&b, "header length");
}

#[test]
fn safetensors_header_not_json() {
    check_st(&raw_safetensors("this is not json", &[]), "JSON");
}

#[test]
fn safetensors_offsets_outside_file() {
    let h = r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;
    check_st(&raw_safetensors(h, &[0u8; 8]), "\"w\"");
}

#[test]
fn safetensors_shape_dtype_mismatch() {
    let h = r#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,16]}}"#;
    check_st(&raw_safetensors(h, &[0u8; 16]), "\"w\"");
}

#[test]
fn safetensors_unknown_dtype() {
    let h = r#"{"w":{"dtype":"F7","shape":[2,2],"data_offsets":[0,16]}}"#;
    check_st(&raw_safetensors(h, &[0u8; 16]), "F7");
}

#[test]
fn safetensors_shape_overflow() {
    let h =
        r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,16]}}"#;
    check_st(&raw_safetensors(h, &[0u8; 16]), "overflow");
}

#[test]
fn safetensors_empty_file() {
    check_st(&[], "empty");
}

#[test]
fn safetensors_truncated_data() {
    let full = f32_safetensors(&[("w", vec![4, 32], vec![0.5; 128])]);
    check_st(&full[..full.len() - 100], "\"w\"");
}

#[test]
fn nan_weight_is_refused() {
    let mut v = gaussian(64 * 32, 0.02, 1);
    v[100] = f32::NAN;
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("nan.safetensors");
    std::fs::write(&p, f32_safetensors(&[("layer.weight", vec![64, 32], v)])).unwrap();
    let o = quantize_to(&p, d.path(), "f16");
    assert_fails(&o, 1, "layer.weight");
    assert!(stderr(&o).contains("invalid data"));
    assert_eq!(list(d.path()), vec!["nan.safetensors"]);
}

#[test]
fn unknown_type_is_a_usage_error() {
    let o = run(&[
        "quantize",
        fixture("tiny-llama").to_str().unwrap(),
        "--to",
        "q9_k",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("q9_k"));
}

#[test]
fn output_folder_must_exist() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("nope").join("x.gguf");
    let o = run(&[
        "quantize",
        fixture("tiny-llama").to_str().unwrap(),
        "--to",
        "f16",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_fails(&o, 1, "does not exist");
}

fn tiny_copy(d: &Path) -> std::path::PathBuf {
    let m = d.join("model");
    copy_dir(&fixture("tiny-llama"), &m);
    m
}

#[test]
fn config_missing() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny_copy(d.path());
    std::fs::remove_file(m.join("config.json")).unwrap();
    let o = quantize_to(&m, d.path(), "f16");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("model"), "{}", stderr(&o));
    assert!(!d.path().join("out.gguf").exists());
}

#[test]
fn config_not_json() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny_copy(d.path());
    std::fs::write(m.join("config.json"), "{ nope").unwrap();
    assert_fails(&quantize_to(&m, d.path(), "f16"), 1, "config.json");
}

#[test]
fn config_unknown_architecture() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny_copy(d.path());
    let cfg = std::fs::read_to_string(m.join("config.json"))
        .unwrap()
        .replace("LlamaForCausalLM", "FancyNewForCausalLM");
    std::fs::write(m.join("config.json"), cfg).unwrap();
    let o = quantize_to(&m, d.path(), "f16");
    assert_fails(&o, 1, "FancyNewForCausalLM");
    assert!(!d.path().join("out.gguf").exists());
}

#[test]
fn config_heads_do_not_divide_hidden() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny_copy(d.path());
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("config.json")).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("head_dim");
    cfg["num_attention_heads"] = serde_json::json!(3);
    cfg["num_key_value_heads"] = serde_json::json!(3);
    std::fs::write(m.join("config.json"), cfg.to_string()).unwrap();
    assert_fails(
        &quantize_to(&m, d.path(), "f16"),
        1,
        "does not divide hidden_size",
    );
}

fn check_gguf(bytes: &[u8], needle: &str) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("bad.gguf");
    std::fs::write(&p, bytes).unwrap();
    let o = quantize_to(&p, d.path(), "q8_0");
    assert_fails(&o, 1, needle);
    assert!(stderr(&o).contains("bad.gguf"));
    assert_eq!(list(d.path()), vec!["bad.gguf"]);
    let o = run(&["inspect", p.to_str().unwrap()]);
    assert_fails(&o, 1, needle);
}

#[test]
fn gguf_bad_magic() {
    let mut b = b"GGUX".to_vec();
    b.extend_from_slice(&[0u8; 20]);
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("bad.gguf");
    std::fs::write(&p, &b).unwrap();
    assert_fails(&quantize_to(&p, d.path(), "q8_0"), 1, "magic");
}

#[test]
fn gguf_truncated() {
    let d = tempfile::tempdir().unwrap();
    let good = d.path().join("good.gguf");
    let o = run(&[
        "quantize",
        fixture("tiny-llama").to_str().unwrap(),
        "--to",
        "f16",
        "-o",
        good.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&good).unwrap();
    check_gguf(&bytes[..bytes.len() - 4096], "truncated");
    check_gguf(&bytes[..1000], "truncated");
}

#[test]
fn gguf_absurd_counts() {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(1u64 << 60).to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    check_gguf(&b, "absurd tensor count");
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&(u64::MAX / 2).to_le_bytes());
    check_gguf(&b, "absurd key/value count");
}
