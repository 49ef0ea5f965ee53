//! `ftconv ollama` end to end: the Modelfile it writes parses as Ollama's parser reads
//! Modelfiles, FROM / ADAPTER resolve relative to its folder, stops, parameters, SYSTEM,
//! LICENSE; refusals are one line, exit 1 (2 for usage), and leave no file.

mod common;
use common::*;
use ftconv::ollama::modelfile::{self, Command as Cmd};
use std::path::{Path, PathBuf};

/// A copy of the tiny-llama fixture's JSON files (no weights: `ftconv ollama` reads none),
/// with `edit` applied to tokenizer_config.json.
fn hf_copy(dir: &Path, name: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let m = dir.join(name);
    std::fs::create_dir_all(&m).unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "special_tokens_map.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixture("tiny-llama").join(f), m.join(f)).unwrap();
    }
    let p = m.join("tokenizer_config.json");
    let mut tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut tc);
    std::fs::write(&p, serde_json::to_string_pretty(&tc).unwrap()).unwrap();
    m
}

fn parse_file(p: &Path) -> (String, Vec<Cmd>) {
    let bytes = std::fs::read(p).unwrap();
    assert!(!bytes.starts_with(&[0xef, 0xbb, 0xbf]), "no BOM");
    assert!(!bytes.contains(&b'\r'), "LF only");
    assert!(bytes.ends_with(b"\n"));
    let text = String::from_utf8(bytes).unwrap();
    let cmds = modelfile::parse(&text).unwrap_or_else(|e| panic!("{e:#}\n{text}"));
    (text, cmds)
}

fn values(cmds: &[Cmd], name: &str) -> Vec<String> {
    cmds.iter()
        .filter(|c| c.name == name)
        .map(|c| c.args.clone())
        .collect()
}

fn ok(o: &std::process::Output) {
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(o));
}

#[test]
fn hf_folder_modelfile() {
    let d = tempfile::tempdir().unwrap();
    let out_dir = d.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let model = hf_copy(d.path(), "my model", |_| {});
    std::fs::write(model.join("LICENSE"), "Some licence\r\nline two\n").unwrap();
    let mf = out_dir.join("Modelfile");
    let o = run(&[
        "ollama",
        model.to_str().unwrap(),
        "-o",
        mf.to_str().unwrap(),
    ]);
    ok(&o);
    assert!(stderr(&o).contains("verified on 4 conversations"));
    let (text, cmds) = parse_file(&mf);
    assert_eq!(values(&cmds, "model"), vec!["../my model"]);
    assert!(out_dir.join("../my model").is_dir());
    // the ChatML family template, byte for byte (formats/ollama/chatml.gotmpl)
    let expected = std::fs::read_to_string(repo().join("formats/ollama/chatml.gotmpl")).unwrap();
    assert_eq!(
        values(&cmds, "template"),
        vec![expected.strip_suffix('\n').unwrap().to_string()]
    );
    // family markers ∪ tokenizer eos ("<|im_end|>") ∪ generation_config eos ids 2, 4
    assert_eq!(
        values(&cmds, "stop"),
        vec!["<|im_start|>", "<|im_end|>", "</s>"]
    );
    assert_eq!(values(&cmds, "temperature"), vec!["0.7"]);
    assert_eq!(values(&cmds, "top_k"), vec!["40"]);
    assert_eq!(values(&cmds, "top_p"), vec!["0.9"]);
    assert_eq!(values(&cmds, "repeat_penalty"), vec!["1.1"]);
    assert!(values(&cmds, "system").is_empty());
    assert_eq!(values(&cmds, "license"), vec!["Some licence\nline two\n"]);
    assert!(text.starts_with("# Modelfile written by ftconv"));
}

#[test]
fn default_system_prompt_and_options() {
    let d = tempfile::tempdir().unwrap();
    let tpl = std::fs::read_to_string(fixture("templates/Qwen-Qwen2.5-7B-Instruct.jinja")).unwrap();
    let model = hf_copy(d.path(), "qwen", |tc| {
        tc["chat_template"] = serde_json::Value::from(tpl.clone());
        tc["bos_token"] = serde_json::Value::Null;
    });
    let mf = d.path().join("Modelfile");
    let o = run(&[
        "ollama",
        model.to_str().unwrap(),
        "-o",
        mf.to_str().unwrap(),
    ]);
    ok(&o);
    let (_, cmds) = parse_file(&mf);
    assert_eq!(
        values(&cmds, "system"),
        vec!["You are Qwen, created by Alibaba Cloud. You are a helpful assistant."]
    );
    assert!(values(&cmds, "template")[0].contains(".Tools"));
    assert_eq!(values(&cmds, "model"), vec!["./qwen"]);

    let o = run(&[
        "ollama",
        model.to_str().unwrap(),
        "-o",
        mf.to_str().unwrap(),
        "--system",
        "Be \"brief\".",
        "--param",
        "temperature=0.2",
        "--param",
        "stop=END ",
        "--param",
        "num_ctx=4096",
    ]);
    ok(&o);
    let (_, cmds) = parse_file(&mf);
    assert_eq!(values(&cmds, "system"), vec!["Be \"brief\"."]);
    assert_eq!(values(&cmds, "temperature"), vec!["0.2"]);
    assert_eq!(values(&cmds, "num_ctx"), vec!["4096"]);
    assert!(values(&cmds, "stop").contains(&"END ".to_string()));
}

