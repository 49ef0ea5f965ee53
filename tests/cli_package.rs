//! `ftconv package`: GGUF + Modelfile + manifest in one step; the same bytes whatever --threads is.

mod common;
use common::*;
use sha2::{Digest, Sha256};
use std::path::Path;

fn sha(p: &Path) -> String {
    Sha256::digest(std::fs::read(p).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn write_adapter(dir: &Path) {
    let cfg = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "fan_in_fan_out": false,
        "use_rslora": false, "use_dora": false, "base_model_name_or_path": "tiny-llama"
    });
    let p = "base_model.model.model.layers.";
    let mut t = vec![];
    for l in 0..2 {
        for (m, out) in [("q_proj", 256), ("v_proj", 128)] {
            t.push((
                format!("{p}{l}.self_attn.{m}.lora_A.weight"),
                vec![4, 256],
                gaussian(4 * 256, 0.05, 10 + l as u64),
            ));
            t.push((
                format!("{p}{l}.self_attn.{m}.lora_B.weight"),
                vec![out, 4],
                gaussian(out * 4, 0.05, 20 + l as u64),
            ));
        }
    }
    write_f32_adapter(dir, &cfg, &t);
}

#[test]
fn package_is_deterministic_and_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let ad = tmp.path().join("my-tune");
    write_adapter(&ad);
    let base = fixture("tiny-llama");
    let mut dirs = vec![];
    for threads in ["1", "2"] {
        let out = tmp.path().join(format!("out{threads}"));
        let o = run(&[
            "package",
            base.to_str().unwrap(),
            "--adapter",
            ad.to_str().unwrap(),
            "--to",
            "q4_k_m",
            "-o",
            out.to_str().unwrap(),
            "--threads",
            threads,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(
            list(&out),
            ["Modelfile", "manifest.json", "my-tune-Q4_K_M.gguf"]
        );
        dirs.push(out);
    }
    for f in ["Modelfile", "manifest.json", "my-tune-Q4_K_M.gguf"] {
        assert_eq!(
            std::fs::read(dirs[0].join(f)).unwrap(),
            std::fs::read(dirs[1].join(f)).unwrap(),
            "{f} differs between --threads 1 and 2"
        );
    }
    let mf = std::fs::read_to_string(dirs[0].join("Modelfile")).unwrap();
    assert!(mf.contains("FROM ./my-tune-Q4_K_M.gguf"), "{mf}");
    assert!(mf.contains("TEMPLATE"), "{mf}");
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dirs[0].join("manifest.json")).unwrap()).unwrap();
    let outs = m["outputs"].as_array().unwrap();
    assert_eq!(outs[0]["path"], "my-tune-Q4_K_M.gguf");
    assert_eq!(outs[0]["sha256"], sha(&dirs[0].join("my-tune-Q4_K_M.gguf")));
    assert_eq!(outs[1]["sha256"], sha(&dirs[0].join("Modelfile")));
    let inputs = m["inputs"].as_array().unwrap();
    assert_eq!(inputs[0]["role"], "base");
    let cfg = inputs[0]["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "tiny-llama/config.json")
        .unwrap();
    assert_eq!(cfg["sha256"], sha(&base.join("config.json")));
    assert_eq!(inputs[1]["role"], "adapter");
    assert_eq!(m["settings"]["type"], "Q4_K_M");
    let tensors = m["tensors"].as_array().unwrap();
    assert!(
        tensors
            .iter()
            .any(|t| t["name"] == "blk.0.attn_q.weight" && t["type"] == "Q4_K")
    );
    assert!(
        tensors
            .iter()
            .filter(|t| t["type"] != "F32")
            .all(|t| t["rel_error"].as_f64().unwrap() > 0.0)
    );
}

#[test]
fn package_merge_equals_quantize_with_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let ad = tmp.path().join("tune");
    write_adapter(&ad);
    let base = fixture("tiny-llama");
    let out = tmp.path().join("pkg");
    let o = run(&[
        "package",
        base.to_str().unwrap(),
        "--adapter",
        ad.to_str().unwrap(),
        "--to",
        "q8_0",
        "-o",
        out.to_str().unwrap(),
        "--name",
        "x",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let q = tmp.path().join("q.gguf");
    let o = run(&[
        "quantize",
        base.to_str().unwrap(),
        "--adapter",
        ad.to_str().unwrap(),
        "--to",
        "q8_0",
        "-o",
        q.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(out.join("x-Q8_0.gguf")).unwrap(),
        std::fs::read(&q).unwrap()
    );
}

#[test]
fn package_refuses_bad_input_without_output() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pkg");
    let o = run(&[
        "package",
        tmp.path().to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let o = run(&[
        "package",
        fixture("tiny-llama").to_str().unwrap(),
        "--to",
        "q9_z",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = run(&[
        "package",
        fixture("tiny-llama").to_str().unwrap(),
        "--adapter",
        "/nonexistent/adapter",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(!out.join("manifest.json").exists());
}
