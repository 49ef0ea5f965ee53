//! `ftconv ollama MODEL`: a Modelfile whose TEMPLATE renders like the model's own chat template
//! (proved by rendering both before writing), with the full stop list.

use super::usage;
use crate::checkpoint::{self, InputKind};
use crate::ollama::gotemplate::{Env, GoTemplate};
use crate::ollama::source::{self, ModelInfo};
use crate::ollama::{self, modelfile};
use crate::output::AtomicFile;
use anyhow::{Context, Result, anyhow, bail};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A GGUF (chat template from tokenizer.chat_template) or an HF model folder.
    #[arg(required_unless_present = "render")]
    pub model: Option<PathBuf>,
    /// Where to write the Modelfile (default: ./Modelfile).
    #[arg(short, long, default_value = "Modelfile")]
    pub output: PathBuf,
    /// A GGUF LoRA adapter to apply (ADAPTER line).
    #[arg(long, value_name = "FILE.gguf")]
    pub adapter: Option<PathBuf>,
    /// Default system prompt (SYSTEM), replacing the one the chat template hard-codes.
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Extra PARAMETER (repeatable): replaces the derived value of NAME; `stop` adds a stop.
    #[arg(long = "param", value_name = "NAME=VALUE")]
    pub params: Vec<String>,
    /// Take the chat template, tokens and generation_config.json from this HF folder.
    #[arg(long, value_name = "HF_DIR")]
    pub template_from: Option<PathBuf>,
    /// Write the Modelfile even when its template does not render like the chat template.
    #[arg(long)]
    pub force: bool,
    /// (testing) Print what Ollama would render from this Modelfile for --conversation.
    #[arg(long, hide = true, value_name = "MODELFILE", requires = "conversation")]
    pub render: Option<PathBuf>,
    /// (testing) JSON file {"messages": [...], "tools": [...]} for --render.
    #[arg(long, hide = true, value_name = "FILE")]
    pub conversation: Option<PathBuf>,
}

/// `--param NAME=VALUE`, checked against the names and value types Ollama accepts.
pub fn parse_param(s: &str) -> Result<(String, String)> {
    let (n, v) = s
        .split_once('=')
        .ok_or_else(|| usage(format!("--param {s:?}: expected NAME=VALUE")))?;
    modelfile::check_parameter(n, v).map_err(|e| usage(format!("--param {s:?}: {e}")))?;
    Ok((n.to_string(), v.to_string()))
}

fn model_info(model: &Path, template_from: Option<&Path>) -> Result<ModelInfo> {
    let kind = checkpoint::detect(model)?;
    let mut info = match kind {
        InputKind::Gguf => source::from_gguf(model)?,
        InputKind::HfFolder | InputKind::Nf4Folder => source::from_hf_dir(model)?,
        InputKind::PeftAdapter => bail!(
            "{}: a PEFT adapter; give the base model (GGUF or HF folder) and the adapter as --adapter FILE.gguf",
            model.display()
        ),
        InputKind::SafetensorsFile => bail!(
            "{}: a single safetensors file; give a GGUF or an HF model folder",
            model.display()
        ),
    };
    if let Some(dir) = template_from {
        if !dir.join("tokenizer_config.json").is_file()
            && !dir.join("chat_template.jinja").is_file()
        {
            bail!(
                "{}: --template-from needs an HF folder with tokenizer_config.json or chat_template.jinja",
                dir.display()
            );
        }
        let hf = source::from_hf_dir(dir)?;
        if hf.chat.is_none() {
            bail!("{}: no chat template in this folder", dir.display());
        }
        let mut eos = info.eos.clone();
        for e in hf.eos {
            if !eos.contains(&e) {
                eos.push(e);
            }
        }
        info = ModelInfo {
            chat: hf.chat,
            eos,
            unnamed_eos_ids: hf.unnamed_eos_ids,
            generation_config: hf.generation_config,
            add_bos: info.add_bos.or(hf.add_bos),
        };
    }
    if info.chat.is_none() {
        bail!(
            "{}: no chat template ({}); give --template-from HF_DIR",
            model.display(),
            if kind == InputKind::Gguf {
                "no tokenizer.chat_template key"
            } else {
                "no chat_template.jinja, no chat_template in tokenizer_config.json"
            }
        );
    }
    Ok(info)
}

