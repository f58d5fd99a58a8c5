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
    // Reducers hostile at instantiation: the default fold with a start function
    // (run when an instance is made, before any call) that traps, loops, or grows and
    // writes memory until the limit stops it.
    let module = std::fs::read(core_module(&root, "logq-reducer"))
        .unwrap_or_else(|e| panic!("reading the default reducer's core module: {e}"));
    for (name, body) in START_BODIES {
        let out = components.join(format!("test-start-{name}-reducer.wasm"));
        encode(&with_start(&module, body), &out);
    }
    println!(
        "cargo:rustc-env=LOGQ_TEST_START_REDUCERS_DIR={}",
        components.display()
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
    let module_path = core_module(root, package);
    let module = std::fs::read(&module_path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", module_path.display()));
    encode(&module, out);
    out.to_path_buf()
}

/// Where [`build_component`] leaves `package`'s core module.
fn core_module(root: &Path, package: &str) -> PathBuf {
    wasm_target_dir(root)
        .join(WASM_TARGET)
        .join("release")
        .join(format!("{}.wasm", package.replace('-', "_")))
}

/// Encodes a core module as a component at `out`.
fn encode(module: &[u8], out: &Path) {
    let component = wit_component::ComponentEncoder::default()
        .module(module)
        .and_then(|encoder| encoder.validate(true).encode())
        .unwrap_or_else(|e| panic!("encoding {} as a component: {e:?}", out.display()));
    std::fs::write(out, component).unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
}

/// Start functions (their code-section bodies: locals, instructions, `end`), by name.
const START_BODIES: [(&str, &[u8]); 3] = [
    // unreachable
    ("trap", &[0x00, 0x00, 0x0b]),
    // loop br 0 end
    ("loop", &[0x00, 0x03, 0x40, 0x0c, 0x00, 0x0b, 0x0b]),
    // One i32 local; loop { old = memory.grow(16 pages); if old == -1 { unreachable }
    // store8 (old << 16) 1; br 0 }: every MiB it gets is written.
    (
        "memory",
        &[
            0x01, 0x01, 0x7f, // locals: 1 x i32
            0x03, 0x40, // loop
            0x41, 0x10, 0x40, 0x00, // i32.const 16; memory.grow 0
            0x22, 0x00, 0x41, 0x7f, 0x46, // local.tee 0; i32.const -1; i32.eq
            0x04, 0x40, 0x00, 0x0b, // if unreachable end
            0x20, 0x00, 0x41, 0x10, 0x74, // local.get 0; i32.const 16; i32.shl
            0x41, 0x01, 0x3a, 0x00, 0x00, // i32.const 1; i32.store8
            0x0c, 0x00, 0x0b, // br 0; end loop
            0x0b, // end
        ],
    ),
];

/// `module` with one more function, `() -> ()` with `body`, as its start function:
/// the type, function and code sections get one entry more each (appended, so no
/// index changes) and a start section goes where the binary format orders it.
fn with_start(module: &[u8], body: &[u8]) -> Vec<u8> {
    let mut sections = Vec::new();
    let mut at = 8;
    while at < module.len() {
        let id = module[at];
        let (size, n) = leb(&module[at + 1..]);
        let payload = &module[at + 1 + n..at + 1 + n + size as usize];
        sections.push((id, payload.to_vec()));
        at += 1 + n + size as usize;
    }
    let count = |payload: &[u8]| leb(payload).0;
    let appended = |payload: &[u8], entry: &[u8]| {
        let (n, len) = leb(payload);
        let mut out = uleb(n + 1);
        out.extend_from_slice(&payload[len..]);
        out.extend_from_slice(entry);
        out
    };
    let section = |sections: &[(u8, Vec<u8>)], id: u8| sections.iter().position(|(i, _)| *i == id);
    let (types, funcs, code) = (
        section(&sections, 1).expect("a type section"),
        section(&sections, 3).expect("a function section"),
        section(&sections, 10).expect("a code section"),
    );
    // Imported functions come first in the function index space.
    let imported = section(&sections, 2).map_or(0, |i| {
        let payload = &sections[i].1;
        let (n, mut at) = leb(payload);
        for _ in 0..n {
            // Module and field names, then the kind and the type index.
            for _ in 0..2 {
                let (len, k) = leb(&payload[at..]);
                at += k + len as usize;
            }
            assert_eq!(payload[at], 0x00, "the reducer imports functions only");
            at += 1 + leb(&payload[at + 1..]).1;
        }
        n
    });
    let new_type = count(&sections[types].1);
    let new_func = imported + count(&sections[funcs].1);
    sections[types].1 = appended(&sections[types].1, &[0x60, 0x00, 0x00]);
    sections[funcs].1 = appended(&sections[funcs].1, &uleb(new_type));
    let mut entry = uleb(body.len() as u32);
    entry.extend_from_slice(body);
    sections[code].1 = appended(&sections[code].1, &entry);
    // Start (8) comes after export (7) and before element (9), data count (12), code.
    let place = sections
        .iter()
        .position(|(id, _)| (9..=12).contains(id))
        .expect("a code section");
    assert!(
        section(&sections, 8).is_none(),
        "the module already has a start function"
    );
    sections.insert(place, (8, uleb(new_func)));
    let mut out = module[..8].to_vec();
    for (id, payload) in sections {
        out.push(id);
        out.extend(uleb(payload.len() as u32));
        out.extend(payload);
    }
    out
}

/// An unsigned LEB128 number at the start of `bytes`, and how many bytes it took.
fn leb(bytes: &[u8]) -> (u32, usize) {
    let mut value = 0u32;
    for (i, b) in bytes.iter().enumerate().take(5) {
        value |= u32::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return (value, i + 1);
        }
    }
    panic!("a malformed LEB128 number")
}

fn uleb(mut value: u32) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}
