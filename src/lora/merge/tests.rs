//! Merge math against values computed independently here: hand-worked tiny cases, and a
//! naive f64 reference written from PEFT's formulas (nf4-peft.md §2) on generated tensors.
//! Generated LoRA values are small dyadic rationals, so every f32 product and sum in the
//! delta is exact and the comparison can demand identical bits wherever the formula has
//! no square root.

use super::*;
use crate::lora::adapter::Adapter;
use safetensors::tensor::TensorView;
use serde_json::json;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------- independent helpers

/// bf16 round-to-nearest-even, written out here (not the crate's helper).
fn bf16(x: f32) -> f32 {
    let b = x.to_bits();
    let lsb = (b >> 16) & 1;
    f32::from_bits((b.wrapping_add(0x7FFF + lsb)) & 0xFFFF_0000)
}

fn f16r(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

fn round_as(ty: &str, x: f32) -> f32 {
    match ty {
        "BF16" => bf16(x),
        "F16" => f16r(x),
        _ => x,
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// k/64 for k in [-64, 64]
    fn dyadic(&mut self) -> f32 {
        ((self.next() % 129) as i32 - 64) as f32 / 64.0
    }
    /// a normal-ish value already representable in `ty`
    fn weight(&mut self, ty: &str) -> f32 {
        let u = (self.next() % 1_000_000) as f32 / 1_000_000.0;
        round_as(ty, (u - 0.5) * 0.2)
    }
    fn vec(&mut self, n: usize, f: impl Fn(&mut Rng) -> f32) -> Vec<f32> {
        (0..n).map(|_| f(self)).collect()
    }
}

fn encode(ty: &str, v: &[f32]) -> (Dtype, Vec<u8>) {
    match ty {
        "BF16" => (
            Dtype::BF16,
            v.iter()
                .flat_map(|x| ((bf16(*x).to_bits() >> 16) as u16).to_le_bytes())
                .collect(),
        ),
        "F16" => (
            Dtype::F16,
            v.iter()
                .flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes())
                .collect(),
        ),
        _ => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
    }
}

type T = (String, &'static str, Vec<usize>, Vec<f32>);

fn t(name: &str, ty: &'static str, shape: &[usize], v: Vec<f32>) -> T {
    assert_eq!(shape.iter().product::<usize>(), v.len(), "{name}");
    (name.to_string(), ty, shape.to_vec(), v)
}

fn write_st(path: &Path, ts: &[T]) {
    let enc: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = ts
        .iter()
        .map(|(n, ty, s, v)| {
            let (d, b) = encode(ty, v);
            (n.clone(), d, s.clone(), b)
        })
        .collect();
    let views: Vec<(String, TensorView)> = enc
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let md: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize_to_file(views, Some(md), path).unwrap();
}

fn base_dir(dir: &Path, config: Value, ts: &[T]) -> PathBuf {
    let d = dir.join("base");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("config.json"), config.to_string()).unwrap();
    write_st(&d.join("model.safetensors"), ts);
    d
}

fn adapter_dir(dir: &Path, name: &str, config: Value, ts: &[T]) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("adapter_config.json"), config.to_string()).unwrap();
    write_st(&d.join("adapter_model.safetensors"), ts);
    d
}

fn llama_cfg() -> Value {
    json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": false,
           "torch_dtype": "bfloat16"})
}

fn lora_cfg(extra: Value) -> Value {
    let mut c = json!({"peft_type": "LORA", "r": 4, "lora_alpha": 16, "target_modules": null});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

/// Merge with the crate and return every output tensor's values.
fn merged(
    base: &Path,
    adapters: &[(&Path, f64)],
    dtype: Option<FloatType>,
) -> Result<(MergePlan, HashMap<String, Vec<f32>>)> {
    let b = crate::checkpoint::HfCheckpoint::open(base)?;
    let ads: Vec<Adapter> = adapters
        .iter()
        .map(|(p, w)| Adapter::open(p, *w))
        .collect::<Result<_>>()?;
    let plan = MergePlan::build(&b, &ads, dtype)?;
    let mut out = HashMap::new();
    for j in &plan.tensors {
        let rows = j.rows();
        let mut v = vec![0f32; rows.rows() * rows.cols()];
        // read in two uneven chunks to exercise row offsets
        let cut = rows.rows() / 3;
        let c = rows.cols();
        rows.read_rows(0, &mut v[..cut * c])?;
        rows.read_rows(cut, &mut v[cut * c..])?;
        out.insert(j.name.clone(), v);
    }
    Ok((plan, out))
}

/// (B @ A) as f64, [rows_b, cols_a].
fn matmul(b: &[f32], a: &[f32], out_f: usize, r: usize, in_f: usize) -> Vec<f64> {
    let mut d = vec![0f64; out_f * in_f];
    for o in 0..out_f {
        for i in 0..in_f {
            let mut s = 0f64;
            for k in 0..r {
                s += b[o * r + k] as f64 * a[k * in_f + i] as f64;
            }
            d[o * in_f + i] = s;
        }
    }
    d
}

fn assert_bits(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{name}[{i}]: got {g}, want {w}");
    }
}

/// Differences of at most one unit in the last place of `ty`; returns how many differ.
fn assert_ulp(name: &str, got: &[f32], want: &[f32], ty: &str) -> usize {
    let ulp_bits = match ty {
        "BF16" => 16,
        "F16" => 13,
        _ => 0,
    };
    let mut n = 0;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if g.to_bits() != w.to_bits() {
            n += 1;
            let d = ((g.to_bits() as i64) - (w.to_bits() as i64)).abs() >> ulp_bits;
            assert!(d <= 1, "{name}[{i}]: got {g}, want {w}: more than 1 ulp");
        }
    }
    n
}

