//! `ftconv finetune` training data (src/train/data.rs): row formats, rendering, label masks,
//! truncation, errors. Fixtures: fixtures/tiny-chat/{instruct,base} (see make.py there).

use ftconv::train::data::{
    DataOptions, IGNORE, Sample, TextEncoder, alpaca_prompt, drop_untrained, load_jsonl,
};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/tiny-chat")
        .join(name)
}

fn instruct() -> TextEncoder {
    TextEncoder::from_dir(&fixture("instruct")).unwrap()
}

fn base() -> TextEncoder {
    TextEncoder::from_dir(&fixture("base")).unwrap()
}

const SYS: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";

/// The decoded text of each run of consecutive trained positions.
fn trained_runs(enc: &TextEncoder, s: &Sample) -> Vec<String> {
    assert_eq!(s.input_ids.len(), s.labels.len());
    let mut runs = Vec::new();
    let mut cur: Vec<u32> = Vec::new();
    for (&id, &l) in s.input_ids.iter().zip(&s.labels) {
        if l == IGNORE {
            if !cur.is_empty() {
                runs.push(enc.decode(&cur).unwrap());
                cur.clear();
            }
        } else {
            assert_eq!(l, id as i64, "a trained label must be its input id");
            cur.push(id);
        }
    }
    if !cur.is_empty() {
        runs.push(enc.decode(&cur).unwrap());
    }
    runs
}

fn all_trained(s: &Sample) -> bool {
    s.input_ids
        .iter()
        .zip(&s.labels)
        .all(|(&i, &l)| l == i as i64)
}

fn write_jsonl(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn opts(max: usize, all: bool) -> DataOptions {
    DataOptions {
        max_seq_len: max,
        train_on_prompt: all,
    }
}

fn err_of(enc: &TextEncoder, rows: &str) -> String {
    let d = tempfile::tempdir().unwrap();
    let p = write_jsonl(d.path(), "bad.jsonl", rows);
    let e = load_jsonl(&p, enc, &DataOptions::default()).unwrap_err();
    let msg = format!("{e:#}");
    let prefix = format!("{}:", p.display());
    assert!(msg.starts_with(&prefix), "{msg}");
    msg[prefix.len()..].to_string()
}

fn paris() -> Value {
    json!({"messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris"}
    ]})
}

#[test]
fn encoder_special_tokens() {
    let e = instruct();
    assert!(e.has_chat_template());
    assert!(
        e.chat_template_origin()
            .unwrap()
            .contains("tokenizer_config.json")
    );
    assert_eq!(e.bos_id(), None);
    assert_eq!(e.eos_id(), Some(2));
    assert_eq!(
        e.pad_id(),
        0,
        "pad_token <|endoftext|> (an object in tokenizer_config)"
    );
    assert!(!e.adds_bos());
    assert_eq!(e.vocab_size(), 3 + 256 + 36);

    let b = base();
    assert!(!b.has_chat_template());
    assert_eq!(b.bos_id(), Some(1));
    assert_eq!(b.eos_id(), Some(2));
    assert_eq!(b.pad_id(), 2, "no pad token: EOS");
    assert!(b.adds_bos() && !b.adds_eos());
    assert!(e.warnings().is_empty() && b.warnings().is_empty());
}

#[test]
fn tokenizer_merges_and_offsets() {
    let e = instruct();
    let (ids, offs) = e
        .encode_plain("<|im_start|>assistant\nParis<|im_end|>")
        .unwrap();
    assert_eq!(ids.len(), 5, "{ids:?}");
    assert_eq!((ids[0], ids[4]), (1, 2));
    assert_eq!(e.decode(&ids[1..2]).unwrap(), "assistant");
    assert_eq!(e.decode(&ids[3..4]).unwrap(), "Paris");
    assert_eq!(offs[3], (22, 27));
}

#[test]
fn messages_single_turn() {
    let e = instruct();
    let text = e.render(&paris()["messages"], false).unwrap();
    assert_eq!(
        text,
        format!(
            "{SYS}<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis<|im_end|>\n"
        )
    );
    let s = e.encode_row(&paris()).unwrap();
    assert_eq!(e.decode(&s.input_ids).unwrap(), text);
    assert_eq!(
        s.input_ids,
        e.encode_plain(&text).unwrap().0,
        "rendered text tokenized without special tokens"
    );
    assert_eq!(trained_runs(&e, &s), vec!["Paris<|im_end|>\n"]);
    assert_eq!(s.trained_tokens(), 3);
}

