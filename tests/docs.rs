//! Every repository file that the README, the docs and the crate front
//! page name exists (`WORKLOADS.md` was once named and missing).

use std::path::Path;

/// The documents a reader follows, relative to the repository root.
const DOCUMENTS: &[&str] = &[
    "README.md",
    "WORKLOADS.md",
    "docs/COMING_FROM.md",
    "docs/PERFORMANCE.md",
    "src/lib.rs",
];

/// Top-level folders of the repository: a reference starting with one of
/// them names a repository path.
const FOLDERS: &[&str] = &[
    "benches/",
    "docs/",
    "examples/",
    "python/",
    "scripts/",
    "src/",
    "tests/",
    "workloads/",
];

/// The spans of `text` between backticks and the targets of Markdown links
/// that name a repository path: under one of [`FOLDERS`], or a Markdown file.
fn named_paths(text: &str) -> Vec<String> {
    let mut spans: Vec<&str> = text.split('`').skip(1).step_by(2).collect();
    spans.extend(text.split("](").skip(1).filter_map(|s| s.split(')').next()));
    spans
        .into_iter()
        .map(|s| s.split('#').next().unwrap_or(s).trim())
        .filter(|s| !s.is_empty() && !s.contains(char::is_whitespace) && !s.contains("://"))
        .filter(|s| FOLDERS.iter().any(|f| s.starts_with(f)) || s.ends_with(".md"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_file_the_docs_name_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut checked = 0;
    for doc in DOCUMENTS {
        let text = std::fs::read_to_string(root.join(doc)).unwrap();
        for path in named_paths(&text) {
            // Links inside docs/ are relative to it.
            let base = if doc.starts_with("docs/") && !path.starts_with("docs/") {
                root.join("docs")
            } else {
                root.to_path_buf()
            };
            let exists = base.join(&path).exists() || root.join(&path).exists();
            assert!(exists, "{doc} names {path}, which is not in the repository");
            checked += 1;
        }
    }
    assert!(
        checked >= 10,
        "only {checked} paths found: the scan is broken"
    );
}

#[test]
fn the_scan_finds_paths_and_skips_prose() {
    let text = "see [the page](docs/COMING_FROM.md#keras), `benches/lookup.rs` and \
                `WORKLOADS.md`, not `--data ratings.csv`, `cargo test` or \
                [a site](https://example.org/x.md)";
    assert_eq!(
        named_paths(text),
        ["benches/lookup.rs", "WORKLOADS.md", "docs/COMING_FROM.md"]
    );
}
