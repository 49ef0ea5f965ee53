//! `ftconv finetune` end to end on the 2-layer fixture llama with the tiny-chat tokenizer: the
//! model learns, a resumed run equals the uninterrupted one byte for byte, Ctrl-C checkpoints,
//! the adapter is a PEFT LoRA the other commands load, errors are one line.
#![cfg(feature = "train")]

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// tiny-llama's weights (vocab 512) with the tiny-chat instruct tokenizer (295 ids) and its
/// SmolLM2 chat template.
fn model(tmp: &Path) -> PathBuf {
    let dir = tmp.join("base");
    copy_dir(&fixture("tiny-llama"), &dir);
    for f in ["tokenizer.model", "special_tokens_map.json"] {
        std::fs::remove_file(dir.join(f)).ok();
    }
    copy_dir(&fixture("tiny-chat/instruct"), &dir);
    dir
}

const FACTS: [(&str, &str); 6] = [
    ("Where is Paris?", "In France."),
    ("What is the user?", "A person."),
    ("Name a colour.", "Blue, the sky."),
    ("Where is the assistant?", "Here with you."),
    ("What is two plus two?", "Four, always."),
    ("Say hello.", "Hello there!"),
];

/// Chat rows, prompt/completion rows and an Alpaca row.
fn data(tmp: &Path) -> PathBuf {
    let mut s = String::new();
    for (i, (q, a)) in FACTS.iter().enumerate() {
        let row = match i % 3 {
            0 => {
                serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            }
            1 => serde_json::json!({"prompt": format!("Q: {q}\nA: "), "completion": a}),
            _ => serde_json::json!({"instruction": q, "input": "", "output": a}),
        };
        s.push_str(&row.to_string());
        s.push('\n');
    }
    let p = tmp.join("train.jsonl");
    std::fs::write(&p, s).unwrap();
    p
}