// ---------------------------------------------------------------- hand-worked cases

fn term(a: Vec<f32>, b: Vec<f32>, r: usize, scaling: f32, weight: f32) -> LoraTerm {
    LoraTerm {
        a,
        b,
        r,
        scaling,
        weight,
    }
}

#[test]
fn linear_rounds_once_embedding_twice() {
    // delta = 2^-8 + 2^-20 added to 1.0:
    //  Linear: bf16(1 + 2^-8 + 2^-20) = 1 + 2^-7 (above the tie)
    //  Embedding: bf16(delta) = 2^-8, then bf16(1 + 2^-8) = 1.0 (tie to even)
    let a = vec![1.0 + 2f32.powi(-12)];
    let b = vec![2f32.powi(-8)];
    let mut w = vec![1.0f32];
    merge_dense(
        &mut w,
        1,
        FloatType::BF16,
        &[Op::Add(LoraDelta::new(
            Layout::Linear,
            &[term(a.clone(), b.clone(), 1, 1.0, 1.0)],
        ))],
    );
    assert_eq!(w[0], 1.0078125);
    let mut w = vec![1.0f32];
    merge_dense(
        &mut w,
        1,
        FloatType::BF16,
        &[Op::AddRounded(LoraDelta::new(
            Layout::Embedding,
            &[term(a, b, 1, 1.0, 1.0)],
        ))],
    );
    assert_eq!(w[0], 1.0);
}

#[test]
fn linear_and_transposed_layouts_by_hand() {
    // A = [[1, 2, 3]] (r=1, in=3), B = [[1], [-1]] (out=2), s = 0.5
    // B @ A = [[1, 2, 3], [-1, -2, -3]] * 0.5
    let a = vec![1.0, 2.0, 3.0];
    let b = vec![1.0, -1.0];
    let d = LoraDelta::new(Layout::Linear, &[term(a.clone(), b.clone(), 1, 0.5, 1.0)]);
    let mut w = vec![0f32; 6];
    merge_dense(&mut w, 3, FloatType::F32, &[Op::Add(d)]);
    assert_eq!(w, [0.5, 1.0, 1.5, -0.5, -1.0, -1.5]);
    // Conv1D: W is [in=3, out=2]: the transpose
    let d = LoraDelta::new(Layout::Conv1D, &[term(a, b, 1, 0.5, 1.0)]);
    let mut w = vec![10f32; 6];
    merge_dense(&mut w, 2, FloatType::F32, &[Op::Add(d)]);
    assert_eq!(w, [10.5, 9.5, 11.0, 9.0, 11.5, 8.5]);
}

#[test]
fn cat_combination_by_hand() {
    // adapter 1: A=[[1, 1]], B=[[2]], s=2, w=0.5 → 0.5*2*2*[1,1] = [2, 2]
    // adapter 2: A=[[1, -1]], B=[[1]], s=1, w=3 → 3*[1,-1] = [3, -3]
    let d = LoraDelta::new(
        Layout::Linear,
        &[
            term(vec![1.0, 1.0], vec![2.0], 1, 2.0, 0.5),
            term(vec![1.0, -1.0], vec![1.0], 1, 1.0, 3.0),
        ],
    );
    let mut row = vec![0f32; 2];
    d.row(0, &mut row);
    assert_eq!(row, [5.0, -1.0]);
}

#[test]
fn dora_by_hand() {
    // Linear: W = [[2, 4]], delta = [[1, 0]] → V = [3, 4], ‖V‖ = 5, m = 10 → [6, 8]
    let d = LoraDelta::new(
        Layout::Linear,
        &[term(vec![1.0, 0.0], vec![1.0], 1, 1.0, 1.0)],
    );
    let mut w = vec![2.0, 4.0];
    merge_dense(
        &mut w,
        2,
        FloatType::F32,
        &[Op::Dora {
            delta: d,
            magnitude: vec![10.0],
            per_column: false,
        }],
    );
    assert_eq!(w, [6.0, 8.0]);
    // Embedding [vocab=2, dim=1]: one norm over the column: W = [[0], [4]], A = [[3, 0]]
    // (r=1, vocab=2), B = [[1]] → delta^T = [[3], [0]] → V = [[3], [4]], ‖·‖ = 5, m = 1
    let d = LoraDelta::new(
        Layout::Embedding,
        &[term(vec![3.0, 0.0], vec![1.0], 1, 1.0, 1.0)],
    );
    let mut w = vec![0.0, 4.0];
    merge_dense(
        &mut w,
        1,
        FloatType::F32,
        &[Op::Dora {
            delta: d,
            magnitude: vec![1.0],
            per_column: true,
        }],
    );
    assert_eq!(w, [0.6, 0.8]);
}

#[test]
fn ia3_by_hand() {
    let mut w = vec![1.0, 2.0, 3.0, 4.0];
    merge_dense(
        &mut w,
        2,
        FloatType::F32,
        &[Op::Scale {
            l: vec![2.0, 0.5],
            per_row: true,
        }],
    );
    assert_eq!(w, [2.0, 4.0, 1.5, 2.0]);
    let mut w = vec![1.0, 2.0, 3.0, 4.0];
    merge_dense(
        &mut w,
        2,
        FloatType::F32,
        &[Op::Scale {
            l: vec![2.0, 0.5],
            per_row: false,
        }],
    );
    assert_eq!(w, [2.0, 1.0, 6.0, 2.0]);
}

// ---------------------------------------------------------------- generated models

const H: usize = 16; // hidden
const F: usize = 24; // ffn
const V: usize = 32; // vocab

