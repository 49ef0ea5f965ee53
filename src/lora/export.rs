//! PEFT LoRA adapter → GGUF LoRA adapter, the file llama.cpp's `convert_lora_to_gguf.py` writes
//! (../shared/specs/gguf-and-k-quants.md §6), for `llama-completion --lora` and Ollama's ADAPTER.
//!
//! For every adapted base weight `X.weight` (GGUF name after the base model's name map) two tensors
//! `X.weight.lora_a` (PEFT `lora_A`, ne `[in, r]`) and `X.weight.lora_b` (PEFT `lora_B`, ne `[r, out]`),
//! a before b, in the order of the adapter's (sorted) tensor names. The llama Q/K permutation applies to
//! lora_b's rows; embedding adapters store A transposed. KVs: architecture, `general.type = adapter`,
//! `adapter.type = lora`, `general.name`, `adapter.lora.alpha`, quantization version.
//!
//! llama.cpp applies `alpha / r` per tensor (r read from lora_b). Where PEFT's scale differs (rsLoRA,
//! `alpha_pattern`, an `@WEIGHT`), the ratio is folded into lora_b so the runtime computes PEFT's ΔW; such
//! files cannot be byte-identical to the script's, which ignores those fields.

use super::adapter::{Adapter, PeftType};
use crate::arch;
use crate::checkpoint::ModelConfig;
use crate::checkpoint::TensorRef;
use crate::gguf::{Metadata, Value};
use crate::plan::{Plan, PlannedTensor, RowSource, SafetensorsRows, VecRows};
use crate::quant::GgmlType;
use anyhow::{Result, bail};

/// Rows of a tensor multiplied by a constant (scale folded into lora_b), after the permutation.
struct ScaledRows {
    inner: SafetensorsRows,
    factor: f32,
}

impl RowSource for ScaledRows {
    fn rows(&self) -> usize {
        self.inner.rows()
    }
    fn cols(&self) -> usize {
        self.inner.cols()
    }
    fn read_rows(&self, row0: usize, out: &mut [f32]) -> Result<()> {
        self.inner.read_rows(row0, out)?;
        for v in out.iter_mut() {
            *v *= self.factor;
        }
        Ok(())
    }
    fn release(&self) {
        self.inner.release();
    }
}

/// The storage type of a 2-D lora tensor for `--to`: convert_hf_to_gguf's rule, Q8_0 falling back to
/// F16 when the row length is not a multiple of 32 (gguf-py raises and the converter retries as F16).
fn stored_type(out: GgmlType, ne0: u64) -> GgmlType {
    if out == GgmlType::Q8_0 && !ne0.is_multiple_of(32) {
        GgmlType::F16
    } else {
        out
    }
}

fn dtype_str(t: &TensorRef) -> String {
    crate::checkpoint::safetensors::dtype_name(t.dtype)
}

struct Entry {
    /// The adapter key that orders this entry (its lora_A / lora_embedding_A / norm name).
    key: String,
    tensors: Vec<PlannedTensor>,
}

