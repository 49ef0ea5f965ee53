//! Families described in formats/arch beyond the llama family: a tiny checkpoint of each (tensor
//! names and shapes written here from the transformers modeling files, not from the
//! descriptions) plans as a GGUF; a config missing a field the family needs names the key; a
//! tensor whose shape disagrees with the config names the tensor, its shape and the expected one.
//! Byte-level conformance with llama.cpp is in scripts/interop.sh (section `families`).

mod common;
use common::*;
use serde_json::{Value, json};
use std::path::Path;

/// (name, shape) of each tensor of a checkpoint.
type Tensors = Vec<(String, Vec<usize>)>;

struct Family {
    class: &'static str,
    config: Value,
    /// (name, shape) of every tensor the HF model saves
    tensors: fn(&Value) -> Tensors,
    /// GGUF names the plan must contain
    expect: &'static [&'static str],
}

fn u(c: &Value, k: &str) -> usize {
    c[k].as_u64().unwrap() as usize
}

/// Llama-style decoder layers: attention and MLP projections with the given extra tensors.
fn layers(c: &Value, head_dim: usize, extra: &dyn Fn(&str, &mut Tensors)) -> Tensors {
    let (h, f, v) = (
        u(c, "hidden_size"),
        u(c, "intermediate_size"),
        u(c, "vocab_size"),
    );
    let (nh, nkv) = (u(c, "num_attention_heads"), u(c, "num_key_value_heads"));
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..u(c, "num_hidden_layers") {
        let p = format!("model.layers.{l}.");
        for (n, s) in [
            ("self_attn.q_proj.weight", vec![nh * head_dim, h]),
            ("self_attn.k_proj.weight", vec![nkv * head_dim, h]),
            ("self_attn.v_proj.weight", vec![nkv * head_dim, h]),
            ("self_attn.o_proj.weight", vec![h, nh * head_dim]),
            ("mlp.gate_proj.weight", vec![f, h]),
            ("mlp.up_proj.weight", vec![f, h]),
            ("mlp.down_proj.weight", vec![h, f]),
        ] {
            t.push((format!("{p}{n}"), s));
        }
        extra(&p, &mut t);
    }
    t.push(("model.norm.weight".to_string(), vec![h]));
    t
}

fn pre_norms(h: usize) -> impl Fn(&str, &mut Tensors) {
    move |p, t| {
        t.push((format!("{p}input_layernorm.weight"), vec![h]));
        t.push((format!("{p}post_attention_layernorm.weight"), vec![h]));
    }
}