fn llama_base(rng: &mut Rng, ty: &'static str) -> Vec<T> {
    let mut v = vec![
        t(
            "model.embed_tokens.weight",
            ty,
            &[V, H],
            rng.vec(V * H, |r| r.weight(ty)),
        ),
        t(
            "lm_head.weight",
            ty,
            &[V, H],
            rng.vec(V * H, |r| r.weight(ty)),
        ),
        t("model.norm.weight", ty, &[H], rng.vec(H, |r| r.weight(ty))),
    ];
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        v.push(t(
            &format!("{p}.self_attn.q_proj.weight"),
            ty,
            &[H, H],
            rng.vec(H * H, |r| r.weight(ty)),
        ));
        v.push(t(
            &format!("{p}.self_attn.q_proj.bias"),
            ty,
            &[H],
            rng.vec(H, |r| r.weight(ty)),
        ));
        v.push(t(
            &format!("{p}.self_attn.v_proj.weight"),
            ty,
            &[8, H],
            rng.vec(8 * H, |r| r.weight(ty)),
        ));
        v.push(t(
            &format!("{p}.mlp.down_proj.weight"),
            ty,
            &[H, F],
            rng.vec(H * F, |r| r.weight(ty)),
        ));
        v.push(t(
            &format!("{p}.mlp.up_proj.weight"),
            ty,
            &[F, H],
            rng.vec(F * H, |r| r.weight(ty)),
        ));
    }
    v
}

fn get<'a>(ts: &'a [T], name: &str) -> &'a [f32] {
    &ts.iter().find(|x| x.0 == name).unwrap().3
}

/// LoRA A/B for module m with rank r: A [r, in], B [out, r] (dyadic values).
fn lora_pair(rng: &mut Rng, m: &str, r: usize, in_f: usize, out_f: usize) -> (T, T) {
    (
        t(
            &format!("base_model.model.{m}.lora_A.weight"),
            "F32",
            &[r, in_f],
            rng.vec(r * in_f, |g| g.dyadic()),
        ),
        t(
            &format!("base_model.model.{m}.lora_B.weight"),
            "F32",
            &[out_f, r],
            rng.vec(out_f * r, |g| g.dyadic()),
        ),
    )
}

#[allow(clippy::too_many_arguments)]
/// Reference Linear merge: dtype(f32(W) + (B@A)*s), f32 arithmetic exact for these values.
fn ref_linear(
    w: &[f32],
    a: &[f32],
    b: &[f32],
    r: usize,
    in_f: usize,
    out_f: usize,
    s: f64,
    ty: &str,
    transpose: bool,
) -> Vec<f32> {
    let d = matmul(b, a, out_f, r, in_f);
    let mut out = w.to_vec();
    for o in 0..out_f {
        for i in 0..in_f {
            let idx = if transpose {
                i * out_f + o
            } else {
                o * in_f + i
            };
            let v = (w[idx] as f64 + d[o * in_f + i] * s) as f32;
            out[idx] = round_as(ty, v);
        }
    }
    out
}

#[test]
fn linear_rslora_rank_alpha_patterns_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x1234_5678);
    let base = llama_base(&mut rng, "BF16");
    let bdir = base_dir(dir.path(), llama_cfg(), &base);
    // rank 4 by default, down_proj rank 2, alpha 8 (q_proj: alpha 32); rsLoRA
    let mut ad = vec![];
    let mut mods = vec![];
    for l in 0..2 {
        for (m, in_f, out_f, r) in [
            ("self_attn.q_proj", H, H, 4),
            ("self_attn.v_proj", H, 8, 4),
            ("mlp.down_proj", F, H, 2),
            ("mlp.up_proj", H, F, 4),
        ] {
            let name = format!("model.layers.{l}.{m}");
            let (a, b) = lora_pair(&mut rng, &name, r, in_f, out_f);
            mods.push((name, in_f, out_f, r, a.3.clone(), b.3.clone()));
            ad.push(a);
            ad.push(b);
        }
    }
    let cfg = lora_cfg(json!({"r": 4, "lora_alpha": 8, "use_rslora": true,
        "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"q_proj": 32},
        "target_modules": ["q_proj", "v_proj", "down_proj", "up_proj"]}));
    let adir = adapter_dir(dir.path(), "ad", cfg, &ad);
    let (_, out) = merged(&bdir, &[(&adir, 1.0)], None).unwrap();
    for (name, in_f, out_f, r, a, b) in &mods {
        let alpha = if name.ends_with("q_proj") { 32.0 } else { 8.0 };
        let s = alpha / (*r as f64).sqrt();
        let w = get(&base, &format!("{name}.weight"));
        let want = ref_linear(w, a, b, *r, *in_f, *out_f, s, "BF16", false);
        let got = &out[&format!("{name}.weight")];
        if s.fract() == 0.0 {
            assert_bits(name, got, &want);
        } else {
            // alpha/sqrt(2) is irrational: the f32 scaling makes products inexact
            assert_ulp(name, got, &want, "BF16");
        }
    }
    // everything else untouched
    for n in [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.0.self_attn.q_proj.bias",
    ] {
        assert_bits(n, &out[n], get(&base, n));
    }
}

