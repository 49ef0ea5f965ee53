//! llama-quantize's per-tensor type choice (`llama_tensor_get_type` in src/llama-quant.cpp,
//! summarized in gguf-and-k-quants.md §4): which tensors are quantized, the mixture rules of
//! each file type (use_more_bits layers, output/token_embd, tied embeddings), and the
//! fallbacks for rows that are not a whole number of blocks.

use super::{Ftype, GgmlType};

/// The model facts the rules look at.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// GGUF architecture name (`llama`, `qwen2`).
    pub arch: String,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_expert: usize,
}

impl ModelInfo {
    fn n_gqa(&self) -> usize {
        self.n_head.checked_div(self.n_head_kv).unwrap_or(0)
    }

    fn is_70b(&self) -> bool {
        self.n_layer == 80
            && ((self.arch == "llama" && self.n_head != self.n_head_kv) || self.arch == "qwen2")
    }
}

/// Sort key of llama.cpp's `weight_name_comparer`: (layer parsed from a leading `blk.N.`, or
/// -1; then the name byte-wise).
pub fn sort_key(name: &str) -> (i64, &str) {
    let layer = name
        .strip_prefix("blk.")
        .and_then(|r| {
            let digits: String = r.chars().take_while(|c| c.is_ascii_digit()).collect();
            if digits.is_empty() || !r[digits.len()..].starts_with('.') {
                return None;
            }
            digits.parse::<i64>().ok()
        })
        .unwrap_or(-1);
    (layer, name)
}

/// Order tensors as llama-quantize writes them.
pub fn sort_names<T>(items: &mut [T], name: impl Fn(&T) -> &str) {
    items.sort_by(|a, b| sort_key(name(a)).cmp(&sort_key(name(b))));
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Category {
    Output,
    TokenEmbd,
    AttnQkv,
    AttnKvB,
    AttnV,
    AttnK,
    AttnQ,
    AttnOutput,
    FfnUp,
    FfnGate,
    FfnDown,
    Other,
}

fn category(name: &str) -> Category {
    if name == "output.weight" {
        return Category::Output;
    }
    if name == "token_embd.weight" || name == "per_layer_token_embd.weight" {
        return Category::TokenEmbd;
    }
    let pats = [
        ("attn_qkv.weight", Category::AttnQkv),
        ("attn_kv_b.weight", Category::AttnKvB),
        ("attn_v.weight", Category::AttnV),
        ("attn_k.weight", Category::AttnK),
        ("attn_q.weight", Category::AttnQ),
        ("attn_output.weight", Category::AttnOutput),
        ("ffn_up", Category::FfnUp),
        ("ffn_gate", Category::FfnGate),
        ("ffn_down", Category::FfnDown),
    ];
    for (p, c) in pats {
        if name.contains(p) {
            return c;
        }
    }
    Category::Other
}

fn is_attn_v(c: Category) -> bool {
    matches!(c, Category::AttnV | Category::AttnQkv | Category::AttnKvB)
}

/// `tensor_allows_quantization` for the names the llama family has (plus the generic rules).
pub fn allows_quantization(name: &str, n_dims: usize) -> bool {
    if n_dims < 2 {
        return false;
    }
    if !name.ends_with("weight") {
        return false;
    }
    let banned = [
        "_norm.weight",
        "ffn_gate_inp.weight",
        "ffn_gate_tid2eid.weight",
        "altup",
        "laurel",
        "per_layer_model_proj",
        "ssm_conv1d",
        "shortconv.conv.weight",
        "indexer.k_proj.weight",
        "indexer.q_proj.weight",
    ];
    !banned.iter().any(|b| name.contains(b))
        && name != "position_embd.weight"
        && name != "token_types.weight"
}

fn use_more_bits(i: i64, n: i64) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// One tensor as the policy sees it.
pub struct TensorDesc<'a> {
    pub name: &'a str,
    /// GGUF dims (ne[0] = row length).
    pub ne: &'a [u64],
    /// The type it is stored as in the (converted) input.
    pub stored: GgmlType,
}

