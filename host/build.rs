//! Builds the default reducer (`reducer/`) and the proof reducer (`examples/mask-emails`,
//! written with the SDK) for `wasm32-unknown-unknown` and wraps each
//! core module as a component, so the `logq` binary embeds it and every test runs
//! against the reducer's current source: there is no separate artifact to forget.

use std::path::{Path, PathBuf};
use std::process::Command;

const WASM_TARGET: &str = "wasm32-unknown-unknown";

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest
        .parent()
        .expect("host/ lives in the workspace")
        .to_path_buf();
    println!("cargo:rerun-if-changed=build.rs");
    for watched in [
        "abi/src",
        "abi/Cargo.toml",
        "reducer/src",
        "reducer/Cargo.toml",
        "sdk/src",
        "sdk/Cargo.toml",
        "examples/mask-emails",
        "wit",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    let components = components_dir(&root);
    let default = build_component(&root, "logq-reducer", &[], &components.join("reducer.wasm"));
    println!("cargo:rustc-env=LOGQ_REDUCER_WASM={}", default.display());
    // The test fixture: the same fold plus deliberate traps, loops and memory bombs.
    let hostile = build_component(
        &root,
        "logq-reducer",
        &["--features", "test-triggers"],
        &components.join("test-triggers-reducer.wasm"),
    );
    println!(
        "cargo:rustc-env=LOGQ_TEST_TRIGGERS_REDUCER_WASM={}",
        hostile.display()
    );
    // The proof reducer for hot swaps: examples/mask-emails, written with the SDK (the
    // default rules, e-mail addresses masked).
    let mask = build_component(
        &root,
        "mask-emails",
        &[],
        &components.join("mask-emails-reducer.wasm"),
    );
    println!(
        "cargo:rustc-env=LOGQ_MASK_EMAILS_REDUCER_WASM={}",
        mask.display()
    );
}

/// Where built components go: `<target>/reducer-wasm/components/`, a fixed place the
/// end-to-end tests and the README can name.
fn components_dir(root: &Path) -> PathBuf {
    let dir = wasm_target_dir(root).join("components");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

fn wasm_target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("reducer-wasm")
}

/// Builds `reducer/` for wasm32 (with `features`) in its own target directory (a
/// nested cargo in the outer build's target directory would wait forever on the lock
/// the outer build holds), then encodes the core module as a component at `out`.
fn build_component(root: &Path, package: &str, features: &[&str], out: &Path) -> PathBuf {
    let target_dir = wasm_target_dir(root);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["build", "--locked", "--release", "--lib", "-p", package])
        .args(features)
        .args(["--target", WASM_TARGET, "--target-dir"])
        .arg(&target_dir);
    // The outer build's flags and wrappers (coverage, clippy) are for the host only.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    // The reducer is small and hot: whole-program optimization is worth its seconds.
    cmd.env("CARGO_PROFILE_RELEASE_LTO", "fat")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1");
    let status = cmd.status().expect("could not run cargo for the reducer");
    assert!(
        status.success(),
        "building {package} {features:?} for {WASM_TARGET} failed ({status}). If the target is \
         missing, install it with `rustup target add {WASM_TARGET}` (or run ./scripts/setup.sh)."
    );
    let module_path = target_dir
        .join(WASM_TARGET)
        .join("release")
        .join(format!("{}.wasm", package.replace('-', "_")));
    let module = std::fs::read(&module_path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", module_path.display()));
    let component = wit_component::ComponentEncoder::default()
        .module(&module)
        .and_then(|encoder| encoder.validate(true).encode())
        .unwrap_or_else(|e| panic!("encoding {} as a component: {e:?}", module_path.display()));
    std::fs::write(out, component).unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
    out.to_path_buf()
}