#[test]
fn linear_f32_and_f16_bases_and_dtype_override() {
    for ty in ["F32", "F16"] {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng(99);
        let base = llama_base(&mut rng, ty);
        let bdir = base_dir(dir.path(), llama_cfg(), &base);
        let m = "model.layers.1.mlp.up_proj";
        let (a, b) = lora_pair(&mut rng, m, 4, H, F);
        let adir = adapter_dir(
            dir.path(),
            "ad",
            lora_cfg(json!({"target_modules": ["up_proj"]})),
            &[a.clone(), b.clone()],
        );
        let (_, out) = merged(&bdir, &[(&adir, 1.0)], None).unwrap();
        let w = get(&base, &format!("{m}.weight"));
        let want = ref_linear(w, &a.3, &b.3, 4, H, F, 4.0, ty, false);
        assert_bits(ty, &out[&format!("{m}.weight")], &want);
        if ty == "F32" {
            // --dtype bf16: the base is rounded to bf16 first, then merged and rounded once
            let (plan, out) = merged(&bdir, &[(&adir, 1.0)], Some(FloatType::BF16)).unwrap();
            assert_eq!(plan.model_type, FloatType::BF16);
            let wb: Vec<f32> = w.iter().map(|x| bf16(*x)).collect();
            let want = ref_linear(&wb, &a.3, &b.3, 4, H, F, 4.0, "BF16", false);
            assert_bits("override", &out[&format!("{m}.weight")], &want);
            let n = "model.norm.weight";
            let wn: Vec<f32> = get(&base, n).iter().map(|x| bf16(*x)).collect();
            assert_bits(n, &out[n], &wn);
        }
    }
}

#[test]
fn embedding_lora_with_modules_to_save_and_layers_to_transform() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(7);
    let base = llama_base(&mut rng, "BF16");
    let bdir = base_dir(dir.path(), llama_cfg(), &base);
    let r = 4;
    // embedding LoRA: A [r, vocab], B [dim, r]; values chosen so the delta is not bf16-exact
    let ea: Vec<f32> = rng.vec(r * V, |g| g.dyadic() * (1.0 + 1.0 / 4096.0));
    let eb = rng.vec(H * r, |g| g.dyadic());
    let saved_embed = rng.vec(V * H, |g| g.weight("BF16"));
    let lm_copy = rng.vec(V * H, |g| g.weight("BF16"));
    let m1 = "model.layers.1.mlp.up_proj";
    let (a1, b1) = lora_pair(&mut rng, m1, r, H, F);
    let m0 = "model.layers.0.mlp.up_proj";
    let (a0, b0) = lora_pair(&mut rng, m0, r, H, F);
    let ts = vec![
        t(
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "F32",
            &[r, V],
            ea.clone(),
        ),
        t(
            "base_model.model.model.embed_tokens.lora_embedding_B",
            "F32",
            &[H, r],
            eb.clone(),
        ),
        t(
            "base_model.model.model.embed_tokens.base_layer.weight",
            "BF16",
            &[V, H],
            saved_embed.clone(),
        ),
        t(
            "base_model.model.lm_head.weight",
            "BF16",
            &[V, H],
            lm_copy.clone(),
        ),
        a1.clone(),
        b1.clone(),
        a0,
        b0,
    ];
    let cfg = lora_cfg(
        json!({"target_modules": ["embed_tokens", "up_proj"], "modules_to_save": ["lm_head"],
        "layers_to_transform": [1]}),
    );
    let adir = adapter_dir(dir.path(), "ad", cfg.clone(), &ts);
    // with layers_to_transform [1], PEFT puts no LoRA on embed_tokens (no layer index) nor on
    // layer 0: those tensors are ignored
    let (plan, out) = merged(&bdir, &[(&adir, 1.0)], None).unwrap();
    assert!(
        plan.warnings
            .iter()
            .any(|w| w.contains("model.layers.0.mlp.up_proj"))
    );
    assert!(plan.warnings.iter().any(|w| w.contains("embed_tokens")));
    assert_bits("lm_head copy", &out["lm_head.weight"], &lm_copy);
    assert_bits(
        "embed replaced",
        &out["model.embed_tokens.weight"],
        &saved_embed,
    );
    let want = ref_linear(
        get(&base, &format!("{m1}.weight")),
        &a1.3,
        &b1.3,
        r,
        H,
        F,
        4.0,
        "BF16",
        false,
    );
    assert_bits(m1, &out[&format!("{m1}.weight")], &want);
    assert_bits(
        "layer 0",
        &out[&format!("{m0}.weight")],
        get(&base, &format!("{m0}.weight")),
    );

    // without layers_to_transform the embedding LoRA applies on the saved base layer:
    // dtype(W + dtype((B @ A)^T * s))
    let mut cfg2 = cfg;
    cfg2["layers_to_transform"] = Value::Null;
    let adir2 = adapter_dir(dir.path(), "ad2", cfg2, &ts);
    let (_, out) = merged(&bdir, &[(&adir2, 1.0)], None).unwrap();
    let d = matmul(&eb, &ea, H, r, V); // [dim, vocab]
    let mut want = saved_embed.clone();
    let mut differs_from_single = 0;
    for v in 0..V {
        for j in 0..H {
            let delta = (d[j * V + v] * 4.0) as f32;
            want[v * H + j] = bf16(saved_embed[v * H + j] + bf16(delta));
            if want[v * H + j] != bf16(saved_embed[v * H + j] + delta) {
                differs_from_single += 1;
            }
        }
    }
    assert!(
        differs_from_single > 0,
        "test values do not exercise the double rounding"
    );
    assert_bits("embedding", &out["model.embed_tokens.weight"], &want);
}