/// Target types for `tensors`, which must already be in llama-quantize's order (the counters
/// advance in that order).
pub fn choose_types(
    tensors: &[TensorDesc],
    ftype: Ftype,
    pure: bool,
    info: &ModelInfo,
) -> Vec<GgmlType> {
    let default = ftype.default_type();
    let has_tied = !tensors.iter().any(|t| t.name == "output.weight");
    let n_attention_wv = tensors
        .iter()
        .filter(|t| is_attn_v(category(t.name)))
        .count() as i64;
    let n_layer = info.n_layer as i64;
    let mut i_attention_wv: i64 = 0;
    let mut i_ffn_down: i64 = 0;
    let mut out = Vec::with_capacity(tensors.len());
    for t in tensors {
        let n_dims =
            t.ne.iter()
                .rposition(|&d| d != 1)
                .map(|p| p + 1)
                .unwrap_or(1);
        if !allows_quantization(t.name, n_dims) {
            out.push(t.stored);
            continue;
        }
        let mut ty = default;
        if default.is_quantized() {
            if !pure {
                ty = mixture(
                    t,
                    ty,
                    ftype,
                    info,
                    has_tied,
                    n_attention_wv,
                    n_layer,
                    &mut i_attention_wv,
                    &mut i_ffn_down,
                );
            }
            ty = fallback(ty, t.ne[0]);
        }
        out.push(ty);
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn mixture(
    t: &TensorDesc,
    mut ty: GgmlType,
    ftype: Ftype,
    info: &ModelInfo,
    has_tied: bool,
    n_attention_wv: i64,
    n_layer: i64,
    i_attention_wv: &mut i64,
    i_ffn_down: &mut i64,
) -> GgmlType {
    use GgmlType as G;
    let cat = category(t.name);
    let n_expert = info.n_expert.max(1);
    let layer_of = |counter: i64| -> i64 {
        if n_expert > 1 {
            super::policy::sort_key(t.name).0
        } else {
            counter
        }
    };
    if cat == Category::Output || (has_tied && cat == Category::TokenEmbd) {
        let nx = t.ne[0] as usize;
        if !nx.is_multiple_of(ty.block_size()) {
            ty = G::Q8_0;
        } else if ty != G::Q8_0 {
            ty = G::Q6_K;
        }
    } else if cat == Category::TokenEmbd {
        // unchanged for the K and legacy file types
    } else if is_attn_v(cat) {
        match ftype {
            Ftype::Q2_K => ty = if info.n_gqa() >= 4 { G::Q4_K } else { G::Q3_K },
            Ftype::Q3_K_M => {
                ty = if *i_attention_wv < 2 {
                    G::Q5_K
                } else {
                    G::Q4_K
                }
            }
            Ftype::Q3_K_L => ty = G::Q5_K,
            Ftype::Q4_K_M | Ftype::Q5_K_M if use_more_bits(*i_attention_wv, n_attention_wv) => {
                ty = G::Q6_K
            }
            Ftype::Q4_K_S if *i_attention_wv < 4 => ty = G::Q5_K,
            _ => {}
        }
        if info.is_70b() && (ty == G::Q3_K || ty == G::Q4_K) {
            ty = G::Q5_K;
        }
        if info.n_expert == 8 {
            ty = G::Q8_0;
        }
        *i_attention_wv += 1;
    } else if cat == Category::AttnK {
        if info.n_expert == 8 {
            ty = G::Q8_0;
        }
    } else if cat == Category::FfnDown {
        let i = layer_of(*i_ffn_down);
        let n = n_layer;
        match ftype {
            Ftype::Q2_K => ty = G::Q3_K,
            Ftype::Q3_K_M => ty = if i < n / 16 { G::Q5_K } else { G::Q4_K },
            Ftype::Q3_K_L => ty = G::Q5_K,
            Ftype::Q4_K_M if use_more_bits(i, n) => {
                ty = G::Q6_K;
            }
            Ftype::Q5_K_M if use_more_bits(i, n) => ty = G::Q6_K,
            Ftype::Q4_K_S if i < n / 8 => ty = G::Q5_K,
            _ => {}
        }
        *i_ffn_down += 1;
    } else if cat == Category::AttnOutput {
        if info.n_expert == 8 {
            if matches!(
                ftype,
                Ftype::Q2_K | Ftype::Q3_K_S | Ftype::Q3_K_M | Ftype::Q4_K_S | Ftype::Q4_K_M
            ) {
                ty = G::Q5_K;
            }
        } else {
            match ftype {
                Ftype::Q2_K => ty = G::Q3_K,
                Ftype::Q3_K_M => ty = G::Q4_K,
                Ftype::Q3_K_L => ty = G::Q5_K,
                _ => {}
            }
        }
    }
    ty
}

/// `tensor_type_fallback`: a row that is not a whole number of blocks demotes to a type with
/// 32-element blocks, and to F16 if even that does not fit.
pub fn fallback(ty: GgmlType, ncols: u64) -> GgmlType {
    use GgmlType as G;
    if ncols.is_multiple_of(ty.block_size() as u64) {
        return ty;
    }
    let t = match ty {
        G::Q2_K | G::Q3_K => G::Q4_0,
        G::Q4_K => G::Q5_0,
        G::Q5_K => G::Q5_1,
        G::Q6_K => G::Q8_0,
        other => other,
    };
    if !ncols.is_multiple_of(t.block_size() as u64) {
        G::F16
    } else {
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama_names(n_layer: usize, tied: bool) -> Vec<String> {
        let mut v = vec![
            "output_norm.weight".to_string(),
            "token_embd.weight".to_string(),
        ];
        if !tied {
            v.push("output.weight".into());
        }
        for i in 0..n_layer {
            for s in [
                "attn_k",
                "attn_norm",
                "attn_output",
                "attn_q",
                "attn_v",
                "ffn_down",
                "ffn_gate",
                "ffn_norm",
                "ffn_up",
            ] {
                v.push(format!("blk.{i}.{s}.weight"));
            }
        }
        v
    }

    #[test]
    fn order_is_layer_then_bytes() {
        let mut v = vec![
            "blk.10.attn_k.weight",
            "blk.9.ffn_up.weight",
            "token_embd.weight",
            "output.weight",
            "blk.9.attn_k.weight",
        ];
        sort_names(&mut v, |s| s);
        assert_eq!(
            v,
            [
                "output.weight",
                "token_embd.weight",
                "blk.9.attn_k.weight",
                "blk.9.ffn_up.weight",
                "blk.10.attn_k.weight"
            ]
        );
    }

    /// The worked example of gguf-and-k-quants.md §4.6 (confirmed against llama-quantize):
    /// a 22-layer llama at Q4_K_M has attn_v/ffn_down Q6_K in layers 0, 1, 4, 7, 10, 13, 16,
    /// 19, 20, 21.
    #[test]
    fn q4_k_m_22_layers() {
        let mut names = llama_names(22, false);
        sort_names(&mut names, |s| s);
        let ne: Vec<Vec<u64>> = names
            .iter()
            .map(|n| {
                if n.contains("norm") {
                    vec![2048]
                } else {
                    vec![2048, 256]
                }
            })
            .collect();
        let descs: Vec<TensorDesc> = names
            .iter()
            .zip(&ne)
            .map(|(n, ne)| TensorDesc {
                name: n,
                ne,
                stored: if ne.len() == 1 {
                    GgmlType::F32
                } else {
                    GgmlType::BF16
                },
            })
            .collect();
        let info = ModelInfo {
            arch: "llama".into(),
            n_layer: 22,
            n_head: 32,
            n_head_kv: 4,
            n_expert: 0,
        };
        let types = choose_types(&descs, Ftype::Q4_K_M, false, &info);
        let q6: Vec<usize> = (0..22)
            .filter(|i| {
                let k = names
                    .iter()
                    .position(|n| *n == format!("blk.{i}.attn_v.weight"))
                    .unwrap();
                types[k] == GgmlType::Q6_K
            })
            .collect();
        assert_eq!(q6, vec![0, 1, 4, 7, 10, 13, 16, 19, 20, 21]);
        let k = names.iter().position(|n| n == "output.weight").unwrap();
        assert_eq!(types[k], GgmlType::Q6_K);
        let k = names.iter().position(|n| n == "token_embd.weight").unwrap();
        assert_eq!(types[k], GgmlType::Q4_K);
        let k = names
            .iter()
            .position(|n| n == "output_norm.weight")
            .unwrap();
        assert_eq!(types[k], GgmlType::F32);
    }

    /// §4.6: SmolLM2-135M (tied, hidden 576) at Q4_K_M: token_embd Q8_0, 576-wide tensors
    /// Q5_0, use_more_bits attn_v Q8_0, ffn_down (ne0 = 1536) Q6_K/Q4_K.
    #[test]
    fn smollm2_fallbacks() {
        let mut names = llama_names(30, true);
        sort_names(&mut names, |s| s);
        let ne: Vec<Vec<u64>> = names
            .iter()
            .map(|n| {
                if n.contains("norm") {
                    vec![576]
                } else if n.contains("ffn_down") {
                    vec![1536, 576]
                } else {
                    vec![576, 192]
                }
            })
            .collect();
        let descs: Vec<TensorDesc> = names
            .iter()
            .zip(&ne)
            .map(|(n, ne)| TensorDesc {
                name: n,
                ne,
                stored: if ne.len() == 1 {
                    GgmlType::F32
                } else {
                    GgmlType::BF16
                },
            })
            .collect();
        let info = ModelInfo {
            arch: "llama".into(),
            n_layer: 30,
            n_head: 9,
            n_head_kv: 3,
            n_expert: 0,
        };
        let types = choose_types(&descs, Ftype::Q4_K_M, false, &info);
        let ty = |n: &str| types[names.iter().position(|x| x == n).unwrap()];
        assert_eq!(ty("token_embd.weight"), GgmlType::Q8_0);
        assert_eq!(ty("blk.0.attn_q.weight"), GgmlType::Q5_0);
        assert_eq!(ty("blk.0.attn_v.weight"), GgmlType::Q8_0);
        assert_eq!(ty("blk.6.attn_v.weight"), GgmlType::Q5_0);
        assert_eq!(ty("blk.0.ffn_down.weight"), GgmlType::Q6_K);
        assert_eq!(ty("blk.6.ffn_down.weight"), GgmlType::Q4_K);
        let types = choose_types(&descs, Ftype::Q4_K_M, true, &info);
        assert_eq!(
            types[names.iter().position(|x| x == "token_embd.weight").unwrap()],
            GgmlType::Q5_0
        );
        let types = choose_types(&descs, Ftype::BF16, false, &info);
        assert_eq!(
            types[names
                .iter()
                .position(|x| x == "blk.0.attn_q.weight")
                .unwrap()],
            GgmlType::BF16
        );
    }

    #[test]
    fn fallbacks() {
        assert_eq!(fallback(GgmlType::Q4_K, 576), GgmlType::Q5_0);
        assert_eq!(fallback(GgmlType::Q6_K, 576), GgmlType::Q8_0);
        assert_eq!(fallback(GgmlType::Q2_K, 96), GgmlType::Q4_0);
        assert_eq!(fallback(GgmlType::Q4_K, 100), GgmlType::F16);
        assert_eq!(fallback(GgmlType::Q8_0, 100), GgmlType::F16);
        assert_eq!(fallback(GgmlType::Q4_K, 512), GgmlType::Q4_K);
    }
}