#[test]
fn messages_two_assistant_turns() {
    let e = instruct();
    let row = json!({"messages": [
        {"role": "system", "content": "Answer with one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And of Germany?"},
        {"role": "assistant", "content": "Berlin, of course."}
    ]});
    let s = e.encode_row(&row).unwrap();
    assert_eq!(
        e.decode(&s.input_ids).unwrap(),
        "<|im_start|>system\nAnswer with one word.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\nParis<|im_end|>\n<|im_start|>user\nAnd of Germany?<|im_end|>\n<|im_start|>assistant\nBerlin, of course.<|im_end|>\n"
    );
    assert_eq!(
        trained_runs(&e, &s),
        vec!["Paris<|im_end|>\n", "Berlin, of course.<|im_end|>\n"]
    );
    // train_on_prompt: every token
    let all = e.encode_row_with(&row, &opts(4096, true)).unwrap();
    assert_eq!(all.input_ids, s.input_ids);
    assert!(all_trained(&all));
}

#[test]
fn messages_without_assistant_and_unicode() {
    let e = instruct();
    let s = e
        .encode_row(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .unwrap();
    assert!(!s.is_empty());
    assert_eq!(
        s.trained_tokens(),
        0,
        "nothing to train; the caller drops it"
    );

    let row = json!({"messages": [
        {"role": "user", "content": "Tōkyō?"},
        {"role": "assistant", "content": "東京 — «ok» 🎌"}
    ]});
    let s = e.encode_row(&row).unwrap();
    assert_eq!(trained_runs(&e, &s), vec!["東京 — «ok» 🎌<|im_end|>\n"]);
}

#[test]
fn truncation_keeps_the_start() {
    let e = instruct();
    let full = e.encode_row(&paris()).unwrap();
    let n = full.len();
    let t = e.encode_row_with(&paris(), &opts(n - 2, false)).unwrap();
    assert_eq!(t.len(), n - 2);
    assert_eq!(t.input_ids[..], full.input_ids[..n - 2]);
    assert_eq!(t.labels[..], full.labels[..n - 2]);
    assert_eq!(trained_runs(&e, &t), vec!["Paris"]);
    // cut before the answer: kept, with nothing trained
    let t = e.encode_row_with(&paris(), &opts(n - 3, false)).unwrap();
    assert_eq!((t.len(), t.trained_tokens()), (n - 3, 0));
    let (kept, dropped) = drop_untrained(vec![t, full.clone()]);
    assert_eq!((kept, dropped), (vec![full], 1));
    // longer than needed: unchanged
    let s = e.encode_row_with(&paris(), &opts(10_000, false)).unwrap();
    assert_eq!(s, e.encode_row(&paris()).unwrap());
    assert!(e.encode_row_with(&paris(), &opts(0, false)).is_err());
}

#[test]
fn prompt_completion_strings() {
    // instruct: no BOS; EOS <|im_end|> appended
    let e = instruct();
    let s = e
        .encode_row(&json!({"prompt": "The capital of France is", "completion": " Paris."}))
        .unwrap();
    assert_eq!(
        e.decode(&s.input_ids).unwrap(),
        "The capital of France is Paris.<|im_end|>"
    );
    assert_eq!(s.input_ids.last(), Some(&2));
    assert_eq!(trained_runs(&e, &s), vec![" Paris.<|im_end|>"]);

    // base: BOS from add_bos_token, EOS </s> appended
    let b = base();
    let s = b
        .encode_row(&json!({"prompt": "The capital of France is", "completion": " Paris."}))
        .unwrap();
    assert_eq!(s.input_ids[0], 1);
    assert_eq!(s.labels[0], IGNORE);
    assert_eq!(
        b.decode(&s.input_ids).unwrap(),
        "<s>The capital of France is Paris.</s>"
    );
    assert_eq!(trained_runs(&b, &s), vec![" Paris.</s>"]);
    let all = b
        .encode_row_with(
            &json!({"prompt": "The capital of France is", "completion": " Paris."}),
            &opts(1024, true),
        )
        .unwrap();
    assert!(all_trained(&all));

    // the mask starts at the common prefix of tok(prompt) and tok(prompt+completion):
    // "Par" + "is" merges into one token "Paris", which is trained
    let s = b
        .encode_row(&json!({"prompt": "Par", "completion": "is"}))
        .unwrap();
    assert_eq!(s.input_ids.len(), 3, "<s> Paris </s>");
    assert_eq!(trained_runs(&b, &s), vec!["Paris</s>"]);

    // a completion already ending with EOS gets no second one
    let s = e
        .encode_row(&json!({"prompt": "Q", "completion": "A<|im_end|>"}))
        .unwrap();
    assert_eq!(
        s.input_ids.iter().filter(|&&i| i == 2).count(),
        1,
        "{:?}",
        s.input_ids
    );
    assert_eq!(trained_runs(&e, &s), vec!["A<|im_end|>"]);
}

#[test]
fn text_rows() {
    let b = base();
    let s = b.encode_row(&json!({"text": "the sky is blue"})).unwrap();
    assert_eq!(b.decode(&s.input_ids).unwrap(), "<s>the sky is blue</s>");
    assert!(all_trained(&s));
    let e = instruct();
    let s = e.encode_row(&json!({"text": "the sky"})).unwrap();
    assert_eq!(e.decode(&s.input_ids).unwrap(), "the sky<|im_end|>");
    let s = e
        .encode_row(&json!({"text": "<|im_start|>user\nhi<|im_end|>"}))
        .unwrap();
    assert_eq!(
        s.input_ids.first(),
        Some(&1),
        "special tokens in text are matched"
    );
    assert_eq!(s.input_ids.iter().filter(|&&i| i == 2).count(), 1);
    assert!(all_trained(&s));
}

#[test]
fn conversational_prompt_completion() {
    let e = instruct();
    let row = json!({
        "prompt": [{"role": "user", "content": "What is the capital of France?"}],
        "completion": [{"role": "assistant", "content": "Paris"}]
    });
    let s = e.encode_row(&row).unwrap();
    assert_eq!(s.input_ids, e.encode_row(&paris()).unwrap().input_ids);
    assert_eq!(trained_runs(&e, &s), vec!["Paris<|im_end|>\n"]);
    let all = e.encode_row_with(&row, &opts(1024, true)).unwrap();
    assert!(all_trained(&all));
}

#[test]
fn sharegpt_is_messages() {
    let e = instruct();
    let sg = json!({"conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Capital of France?"},
        {"from": "gpt", "value": "Paris"},
        {"from": "human", "value": "Germany?"},
        {"from": "gpt", "value": "Berlin"}
    ], "id": "sg-1"});
    let msgs = json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "Germany?"},
        {"role": "assistant", "content": "Berlin"}
    ]});
    let s = e.encode_row(&sg).unwrap();
    assert_eq!(s, e.encode_row(&msgs).unwrap());
    assert_eq!(
        trained_runs(&e, &s),
        vec!["Paris<|im_end|>\n", "Berlin<|im_end|>\n"]
    );
}

