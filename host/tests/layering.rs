//! The host's modules form layers in data-path order, and this test holds them to it
//! by reading the sources (`host/src`):
//!
//! 1. no import cycle among the host's files (module paths named with `crate::`,
//!    `super::`, `self::` or a child module's name are followed);
//! 2. a top-level module imports only modules of lower layers (the table in
//!    `lib.rs`), never one above it;
//! 3. only `broker/` names rdkafka, only `fold/runtime.rs` names wasmtime, and only
//!    `http/` names warp or hyper.
//!
//! Comments and the `#[cfg(test)] mod tests` at the end of a file are left out: doc
//! links are not imports, and tests may reach wherever they need.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lowest first: a module may import those of lower layers and its own.
const LAYERS: [(&str, u8); 13] = [
    ("config", 0),
    ("memory", 0),
    ("broker", 1),
    ("fold", 2),
    ("state", 3),
    ("step", 3),
    ("metrics", 4),
    ("cluster", 4),
    ("reducers", 5),
    ("consumer", 6),
    ("http", 7),
    ("service", 8),
    ("cli", 9),
];

/// Module path (`["broker", "consumer"]`) -> the file's code without comments/tests.
fn sources() -> BTreeMap<Vec<String>, String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("host/src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&root, &mut files);
    let mut out = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&root).expect("under src");
        let mut module: Vec<String> = rel
            .with_extension("")
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        match module.last().map(String::as_str) {
            Some("main") => continue, // the binary: flags and wiring only
            Some("lib" | "mod") => {
                module.pop();
            }
            _ => {}
        }
        let text = std::fs::read_to_string(&file).expect("readable");
        let text = match text.find("\n#[cfg(test)]\nmod tests") {
            Some(at) => &text[..at],
            None => &text[..],
        };
        let code: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        out.insert(module, code);
    }
    out
}

/// The longest known module that `path` (segments) starts with.
fn resolve(known: &BTreeSet<Vec<String>>, path: &[String]) -> Option<Vec<String>> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| known.contains(p))
}

/// Every path a file names: `crate::a::b`, `super::a`, `self::a`, `use child::...`.
fn imports(module: &[String], code: &str, known: &BTreeSet<Vec<String>>) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    for (prefix, base) in [
        ("crate::", Vec::new()),
        ("super::", module[..module.len().saturating_sub(1)].to_vec()),
        ("self::", module.to_vec()),
    ] {
        let mut rest = code;
        while let Some(at) = rest.find(prefix) {
            let before = rest[..at].chars().next_back();
            rest = &rest[at + prefix.len()..];
            if before.is_some_and(ident) {
                continue; // e.g. `logq_crate::`
            }
            let mut path = base.clone();
            let mut tail = rest;
            loop {
                let end = tail.find(|c: char| !ident(c)).unwrap_or(tail.len());
                if end == 0 {
                    break;
                }
                path.push(tail[..end].to_string());
                if !tail[end..].starts_with("::") {
                    break;
                }
                tail = &tail[end + 2..];
            }
            if let Some(target) = resolve(known, &path) {
                out.insert(target);
            }
        }
    }
    // `use child::...` / `pub use child::...` of a declared child module.
    for line in code.lines() {
        let line = line.trim_start().trim_start_matches("pub ");
        if let Some(rest) = line.strip_prefix("use ") {
            let first: String = rest.chars().take_while(|c| ident(*c)).collect();
            let mut child = module.to_vec();
            child.push(first);
            if known.contains(&child) {
                out.insert(child);
            }
        }
    }
    out.remove(module);
    out
}

fn graph() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let sources = sources();
    let known: BTreeSet<Vec<String>> = sources.keys().cloned().collect();
    sources
        .iter()
        .map(|(m, code)| (m.clone(), imports(m, code, &known)))
        .collect()
}

fn name(m: &[String]) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

#[test]
fn no_import_cycle_among_the_host_files() {
    let graph = graph();
    assert!(graph.len() > 20, "found the sources: {}", graph.len());
    // Depth-first search; a back edge is a cycle.
    fn visit(
        m: &Vec<String>,
        graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut BTreeMap<Vec<String>, u8>,
        stack: &mut Vec<Vec<String>>,
    ) {
        match state.get(m) {
            Some(2) => return,
            Some(1) => {
                let from = stack.iter().position(|s| s == m).unwrap_or(0);
                let cycle: Vec<String> = stack[from..].iter().map(|s| name(s)).collect();
                panic!("import cycle: {} -> {}", cycle.join(" -> "), name(m));
            }
            _ => {}
        }
        state.insert(m.clone(), 1);
        stack.push(m.clone());
        for next in graph.get(m).into_iter().flatten() {
            visit(next, graph, state, stack);
        }
        stack.pop();
        state.insert(m.clone(), 2);
    }
    let mut state = BTreeMap::new();
    for m in graph.keys() {
        visit(m, &graph, &mut state, &mut Vec::new());
    }
}

#[test]
fn modules_import_only_lower_layers() {
    let layer = |m: &[String]| -> Option<u8> {
        let top = m.first()?;
        Some(
            LAYERS
                .iter()
                .find(|(n, _)| n == top)
                .unwrap_or_else(|| panic!("module {top} is missing from LAYERS"))
                .1,
        )
    };
    let mut wrong = Vec::new();
    for (from, targets) in graph() {
        let Some(own) = layer(&from) else { continue }; // lib.rs: the crate map
        for to in targets {
            let Some(theirs) = layer(&to) else { continue };
            if from[0] != to[0] && theirs >= own {
                wrong.push(format!(
                    "{} (layer {own}) imports {} (layer {theirs})",
                    name(&from),
                    name(&to)
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn each_dependency_is_touched_by_one_module() {
    /// A dependency's name, and which modules may use it.
    type Rule = (&'static str, fn(&[String]) -> bool);
    let rules: [Rule; 4] = [
        ("rdkafka", |m| m.first().is_some_and(|t| t == "broker")),
        ("wasmtime", |m| m == ["fold", "runtime"]),
        ("warp", |m| m.first().is_some_and(|t| t == "http")),
        ("hyper", |m| m.first().is_some_and(|t| t == "http")),
    ];
    let mut wrong = Vec::new();
    let sources = sources();
    for (crate_name, allowed) in rules {
        let mut users = 0;
        for (m, code) in &sources {
            if code.contains(&format!("{crate_name}::")) || code.contains(&format!("{crate_name}_"))
            {
                users += 1;
                if !allowed(m) {
                    wrong.push(format!("{} uses {crate_name}", name(m)));
                }
            }
        }
        assert!(
            users > 0,
            "nobody uses {crate_name}: the check is looking at the wrong text"
        );
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}
