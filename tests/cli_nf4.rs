//! `ftconv quantize --to nf4|fp4` on fixtures/tiny-llama (a 2-layer bf16 Llama), and reading the
//! result back. Expected values are computed here, independently of ftconv's code, from the
//! rules in shared/specs/nf4-peft.md §3–4 (which fixtures/golden/nf4 confirms against
//! bitsandbytes itself: tests/golden_nf4.rs).

mod common;

use common::*;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

const LINEAR: &[&str] = &[
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Every tensor of a folder's safetensors files: name → (dtype, shape, bytes).
fn load_dir(dir: &Path) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, t) in st.tensors() {
            out.insert(name, (t.dtype(), t.shape().to_vec(), t.data().to_vec()));
        }
    }
    out
}

fn bf16_to_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2)
        .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
        .collect()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The NF4 table (spec §3.1, f32 bits) and the CPU path of §3.3, written out plainly.
const NF4_BITS: [u32; 16] = [
    0xBF800000, 0xBF3239B1, 0xBF066B30, 0xBECA32A0, 0xBE91A24D, 0xBE3D353F, 0xBDBA7871, 0x00000000,
    0x3DA2FAFF, 0x3E24CAE3, 0x3E7C04DD, 0x3EAD033A, 0x3EE1A4B8, 0x3F1007AB, 0x3F3913B3, 0x3F800000,
];

fn nf4_table() -> Vec<f32> {
    NF4_BITS.iter().map(|&b| f32::from_bits(b)).collect()
}

fn reference_nf4(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let t = nf4_table();
    let mids: Vec<f32> = (0..15).map(|k| (t[k] + t[k + 1]) / 2.0).collect();
    let mut codes = vec![];
    let mut absmax = vec![];
    for blk in x.chunks(64) {
        let am = blk.iter().map(|v| v.abs()).fold(0f32, f32::max);
        let full = blk.len() == 64;
        let am_s = if full { am } else { am.max(1e-38) };
        absmax.push(am_s);
        let recip = 1.0f32 / am.max(1e-38);
        for &v in blk {
            let y = if full { v * recip } else { v / am_s }.clamp(-1.0, 1.0);
            codes.push(mids.iter().filter(|&&m| m < y).count() as u8);
        }
    }
    if codes.len() % 2 == 1 {
        codes.push(7);
    }
    let packed = codes.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
    (packed, absmax)
}

fn dequant(packed: &[u8], absmax: &[f32], table: &[f32], n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let b = packed[i / 2];
            let c = if i % 2 == 0 { b >> 4 } else { b & 15 };
            table[c as usize] * absmax[i / 64]
        })
        .collect()
}