#[test]
fn tied_embedding_lora() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(11);
    let base: Vec<T> = llama_base(&mut rng, "BF16")
        .into_iter()
        .filter(|x| x.0 != "lm_head.weight")
        .collect();
    let mut cfg = llama_cfg();
    cfg["tie_word_embeddings"] = json!(true);
    let bdir = base_dir(dir.path(), cfg, &base);
    let r = 2;
    let ea = rng.vec(r * V, |g| g.dyadic());
    let eb = rng.vec(H * r, |g| g.dyadic());
    // LoRA on lm_head (a Linear [vocab, hidden]) lands on the shared embedding
    let (la, lb) = lora_pair(&mut rng, "lm_head", r, H, V);
    let ts = vec![
        t(
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "F32",
            &[r, V],
            ea.clone(),
        ),
        t(
            "base_model.model.model.embed_tokens.lora_embedding_B",
            "F32",
            &[H, r],
            eb.clone(),
        ),
        la.clone(),
        lb.clone(),
    ];
    let adir = adapter_dir(
        dir.path(),
        "ad",
        lora_cfg(json!({"r": 2, "lora_alpha": 2, "target_modules": ["embed_tokens", "lm_head"]})),
        &ts,
    );
    let (plan, out) = merged(&bdir, &[(&adir, 1.0)], None).unwrap();
    assert!(!out.contains_key("lm_head.weight"));
    // steps in module order: embed_tokens (Embedding, delta rounded first), then lm_head
    // (Linear) on the same shared tensor, each rounded to bf16
    let w = get(&base, "model.embed_tokens.weight");
    let d = matmul(&eb, &ea, H, r, V);
    let mut step1 = w.to_vec();
    for v in 0..V {
        for j in 0..H {
            step1[v * H + j] = bf16(w[v * H + j] + bf16(d[j * V + v] as f32));
        }
    }
    let want = ref_linear(&step1, &la.3, &lb.3, r, H, V, 1.0, "BF16", false);
    assert_bits("tied", &out["model.embed_tokens.weight"], &want);
    assert_eq!(plan.n_modules, 2);
}

#[test]
fn dora_linear_and_embedding() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(5);
    let base = llama_base(&mut rng, "BF16");
    let bdir = base_dir(dir.path(), llama_cfg(), &base);
    let r = 4;
    let m = "model.layers.0.self_attn.v_proj";
    let (a, b) = lora_pair(&mut rng, m, r, H, 8);
    let mag = rng.vec(8, |g| 0.5 + g.dyadic().abs());
    let ea = rng.vec(r * V, |g| g.dyadic());
    let eb = rng.vec(H * r, |g| g.dyadic() / 8.0);
    let emag = rng.vec(H, |g| 0.5 + g.dyadic().abs());
    let ts = vec![
        a.clone(),
        b.clone(),
        t(
            &format!("base_model.model.{m}.lora_magnitude_vector"),
            "F32",
            &[8],
            mag.clone(),
        ),
        t(
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "F32",
            &[r, V],
            ea.clone(),
        ),
        t(
            "base_model.model.model.embed_tokens.lora_embedding_B",
            "F32",
            &[H, r],
            eb.clone(),
        ),
        t(
            "base_model.model.model.embed_tokens.lora_magnitude_vector",
            "F32",
            &[H],
            emag.clone(),
        ),
    ];
    let adir = adapter_dir(
        dir.path(),
        "ad",
        lora_cfg(json!({"use_dora": true, "lora_alpha": 4})),
        &ts,
    );
    let (_, out) = merged(&bdir, &[(&adir, 1.0)], None).unwrap();
    // Linear: one norm per output row of V = W + delta
    let w = get(&base, &format!("{m}.weight"));
    let d = matmul(&b.3, &a.3, 8, r, H);
    let mut want = vec![0f32; 8 * H];
    for o in 0..8 {
        let row: Vec<f64> = (0..H).map(|i| w[o * H + i] as f64 + d[o * H + i]).collect();
        let n = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        for i in 0..H {
            want[o * H + i] = bf16((mag[o] as f64 / n * row[i]) as f32);
        }
    }
    let n1 = assert_ulp("dora linear", &out[&format!("{m}.weight")], &want, "BF16");
    assert!(n1 <= 2, "{n1} elements off by one ulp");
    // Embedding: one norm per column (embedding dim), delta not rounded before the add
    let w = get(&base, "model.embed_tokens.weight");
    let d = matmul(&eb, &ea, H, r, V);
    let vmat: Vec<f64> = (0..V * H)
        .map(|k| w[k] as f64 + d[(k % H) * V + k / H])
        .collect();
    let norms: Vec<f64> = (0..H)
        .map(|j| (0..V).map(|v| vmat[v * H + j].powi(2)).sum::<f64>().sqrt())
        .collect();
    let want: Vec<f32> = (0..V * H)
        .map(|k| bf16((emag[k % H] as f64 / norms[k % H] * vmat[k]) as f32))
        .collect();
    let n2 = assert_ulp(
        "dora embedding",
        &out["model.embed_tokens.weight"],
        &want,
        "BF16",
    );
    assert!(n2 <= 2, "{n2} elements off by one ulp");
}

fn gpt2_base(rng: &mut Rng) -> Vec<T> {
    vec![
        t(
            "transformer.wte.weight",
            "F32",
            &[V, H],
            rng.vec(V * H, |r| r.weight("F32")),
        ),
        t(
            "transformer.h.0.attn.c_attn.weight",
            "F32",
            &[H, 3 * H],
            rng.vec(3 * H * H, |r| r.weight("F32")),
        ),
        t(
            "transformer.h.0.attn.c_attn.bias",
            "F32",
            &[3 * H],
            rng.vec(3 * H, |r| r.weight("F32")),
        ),
        t(
            "transformer.h.0.mlp.c_fc.weight",
            "F32",
            &[H, F],
            rng.vec(F * H, |r| r.weight("F32")),
        ),
    ]
}

