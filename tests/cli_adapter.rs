//! `ftconv adapter`: PEFT LoRA → GGUF LoRA (convert_lora_to_gguf.py's layout, gguf-and-k-quants.md §6).
//! Expected values are computed here from the definitions (A as stored, B with the llama rotate-half
//! permutation written out as torch's reshape/swapaxes, A transposed for embeddings), not by ftconv.

mod common;
use common::*;
use ftconv::gguf::GgufFile;

const H: usize = 256; // tiny-llama hidden
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 64;
const VOCAB: usize = 512;

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// torch: w.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2).reshape(rows, cols)
fn permute_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let half = rows / n_head / 2;
    let mut out = vec![0f32; w.len()];
    let mut r_out = 0;
    for h in 0..n_head {
        for i in 0..half {
            for two in 0..2 {
                let r_src = h * 2 * half + two * half + i;
                out[r_out * cols..(r_out + 1) * cols]
                    .copy_from_slice(&w[r_src * cols..(r_src + 1) * cols]);
                r_out += 1;
            }
        }
    }
    out
}

fn config(extra: serde_json::Value) -> serde_json::Value {
    let mut c = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
        "target_modules": ["q_proj", "k_proj", "v_proj", "embed_tokens"], "base_model_name_or_path": "tiny-llama",
        "bias": "none", "fan_in_fan_out": false, "use_rslora": false, "use_dora": false
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn tensors(r: usize) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let p = "base_model.model.model.";
    let kv = KV_HEADS * HEAD_DIM;
    vec![
        (
            format!("{p}embed_tokens.lora_embedding_A"),
            vec![r, VOCAB],
            gaussian(r * VOCAB, 0.1, 1),
        ),
        (
            format!("{p}embed_tokens.lora_embedding_B"),
            vec![H, r],
            gaussian(H * r, 0.1, 2),
        ),
        (
            format!("{p}layers.0.self_attn.k_proj.lora_A.weight"),
            vec![r, H],
            gaussian(r * H, 0.1, 3),
        ),
        (
            format!("{p}layers.0.self_attn.k_proj.lora_B.weight"),
            vec![kv, r],
            gaussian(kv * r, 0.1, 4),
        ),
        (
            format!("{p}layers.0.self_attn.q_proj.lora_A.weight"),
            vec![r, H],
            gaussian(r * H, 0.1, 5),
        ),
        (
            format!("{p}layers.0.self_attn.q_proj.lora_B.weight"),
            vec![H, r],
            gaussian(H * r, 0.1, 6),
        ),
        (
            format!("{p}layers.1.self_attn.v_proj.lora_A.weight"),
            vec![r, H],
            gaussian(r * H, 0.1, 7),
        ),
        (
            format!("{p}layers.1.self_attn.v_proj.lora_B.weight"),
            vec![kv, r],
            gaussian(kv * r, 0.1, 8),
        ),
    ]
}

fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = w[i * cols + j];
        }
    }
    t
}

#[test]
fn plain_lora_layout_and_values() {
    let tmp = tempfile::tempdir().unwrap();
    let ad = tmp.path().join("my-adapter");
    let r = 8;
    let ts = tensors(r);
    write_f32_adapter(&ad, &config(serde_json::json!({})), &ts);
    let out = tmp.path().join("a.gguf");
    let o = run(&[
        "adapter",
        ad.to_str().unwrap(),
        "--base",
        fixture("tiny-llama").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let g = GgufFile::open(&out).unwrap();
    let keys: Vec<&str> = g.metadata.keys().collect();
    assert_eq!(
        keys,
        [
            "general.architecture",
            "general.type",
            "adapter.type",
            "general.name",
            "adapter.lora.alpha",
            "general.quantization_version"
        ]
    );
    assert_eq!(g.metadata.get_str("general.type"), Some("adapter"));
    assert_eq!(g.metadata.get_str("adapter.type"), Some("lora"));
    assert_eq!(
        g.metadata.get("adapter.lora.alpha").unwrap().as_f64(),
        Some(16.0)
    );
    let names: Vec<&str> = g.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "token_embd.weight.lora_a",
            "token_embd.weight.lora_b",
            "blk.0.attn_k.weight.lora_a",
            "blk.0.attn_k.weight.lora_b",
            "blk.0.attn_q.weight.lora_a",
            "blk.0.attn_q.weight.lora_b",
            "blk.1.attn_v.weight.lora_a",
            "blk.1.attn_v.weight.lora_b",
        ]
    );
    let get = |n: &str| {
        let t = g.tensor(n).unwrap();
        assert_eq!(t.type_id, 0, "{n} is F32");
        (t.ne.clone(), f32s(g.tensor_data(t)))
    };
    let kv = KV_HEADS * HEAD_DIM;
    // embeddings: a = A^T (ne [r, vocab]), b = B (ne [r, hidden])
    assert_eq!(
        get("token_embd.weight.lora_a"),
        (vec![r as u64, VOCAB as u64], transpose(&ts[0].2, r, VOCAB))
    );
    assert_eq!(
        get("token_embd.weight.lora_b"),
        (vec![r as u64, H as u64], ts[1].2.clone())
    );
    // k: A as is, B rows permuted with the kv head count
    assert_eq!(
        get("blk.0.attn_k.weight.lora_a"),
        (vec![H as u64, r as u64], ts[2].2.clone())
    );
    assert_eq!(
        get("blk.0.attn_k.weight.lora_b"),
        (
            vec![r as u64, kv as u64],
            permute_rows(&ts[3].2, kv, r, KV_HEADS)
        )
    );
    assert_eq!(
        get("blk.0.attn_q.weight.lora_b"),
        (
            vec![r as u64, H as u64],
            permute_rows(&ts[5].2, H, r, HEADS)
        )
    );
    // v: untouched
    assert_eq!(
        get("blk.1.attn_v.weight.lora_b"),
        (vec![r as u64, kv as u64], ts[7].2.clone())
    );
}