fn quantize(args: &[&str]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let src = fixture("tiny-llama");
    let mut a = vec![
        "quantize",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    a.extend_from_slice(args);
    let o = run(&a);
    assert!(o.status.success(), "ftconv {a:?} failed: {}", stderr(&o));
    tmp
}

fn config(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

#[test]
fn nf4_double_quant_layout_and_values() {
    let tmp = quantize(&["--to", "nf4"]);
    let out = tmp.path().join("out");
    let src = load_dir(&fixture("tiny-llama"));
    let got = load_dir(&out);
    // one file, no index (transformers: single shard below max_shard_size)
    assert!(out.join("model.safetensors").is_file());
    assert!(!out.join("model.safetensors.index.json").exists());
    let mut expected_keys = vec![];
    for (name, (dtype, shape, bytes)) in &src {
        let module = name.trim_end_matches(".weight");
        let linear = LINEAR.iter().any(|l| module.ends_with(l));
        if !linear {
            // embeddings, norms and lm_head stay as they are, byte for byte
            assert_eq!(got[name].0, *dtype, "{name}");
            assert_eq!(&got[name].1, shape, "{name}");
            assert!(got[name].2 == *bytes, "{name} bytes changed");
            expected_keys.push(name.clone());
            continue;
        }
        let x = bf16_to_f32(bytes);
        let (packed, absmax) = reference_nf4(&x);
        let k = |s: &str| format!("{name}{s}");
        for s in [
            "",
            ".absmax",
            ".quant_map",
            ".nested_absmax",
            ".nested_quant_map",
            ".quant_state.bitsandbytes__nf4",
        ] {
            expected_keys.push(k(s));
        }
        let w = &got[&k("")];
        assert_eq!(
            (w.0, w.1.clone()),
            (Dtype::U8, vec![x.len() / 2, 1]),
            "{name}"
        );
        assert!(
            w.2 == packed,
            "{name}: packed codes differ from the spec's rule"
        );
        let qm = &got[&k(".quant_map")];
        assert_eq!(f32s(&qm.2), nf4_table());
        // the quant state blob: Python json.dumps of QuantState.as_dict
        let blob = String::from_utf8(got[&k(".quant_state.bitsandbytes__nf4")].2.clone()).unwrap();
        let prefix = format!(
            "{{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [{}, {}], \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": ",
            shape[0], shape[1]
        );
        assert!(blob.starts_with(&prefix) && blob.ends_with('}'), "{blob}");
        let offset: f64 = blob[prefix.len()..blob.len() - 1].parse().unwrap();
        let mean = absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64;
        assert!(
            (offset - mean).abs() <= mean * 1e-6,
            "{name}: offset {offset} vs {mean}"
        );
        // double-quantized absmax reconstructs the true absmax to 8-bit precision
        let q = &got[&k(".absmax")];
        assert_eq!((q.0, q.1.clone()), (Dtype::U8, vec![absmax.len()]));
        let nested = f32s(&got[&k(".nested_absmax")].2);
        assert_eq!(nested.len(), absmax.len().div_ceil(256));
        let map = f32s(&got[&k(".nested_quant_map")].2);
        assert_eq!(map.len(), 256);
        for (b, &a) in absmax.iter().enumerate() {
            let r = map[q.2[b] as usize] * nested[b / 256] + offset as f32;
            assert!(
                (r - a).abs() <= nested[b / 256] * 0.02 + 1e-9,
                "{name} absmax[{b}]"
            );
        }
    }
    let mut got_keys: Vec<String> = got.keys().cloned().collect();
    got_keys.sort();
    expected_keys.sort();
    assert_eq!(got_keys, expected_keys);
    // config.json: quantization_config exactly as transformers writes it
    let cfg_text = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(cfg_text.contains(
        "  \"quantization_config\": {\n    \"_load_in_4bit\": true,\n    \"_load_in_8bit\": false,\n    \"bnb_4bit_compute_dtype\": \"bfloat16\",\n    \"bnb_4bit_quant_storage\": \"uint8\",\n    \"bnb_4bit_quant_type\": \"nf4\",\n    \"bnb_4bit_use_double_quant\": true,\n    \"llm_int8_enable_fp32_cpu_offload\": false,\n    \"llm_int8_has_fp16_weight\": false,\n    \"llm_int8_skip_modules\": null,\n    \"llm_int8_threshold\": 6.0,\n    \"load_in_4bit\": true,\n    \"load_in_8bit\": false,\n    \"quant_method\": \"bitsandbytes\"\n  },\n"
    ), "{cfg_text}");
    assert!(cfg_text.contains("\"rms_norm_eps\": 1e-05,"));
    assert!(cfg_text.ends_with("}\n"));
    let cfg = config(&out);
    assert_eq!(cfg["dtype"], "bfloat16");
    assert_eq!(cfg["num_hidden_layers"], 2);
    // tokenizer and generation config copied unchanged
    for f in [
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(fixture("tiny-llama").join(f)).unwrap(),
            "{f}"
        );
    }
    // safetensors metadata {"format": "pt"}
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let (_, md) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(md.metadata().as_ref().unwrap()["format"], "pt");
}

#[test]
fn nf4_without_double_quant_and_skip() {
    let tmp = quantize(&["--to", "nf4", "--no-double-quant", "--skip", "down_proj"]);
    let out = tmp.path().join("out");
    let src = load_dir(&fixture("tiny-llama"));
    let got = load_dir(&out);
    for l in 0..2 {
        let down = format!("model.layers.{l}.mlp.down_proj.weight");
        assert!(got[&down].2 == src[&down].2, "skipped module copied");
        assert!(!got.contains_key(&format!("{down}.absmax")));
        let q = format!("model.layers.{l}.self_attn.q_proj.weight");
        let (packed, absmax) = reference_nf4(&bf16_to_f32(&src[&q].2));
        assert!(got[&q].2 == packed);
        let a = &got[&format!("{q}.absmax")];
        assert_eq!(a.0, Dtype::F32);
        assert_eq!(f32s(&a.2), absmax);
        assert!(!got.contains_key(&format!("{q}.nested_absmax")));
        let blob = String::from_utf8(got[&format!("{q}.quant_state.bitsandbytes__nf4")].2.clone())
            .unwrap();
        assert_eq!(
            blob,
            "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [256, 256]}"
        );
    }
    let qc = &config(&out)["quantization_config"];
    assert_eq!(qc["bnb_4bit_use_double_quant"], false);
    assert_eq!(
        qc["llm_int8_skip_modules"],
        serde_json::json!(["lm_head", "down_proj"])
    );
}

#[test]
fn fp4_table_and_key() {
    let tmp = quantize(&["--to", "fp4"]);
    let out = tmp.path().join("out");
    let got = load_dir(&out);
    let q = "model.layers.0.self_attn.q_proj.weight";
    // get_4bit_type("fp4"): [0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, ...] / 12
    let raw = [
        0.0f32, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0,
        -3.0,
    ];
    let table: Vec<f32> = raw.iter().map(|v| v / 12.0).collect();
    assert_eq!(f32s(&got[&format!("{q}.quant_map")].2), table);
    assert!(got.contains_key(&format!("{q}.quant_state.bitsandbytes__fp4")));
    assert_eq!(
        config(&out)["quantization_config"]["bnb_4bit_quant_type"],
        "fp4"
    );
    // every value dequantizes to the representable FP4 value nearest to x/absmax
    let src = load_dir(&fixture("tiny-llama"));
    let x = bf16_to_f32(&src[q].2);
    let absmax: Vec<f32> = x
        .chunks(64)
        .map(|b| b.iter().map(|v| v.abs()).fold(0f32, f32::max))
        .collect();
    let p = &got[q].2;
    for (i, &v) in x.iter().enumerate() {
        let c = if i % 2 == 0 {
            p[i / 2] >> 4
        } else {
            p[i / 2] & 15
        };
        let y = v / absmax[i / 64];
        let best = table
            .iter()
            .map(|t| (t - y).abs())
            .fold(f32::INFINITY, f32::min);
        assert!((table[c as usize] - y).abs() <= best + 1e-6, "element {i}");
    }
}

#[test]
fn sharded_output_with_index() {
    let tmp = quantize(&["--to", "nf4", "--max-shard-size", "400kB"]);
    let out = tmp.path().join("out");
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let got = load_dir(&out);
    let wm = index["weight_map"].as_object().unwrap();
    assert_eq!(wm.len(), got.len());
    let total: usize = got.values().map(|t| t.2.len()).sum();
    assert_eq!(index["metadata"]["total_size"], total);
    // num_parameters() of the 4-bit model: every source element once (packed: two a byte)
    let params: usize = load_dir(&fixture("tiny-llama"))
        .values()
        .map(|t| t.1.iter().product::<usize>())
        .sum();
    assert_eq!(index["metadata"]["total_parameters"], params);
    let files: std::collections::BTreeSet<&str> =
        wm.values().map(|v| v.as_str().unwrap()).collect();
    assert!(files.len() > 1);
    for f in &files {
        assert!(f.starts_with("model-0000") && f.contains(&format!("-of-{:05}", files.len())));
        let bytes = std::fs::read(out.join(f)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for name in st.names() {
            assert_eq!(wm[&name.to_string()], *f);
        }
        // no shard above the limit unless it holds a single tensor
        let size: usize = st.tensors().iter().map(|(_, t)| t.data().len()).sum();
        assert!(size <= 400_000 || st.len() == 1);
    }
}

#[test]
fn nf4_folder_reads_back_dequantized() {
    let tmp = quantize(&["--to", "nf4"]);
    let out = tmp.path().join("out");
    // inspect understands the folder
    let o = run(&["inspect", out.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["kind"], "nf4-checkpoint");
    assert_eq!(v["bnb_4bit"]["quantized_weights"], 14);
    assert_eq!(v["bnb_4bit"]["double_quant"], true);
    assert_eq!(v["bnb_4bit"]["stored_dtype"], "bfloat16");
    // NF4 folder → BF16 GGUF: every quantized weight holds dequantize_4bit's values
    let gguf = tmp.path().join("back.gguf");
    let o = run(&[
        "quantize",
        out.to_str().unwrap(),
        "--to",
        "bf16",
        "-o",
        gguf.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let g = ftconv::gguf::GgufFile::open(&gguf).unwrap();
    let got = load_dir(&out);
    let src = load_dir(&fixture("tiny-llama"));
    let mut checked = 0;
    for l in 0..2 {
        // attn_v and ffn_down are not permuted by the converter: rows map one to one
        for (hf, gg) in [
            ("self_attn.v_proj", "attn_v"),
            ("mlp.down_proj", "ffn_down"),
            ("mlp.up_proj", "ffn_up"),
        ] {
            let name = format!("model.layers.{l}.{hf}.weight");
            let n = src[&name].1.iter().product::<usize>();
            let blob = String::from_utf8(
                got[&format!("{name}.quant_state.bitsandbytes__nf4")]
                    .2
                    .clone(),
            )
            .unwrap();
            let off: f32 = blob[blob.find("nested_offset\": ").unwrap() + 16..blob.len() - 1]
                .parse::<f64>()
                .unwrap() as f32;
            let map = f32s(&got[&format!("{name}.nested_quant_map")].2);
            let nested = f32s(&got[&format!("{name}.nested_absmax")].2);
            let absmax: Vec<f32> = got[&format!("{name}.absmax")]
                .2
                .iter()
                .enumerate()
                .map(|(b, &q)| map[q as usize] * nested[b / 256] + off)
                .collect();
            let want = dequant(&got[&name].2, &absmax, &nf4_table(), n);
            let t = g
                .tensors
                .iter()
                .find(|t| t.name == format!("blk.{l}.{gg}.weight"))
                .unwrap();
            let data = g.tensor_data(t);
            let have = bf16_to_f32(data);
            for (i, (a, b)) in have.iter().zip(&want).enumerate() {
                // bf16 round-to-nearest-even of the f32 product
                let r = f32::from_bits(
                    (b.to_bits() + 0x7FFF + ((b.to_bits() >> 16) & 1)) & 0xFFFF_0000,
                );
                assert_eq!(a.to_bits(), r.to_bits(), "{name}[{i}]");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 6);
}

/// NF4 folder → q4_k_m equals the same conversion of a bf16 folder holding the dequantized
/// weights (built here from the NF4 tensors by the spec's formula).
#[test]
fn nf4_folder_to_q4_k_m_matches_dequantized_source() {
    let tmp = quantize(&["--to", "nf4", "--no-double-quant"]);
    let out = tmp.path().join("out");
    let got = load_dir(&out);
    let src_dir = fixture("tiny-llama");
    // the dequantized bf16 checkpoint, same folder name (general.name) in another parent
    let deq_parent = tmp.path().join("deq");
    let deq = deq_parent.join("out");
    copy_dir(&src_dir, &deq);
    let src = load_dir(&src_dir);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = vec![];
    for (name, (_, shape, bytes)) in &src {
        let data = if got.contains_key(&format!("{name}.absmax")) {
            let n = shape.iter().product();
            let v = dequant(
                &got[name].2,
                &f32s(&got[&format!("{name}.absmax")].2),
                &nf4_table(),
                n,
            );
            v.iter()
                .flat_map(|b| {
                    let r = (b.to_bits() + 0x7FFF + ((b.to_bits() >> 16) & 1)) >> 16;
                    (r as u16).to_le_bytes()
                })
                .collect()
        } else {
            bytes.clone()
        };
        tensors.push((name.clone(), shape.clone(), data));
    }
    for e in std::fs::read_dir(&deq).unwrap() {
        let p = e.unwrap().path();
        let n = p.file_name().unwrap().to_string_lossy().to_string();
        if n.starts_with("model") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(Dtype::BF16, s.clone(), d).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &deq.join("model.safetensors")).unwrap();
    let a = tmp.path().join("a.gguf");
    let b = tmp.path().join("b.gguf");
    let oa = run(&[
        "quantize",
        deq.to_str().unwrap(),
        "--to",
        "q4_k_m",
        "-o",
        b.to_str().unwrap(),
    ]);
    if stderr(&oa).contains("not implemented") {
        eprintln!("skipped: this build has no Q4_K quantizer yet");
        return;
    }
    assert!(oa.status.success(), "{}", stderr(&oa));
    let ob = run(&[
        "quantize",
        out.to_str().unwrap(),
        "--to",
        "q4_k_m",
        "-o",
        a.to_str().unwrap(),
    ]);
    assert!(ob.status.success(), "{}", stderr(&ob));
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
}

#[test]
fn nf4_usage_errors_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let st = tmp.path().join("x.safetensors");
    std::fs::write(&st, f32_safetensors(&[("w", vec![2, 64], vec![0.5; 128])])).unwrap();
    let o = run(&[
        "quantize",
        st.to_str().unwrap(),
        "--to",
        "nf4",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_fails(&o, 2, "needs an HF model folder");
    let src = fixture("tiny-llama");
    let o = run(&[
        "quantize",
        src.to_str().unwrap(),
        "--to",
        "q8_0",
        "--skip",
        "lm_head",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_fails(&o, 2, "--skip apply only to --to nf4");
    let o = run(&[
        "quantize",
        src.to_str().unwrap(),
        "--to",
        "nf4",
        "--skip",
        "(",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_fails(&o, 1, "not a valid regular expression");
    assert_eq!(list(tmp.path()), vec!["x.safetensors".to_string()]);
}

/// Tied embeddings: transformers skips both tied modules and does not save lm_head.
#[test]
fn tied_embeddings_keep_lm_head_out() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("tied");
    copy_dir(&fixture("tiny-llama"), &src);
    let cfg_path = src.join("config.json");
    let mut cfg = config(&src);
    cfg["tie_word_embeddings"] = true.into();
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let out = tmp.path().join("out");
    let o = run(&[
        "quantize",
        src.to_str().unwrap(),
        "--to",
        "nf4",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = load_dir(&out);
    assert!(!got.keys().any(|k| k.starts_with("lm_head")));
    assert_eq!(got["model.embed_tokens.weight"].0, Dtype::BF16);
    assert_eq!(config(&out)["tie_word_embeddings"], true);
}