fn render(modelfile_path: &Path, conversation: &Path) -> Result<()> {
    let text = std::fs::read_to_string(modelfile_path)
        .with_context(|| format!("{}: cannot read", modelfile_path.display()))?;
    let cmds =
        modelfile::parse(&text).map_err(|e| anyhow!("{}: {e:#}", modelfile_path.display()))?;
    let last = |n: &str| cmds.iter().rev().find(|c| c.name == n && !c.parameter);
    let tpl =
        last("template").ok_or_else(|| anyhow!("{}: no TEMPLATE", modelfile_path.display()))?;
    let system = last("system").map(|c| c.args.clone());
    let conv = checkpoint::read_json_opt(conversation)?
        .ok_or_else(|| anyhow!("{}: no such file", conversation.display()))?;
    let go = GoTemplate::parse(&tpl.args)
        .map_err(|e| anyhow!("{}: TEMPLATE: {e:#}", modelfile_path.display()))?;
    let messages = conv
        .get("messages")
        .ok_or_else(|| anyhow!("{}: no \"messages\"", conversation.display()))?;
    let env = Env {
        current_date: today(0),
        yesterday_date: today(1),
    };
    let out = ollama::render_ollama(&go, messages, conv.get("tools"), system.as_deref(), &env)?;
    let mut so = std::io::stdout().lock();
    so.write_all(out.as_bytes())?;
    so.flush()?;
    Ok(())
}

/// UTC date `days_back` days ago as YYYY-MM-DD (what Ollama's currentDate writes).
fn today(days_back: i64) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let z = secs.div_euclid(86400) - days_back + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

pub fn run(a: Args, quiet: bool) -> Result<()> {
    if let Some(mf) = &a.render {
        let conv = a
            .conversation
            .as_deref()
            .ok_or_else(|| usage("--render needs --conversation"))?;
        return render(mf, conv);
    }
    let model = a
        .model
        .as_deref()
        .ok_or_else(|| usage("MODEL is required"))?;
    let params: Vec<(String, String)> = a
        .params
        .iter()
        .map(|p| parse_param(p))
        .collect::<Result<_>>()?;
    crate::output::check_output_dir(&a.output)?;
    if a.output.is_dir() {
        bail!(
            "{}: is a folder; give the Modelfile's path",
            a.output.display()
        );
    }
    let out_dir = match a.output.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let info = model_info(model, a.template_from.as_deref())?;
    let from = source::relative_path(&out_dir, model)?;
    let adapter = match &a.adapter {
        Some(p) => {
            if !p.is_file() {
                bail!("{}: no such adapter file", p.display());
            }
            source::check_adapter_gguf(p)?;
            Some(source::relative_path(&out_dir, p)?)
        }
        None => None,
    };
    let license = match source::find_license(model) {
        Some(p) => Some(
            std::fs::read_to_string(&p)
                .with_context(|| format!("{}: cannot read as UTF-8 text", p.display()))?,
        ),
        None => None,
    };
    if let Some(s) = &a.system
        && s.is_empty()
    {
        return Err(usage("--system: empty text"));
    }
    let opts = ollama::Options {
        from,
        adapter,
        system: a.system.clone(),
        params,
        license,
        source_label: model.display().to_string(),
        force: a.force,
    };
    let built = ollama::build(&info, &opts)?;
    let text = built
        .modelfile
        .to_text()
        .map_err(|e| anyhow!("{}: {e:#}", a.output.display()))?;
    // what we write must read back as written
    modelfile::parse(&text)
        .map_err(|e| anyhow!("internal: emitted Modelfile does not parse: {e:#}"))?;
    let mut f = AtomicFile::create(&a.output)?;
    f.writer().write_all(text.as_bytes())?;
    f.commit()?;
    if !quiet {
        let d = &built.derived;
        if let Some(w) = &d.unverified {
            eprintln!("ftconv: warning: {w}");
            eprintln!(
                "ftconv: warning: --force: wrote {} anyway",
                a.output.display()
            );
        }
        for n in &built.notes {
            eprintln!("ftconv: note: {n}");
        }
        let n_stop = built
            .modelfile
            .parameters
            .iter()
            .filter(|(n, _)| n == "stop")
            .count();
        eprintln!(
            "wrote {}: template {} (variant {}){}, {} stop strings{}",
            a.output.display(),
            d.family.title,
            d.variant.name,
            if d.unverified.is_none() {
                format!(
                    ", verified on {} conversations{}",
                    d.proof.matched.len(),
                    if d.proof.skipped.is_empty() {
                        String::new()
                    } else {
                        format!(" ({} refused by the chat template)", d.proof.skipped.len())
                    }
                )
            } else {
                String::new()
            },
            n_stop,
            if built.modelfile.system.is_some() {
                ", SYSTEM"
            } else {
                ""
            }
        );
        eprintln!("next: ollama create <name> -f {}", a.output.display());
    }
    Ok(())
}