#[test]
fn conv1d_fan_in_fan_out_lora_and_dora() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(21);
    let base = gpt2_base(&mut rng);
    let bdir = base_dir(
        dir.path(),
        json!({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}),
        &base,
    );
    let m = "transformer.h.0.attn.c_attn";
    let (a, b) = lora_pair(&mut rng, m, 4, H, 3 * H);
    let adir = adapter_dir(
        dir.path(),
        "ad",
        lora_cfg(json!({"fan_in_fan_out": true, "target_modules": ["c_attn"]})),
        &[a.clone(), b.clone()],
    );
    let (_, out) = merged(&bdir, &[(&adir, 1.0)], None).unwrap();
    let w = get(&base, &format!("{m}.weight"));
    let want = ref_linear(w, &a.3, &b.3, 4, H, 3 * H, 4.0, "F32", true);
    assert_bits("conv1d", &out[&format!("{m}.weight")], &want);
    // DoRA on Conv1D: one norm per column (output feature) of the [in, out] weight
    let m2 = "transformer.h.0.mlp.c_fc";
    let (a2, b2) = lora_pair(&mut rng, m2, 4, H, F);
    let mag = rng.vec(F, |g| 0.25 + g.dyadic().abs());
    let ts = vec![
        a2.clone(),
        b2.clone(),
        t(
            &format!("base_model.model.{m2}.lora_magnitude_vector"),
            "F32",
            &[F],
            mag.clone(),
        ),
    ];
    let adir = adapter_dir(
        dir.path(),
        "ad2",
        lora_cfg(json!({"fan_in_fan_out": true, "use_dora": true})),
        &ts,
    );
    let (_, out) = merged(&bdir, &[(&adir, 1.0)], None).unwrap();
    let w = get(&base, &format!("{m2}.weight"));
    let d = matmul(&b2.3, &a2.3, F, 4, H); // [out, in]
    let vmat: Vec<f64> = (0..H * F)
        .map(|k| w[k] as f64 + d[(k % F) * H + k / F] * 4.0)
        .collect();
    let norms: Vec<f64> = (0..F)
        .map(|j| (0..H).map(|i| vmat[i * F + j].powi(2)).sum::<f64>().sqrt())
        .collect();
    let want: Vec<f32> = (0..H * F)
        .map(|k| (mag[k % F] as f64 / norms[k % F] * vmat[k]) as f32)
        .collect();
    let got = &out[&format!("{m2}.weight")];
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (g - w).abs() <= 4.0 * f32::EPSILON * w.abs().max(1e-6),
            "{g} vs {w}"
        );
    }
    // a Linear-shaped adapter on a Conv1D weight is a shape error naming the tensor
    let (a3, b3) = lora_pair(&mut rng, m2, 4, F, H);
    let adir = adapter_dir(dir.path(), "ad3", lora_cfg(json!({})), &[a3, b3]);
    let e = merged(&bdir, &[(&adir, 1.0)], None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("transformer.h.0.mlp.c_fc") && e.contains("do not fit"),
        "{e}"
    );
}

#[test]
fn two_adapters_weighted_cat() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(42);
    let base = llama_base(&mut rng, "BF16");
    let bdir = base_dir(dir.path(), llama_cfg(), &base);
    let m = "model.layers.0.mlp.down_proj";
    let (a1, b1) = lora_pair(&mut rng, m, 4, F, H);
    let (a2, b2) = lora_pair(&mut rng, m, 2, F, H);
    let ad1 = adapter_dir(
        dir.path(),
        "a1",
        lora_cfg(json!({"lora_alpha": 8})),
        &[a1.clone(), b1.clone()],
    );
    let ad2 = adapter_dir(
        dir.path(),
        "a2",
        lora_cfg(json!({"r": 2, "lora_alpha": 8, "use_rslora": false})),
        &[a2.clone(), b2.clone()],
    );
    let (w1, w2) = (0.5, 1.5);
    let (_, out) = merged(&bdir, &[(&ad1, w1), (&ad2, w2)], None).unwrap();
    let w = get(&base, &format!("{m}.weight"));
    let d1 = matmul(&b1.3, &a1.3, H, 4, F);
    let d2 = matmul(&b2.3, &a2.3, H, 2, F);
    let want: Vec<f32> = (0..H * F)
        .map(|k| bf16((w[k] as f64 + w1 * 2.0 * d1[k] + w2 * 4.0 * d2[k]) as f32))
        .collect();
    assert_bits("cat", &out[&format!("{m}.weight")], &want);
}

#[test]
fn lora_bias_and_trained_biases() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(3);
    let base = llama_base(&mut rng, "BF16");
    let bdir = base_dir(dir.path(), llama_cfg(), &base);
    let m = "model.layers.1.self_attn.q_proj";
    let (a, b) = lora_pair(&mut rng, m, 4, H, H);
    let lb = rng.vec(H, |g| g.dyadic() / 64.0);
    let b0 = rng.vec(H, |g| g.weight("BF16"));
    let ts = vec![
        a,
        b,
        t(
            &format!("base_model.model.{m}.lora_B.bias"),
            "F32",
            &[H],
            lb.clone(),
        ),
        t(
            "base_model.model.model.layers.0.self_attn.q_proj.bias",
            "BF16",
            &[H],
            b0.clone(),
        ),
    ];
    let adir = adapter_dir(
        dir.path(),
        "ad",
        lora_cfg(json!({"lora_bias": true, "bias": "all"})),
        &ts,
    );
    let (_, out) = merged(&bdir, &[(&adir, 1.0)], None).unwrap();
    let bias = get(&base, &format!("{m}.bias"));
    let want: Vec<f32> = (0..H).map(|i| bf16(bias[i] + lb[i] * 4.0)).collect();
    assert_bits("lora_bias", &out[&format!("{m}.bias")], &want);
    assert_bits(
        "bias all",
        &out["model.layers.0.self_attn.q_proj.bias"],
        &b0,
    );
}

