//! `ftconv merge` / `quantize --adapter` end to end on the tiny-llama fixture with adapters
//! generated here. Merged values are checked against a computation written in this test
//! (dyadic LoRA values, so the f32 arithmetic is exact and only the bf16 rounding matters).

mod common;
use common::*;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const H: usize = 256;

fn bf16_round(x: f32) -> f32 {
    let b = x.to_bits();
    f32::from_bits(b.wrapping_add(0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000)
}

struct Rng(u64);
impl Rng {
    fn dyadic(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 % 65) as i32 - 32) as f32 / 64.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.dyadic()).collect()
    }
}

type T = (String, Dtype, Vec<usize>, Vec<u8>);

fn f32t(name: &str, shape: &[usize], v: &[f32]) -> T {
    (
        name.to_string(),
        Dtype::F32,
        shape.to_vec(),
        v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    )
}

fn write_adapter(dir: &Path, cfg: Value, ts: &[T]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    let views: Vec<(String, TensorView)> = ts
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let md: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize_to_file(views, Some(md), &dir.join("adapter_model.safetensors"))
        .unwrap();
    dir.to_path_buf()
}

fn lora_cfg(extra: Value) -> Value {
    let mut c = json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "tiny-llama", "task_type": "CAUSAL_LM"});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

struct Lora {
    module: String,
    a: Vec<f32>,
    b: Vec<f32>,
    r: usize,
    in_f: usize,
    out_f: usize,
}

fn lora(rng: &mut Rng, module: &str, r: usize, in_f: usize, out_f: usize) -> Lora {
    Lora {
        module: module.into(),
        a: rng.vec(r * in_f),
        b: rng.vec(out_f * r),
        r,
        in_f,
        out_f,
    }
}

fn lora_tensors(l: &Lora) -> Vec<T> {
    vec![
        f32t(
            &format!("base_model.model.{}.lora_A.weight", l.module),
            &[l.r, l.in_f],
            &l.a,
        ),
        f32t(
            &format!("base_model.model.{}.lora_B.weight", l.module),
            &[l.out_f, l.r],
            &l.b,
        ),
    ]
}

/// Every tensor of an HF folder as f32 values (+ dtype).
fn load_folder(dir: &Path) -> HashMap<String, (Dtype, Vec<usize>, Vec<f32>)> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().and_then(|x| x.to_str()) != Some("safetensors") {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (n, v) in st.tensors() {
            let vals: Vec<f32> = match v.dtype() {
                Dtype::BF16 => v
                    .data()
                    .chunks_exact(2)
                    .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                    .collect(),
                Dtype::F32 => v
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                d => panic!("{n}: {d:?}"),
            };
            out.insert(n, (v.dtype(), v.shape().to_vec(), vals));
        }
    }
    out
}

fn expected_linear(w: &[f32], l: &Lora, s: f64) -> Vec<f32> {
    let mut out = w.to_vec();
    for o in 0..l.out_f {
        for i in 0..l.in_f {
            let mut d = 0f64;
            for k in 0..l.r {
                d += l.b[o * l.r + k] as f64 * l.a[k * l.in_f + i] as f64;
            }
            out[o * l.in_f + i] = bf16_round((w[o * l.in_f + i] as f64 + d * s) as f32);
        }
    }
    out
}

