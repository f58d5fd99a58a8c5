//! `logq reducer new` and `logq reducer build`: a reducer project of your own from a
//! template that builds as it is, and one command from its source to a checked
//! component.
//!
//! - Rust: the template depends on `logq-reducer-sdk` and starts from the default
//!   rules; `build` runs cargo for `wasm32-unknown-unknown` and encodes the module as a
//!   component.
//! - JavaScript: the template carries `logq.js` (the framing) and builds with
//!   ComponentizeJS from the npm registry, every WASI feature disabled; `build` runs
//!   `npm install` once, then `node build.mjs`.
//!
//! Either way `build` ends with the checks a hot swap runs (compile, world, canary)
//! and prints the verdict.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail};

pub use crate::config::Lang;
use crate::fold::Limits;
use crate::reducers::canary::{Verdict, check};

/// The WIT world every reducer implements (copied into JavaScript projects).
const WIT: &str = include_str!("../../../wit/reducer.wit");

const RUST_CARGO: &str = include_str!("templates/rust/Cargo.toml");
const RUST_LIB: &str = include_str!("templates/rust/lib.rs");
const JS_PACKAGE: &str = include_str!("templates/js/package.json");
const JS_BUILD: &str = include_str!("templates/js/build.mjs");
const JS_HELPER: &str = include_str!("templates/js/logq.js");
const JS_REDUCER: &str = include_str!("templates/js/reducer.js");

/// The target Rust reducers are built for.
const WASM_TARGET: &str = "wasm32-unknown-unknown";