#[test]
fn ia3_rows_columns_and_bias() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(17);
    let base = llama_base(&mut rng, "BF16");
    let bdir = base_dir(dir.path(), llama_cfg(), &base);
    let lq = rng.vec(H, |g| 1.0 + g.dyadic() / 3.0);
    let ld = rng.vec(F, |g| 1.0 + g.dyadic() / 3.0);
    let ts = vec![
        t(
            "base_model.model.model.layers.0.self_attn.q_proj.ia3_l",
            "F32",
            &[H, 1],
            lq.clone(),
        ),
        t(
            "base_model.model.model.layers.0.mlp.down_proj.ia3_l",
            "F32",
            &[1, F],
            ld.clone(),
        ),
    ];
    let cfg = json!({"peft_type": "IA3", "target_modules": ["q_proj", "down_proj"], "feedforward_modules": ["down_proj"]});
    let adir = adapter_dir(dir.path(), "ad", cfg, &ts);
    let (_, out) = merged(&bdir, &[(&adir, 1.0)], None).unwrap();
    let wq = get(&base, "model.layers.0.self_attn.q_proj.weight");
    let want: Vec<f32> = (0..H * H).map(|k| bf16(wq[k] * lq[k / H])).collect();
    assert_bits(
        "ia3 rows",
        &out["model.layers.0.self_attn.q_proj.weight"],
        &want,
    );
    let bq = get(&base, "model.layers.0.self_attn.q_proj.bias");
    let want: Vec<f32> = (0..H).map(|k| bf16(bq[k] * lq[k])).collect();
    assert_bits(
        "ia3 bias",
        &out["model.layers.0.self_attn.q_proj.bias"],
        &want,
    );
    let wd = get(&base, "model.layers.0.mlp.down_proj.weight");
    let want: Vec<f32> = (0..H * F).map(|k| bf16(wd[k] * ld[k % F])).collect();
    assert_bits(
        "ia3 columns",
        &out["model.layers.0.mlp.down_proj.weight"],
        &want,
    );
}

#[test]
fn random_values_within_one_ulp_of_f64_reference() {
    // non-dyadic values: the f32 summation may differ from the exact sum; at most 1 bf16 ulp
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(2024);
    let base = llama_base(&mut rng, "BF16");
    let bdir = base_dir(dir.path(), llama_cfg(), &base);
    let m = "model.layers.1.mlp.down_proj";
    let r = 16;
    let a = rng.vec(r * F, |g| g.weight("F32") * 3.0);
    let b = rng.vec(H * r, |g| g.weight("F32") * 3.0);
    let ts = vec![
        t(
            &format!("base_model.model.{m}.lora_A.weight"),
            "F32",
            &[r, F],
            a.clone(),
        ),
        t(
            &format!("base_model.model.{m}.lora_B.weight"),
            "F32",
            &[H, r],
            b.clone(),
        ),
    ];
    let adir = adapter_dir(
        dir.path(),
        "ad",
        lora_cfg(json!({"r": 16, "lora_alpha": 24})),
        &ts,
    );
    let (_, out) = merged(&bdir, &[(&adir, 1.0)], None).unwrap();
    let w = get(&base, &format!("{m}.weight"));
    let s = (24.0f64 / 16.0) as f32 as f64;
    let d = matmul(&b, &a, H, r, F);
    let want: Vec<f32> = (0..H * F)
        .map(|k| bf16((w[k] as f64 + d[k] * s) as f32))
        .collect();
    let n = assert_ulp("random", &out[&format!("{m}.weight")], &want, "BF16");
    assert!(n * 100 <= H * F, "{n} of {} elements differ", H * F);
}

#[test]
fn errors_before_output() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(1);
    let base = llama_base(&mut rng, "BF16");
    let bdir = base_dir(dir.path(), llama_cfg(), &base);
    let err = |name: &str, cfg: Value, ts: Vec<T>| -> String {
        let adir = adapter_dir(dir.path(), name, cfg, &ts);
        match merged(&bdir, &[(&adir, 1.0)], None) {
            Ok(_) => panic!("{name}: merge succeeded"),
            Err(e) => format!("{e:#}"),
        }
    };
    // shape mismatch
    let (a, b) = lora_pair(&mut rng, "model.layers.0.mlp.up_proj", 4, H + 1, F);
    let e = err("shape", lora_cfg(json!({})), vec![a, b]);
    assert!(
        e.contains("do not fit") && e.contains("model.layers.0.mlp.up_proj.weight"),
        "{e}"
    );
    // A/B rank mismatch
    let (a, _) = lora_pair(&mut rng, "model.layers.0.mlp.up_proj", 4, H, F);
    let (_, b) = lora_pair(&mut rng, "model.layers.0.mlp.up_proj", 3, H, F);
    let e = err("rank", lora_cfg(json!({})), vec![a, b]);
    assert!(e.contains("rank mismatch"), "{e}");
    // rank disagreeing with the config
    let (a, b) = lora_pair(&mut rng, "model.layers.0.mlp.up_proj", 2, H, F);
    let e = err("rank2", lora_cfg(json!({})), vec![a, b]);
    assert!(e.contains("config says r=4"), "{e}");
    // a target the base does not have
    let (a, b) = lora_pair(&mut rng, "model.layers.0.mlp.gate_proj", 4, H, F);
    let (a2, b2) = lora_pair(&mut rng, "model.layers.0.mlp.up_proj", 4, H, F);
    let e = err("absent", lora_cfg(json!({})), vec![a, b, a2, b2]);
    assert!(
        e.contains("gate_proj") && e.contains("does not exist"),
        "{e}"
    );
    // another architecture altogether
    let (a, b) = lora_pair(&mut rng, "transformer.h.0.attn.c_attn", 4, H, 3 * H);
    let e = err("arch", lora_cfg(json!({})), vec![a, b]);
    assert!(e.contains("different architecture"), "{e}");
    // a missing config field
    let (a, b) = lora_pair(&mut rng, "model.layers.0.mlp.up_proj", 4, H, F);
    let e = err(
        "cfg",
        json!({"peft_type": "LORA", "r": 4, "target_modules": null}),
        vec![a, b],
    );
    assert!(e.contains("lora_alpha"), "{e}");
    // a modules_to_save copy of the wrong shape
    let e = err(
        "mts",
        lora_cfg(json!({})),
        vec![t(
            "base_model.model.lm_head.weight",
            "BF16",
            &[V, H + 1],
            vec![0.0; V * (H + 1)],
        )],
    );
    assert!(e.contains("lm_head.weight") && e.contains("shape"), "{e}");
}