#[test]
fn alpaca_with_chat_template() {
    let e = instruct();
    let s = e
        .encode_row(&json!({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}))
        .unwrap();
    assert_eq!(
        e.decode(&s.input_ids).unwrap(),
        format!(
            "{SYS}<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
        )
    );
    assert_eq!(trained_runs(&e, &s), vec!["5<|im_end|>\n"]);
    // empty or missing input: the instruction alone; a "text" column beside is ignored
    let s1 = e
        .encode_row(&json!({"instruction": "Say hi.", "input": "", "output": "hi", "text": "x"}))
        .unwrap();
    let s2 = e
        .encode_row(&json!({"instruction": "Say hi.", "output": "hi"}))
        .unwrap();
    let m = e
        .encode_row(&json!({"messages": [
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "hi"}
        ]}))
        .unwrap();
    assert_eq!(s1, m);
    assert_eq!(s2, m);
}

#[test]
fn alpaca_without_chat_template() {
    let b = base();
    let s = b
        .encode_row(&json!({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}))
        .unwrap();
    let prompt = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response: ";
    assert_eq!(alpaca_prompt("Add the numbers.", "2 and 3"), prompt);
    assert_eq!(b.decode(&s.input_ids).unwrap(), format!("<s>{prompt}5</s>"));
    assert_eq!(trained_runs(&b, &s), vec!["5</s>"]);

    let s = b
        .encode_row(&json!({"instruction": "Say hi.", "output": "hi"}))
        .unwrap();
    assert_eq!(
        b.decode(&s.input_ids).unwrap(),
        "<s>Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nSay hi.\n\n### Response: hi</s>"
    );
    assert_eq!(trained_runs(&b, &s), vec!["hi</s>"]);
}