fn log(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn finetune(base: &Path, data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "finetune".to_string(),
        base.display().to_string(),
        "--data".into(),
        data.display().to_string(),
        "-o".into(),
        out.display().to_string(),
        "--threads".into(),
        "1".into(),
        "-q".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    ftconv().args(&args).output().unwrap()
}

fn ok(o: &std::process::Output) {
    assert!(o.status.success(), "finetune failed: {}", stderr(o));
}

#[test]
fn a_tiny_model_learns_a_tiny_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let base = model(tmp.path());
    let d = data(tmp.path());
    let out = tmp.path().join("out");
    let o = finetune(
        &base,
        &d,
        &out,
        &[
            "--eval",
            d.to_str().unwrap(),
            "--rank",
            "8",
            "--lr",
            "3e-3",
            "--max-steps",
            "60",
            "--dropout",
            "0",
            "--batch-size",
            "3",
            "--lr-schedule",
            "constant",
        ],
    );
    ok(&o);
    let l = log(&out);
    let evals: Vec<f64> = l
        .iter()
        .filter(|v| v["type"] == "eval")
        .map(|v| v["eval_loss"].as_f64().unwrap())
        .collect();
    assert_eq!(evals.len(), 2, "{l:?}");
    // a random 2-layer model memorising through rank-8 LoRA: about 6.35 → 2.1 in 60 steps (the
    // interop suite asks 5× of the real SmolLM2)
    assert!(
        evals[1] < evals[0] * 0.4,
        "eval loss {} → {}: did not fall well below its start",
        evals[0],
        evals[1]
    );
    let done = l.last().unwrap();
    assert_eq!(done["type"], "done");
    assert_eq!(done["steps"], 60);
    // the adapter, as PEFT writes it
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["lora_alpha"], 32.0);
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7);
    assert_eq!(cfg["base_model_name_or_path"], base.display().to_string());
    let st = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&st[8..8 + n]).unwrap();
    assert_eq!(header["__metadata__"]["format"], "pt");
    let a = &header["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"];
    assert_eq!(a["dtype"], "F32");
    assert_eq!(a["shape"], serde_json::json!([8, 512]));
    assert_eq!(
        header["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"]["shape"],
        serde_json::json!([128, 8])
    );
    // the other commands take it
    let merged = tmp.path().join("merged");
    let o = run(&[
        "merge",
        base.to_str().unwrap(),
        out.to_str().unwrap(),
        "-o",
        merged.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let g = tmp.path().join("a.gguf");
    let o = run(&[
        "adapter",
        out.to_str().unwrap(),
        "--base",
        base.to_str().unwrap(),
        "-o",
        g.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_resumed_run_equals_the_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let base = model(tmp.path());
    let d = data(tmp.path());
    let settings = [
        "--rank",
        "4",
        "--dropout",
        "0.1",
        "--max-steps",
        "6",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--warmup-steps",
        "2",
        "--lr",
        "1e-3",
        "--lr-schedule",
        "cosine",
        "--max-grad-norm",
        "0.5",
    ];
    let full = tmp.path().join("full");
    let mut args = settings.to_vec();
    args.extend(["--save-every", "3"]);
    ok(&finetune(&base, &d, &full, &args));
    let ck = full.join("checkpoint-3");
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(ck.join(f).is_file(), "{f} missing from the checkpoint");
    }
    let resumed = tmp.path().join("resumed");
    let mut args = settings.to_vec();
    args.extend(["--resume", ck.to_str().unwrap()]);
    ok(&finetune(&base, &d, &resumed, &args));
    let a = std::fs::read(full.join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(resumed.join("adapter_model.safetensors")).unwrap();
    assert!(a == b, "resumed adapter differs from the uninterrupted one");
    // the resumed log continues at step 4
    let steps: Vec<u64> = log(&resumed)
        .iter()
        .filter(|v| v["type"] == "train")
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![4, 5, 6]);
    // a resume with other settings is refused, naming the setting
    let mut args = settings.to_vec();
    args[13] = "3e-3";
    args.extend(["--resume", ck.to_str().unwrap()]);
    let o = finetune(&base, &d, &tmp.path().join("other"), &args);
    assert_fails(&o, 1, "lr");
}

#[test]
fn ctrl_c_saves_a_checkpoint_that_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let base = model(tmp.path());
    let d = data(tmp.path());
    let out = tmp.path().join("out");
    let child = ftconv()
        .args([
            "finetune",
            base.to_str().unwrap(),
            "--data",
            d.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--rank",
            "2",
            "--max-steps",
            "1000000",
            "--threads",
            "1",
            "-q",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let logp = out.join("train_log.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&logp)
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < 2
    {
        assert!(t0.elapsed().as_secs() < 120, "no training step logged");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let k = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(k.success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("interrupted at step"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"));
    let ck: Vec<String> = list(&out)
        .into_iter()
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert_eq!(ck.len(), 1, "{ck:?}");
    assert!(out.join(&ck[0]).join("optimizer.safetensors").is_file());
    assert!(
        !out.join("adapter_model.safetensors").exists(),
        "no final adapter after an interrupt"
    );
}

#[test]
fn probe_writes_the_parity_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let base = model(tmp.path());
    let d = data(tmp.path());
    let out = tmp.path().join("out");
    ok(&finetune(
        &base,
        &d,
        &out,
        &["--rank", "4", "--max-steps", "1"],
    ));
    let p = tmp.path().join("probe.safetensors");
    ok(&finetune(
        &base,
        &d,
        &tmp.path().join("unused"),
        &[
            "--base-dtype",
            "f32",
            "--init-adapter",
            out.to_str().unwrap(),
            "--batch-size",
            "3",
            "--probe",
            p.to_str().unwrap(),
        ],
    ));
    let st = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let h: Value = serde_json::from_slice(&st[8..8 + n]).unwrap();
    let t = h["input_ids"]["shape"][1].as_u64().unwrap();
    assert_eq!(h["input_ids"]["shape"], serde_json::json!([3, t]));
    assert_eq!(h["labels"]["dtype"], "I64");
    assert_eq!(h["attention_mask"]["shape"], serde_json::json!([3, t]));
    assert_eq!(h["logits"]["shape"], serde_json::json!([3, t, 512]));
    assert_eq!(h["loss"]["dtype"], "F32");
    let grads = h
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("grad.base_model.model."))
        .count();
    assert_eq!(grads, 2 * 7 * 2);
}

#[test]
fn dry_run_prints_the_plan() {
    let tmp = tempfile::tempdir().unwrap();
    let base = model(tmp.path());
    let d = data(tmp.path());
    let out = tmp.path().join("out");
    let o = finetune(
        &base,
        &d,
        &out,
        &[
            "--dry-run",
            "--targets",
            "q_proj,v_proj",
            "--epochs",
            "3",
            "--batch-size",
            "2",
        ],
    );
    ok(&o);
    let s = stdout(&o);
    assert!(s.contains("q_proj,v_proj"), "{s}");
    assert!(s.contains("6 rows"), "{s}");
    assert!(s.contains("9 steps"), "{s}");
    assert!(!out.exists(), "dry run wrote output");
}

#[test]
fn bad_input_is_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let base = model(tmp.path());
    let d = data(tmp.path());
    let out = tmp.path().join("out");
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"text\": \"fine\"}\n{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}\n",
    )
    .unwrap();
    assert_fails(&finetune(&base, &bad, &out, &[]), 1, "bad.jsonl:2:");
    let missing = tmp.path().join("nope.jsonl");
    assert_fails(&finetune(&base, &missing, &out, &[]), 1, "nope.jsonl");
    assert_fails(
        &finetune(&base, &d, &out, &["--batch-size", "0"]),
        2,
        "--batch-size",
    );
    assert_fails(
        &finetune(&base, &d, &out, &["--targets", "q_proj,wq"]),
        1,
        "wq",
    );
    #[cfg(not(feature = "candle-cuda"))]
    assert_fails(
        &finetune(&base, &d, &out, &["--device", "cuda"]),
        2,
        "candle-cuda",
    );
    assert!(!out.join("adapter_model.safetensors").exists());
}

#[test]
fn an_nf4_folder_is_a_base() {
    let tmp = tempfile::tempdir().unwrap();
    let base = model(tmp.path());
    let d = data(tmp.path());
    let q = tmp.path().join("nf4");
    let o = run(&[
        "quantize",
        base.to_str().unwrap(),
        "--to",
        "nf4",
        "-o",
        q.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = tmp.path().join("out");
    ok(&finetune(
        &q,
        &d,
        &out,
        &["--rank", "4", "--max-steps", "2"],
    ));
    assert!(out.join("adapter_model.safetensors").is_file());
}
