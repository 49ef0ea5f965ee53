//! Embeds every architecture description in `formats/arch/` (one JSON file per model family),
//! so that adding a family is adding its description: no list in the code to keep in step.

use std::fmt::Write;

fn main() {
    let dir = std::path::Path::new("formats/arch");
    println!("cargo:rerun-if-changed=formats/arch");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("formats/arch")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    let mut src = String::from("pub const DESCRIPTIONS: &[(&str, &str)] = &[\n");
    for n in &names {
        println!("cargo:rerun-if-changed=formats/arch/{n}");
        writeln!(
            src,
            "    ({:?}, include_str!(concat!(env!(\"CARGO_MANIFEST_DIR\"), \"/formats/arch/{n}\"))),",
            n.trim_end_matches(".json")
        )
        .unwrap();
    }
    src.push_str("];\n");
    let out =
        std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("arch_descriptions.rs");
    std::fs::write(out, src).unwrap();
}