#[test]
fn load_jsonl_mixed_formats() {
    let e = instruct();
    let d = tempfile::tempdir().unwrap();
    let rows = [
        paris().to_string(),
        String::new(),
        json!({"text": "plain"}).to_string(),
        "   ".to_string(),
        json!({"prompt": "Q:", "completion": " A"}).to_string(),
    ];
    let p = write_jsonl(
        d.path(),
        "mixed.jsonl",
        &format!("\u{feff}{}\r\n", rows.join("\r\n")),
    );
    let v = load_jsonl(&p, &e, &DataOptions::default()).unwrap();
    assert_eq!(v.len(), 3);
    assert_eq!(v[0], e.encode_row(&paris()).unwrap());
    assert_eq!(trained_runs(&e, &v[1]), vec!["plain<|im_end|>"]);
    assert_eq!(trained_runs(&e, &v[2]), vec![" A<|im_end|>"]);

    let v = load_jsonl(&p, &e, &opts(4, true)).unwrap();
    assert!(v.iter().all(|s| s.len() <= 4 && all_trained(s)));
}

#[test]
fn bad_rows_name_file_and_line() {
    let e = instruct();
    let good = paris().to_string();
    let m = err_of(&e, &format!("{good}\n\n{{\"messages\": [}}\n"));
    assert!(m.starts_with("3: not valid JSON"), "{m}");
    let m = err_of(
        &e,
        &format!("{good}\n{}\n", json!({"question": "q", "answer": "a"})),
    );
    assert!(
        m.starts_with("2: unknown row format (keys: question, answer)"),
        "{m}"
    );
    let m = err_of(
        &e,
        &format!(
            "{}\n",
            json!({"messages": [{"role": "bot", "content": "x"}]})
        ),
    );
    assert!(m.starts_with("1: messages[0]: unknown role \"bot\""), "{m}");
    let m = err_of(
        &e,
        &format!(
            "{}\n",
            json!({"messages": [{"role": "user", "content": 5}]})
        ),
    );
    assert!(
        m.starts_with("1: messages[0].content must be a string"),
        "{m}"
    );
    let m = err_of(&e, &format!("{}\n", json!({"messages": "hi"})));
    assert!(
        m.starts_with("1: \"messages\" must be a list of messages"),
        "{m}"
    );
    let m = err_of(&e, &format!("{}\n", json!({"messages": []})));
    assert!(m.contains("no messages"), "{m}");
    let m = err_of(&e, "[1, 2]\n");
    assert!(m.starts_with("1: not a JSON object"), "{m}");
    let m = err_of(&e, &format!("{}\n", json!({"text": 3})));
    assert!(m.starts_with("1: \"text\" must be a string"), "{m}");
    let m = err_of(&e, &format!("{}\n", json!({"prompt": "q"})));
    assert!(
        m.starts_with("1: a prompt/completion row without \"completion\""),
        "{m}"
    );
    let m = err_of(
        &e,
        &format!(
            "{}\n",
            json!({"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]})
        ),
    );
    assert!(m.contains("both be strings or both be lists"), "{m}");
    let m = err_of(&e, &format!("{}\n", json!({"instruction": "q"})));
    assert!(
        m.starts_with("1: an Alpaca row (instruction/input/output) without \"output\""),
        "{m}"
    );
    let m = err_of(
        &e,
        &format!("{}\n", json!({"instruction": "q", "output": 1})),
    );
    assert!(m.starts_with("1: \"output\" must be a string"), "{m}");
    let m = err_of(
        &e,
        &format!(
            "{}\n",
            json!({"conversations": [{"from": "bot", "value": "x"}]})
        ),
    );
    assert!(
        m.starts_with("1: conversations[0]: unknown ShareGPT role \"bot\""),
        "{m}"
    );
    let m = err_of(
        &e,
        &format!(
            "{}\n",
            json!({"conversations": [{"from": "human", "value": null}]})
        ),
    );
    assert!(
        m.starts_with("1: conversations[0].value must be a string"),
        "{m}"
    );

    // no chat template: messages rows are an error naming the line
    let b = base();
    let m = err_of(&b, &format!("{}\n{good}\n", json!({"text": "ok"})));
    assert!(m.starts_with("2: the model has no chat template"), "{m}");

    // empty file
    let d = tempfile::tempdir().unwrap();
    let p = write_jsonl(d.path(), "empty.jsonl", "\n  \n");
    let msg = format!(
        "{:#}",
        load_jsonl(&p, &e, &DataOptions::default()).unwrap_err()
    );
    assert_eq!(msg, format!("{}: no rows (the file is empty)", p.display()));
    let msg = format!(
        "{:#}",
        load_jsonl(&d.path().join("missing.jsonl"), &e, &DataOptions::default()).unwrap_err()
    );
    assert!(msg.contains("missing.jsonl: cannot read"), "{msg}");
}

/// A copy of a fixture folder whose files `edit` may change.
fn edited_copy(name: &str, edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture(name).join(f), d.path().join(f)).unwrap();
    }
    edit(d.path());
    d
}

fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn bos_comes_from_the_post_processor() {
    let text = |enc: &TextEncoder| {
        let s = enc.encode_row(&json!({"text": "hi"})).unwrap();
        enc.decode(&s.input_ids).unwrap()
    };
    // base: TemplateProcessing adds <s>; add_bos_token true agrees
    let b = base();
    assert!(b.warnings().is_empty(), "{:?}", b.warnings());
    assert_eq!(text(&b), "<s>hi</s>");
    assert_eq!(b.encode_with_special("hi").unwrap(), vec![1, 107, 108]);

    // as transformers 5: tokenizer.json wins over add_bos_token / add_eos_token, with a warning
    let d = edited_copy("base", |dir| {
        edit_json(&dir.join("tokenizer_config.json"), |v| {
            v["add_bos_token"] = json!(false)
        });
    });
    let enc = TextEncoder::from_dir(d.path()).unwrap();
    assert!(enc.adds_bos());
    assert_eq!(text(&enc), "<s>hi</s>");
    assert_eq!(enc.warnings().len(), 1);
    assert!(
        enc.warnings()[0].contains("add_bos_token is false"),
        "{:?}",
        enc.warnings()
    );

    let d = edited_copy("base", |dir| {
        edit_json(&dir.join("tokenizer.json"), |v| {
            v["post_processor"] = json!({"type": "ByteLevel", "add_prefix_space": true,
                                         "trim_offsets": false, "use_regex": true})
        });
        edit_json(&dir.join("tokenizer_config.json"), |v| {
            v["add_eos_token"] = json!(true)
        });
    });
    let enc = TextEncoder::from_dir(d.path()).unwrap();
    assert!(!enc.adds_bos() && !enc.adds_eos());
    assert_eq!(enc.warnings().len(), 2, "{:?}", enc.warnings());
    assert_eq!(text(&enc), "hi</s>", "EOS appended to text rows, once");
    let s = enc
        .encode_row(&json!({"prompt": "The capital of France is", "completion": " Paris"}))
        .unwrap();
    assert_eq!(trained_runs(&enc, &s), vec![" Paris</s>"]);
    assert_eq!(s.input_ids[0], enc.encode_plain("T").unwrap().0[0]);

    // a post-processor that adds EOS: not doubled; prompt/completion still trains completion+EOS
    let d = edited_copy("base", |dir| {
        edit_json(&dir.join("tokenizer.json"), |v| {
            v["post_processor"]["single"]
                .as_array_mut()
                .unwrap()
                .push(json!({"SpecialToken": {"id": "</s>", "type_id": 0}}));
            v["post_processor"]["special_tokens"]["</s>"] =
                json!({"id": "</s>", "ids": [2], "tokens": ["</s>"]});
        });
        edit_json(&dir.join("tokenizer_config.json"), |v| {
            v["add_eos_token"] = json!(true)
        });
    });
    let enc = TextEncoder::from_dir(d.path()).unwrap();
    assert!(enc.adds_bos() && enc.adds_eos() && enc.warnings().is_empty());
    assert_eq!(text(&enc), "<s>hi</s>");
    let s = enc
        .encode_row(&json!({"prompt": "The capital of France is", "completion": " Paris"}))
        .unwrap();
    assert_eq!(trained_runs(&enc, &s), vec![" Paris</s>"]);
}