/// Writes project `name` in `parent` from the `lang` template; returns its folder.
///
/// # Errors
/// A bad name, an existing folder, no SDK to point a Rust project at, or I/O.
pub fn new(name: &str, lang: Lang, parent: &Path, sdk: Option<&Path>) -> anyhow::Result<PathBuf> {
    let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid {
        bail!(
            "{name:?} is not a project name: use lower-case letters, digits, '-' and '_', starting with a letter"
        );
    }
    let dir = parent.join(name);
    if dir.exists() {
        bail!("{} exists already", dir.display());
    }
    let fill =
        |template: &str, sdk: &str| template.replace("{{name}}", name).replace("{{sdk}}", sdk);
    let files: Vec<(&str, String)> = match lang {
        Lang::Rust => {
            let sdk = sdk_path(sdk)?;
            let sdk = sdk
                .display()
                .to_string()
                .replace('\\', "\\\\")
                .replace('"', "\\\"");
            vec![
                ("Cargo.toml", fill(RUST_CARGO, &sdk)),
                ("src/lib.rs", fill(RUST_LIB, &sdk)),
                (".gitignore", "/target\n/reducer.wasm\n".into()),
            ]
        }
        Lang::Js => vec![
            ("package.json", fill(JS_PACKAGE, "")),
            ("build.mjs", JS_BUILD.into()),
            ("logq.js", JS_HELPER.into()),
            ("reducer.js", fill(JS_REDUCER, "")),
            ("wit/reducer.wit", WIT.into()),
            (".gitignore", "/node_modules\n/reducer.wasm\n".into()),
        ],
    };
    for (path, text) in files {
        let path = dir.join(path);
        if let Some(folder) = path.parent() {
            std::fs::create_dir_all(folder)
                .with_context(|| format!("creating {}", folder.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(dir)
}

/// The SDK a new Rust project depends on: `given`, or the `sdk/` folder of the
/// checkout this binary was built from.
fn sdk_path(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk"),
    };
    let manifest = path.join("Cargo.toml");
    if !manifest.exists() {
        bail!(
            "no logq-reducer-sdk at {}: pass --sdk with the sdk/ folder of a logq checkout",
            path.display()
        );
    }
    std::fs::canonicalize(&path).with_context(|| format!("resolving {}", path.display()))
}

/// What `build` did.
pub struct Built {
    /// The component written (`reducer.wasm` in the project).
    pub component: PathBuf,
    /// Seconds the toolchain took (cargo and encoding, or npm and ComponentizeJS).
    pub build_seconds: f64,
    /// The hot-swap checks' verdict.
    pub verdict: Verdict,
}

/// Builds the project in `dir` into `out` (default `dir/reducer.wasm`), then checks
/// it as a hot swap would, under `limits`.
///
/// # Errors
/// No project there, a toolchain that is missing or fails, or I/O.
pub fn build(
    dir: &Path,
    out: Option<&Path>,
    limits: Limits,
    cache: Option<PathBuf>,
) -> anyhow::Result<Built> {
    let start = Instant::now();
    let component = out.map_or_else(|| dir.join("reducer.wasm"), Path::to_path_buf);
    if dir.join("Cargo.toml").exists() {
        let module = cargo_build(dir)?;
        let bytes =
            std::fs::read(&module).with_context(|| format!("reading {}", module.display()))?;
        let encoded = wit_component::ComponentEncoder::default()
            .module(&bytes)
            .and_then(|encoder| encoder.validate(true).encode())
            .map_err(|e| anyhow::anyhow!("encoding {} as a component: {e:?}", module.display()))?;
        std::fs::write(&component, encoded)
            .with_context(|| format!("writing {}", component.display()))?;
    } else if dir.join("package.json").exists() {
        // The framing and the world come with the binary: written when missing, so
        // a project can hold only its rules (see examples/lowercase-emails-js).
        for (path, text) in [
            ("logq.js", JS_HELPER),
            ("build.mjs", JS_BUILD),
            ("wit/reducer.wit", WIT),
        ] {
            let path = dir.join(path);
            if !path.exists() {
                if let Some(folder) = path.parent() {
                    std::fs::create_dir_all(folder)?;
                }
                std::fs::write(&path, text)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        if !dir
            .join("node_modules/@bytecodealliance/componentize-js")
            .exists()
        {
            run(dir, "npm", &["install", "--no-audit", "--no-fund"])?;
        }
        run(dir, "node", &["build.mjs"])?;
        let written = dir.join("reducer.wasm");
        if written != component {
            std::fs::copy(&written, &component)
                .with_context(|| format!("copying to {}", component.display()))?;
        }
    } else {
        bail!(
            "{} holds no reducer project (no Cargo.toml or package.json); start one with `logq reducer new NAME`",
            dir.display()
        );
    }
    let build_seconds = start.elapsed().as_secs_f64();
    let bytes =
        std::fs::read(&component).with_context(|| format!("reading {}", component.display()))?;
    Ok(Built {
        component,
        build_seconds,
        verdict: check(&bytes, limits, cache),
    })
}

/// `cargo build` of the library for wasm32; the module it wrote.
fn cargo_build(dir: &Path) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(dir)
        .args(["build", "--release", "--lib", "--target", WASM_TARGET])
        .args(["--message-format", "json-render-diagnostics"])
        .env_remove("CARGO_BUILD_TARGET")
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo (is Rust installed?)")?;
    if !out.status.success() {
        bail!(
            "cargo build failed in {} (if the target is missing: rustup target add {WASM_TARGET})",
            dir.display()
        );
    }
    // The artifact messages name the module; the last one is the project's own.
    let module = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter_map(|m| {
            m["filenames"]
                .as_array()?
                .iter()
                .filter_map(|f| f.as_str())
                .find(|f| f.ends_with(".wasm"))
                .map(PathBuf::from)
        })
        .next_back();
    module.with_context(|| {
        format!(
            "cargo built no .wasm in {}: is the library's crate-type cdylib?",
            dir.display()
        )
    })
}

fn run(dir: &Path, program: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(program)
        .current_dir(dir)
        .args(args)
        .status()
        .with_context(|| format!("running {program} (is it installed?)"))?;
    if !status.success() {
        bail!(
            "`{program} {}` failed in {} ({status})",
            args.join(" "),
            dir.display()
        );
    }
    Ok(())
}