#[test]
fn rslora_scale_is_folded_into_b() {
    let tmp = tempfile::tempdir().unwrap();
    let ad = tmp.path().join("rs");
    let r = 8;
    let ts = tensors(r);
    write_f32_adapter(
        &ad,
        &config(serde_json::json!({"use_rslora": true, "alpha_pattern": {"v_proj": 4}})),
        &ts,
    );
    let out = tmp.path().join("a.gguf");
    let o = run(&[
        "adapter",
        ad.to_str().unwrap(),
        "--base",
        fixture("tiny-llama").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let g = GgufFile::open(&out).unwrap();
    let b = |n: &str| f32s(g.tensor_data(g.tensor(n).unwrap()));
    // llama.cpp applies alpha/r = 2; PEFT applies alpha/sqrt(r) (q) and 4/sqrt(r) (v, alpha_pattern)
    let fq = ((16.0 / (r as f64).sqrt()) / 2.0) as f32;
    let fv = ((4.0 / (r as f64).sqrt()) / 2.0) as f32;
    let want_q: Vec<f32> = permute_rows(&ts[5].2, H, r, HEADS)
        .iter()
        .map(|x| x * fq)
        .collect();
    let want_v: Vec<f32> = ts[7].2.iter().map(|x| x * fv).collect();
    assert_eq!(b("blk.0.attn_q.weight.lora_b"), want_q);
    assert_eq!(b("blk.1.attn_v.weight.lora_b"), want_v);
}

#[test]
fn f16_and_q8_0_storage() {
    let tmp = tempfile::tempdir().unwrap();
    let ad = tmp.path().join("ad");
    let r = 8;
    write_f32_adapter(&ad, &config(serde_json::json!({})), &tensors(r));
    for (to, a_type, b_type) in [("f16", 1u32, 1u32), ("q8_0", 8, 1), ("bf16", 30, 30)] {
        let out = tmp.path().join(format!("{to}.gguf"));
        let o = run(&[
            "adapter",
            ad.to_str().unwrap(),
            "--base",
            fixture("tiny-llama").to_str().unwrap(),
            "--to",
            to,
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let g = GgufFile::open(&out).unwrap();
        // lora_a rows are 256 long (Q8_0 fits); lora_b rows are r = 8 long (Q8_0 falls back to F16)
        assert_eq!(
            g.tensor("blk.0.attn_q.weight.lora_a").unwrap().type_id,
            a_type,
            "{to}"
        );
        assert_eq!(
            g.tensor("blk.0.attn_q.weight.lora_b").unwrap().type_id,
            b_type,
            "{to}"
        );
    }
}

#[test]
fn refuses_dora_and_full_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("tiny-llama");
    let r = 8;
    let ad = tmp.path().join("dora");
    let mut ts = tensors(r);
    ts.push((
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.weight".into(),
        vec![H],
        vec![1.0; H],
    ));
    write_f32_adapter(&ad, &config(serde_json::json!({"use_dora": true})), &ts);
    let out = tmp.path().join("x.gguf");
    let o = run(&[
        "adapter",
        ad.to_str().unwrap(),
        "--base",
        base.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_fails(&o, 1, "DoRA");
    assert!(!out.exists());

    let ad2 = tmp.path().join("mts");
    let mut ts = tensors(r);
    ts.push((
        "base_model.model.lm_head.modules_to_save.default.weight".into(),
        vec![VOCAB, H],
        vec![0.0; VOCAB * H],
    ));
    write_f32_adapter(
        &ad2,
        &config(serde_json::json!({"modules_to_save": ["lm_head"]})),
        &ts,
    );
    let o = run(&[
        "adapter",
        ad2.to_str().unwrap(),
        "--base",
        base.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("ftconv merge"), "{}", stderr(&o));
    assert!(!out.exists());
}