#[test]
fn template_sources() {
    // chat_template.jinja wins over tokenizer_config.json
    let d = edited_copy("instruct", |dir| {
        std::fs::write(
            dir.join("chat_template.jinja"),
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        )
        .unwrap();
    });
    let enc = TextEncoder::from_dir(d.path()).unwrap();
    assert!(
        enc.chat_template_origin()
            .unwrap()
            .ends_with("chat_template.jinja")
    );
    let s = enc.encode_row(&paris()).unwrap();
    assert_eq!(
        enc.decode(&s.input_ids).unwrap(),
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis<|im_end|>\n"
    );
    assert_eq!(trained_runs(&enc, &s), vec!["Paris<|im_end|>\n"]);

    // a list of named templates: "default"
    let d = edited_copy("instruct", |dir| {
        edit_json(&dir.join("tokenizer_config.json"), |v| {
            let t = v["chat_template"].clone();
            v["chat_template"] =
                json!([{"name": "tool_use", "template": "x"}, {"name": "default", "template": t}]);
        });
    });
    let enc = TextEncoder::from_dir(d.path()).unwrap();
    assert_eq!(
        enc.encode_row(&paris()).unwrap(),
        instruct().encode_row(&paris()).unwrap()
    );

    // the template sees bos_token / eos_token; separators written by the next turn are not trained
    let d = edited_copy("base", |dir| {
        edit_json(&dir.join("tokenizer_config.json"), |v| {
            v["chat_template"] = json!(
                "{{ bos_token }}{% for m in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}{% if m.role == 'user' %}User: {{ m.content }}{% else %}Bot: {{ m.content }}{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '\\n\\nBot: ' }}{% endif %}"
            );
        });
    });
    let enc = TextEncoder::from_dir(d.path()).unwrap();
    let row = json!({"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "b"}, {"role": "assistant", "content": "Berlin"}
    ]});
    let s = enc.encode_row(&row).unwrap();
    assert_eq!(
        enc.decode(&s.input_ids).unwrap(),
        "<s>User: a\n\nBot: Paris</s>\n\nUser: b\n\nBot: Berlin</s>"
    );
    assert_eq!(trained_runs(&enc, &s), vec!["Paris</s>", "Berlin</s>"]);
}

#[test]
fn template_not_prefix_stable() {
    // the last assistant turn is rendered differently from earlier ones
    let d = edited_copy("instruct", |dir| {
        edit_json(&dir.join("tokenizer_config.json"), |v| {
            v["chat_template"] = json!(
                "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and not loop.last %}[old] {% endif %}{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
            );
        });
    });
    let enc = TextEncoder::from_dir(d.path()).unwrap();
    let row = json!({"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}
    ]});
    let e = enc.encode_row(&row).unwrap_err().to_string();
    assert!(
        e.contains("not prefix-stable") && e.contains("assistant message 2"),
        "{e}"
    );
    // the last assistant turn alone is fine; train_on_prompt does not need the spans
    let s = enc
        .encode_row(&json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}))
        .unwrap();
    assert_eq!(trained_runs(&enc, &s), vec!["b<|im_end|>\n"]);
    let s = enc.encode_row_with(&row, &opts(1024, true)).unwrap();
    assert!(all_trained(&s));
}

