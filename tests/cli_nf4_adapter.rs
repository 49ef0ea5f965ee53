//! `quantize --to nf4 --adapter A` (one pass) gives the same folder as `merge` then `quantize --to nf4`,
//! for quantized Linear weights and for unquantized tensors (the embedding) alike.

mod common;
use common::*;
use std::path::Path;

fn write_adapter(dir: &Path) {
    let cfg = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj", "down_proj", "embed_tokens"], "bias": "none", "fan_in_fan_out": false,
        "use_rslora": false, "use_dora": false
    });
    let p = "base_model.model.model.layers.";
    let mut t = vec![];
    for l in 0..2u64 {
        t.push((
            format!("{p}{l}.self_attn.q_proj.lora_A.weight"),
            vec![4, 256],
            gaussian(4 * 256, 0.05, 30 + l),
        ));
        t.push((
            format!("{p}{l}.self_attn.q_proj.lora_B.weight"),
            vec![256, 4],
            gaussian(256 * 4, 0.05, 40 + l),
        ));
        t.push((
            format!("{p}{l}.mlp.down_proj.lora_A.weight"),
            vec![4, 512],
            gaussian(4 * 512, 0.05, 50 + l),
        ));
        t.push((
            format!("{p}{l}.mlp.down_proj.lora_B.weight"),
            vec![256, 4],
            gaussian(256 * 4, 0.05, 60 + l),
        ));
    }
    // embedding LoRA: the embedding stays unquantized, so its merged values are copied
    t.push((
        "base_model.model.model.embed_tokens.lora_embedding_A".into(),
        vec![4, 512],
        gaussian(4 * 512, 0.05, 70),
    ));
    t.push((
        "base_model.model.model.embed_tokens.lora_embedding_B".into(),
        vec![256, 4],
        gaussian(256 * 4, 0.05, 71),
    ));
    write_f32_adapter(dir, &cfg, &t);
}

#[test]
fn nf4_with_adapter_equals_merge_then_quantize() {
    let tmp = tempfile::tempdir().unwrap();
    let ad = tmp.path().join("ad");
    write_adapter(&ad);
    let base = fixture("tiny-llama");
    let merged = tmp.path().join("merged");
    let o = run(&[
        "merge",
        base.to_str().unwrap(),
        ad.to_str().unwrap(),
        "-o",
        merged.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let two = tmp.path().join("two-step");
    let o = run(&[
        "quantize",
        merged.to_str().unwrap(),
        "--to",
        "nf4",
        "-o",
        two.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let one = tmp.path().join("one-step");
    let o = run(&[
        "quantize",
        base.to_str().unwrap(),
        "--adapter",
        ad.to_str().unwrap(),
        "--to",
        "nf4",
        "-o",
        one.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let files = list(&two);
    assert_eq!(list(&one), files);
    for f in &files {
        assert_eq!(
            std::fs::read(one.join(f)).unwrap(),
            std::fs::read(two.join(f)).unwrap(),
            "{f} differs"
        );
    }
    // the merge did change the embedding (it is not the base's)
    let emb = |d: &Path| {
        let b = std::fs::read(d.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&b).unwrap();
        st.tensor("model.embed_tokens.weight")
            .unwrap()
            .data()
            .to_vec()
    };
    let nf4_base = tmp.path().join("base-nf4");
    let o = run(&[
        "quantize",
        base.to_str().unwrap(),
        "--to",
        "nf4",
        "-o",
        nf4_base.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(emb(&one), emb(&nf4_base));
}