#[test]
fn gguf_model_and_template_from() {
    let d = tempfile::tempdir().unwrap();
    let gguf = d.path().join("tiny-F16.gguf");
    ok(&run(&[
        "quantize",
        fixture("tiny-llama").to_str().unwrap(),
        "--to",
        "f16",
        "-o",
        gguf.to_str().unwrap(),
    ]));
    let mf = d.path().join("Modelfile");
    let o = run(&["ollama", gguf.to_str().unwrap(), "-o", mf.to_str().unwrap()]);
    ok(&o);
    let (_, cmds) = parse_file(&mf);
    assert_eq!(values(&cmds, "model"), vec!["./tiny-F16.gguf"]);
    // the GGUF's eos token (id 2, "</s>") joins the ChatML markers; no generation_config
    assert_eq!(
        values(&cmds, "stop"),
        vec!["<|im_start|>", "<|im_end|>", "</s>"]
    );
    assert!(values(&cmds, "temperature").is_empty());

    // the chat template of another folder (Llama 3.1), with its generation_config
    let tpl = std::fs::read_to_string(fixture("templates/meta-llama-Llama-3.1-8B-Instruct.jinja"))
        .unwrap();
    let hf = hf_copy(d.path(), "llama31", |tc| {
        tc["chat_template"] = serde_json::Value::from(tpl.clone());
        tc["bos_token"] = "<|begin_of_text|>".into();
        tc["eos_token"] = "<|eot_id|>".into();
    });
    let o = run(&[
        "ollama",
        gguf.to_str().unwrap(),
        "-o",
        mf.to_str().unwrap(),
        "--template-from",
        hf.to_str().unwrap(),
    ]);
    ok(&o);
    let (_, cmds) = parse_file(&mf);
    assert!(values(&cmds, "template")[0].contains("Today Date: 26 Jul 2024"));
    assert_eq!(
        values(&cmds, "stop"),
        vec![
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "</s>",
            "<|im_end|>"
        ]
    );
    assert_eq!(values(&cmds, "temperature"), vec!["0.7"]);

    // an adapter must be a GGUF LoRA adapter
    let o = run(&[
        "ollama",
        gguf.to_str().unwrap(),
        "-o",
        mf.to_str().unwrap(),
        "--adapter",
        gguf.to_str().unwrap(),
    ]);
    assert_fails(&o, 1, "not a LoRA adapter GGUF");
}

#[test]
fn unreproducible_template_refused_then_forced() {
    let d = tempfile::tempdir().unwrap();
    let model = hf_copy(d.path(), "odd", |tc| {
        let t = tc["chat_template"]
            .as_str()
            .unwrap()
            .replace("'<|im_end|>' + '\n'", "'<|im_end|>'");
        tc["chat_template"] = t.into();
    });
    let mf = d.path().join("Modelfile");
    let o = run(&[
        "ollama",
        model.to_str().unwrap(),
        "-o",
        mf.to_str().unwrap(),
    ]);
    assert_fails(&o, 1, "ChatML");
    assert!(stderr(&o).contains("conversation 'user'"), "{}", stderr(&o));
    assert!(!mf.exists());
    let o = run(&[
        "ollama",
        model.to_str().unwrap(),
        "-o",
        mf.to_str().unwrap(),
        "--force",
    ]);
    ok(&o);
    assert!(stderr(&o).contains("warning"));
    let (text, _) = parse_file(&mf);
    assert!(text.contains("NOT verified"));

    // no family at all: an error even with --force
    let none = hf_copy(d.path(), "none", |tc| {
        tc["chat_template"] = "{% for m in messages %}{{ m.content }}{% endfor %}".into();
    });
    let o = run(&[
        "ollama",
        none.to_str().unwrap(),
        "-o",
        mf.to_str().unwrap(),
        "--force",
    ]);
    assert_fails(&o, 1, "no known family");
}