fn ok(o: &std::process::Output) {
    assert!(
        o.status.success(),
        "ftconv failed: {}\n{}",
        stderr(o),
        stdout(o)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn merge_to_hf_folder_matches_reference() {
    let d = tempfile::tempdir().unwrap();
    let mut rng = Rng(77);
    let q = lora(&mut rng, "model.layers.0.self_attn.q_proj", 4, H, H);
    let v = lora(&mut rng, "model.layers.1.self_attn.v_proj", 4, H, 128);
    let mut ts = lora_tensors(&q);
    ts.extend(lora_tensors(&v));
    let ad = write_adapter(&d.path().join("ad"), lora_cfg(json!({})), &ts);
    let out = d.path().join("merged");
    let base = fixture("tiny-llama");
    let o = run(&["merge", s(&base), s(&ad), "-o", s(&out)]);
    ok(&o);
    let files = list(&out);
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ] {
        assert!(files.contains(&f.to_string()), "{f} missing: {files:?}");
    }
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], "bfloat16");
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    let got = load_folder(&out);
    let want = load_folder(&base);
    assert_eq!(got.len(), want.len());
    for (name, (dt, shape, w)) in &want {
        let (gdt, gshape, g) = &got[name];
        assert_eq!((dt, shape), (gdt, gshape), "{name}");
        let expect = if name.starts_with(&q.module) {
            expected_linear(w, &q, 2.0)
        } else if name.starts_with(&v.module) {
            expected_linear(w, &v, 2.0)
        } else {
            w.clone()
        };
        assert!(
            g.iter()
                .zip(&expect)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name} differs from the reference"
        );
        if name.starts_with(&q.module) {
            assert!(g != w, "{name} unchanged");
        }
    }
    // sharded output: several files plus an index listing every tensor
    let out2 = d.path().join("sharded");
    ok(&run(&[
        "merge",
        s(&base),
        s(&ad),
        "-o",
        s(&out2),
        "--max-shard-size",
        "1MB",
    ]));
    let idx: Value = serde_json::from_str(
        &std::fs::read_to_string(out2.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let wm = idx["weight_map"].as_object().unwrap();
    assert_eq!(wm.len(), want.len());
    let shards: Vec<String> = list(&out2)
        .into_iter()
        .filter(|f| f.ends_with(".safetensors"))
        .collect();
    assert!(shards.len() >= 3, "{shards:?}");
    let n = shards.len();
    assert_eq!(shards[0], format!("model-00001-of-{n:05}.safetensors"));
    let got2 = load_folder(&out2);
    for (k, (_, _, v)) in &got {
        assert_eq!(&got2[k].2, v, "{k}");
    }
    // a rerun replaces an earlier output
    ok(&run(&["merge", s(&base), s(&ad), "-o", s(&out)]));
}

#[test]
fn merge_to_gguf_equals_merge_then_quantize() {
    let d = tempfile::tempdir().unwrap();
    let mut rng = Rng(5);
    // q_proj and k_proj are row-permuted by the converter: the merge must come first
    let q = lora(&mut rng, "model.layers.1.self_attn.q_proj", 8, H, H);
    let k = lora(&mut rng, "model.layers.0.self_attn.k_proj", 8, H, 128);
    let mut ts = lora_tensors(&q);
    ts.extend(lora_tensors(&k));
    let ad = write_adapter(
        &d.path().join("ad"),
        lora_cfg(json!({"r": 8, "target_modules": ["q_proj", "k_proj"]})),
        &ts,
    );
    let base = fixture("tiny-llama");
    // the merged folder gets the base's name so the GGUF's name metadata agrees
    std::fs::create_dir(d.path().join("m")).unwrap();
    let merged = d.path().join("m").join("tiny-llama");
    ok(&run(&["merge", s(&base), s(&ad), "-o", s(&merged)]));
    for ty in ["bf16", "f16", "f32", "q8_0", "q4_k_m"] {
        let two = d.path().join(format!("two-{ty}.gguf"));
        ok(&run(&["quantize", s(&merged), "--to", ty, "-o", s(&two)]));
        let one = d.path().join(format!("one-{ty}.gguf"));
        ok(&run(&[
            "merge",
            s(&base),
            s(&ad),
            "--to",
            ty,
            "-o",
            s(&one),
        ]));
        let a = std::fs::read(&two).unwrap();
        assert!(std::fs::read(&one).unwrap() == a, "merge --to {ty} differs");
        let three = d.path().join(format!("three-{ty}.gguf"));
        let spec = format!("{}@1", s(&ad));
        ok(&run(&[
            "quantize",
            s(&base),
            "--adapter",
            &spec,
            "--to",
            ty,
            "-o",
            s(&three),
        ]));
        assert!(
            std::fs::read(&three).unwrap() == a,
            "quantize --adapter {ty} differs"
        );
        // and the merge changed something
        let plain = d.path().join(format!("plain-{ty}.gguf"));
        ok(&run(&["quantize", s(&base), "--to", ty, "-o", s(&plain)]));
        assert!(std::fs::read(&plain).unwrap() != a);
    }
}

#[test]
fn two_weighted_adapters_and_dtype_f32() {
    let d = tempfile::tempdir().unwrap();
    let mut rng = Rng(9);
    let m = "model.layers.0.mlp.down_proj";
    let l1 = lora(&mut rng, m, 4, 512, H);
    let l2 = lora(&mut rng, m, 2, 512, H);
    let a1 = write_adapter(
        &d.path().join("a1"),
        lora_cfg(json!({"target_modules": ["down_proj"]})),
        &lora_tensors(&l1),
    );
    let a2 = write_adapter(
        &d.path().join("a2"),
        lora_cfg(json!({"r": 2, "lora_alpha": 4, "target_modules": ["down_proj"]})),
        &lora_tensors(&l2),
    );
    let out = d.path().join("out");
    let o = run(&[
        "merge",
        s(&fixture("tiny-llama")),
        &format!("{}@0.5", s(&a1)),
        &format!("{}@-2", s(&a2)),
        "-o",
        s(&out),
        "--dtype",
        "f32",
        "--json",
    ]);
    ok(&o);
    let j: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(j["dtype"], "float32");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], "float32");
    let got = load_folder(&out);
    let base = load_folder(&fixture("tiny-llama"));
    let w = &base[&format!("{m}.weight")].2;
    let (dt, _, g) = &got[&format!("{m}.weight")];
    assert_eq!(*dt, Dtype::F32);
    // W + 0.5·2·B1A1 − 2·2·B2A2, in f32 (exact for these values)
    for o in 0..H {
        for i in 0..512 {
            let mut d1 = 0f64;
            for k in 0..4 {
                d1 += l1.b[o * 4 + k] as f64 * l1.a[k * 512 + i] as f64;
            }
            let mut d2 = 0f64;
            for k in 0..2 {
                d2 += l2.b[o * 2 + k] as f64 * l2.a[k * 512 + i] as f64;
            }
            let want = (w[o * 512 + i] as f64 + 0.5 * 2.0 * d1 - 2.0 * 2.0 * d2) as f32;
            assert_eq!(g[o * 512 + i], want, "[{o}, {i}]");
        }
    }
    assert_eq!(got["model.norm.weight"].0, Dtype::F32);
}