// ---------------------------------------------------------------- batched (GPU) path

/// merge.cu's steps written out in Rust: the stand-in for the GPU in the batched path's
/// plumbing test (the kernels themselves are checked in tests/gpu_kernels.rs).
fn run_steps(x: &mut [f32], cols: usize, dt: gpu::Dtype, steps: &[MergeStep]) -> Result<()> {
    let ty = match dt {
        gpu::Dtype::F32 => FloatType::F32,
        gpu::Dtype::F16 => FloatType::F16,
        gpu::Dtype::BF16 => FloatType::BF16,
    };
    for st in steps {
        for (i, row) in x.chunks_exact_mut(cols).enumerate() {
            match *st {
                MergeStep::Lora {
                    coef,
                    mat,
                    r,
                    post_scale,
                    mode,
                } => {
                    for (j, v) in row.iter_mut().enumerate() {
                        let mut acc = 0f32;
                        for k in 0..r {
                            acc = coef[i * r + k].mul_add(mat[k * cols + j], acc);
                        }
                        if post_scale != 1.0 {
                            acc *= post_scale;
                        }
                        let d = if mode == LoraMode::AddRounded {
                            ty.round1(acc)
                        } else {
                            acc
                        };
                        *v = if mode == LoraMode::DoraV {
                            *v + d
                        } else {
                            ty.round1(*v + d)
                        };
                    }
                }
                MergeStep::DoraRows { magnitude } => {
                    let f = magnitude[i] / l2_norm(row);
                    row.iter_mut().for_each(|v| *v = ty.round1(*v * f));
                }
                MergeStep::DoraCols { magnitude, norms } => {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = ty.round1(*v * (magnitude[j] / norms[j]));
                    }
                }
                MergeStep::AddVec(a) => {
                    for (v, a) in row.iter_mut().zip(a) {
                        *v = ty.round1(*v + *a);
                    }
                }
                MergeStep::ScaleRows(l) => row.iter_mut().for_each(|v| *v = ty.round1(*v * l[i])),
                MergeStep::ScaleCols(l) => {
                    for (v, s) in row.iter_mut().zip(l) {
                        *v = ty.round1(*v * *s);
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn batched_merge_path_slices_rows_and_spot_checks() {
    let mut rng = Rng(77);
    let (rows, cols, r) = (40usize, 70usize, 4usize);
    let w = rng.vec(rows * cols, |g| g.weight("BF16"));
    let lin = LoraDelta::new(
        Layout::Linear,
        &[term(
            rng.vec(r * cols, Rng::dyadic),
            rng.vec(rows * r, Rng::dyadic),
            r,
            0.5,
            1.0,
        )],
    );
    let conv = LoraDelta::new(
        Layout::Conv1D,
        &[term(
            rng.vec(r * rows, Rng::dyadic),
            rng.vec(cols * r, Rng::dyadic),
            r,
            2.0,
            1.0,
        )],
    );
    let positive = |g: &mut Rng, n: usize| g.vec(n, |g| g.dyadic().abs() + 0.25);
    let by_rows = vec![
        Op::Add(lin.clone()),
        Op::Dora {
            delta: lin,
            magnitude: positive(&mut rng, rows),
            per_column: false,
        },
        Op::AddVec(rng.vec(cols, Rng::dyadic)),
        Op::Scale {
            l: positive(&mut rng, rows),
            per_row: true,
        },
        Op::Scale {
            l: positive(&mut rng, cols),
            per_row: false,
        },
    ];
    let by_cols = vec![Op::Dora {
        delta: conv,
        magnitude: positive(&mut rng, cols),
        per_column: true,
    }];
    let mut w_bf16 = w.clone();
    FloatType::BF16.round(&mut w_bf16);
    let col_norms = column_norms_dense(&w_bf16, rows, cols, &by_cols[0]);
    let src = MergedRows {
        inner: Box::new(crate::plan::VecRows {
            data: w.clone(),
            cols,
        }),
        ty: FloatType::BF16,
        steps: vec![],
        prepared: Mutex::new(None),
    };
    for (ops, norms) in [(&by_rows, vec![None; 5]), (&by_cols, vec![Some(col_norms)])] {
        for (row0, n) in [(0usize, rows), (7, 20), (39, 1)] {
            let mut want = vec![0f32; n * cols];
            src.compute(row0, &mut want, ops, &norms).unwrap();
            let mut got = vec![0f32; n * cols];
            src.compute_batched(&run_steps, row0, &mut got, ops, &norms)
                .unwrap();
            assert_bits(&format!("rows {row0}..{}", row0 + n), &got, &want);
            // a runner that gets the last row wrong is caught
            let bad = |x: &mut [f32], c: usize, d: gpu::Dtype, s: &[MergeStep]| {
                run_steps(x, c, d, s)?;
                let last = x.len() - 1;
                x[last] = f32::from_bits(x[last].to_bits() ^ 1);
                Ok(())
            };
            let e = src
                .compute_batched(&bad, row0, &mut got, ops, &norms)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("differs from the CPU's at row {}", row0 + n - 1)),
                "{e}"
            );
        }
    }
}