#[test]
fn usage_and_input_errors() {
    let d = tempfile::tempdir().unwrap();
    let mf = d.path().join("Modelfile");
    let model = fixture("tiny-llama");
    let m = model.to_str().unwrap();
    let o = run(&[
        "ollama",
        m,
        "-o",
        mf.to_str().unwrap(),
        "--param",
        "Temperature=1",
    ]);
    assert_fails(&o, 2, "unknown parameter");
    let o = run(&[
        "ollama",
        m,
        "-o",
        mf.to_str().unwrap(),
        "--param",
        "top_k=1.5",
    ]);
    assert_fails(&o, 2, "top_k");
    let o = run(&[
        "ollama",
        m,
        "-o",
        mf.to_str().unwrap(),
        "--param",
        "mirostat=1",
    ]);
    assert_fails(&o, 2, "deprecated");
    let o = run(&["ollama", m, "-o", mf.to_str().unwrap(), "--param", "seed"]);
    assert_fails(&o, 2, "NAME=VALUE");
    let o = run(&["ollama", "/nonexistent/model", "-o", mf.to_str().unwrap()]);
    assert_fails(&o, 1, "/nonexistent/model");
    let o = run(&["ollama", m, "-o", "/nonexistent/dir/Modelfile"]);
    assert_fails(&o, 1, "does not exist");
    let none = hf_copy(d.path(), "notemplate", |tc| {
        tc.as_object_mut().unwrap().remove("chat_template");
    });
    let o = run(&["ollama", none.to_str().unwrap(), "-o", mf.to_str().unwrap()]);
    assert_fails(&o, 1, "--template-from");
    assert!(!mf.exists());
}

#[test]
fn render_mode_prints_what_ollama_renders() {
    let d = tempfile::tempdir().unwrap();
    let mf = d.path().join("Modelfile");
    ok(&run(&[
        "ollama",
        fixture("tiny-llama").to_str().unwrap(),
        "-o",
        mf.to_str().unwrap(),
        "--system",
        "S",
    ]));
    let conv = d.path().join("conv.json");
    std::fs::write(
        &conv,
        r#"{"messages": [{"role": "user", "content": "U1"}, {"role": "user", "content": "U2"}]}"#,
    )
    .unwrap();
    let o = run(&[
        "ollama",
        "--render",
        mf.to_str().unwrap(),
        "--conversation",
        conv.to_str().unwrap(),
    ]);
    ok(&o);
    // SYSTEM prepended, consecutive user messages merged, as Ollama's chat endpoint does
    assert_eq!(
        stdout(&o),
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1\n\nU2<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn adapter_line_relative_to_the_modelfile() {
    use ftconv::gguf::{GgufWriter, Metadata, Value};
    let d = tempfile::tempdir().unwrap();
    let sub = d.path().join("adapters");
    std::fs::create_dir(&sub).unwrap();
    let adapter = sub.join("lora.gguf");
    let mut md = Metadata::new();
    md.set("general.architecture", Value::Str("llama".into()));
    md.set("general.type", Value::Str("adapter".into()));
    md.set("adapter.type", Value::Str("lora".into()));
    let w = GgufWriter::new(std::fs::File::create(&adapter).unwrap(), &md, &[]).unwrap();
    w.finish().unwrap();
    let model = hf_copy(d.path(), "m", |_| {});
    let mf = d.path().join("Modelfile");
    let o = run(&[
        "ollama",
        model.to_str().unwrap(),
        "-o",
        mf.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
    ]);
    ok(&o);
    let (_, cmds) = parse_file(&mf);
    assert_eq!(values(&cmds, "adapter"), vec!["./adapters/lora.gguf"]);
    assert_eq!(values(&cmds, "model"), vec!["./m"]);
}

#[test]
fn bos_the_tokenizer_does_not_add_is_reported() {
    let d = tempfile::tempdir().unwrap();
    let tpl = std::fs::read_to_string(fixture("templates/written-llama-2-chat.jinja")).unwrap();
    let model = hf_copy(d.path(), "l2", |tc| {
        tc["chat_template"] = serde_json::Value::from(tpl.clone());
        tc["add_bos_token"] = false.into();
    });
    let mf = d.path().join("Modelfile");
    let o = run(&[
        "ollama",
        model.to_str().unwrap(),
        "-o",
        mf.to_str().unwrap(),
    ]);
    ok(&o);
    assert!(stderr(&o).contains("run without it"), "{}", stderr(&o));
    let (text, cmds) = parse_file(&mf);
    assert!(text.contains("# note: the chat template writes BOS (<s>)"));
    // Llama 2 markers ∪ the tokenizer's EOS
    assert_eq!(
        values(&cmds, "stop"),
        vec![
            "[INST]",
            "[/INST]",
            "<<SYS>>",
            "<</SYS>>",
            "<|im_end|>",
            "</s>"
        ]
    );
}