#[test]
fn dry_run_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let mut rng = Rng(1);
    let q = lora(&mut rng, "model.layers.0.self_attn.q_proj", 4, H, H);
    let ad = write_adapter(&d.path().join("ad"), lora_cfg(json!({})), &lora_tensors(&q));
    let out = d.path().join("out");
    let o = run(&[
        "merge",
        s(&fixture("tiny-llama")),
        s(&ad),
        "-o",
        s(&out),
        "--dry-run",
        "--json",
    ]);
    ok(&o);
    let j: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let t = j["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert!(
        t["merge"][0]
            .as_str()
            .unwrap()
            .starts_with("lora linear r=4")
    );
    assert!(!out.exists());
    let o = run(&[
        "merge",
        s(&fixture("tiny-llama")),
        s(&ad),
        "-o",
        s(&out),
        "--dry-run",
    ]);
    ok(&o);
    assert!(stdout(&o).contains("lora linear r=4 s=2"));
    assert!(!out.exists());
}

/// Each bad input: one line on stderr naming the problem, exit 1, nothing written.
#[test]
fn bad_inputs_fail_before_output() {
    let d = tempfile::tempdir().unwrap();
    let mut rng = Rng(3);
    let base = fixture("tiny-llama");
    let check = |name: &str, ad: &Path, needle: &str| {
        let out = d.path().join(format!("out-{name}"));
        let o = run(&["merge", s(&base), s(ad), "-o", s(&out)]);
        assert_fails(&o, 1, needle);
        assert!(!out.exists(), "{name}: output written");
        let g = d.path().join(format!("out-{name}.gguf"));
        let o = run(&["merge", s(&base), s(ad), "-o", s(&g), "--to", "bf16"]);
        assert_fails(&o, 1, needle);
        assert!(!g.exists(), "{name}: gguf written");
    };
    let shape = lora(&mut rng, "model.layers.0.self_attn.q_proj", 4, H + 8, H);
    check(
        "shape",
        &write_adapter(
            &d.path().join("shape"),
            lora_cfg(json!({})),
            &lora_tensors(&shape),
        ),
        "do not fit base tensor \"model.layers.0.self_attn.q_proj.weight\"",
    );
    let mut ts = lora_tensors(&lora(&mut rng, "model.layers.0.self_attn.q_proj", 4, H, H));
    ts[1] = f32t(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
        &[H, 3],
        &rng.vec(H * 3),
    );
    check(
        "rank",
        &write_adapter(&d.path().join("rank"), lora_cfg(json!({})), &ts),
        "rank mismatch",
    );
    let absent = lora(&mut rng, "model.layers.0.self_attn.qkv_proj", 4, H, H);
    let mut ts = lora_tensors(&absent);
    ts.extend(lora_tensors(&lora(
        &mut rng,
        "model.layers.0.self_attn.q_proj",
        4,
        H,
        H,
    )));
    check(
        "absent",
        &write_adapter(
            &d.path().join("absent"),
            lora_cfg(json!({"target_modules": ["q_proj", "qkv_proj"]})),
            &ts,
        ),
        "target module \"model.layers.0.self_attn.qkv_proj\" does not exist",
    );
    let gpt2 = lora(&mut rng, "transformer.h.0.attn.c_attn", 4, H, 3 * H);
    check(
        "arch",
        &write_adapter(
            &d.path().join("arch"),
            lora_cfg(json!({"target_modules": ["c_attn"], "base_model_name_or_path": "gpt2"})),
            &lora_tensors(&gpt2),
        ),
        "different architecture",
    );
    let q = lora(&mut rng, "model.layers.0.self_attn.q_proj", 4, H, H);
    check(
        "field",
        &write_adapter(
            &d.path().join("field"),
            json!({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}),
            &lora_tensors(&q),
        ),
        "required field \"lora_alpha\" is missing",
    );
    check(
        "prompt",
        &write_adapter(
            &d.path().join("prompt"),
            json!({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8}),
            &[f32t("prompt_embeddings", &[8, H], &rng.vec(8 * H))],
        ),
        "prompt-learning method",
    );
    let bin = d.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::write(
        bin.join("adapter_config.json"),
        lora_cfg(json!({})).to_string(),
    )
    .unwrap();
    std::fs::write(bin.join("adapter_model.bin"), b"PK\x03\x04").unwrap();
    check("bin", &bin, "re-save the adapter as safetensors");
    // usage errors: exit 2
    let q = write_adapter(
        &d.path().join("ok"),
        lora_cfg(json!({})),
        &lora_tensors(&lora(&mut rng, "model.layers.0.self_attn.q_proj", 4, H, H)),
    );
    let o = run(&[
        "merge",
        s(&base),
        s(&q),
        "-o",
        s(&d.path().join("x")),
        "--dtype",
        "int8",
    ]);
    assert_fails(&o, 2, "--dtype");
    let o = run(&["merge", s(&base), s(&q), "-o", s(&base)]);
    assert_fails(&o, 2, "would overwrite input");
}