#[test]
fn template_errors_and_tools() {
    let d = edited_copy("instruct", |dir| {
        edit_json(&dir.join("tokenizer_config.json"), |v| {
            v["chat_template"] = json!(
                "{% if tools %}[tools: {{ tools | length }}]{% endif %}{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
            );
        });
    });
    let enc = TextEncoder::from_dir(d.path()).unwrap();
    let m = err_of(
        &enc,
        &format!(
            "{}\n",
            json!({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]})
        ),
    );
    assert!(
        m.starts_with("1: chat template failed") && m.contains("no system role"),
        "{m}"
    );
    let mut row = paris();
    row["tools"] = json!([{"type": "function", "function": {"name": "f"}}]);
    let s = enc.encode_row(&row).unwrap();
    assert!(
        enc.decode(&s.input_ids)
            .unwrap()
            .starts_with("[tools: 1]<|im_start|>user")
    );
    assert_eq!(trained_runs(&enc, &s), vec!["Paris<|im_end|>\n"]);
}

#[test]
fn from_dir_errors_name_the_file() {
    let d = tempfile::tempdir().unwrap();
    let e = TextEncoder::from_dir(d.path()).err().unwrap().to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("not found"),
        "{e}"
    );

    let d = edited_copy("instruct", |dir| {
        std::fs::write(dir.join("tokenizer.json"), "{not json").unwrap();
    });
    let e = TextEncoder::from_dir(d.path()).err().unwrap().to_string();
    assert!(e.contains("tokenizer.json: cannot load tokenizer"), "{e}");

    let d = edited_copy("instruct", |dir| {
        edit_json(&dir.join("tokenizer_config.json"), |v| {
            v["eos_token"] = json!("<eos>")
        });
    });
    let e = TextEncoder::from_dir(d.path()).err().unwrap().to_string();
    assert!(
        e.contains("tokenizer_config.json: eos_token \"<eos>\" is not a token"),
        "{e}"
    );

    let d = edited_copy("instruct", |dir| {
        edit_json(&dir.join("tokenizer_config.json"), |v| {
            v["chat_template"] = json!("{% if %}")
        });
    });
    let e = format!("{:#}", TextEncoder::from_dir(d.path()).err().unwrap());
    assert!(
        e.contains("tokenizer_config.json chat_template") && e.contains("does not compile"),
        "{e}"
    );

    let d = edited_copy("instruct", |dir| {
        std::fs::write(dir.join("tokenizer_config.json"), "[").unwrap();
    });
    let e = TextEncoder::from_dir(d.path()).err().unwrap().to_string();
    assert!(e.contains("tokenizer_config.json: not valid JSON"), "{e}");

    // no tokenizer_config.json at all: no template, no special tokens
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("instruct").join("tokenizer.json"),
        d.path().join("tokenizer.json"),
    )
    .unwrap();
    let enc = TextEncoder::from_dir(d.path()).unwrap();
    assert!(!enc.has_chat_template());
    assert_eq!((enc.eos_id(), enc.pad_id()), (None, 0));
}

/// golden.jsonl: ids and labels from an independent implementation (fixtures/tiny-chat/reference.py:
/// Python `tokenizers` + Jinja2 as transformers configures it).
#[test]
fn matches_the_python_reference() {
    let text = std::fs::read_to_string(fixture("golden.jsonl")).unwrap();
    let (e, b) = (instruct(), base());
    let mut n = 0;
    for line in text.lines() {
        let g: Value = serde_json::from_str(line).unwrap();
        let own; // the model folder with the row's own chat template, if it has one
        let enc = match (&g["chat_template"], g["model"].as_str()) {
            (Value::String(t), Some(m)) => {
                let d = edited_copy(m, |dir| {
                    edit_json(&dir.join("tokenizer_config.json"), |v| {
                        v["chat_template"] = json!(t)
                    })
                });
                own = TextEncoder::from_dir(d.path()).unwrap();
                &own
            }
            (_, Some("instruct")) => &e,
            _ => &b,
        };
        let s = enc.encode_row(&g["row"]).unwrap();
        let ids: Vec<u32> = serde_json::from_value(g["input_ids"].clone()).unwrap();
        let labels: Vec<i64> = serde_json::from_value(g["labels"].clone()).unwrap();
        assert_eq!(s.input_ids, ids, "{}", g["row"]);
        assert_eq!(s.labels, labels, "{}", g["row"]);
        assert!(s.trained_tokens() > 0);
        n += 1;
    }
    assert_eq!(n, 12);
}