/// Plan the GGUF adapter file. `base` is the base model's config (only the config is needed).
pub fn plan_adapter(adapter: &Adapter, base: &ModelConfig, out: GgmlType) -> Result<Plan> {
    if !matches!(
        out,
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0
    ) {
        bail!("--to {out}: a GGUF LoRA adapter is written as F32, F16, BF16 or Q8_0");
    }
    let cfg = &adapter.config;
    let dir = adapter.dir.display();
    if cfg.peft_type == PeftType::Ia3 {
        bail!(
            "{dir}: IA3 adapters have no GGUF adapter format in llama.cpp; merge it instead (ftconv merge BASE {dir} -o OUT)"
        );
    }
    if cfg.use_dora {
        bail!(
            "{dir}: DoRA adapters (use_dora) cannot be expressed as a llama.cpp LoRA; merge it instead (ftconv merge BASE {dir} -o OUT)"
        );
    }
    let n_layer = base.num_hidden_layers;
    let tied = base.tied_by_config();
    // Plain LoRA: llama.cpp scales by alpha/r with the file's single alpha.
    let file_alpha = cfg.lora_alpha as f32;
    let mut entries: Vec<Entry> = vec![];

    for (target, t) in &adapter.replacements {
        if t.name.contains(".base_layer.weight") {
            continue; // dropped by the converter (a frozen copy of the base weight)
        }
        if t.name.contains("_layernorm") || t.name.contains(".norm") {
            let Some(m) = base.arch.map_tensor_name(target, n_layer) else {
                bail!(
                    "{dir}: adapter tensor {:?} has no GGUF name in a {} model",
                    t.name,
                    base.class.name
                );
            };
            let name = m.gguf.clone();
            let mut data = read_all(t)?;
            // the converter's value transforms apply to a full tensor (Gemma's norm + 1)
            let src_rounding = crate::plan::Rounding::for_dtype(t.dtype);
            for tr in arch::applied_transforms(base, &m)? {
                if let arch::Applied::Add(v) = tr {
                    data.iter_mut().for_each(|x| *x += v as f32);
                    src_rounding.apply(&mut data);
                }
            }
            entries.push(Entry {
                key: t.name.clone(),
                tensors: vec![PlannedTensor {
                    ne: vec![data.len() as u64],
                    name,
                    target: GgmlType::F32,
                    source: Box::new(VecRows {
                        cols: data.len(),
                        data,
                    }),
                    origin: format!("{}:{}", adapter.file.path.display(), t.name),
                    source_dtype: dtype_str(t),
                    transforms: vec![],
                }],
            });
            continue;
        }
        bail!(
            "{dir}: the adapter stores full weights ({:?}, from modules_to_save or trained biases) that a llama.cpp LoRA cannot carry; merge it instead (ftconv merge BASE {dir} -o OUT)",
            t.name
        );
    }

    for (module, parts) in &adapter.modules {
        if parts.lora_b_bias.is_some() {
            bail!(
                "{dir}: module {module:?} has a LoRA bias (lora_bias), which a llama.cpp LoRA cannot carry; merge it instead"
            );
        }
        if parts.magnitude.is_some() {
            bail!("{dir}: module {module:?} is DoRA; merge it instead (ftconv merge)");
        }
        let base_name = format!("{module}.weight");
        let embedding = parts.embedding_a.is_some() || parts.embedding_b.is_some();
        let (a, b) = if embedding {
            (parts.embedding_a.as_ref(), parts.embedding_b.as_ref())
        } else {
            (parts.lora_a.as_ref(), parts.lora_b.as_ref())
        };
        let (Some(a), Some(b)) = (a, b) else {
            bail!("{dir}: module {module:?} lacks its lora_A or lora_B tensor");
        };
        if a.shape.len() != 2 || b.shape.len() != 2 {
            bail!("{dir}: module {module:?}: lora_A and lora_B must be 2-D");
        }
        let Some(m) = base.arch.map_tensor_name(&base_name, n_layer) else {
            bail!(
                "{dir}: adapted module {module:?} has no tensor in a {} model with {n_layer} layers",
                base.class.name
            );
        };
        if base.arch.tensors[m.entry].stack.is_some() {
            bail!(
                "{dir}: module {module:?} is one expert of a mixture-of-experts layer, which llama.cpp stores stacked; a GGUF LoRA cannot adapt one expert — merge it instead (ftconv merge)"
            );
        }
        let transforms = arch::applied_transforms(base, &m)?;
        if transforms
            .iter()
            .any(|t| !matches!(t, arch::Applied::Permute(_)))
        {
            bail!(
                "{dir}: module {module:?} maps to {} which the converter transforms in a way a LoRA delta cannot follow; merge it instead (ftconv merge)",
                m.gguf
            );
        }
        let name = m.gguf.clone();
        if name == "output.weight" && tied {
            bail!(
                "{dir}: the adapter targets lm_head, but the base model ties it to the embeddings (no output tensor in the GGUF)"
            );
        }
        // ranks: Linear A [r, in], B [out, r]; Embedding A [r, vocab], B [hidden, r]
        let r = a.shape[0];
        if b.shape[1] != r {
            bail!(
                "{dir}: module {module:?}: lora_A has rank {r} but lora_B has {}",
                b.shape[1]
            );
        }
        let peft_scale = cfg.scaling_for(module, r) * adapter.weight;
        let runtime_scale = if file_alpha == 0.0 {
            1.0
        } else {
            file_alpha as f64 / r as f64
        };
        let factor = (peft_scale / runtime_scale) as f32;
        let permute = if embedding {
            None
        } else {
            transforms.iter().find_map(|t| match t {
                arch::Applied::Permute(h) => Some(*h),
                _ => None,
            })
        };
        let origin = |t: &TensorRef| format!("{}:{}", adapter.file.path.display(), t.name);
        let mut tensors = vec![];
        // lora_a
        let (a_src, a_ne, a_tr): (Box<dyn RowSource>, Vec<u64>, Vec<String>) = if embedding {
            // A [r, vocab] stored transposed: torch [vocab, r] → ne [r, vocab]
            let data = read_all(a)?;
            let (rr, vocab) = (a.shape[0], a.shape[1]);
            let mut t = vec![0f32; data.len()];
            for i in 0..rr {
                for j in 0..vocab {
                    t[j * rr + i] = data[i * vocab + j];
                }
            }
            (
                Box::new(VecRows { data: t, cols: rr }),
                vec![rr as u64, vocab as u64],
                vec!["transpose".into()],
            )
        } else {
            (
                Box::new(SafetensorsRows {
                    tensor: a.clone(),
                    permute_heads: None,
                    rounding: crate::plan::Rounding::None,
                }),
                vec![a.shape[1] as u64, a.shape[0] as u64],
                vec![],
            )
        };
        tensors.push(PlannedTensor {
            name: format!("{name}.lora_a"),
            target: stored_type(out, a_ne[0]),
            ne: a_ne,
            source: a_src,
            origin: origin(a),
            source_dtype: dtype_str(a),
            transforms: a_tr,
        });
        // lora_b
        let inner = SafetensorsRows {
            tensor: b.clone(),
            permute_heads: permute,
            rounding: crate::plan::Rounding::None,
        };
        let mut b_tr = vec![];
        if let Some(h) = permute {
            b_tr.push(format!("permute rows ({h} heads)"));
        }
        let b_src: Box<dyn RowSource> = if factor != 1.0 {
            b_tr.push(format!("× {factor} (PEFT scale folded in)"));
            Box::new(ScaledRows { inner, factor })
        } else {
            Box::new(inner)
        };
        let b_ne = vec![b.shape[1] as u64, b.shape[0] as u64];
        tensors.push(PlannedTensor {
            name: format!("{name}.lora_b"),
            target: stored_type(out, b_ne[0]),
            ne: b_ne,
            source: b_src,
            origin: origin(b),
            source_dtype: dtype_str(b),
            transforms: b_tr,
        });
        for t in &tensors {
            if t.name.len() >= crate::gguf::MAX_NAME {
                bail!("{dir}: tensor name {:?} is too long for GGUF", t.name);
            }
        }
        entries.push(Entry {
            key: a.name.clone(),
            tensors,
        });
    }
    if entries.is_empty() {
        bail!("{dir}: the adapter has no LoRA tensors to export");
    }
    entries.sort_by(|x, y| x.key.cmp(&y.key));

    let mut md = Metadata::new();
    md.set(
        "general.architecture",
        Value::Str(base.arch.gguf_arch.clone()),
    );
    md.set("general.type", Value::Str("adapter".into()));
    md.set("adapter.type", Value::Str("lora".into()));
    md.set(
        "general.name",
        Value::Str(crate::checkpoint::model_dir_name(&adapter.dir)),
    );
    md.set("adapter.lora.alpha", Value::F32(file_alpha));
    md.set("general.quantization_version", Value::U32(2));

    let tensors: Vec<PlannedTensor> = entries.into_iter().flat_map(|e| e.tensors).collect();
    let input_bytes = adapter.file.len_bytes() as u64;
    Ok(Plan {
        metadata: md,
        tensors,
        type_name: format!("LoRA {out}"),
        input_bytes,
    })
}

fn read_all(t: &TensorRef) -> Result<Vec<f32>> {
    let mut v = vec![0f32; t.n_elements()];
    t.read_f32(0, &mut v)?;
    Ok(v)
}