/// An NF4 base (made by `ftconv quantize --to nf4`) is read dequantized and the merge written in
/// bf16 without quantization_config. The delta part is checked against the test's own sum on top
/// of the dequantized weights (a merge of an all-zero adapter).
#[test]
fn nf4_base_is_merged_dequantized() {
    let d = tempfile::tempdir().unwrap();
    let nf4 = d.path().join("nf4");
    ok(&run(&[
        "quantize",
        s(&fixture("tiny-llama")),
        "--to",
        "nf4",
        "-o",
        s(&nf4),
    ]));
    let mut rng = Rng(12);
    let q = lora(&mut rng, "model.layers.0.self_attn.q_proj", 4, H, H);
    let ad = write_adapter(&d.path().join("ad"), lora_cfg(json!({})), &lora_tensors(&q));
    let zero = Lora {
        b: vec![0.0; q.b.len()],
        a: q.a.clone(),
        ..lora(&mut rng, "model.layers.0.self_attn.q_proj", 4, H, H)
    };
    let adz = write_adapter(
        &d.path().join("adz"),
        lora_cfg(json!({})),
        &lora_tensors(&zero),
    );
    let out = d.path().join("out");
    let o = run(&["merge", s(&nf4), s(&ad), "-o", s(&out)]);
    ok(&o);
    assert!(stderr(&o).contains("4-bit"), "{}", stderr(&o));
    let outz = d.path().join("outz");
    ok(&run(&["merge", s(&nf4), s(&adz), "-o", s(&outz), "-q"]));
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert!(cfg.get("quantization_config").is_none());
    let got = load_folder(&out);
    let deq = load_folder(&outz);
    let base = load_folder(&fixture("tiny-llama"));
    assert_eq!(got.len(), base.len());
    for (name, (dt, shape, _)) in &base {
        assert_eq!((&got[name].0, &got[name].1), (dt, shape), "{name}");
    }
    let name = "model.layers.0.self_attn.q_proj.weight";
    let want = expected_linear(&deq[name].2, &q, 2.0);
    assert!(
        got[name].2 == want,
        "merged NF4 q_proj differs from the reference"
    );
    assert!(
        deq[name].2 != base[name].2,
        "the NF4 weights were not dequantized"
    );
}