fn families() -> Vec<Family> {
    let base = |class: &str, extra: Value| {
        let mut c = json!({
            "architectures": [class], "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 32, "rms_norm_eps": 1e-6, "max_position_embeddings": 128,
            "tie_word_embeddings": true
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    vec![
        Family {
            class: "Qwen3ForCausalLM",
            config: base("Qwen3ForCausalLM", json!({"head_dim": 24})),
            tensors: |c| {
                layers(c, 24, &|p, t| {
                    pre_norms(64)(p, t);
                    t.push((format!("{p}self_attn.q_norm.weight"), vec![24]));
                    t.push((format!("{p}self_attn.k_norm.weight"), vec![24]));
                })
            },
            expect: &["blk.1.attn_q_norm.weight", "blk.0.attn_q.weight"],
        },
        Family {
            class: "SmolLM3ForCausalLM",
            config: base("SmolLM3ForCausalLM", json!({"no_rope_layer_interval": 2})),
            tensors: |c| layers(c, 16, &pre_norms(64)),
            expect: &["blk.1.ffn_norm.weight", "blk.1.attn_k.weight"],
        },
        Family {
            class: "Olmo2ForCausalLM",
            config: base("Olmo2ForCausalLM", json!({"vocab_size": 320})),
            tensors: |c| {
                layers(c, 16, &|p, t| {
                    t.push((format!("{p}self_attn.q_norm.weight"), vec![64]));
                    t.push((format!("{p}self_attn.k_norm.weight"), vec![32]));
                    t.push((format!("{p}post_attention_layernorm.weight"), vec![64]));
                    t.push((format!("{p}post_feedforward_layernorm.weight"), vec![64]));
                })
            },
            expect: &[
                "blk.0.post_attention_norm.weight",
                "blk.1.post_ffw_norm.weight",
            ],
        },
        Family {
            class: "GraniteForCausalLM",
            config: base(
                "GraniteForCausalLM",
                json!({"embedding_multiplier": 12.0, "attention_multiplier": 0.0625,
                       "residual_multiplier": 0.22, "logits_scaling": 8.0}),
            ),
            tensors: |c| layers(c, 16, &pre_norms(64)),
            expect: &["blk.0.attn_norm.weight", "output_norm.weight"],
        },
    ]
}

fn write_checkpoint(dir: &Path, config: &Value, tensors: &[(String, Vec<usize>)]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let data: Vec<(&str, Vec<usize>, Vec<f32>)> = tensors
        .iter()
        .enumerate()
        .map(|(i, (n, s))| {
            (
                n.as_str(),
                s.clone(),
                gaussian(s.iter().product(), 0.02, i as u64),
            )
        })
        .collect();
    std::fs::write(dir.join("model.safetensors"), f32_safetensors(&data)).unwrap();
    // tokenizers the converter accepts: the tiny fixture's SentencePiece model, and (for the
    // families that read only tokenizer.json) the tiny BPE of the fine-tuning fixtures
    std::fs::copy(
        fixture("tiny-llama/tokenizer.model"),
        dir.join("tokenizer.model"),
    )
    .unwrap();
    if config["architectures"][0] == "Olmo2ForCausalLM" {
        std::fs::remove_file(dir.join("tokenizer.model")).unwrap();
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(fixture(&format!("tiny-chat/base/{f}")), dir.join(f)).unwrap();
        }
    }
}

fn plan(dir: &Path) -> std::process::Output {
    run(&[
        "quantize",
        dir.to_str().unwrap(),
        "--to",
        "q8_0",
        "--dry-run",
        "--json",
    ])
}

#[test]
fn each_family_plans_its_gguf_tensors() {
    for f in families() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("m");
        write_checkpoint(&m, &f.config, &(f.tensors)(&f.config));
        let o = plan(&m);
        if f.class == "Olmo2ForCausalLM" {
            // OLMo 2 reads only tokenizer.json, and the converter knows only real tokenizers'
            // pre-tokenizer hashes (too big for fixtures/: the interop suite uses a real one):
            // the tensors mapped, the vocabulary is refused as llama.cpp refuses it
            assert_fails(&o, 1, "pre-tokenizer not recognized");
            continue;
        }
        assert!(o.status.success(), "{}: {}", f.class, stderr(&o));
        let out = stdout(&o);
        for e in f.expect {
            assert!(out.contains(e), "{}: plan lacks {e}", f.class);
        }
    }
}

#[test]
fn a_missing_config_field_is_named() {
    for f in families() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("m");
        let mut cfg = f.config.clone();
        cfg.as_object_mut().unwrap().remove("intermediate_size");
        // the class default would fill intermediate_size in: make it null as a broken export does
        cfg["intermediate_size"] = Value::Null;
        write_checkpoint(&m, &cfg, &(f.tensors)(&f.config));
        let o = plan(&m);
        assert_fails(&o, 1, "intermediate_size");
        assert!(stderr(&o).contains(f.class), "{}: {}", f.class, stderr(&o));
    }
}

#[test]
fn a_tensor_shape_that_disagrees_names_both() {
    for f in families() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("m");
        let mut t = (f.tensors)(&f.config);
        let i = t
            .iter()
            .position(|(n, _)| n == "model.layers.1.mlp.up_proj.weight")
            .unwrap();
        t[i].1 = vec![80, 64];
        write_checkpoint(&m, &f.config, &t);
        let o = plan(&m);
        assert_fails(&o, 1, "model.layers.1.mlp.up_proj.weight");
        let e = stderr(&o);
        assert!(
            e.contains("[80, 64]") && e.contains("[96, 64]"),
            "{}: {e}",
            f.class
        );
    }
}

#[test]
fn an_unsupported_architecture_lists_the_supported_ones() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    let f = &families()[0];
    let mut cfg = f.config.clone();
    cfg["architectures"] = json!(["FalconForCausalLM"]);
    write_checkpoint(&m, &cfg, &(f.tensors)(&f.config));
    let o = plan(&m);
    assert_fails(&o, 1, "FalconForCausalLM");
    for c in [
        "Qwen3ForCausalLM",
        "Olmo2ForCausalLM",
        "GraniteForCausalLM",
        "LlamaForCausalLM",
    ] {
        assert!(stderr(&o).contains(c), "{}", stderr(&o));
    }
}
