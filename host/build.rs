//! Builds the first-party plugins (every crate under `plugins/`) into Wasm
//! components and embeds them in the `legate` binary, where plugins.yaml names
//! them `module: builtin:NAME` (package `legate-plugin-NAME`).
//!
//! Each plugin is built exactly as `legate plugin build` builds it (same target,
//! same profile overrides, one crate at a time) into the target directory the
//! test harness uses for plugins, so the host build and the tests share one
//! compiled copy. `LEGATE_BUILTIN_PLUGINS=off` builds a host without them (then
//! `builtin:` modules are refused at load with that reason); a missing
//! `wasm32-wasip2` target does the same, with a build warning saying how to fix.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "src/plugin_profile.rs"]
mod plugin_profile;

use plugin_profile::{PROFILE, TARGET};

fn main() {
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let root = manifest_dir.join("..");
    let out_dir = PathBuf::from(env("OUT_DIR"));
    for dir in ["plugins", "sdk", "abi/rules", "abi/wit"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        root.join("Cargo.lock").display()
    );
    println!("cargo:rerun-if-env-changed=LEGATE_BUILTIN_PLUGINS");
    // The target's std: a host built before `rustup target add` is rebuilt with
    // its plugins once the target is there (a missing path always reruns).
    if let Some(sysroot) = sysroot() {
        let std = sysroot.join("lib/rustlib").join(TARGET);
        println!("cargo:rerun-if-changed={}", std.display());
    }

    let mut embedded: Vec<(String, PathBuf)> = Vec::new();
    let skip = match std::env::var("LEGATE_BUILTIN_PLUGINS").as_deref() {
        Ok("off") => Some("it was built with LEGATE_BUILTIN_PLUGINS=off".to_string()),
        _ if !target_installed() => {
            println!(
                "cargo:warning=the {TARGET} target is not installed, so this legate has no \
                 builtin plugins: run `scripts/setup.sh wasm` (or `rustup target add {TARGET}`) \
                 and build again"
            );
            Some(format!(
                "the {TARGET} target was not installed when it was built"
            ))
        }
        _ => None,
    };
    if skip.is_none() {
        let target_dir = target_root(&out_dir).join("plugin-build-test");
        for (name, crate_dir) in plugin_crates(&root.join("plugins")) {
            let wasm = build_plugin(&crate_dir, &name, &target_dir);
            embedded.push((name, wasm));
        }
    }

    let mut code = String::from(
        "/// The embedded plugins: (name, component bytes), sorted by name.\n\
         pub static BUILTINS: &[(&str, &[u8])] = &[\n",
    );
    for (name, wasm) in &embedded {
        let _ = writeln!(
            code,
            "    ({name:?}, include_bytes!({:?})),",
            wasm.display().to_string()
        );
    }
    code.push_str("];\n");
    let _ = writeln!(
        code,
        "/// Why [`BUILTINS`] is empty, if it was left out on purpose.\n\
         pub static SKIPPED: Option<&str> = {skip:?};"
    );
    if let Err(e) = std::fs::write(out_dir.join("builtin_plugins.rs"), code) {
        panic!(
            "writing {}: {e}",
            out_dir.join("builtin_plugins.rs").display()
        );
    }
}

fn env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| panic!("cargo did not set {key}"))
}

/// The sysroot of the compiler building us.
fn sysroot() -> Option<PathBuf> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// `false` only if rustup says the target is missing; without rustup the
/// plugin build itself reports it.
fn target_installed() -> bool {
    let Ok(out) = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
    else {
        return true;
    };
    !out.status.success()
        || String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.trim() == TARGET)
}

/// The target directory this build writes to: `CARGO_TARGET_DIR`, else the
/// ancestor of `OUT_DIR` that cargo marked with `CACHEDIR.TAG`.
fn target_root(out_dir: &Path) -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    out_dir
        .ancestors()
        .find(|d| d.join("CACHEDIR.TAG").is_file())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| out_dir.join("target"))
}

/// `(NAME, dir)` of every `plugins/NAME` crate, sorted.
fn plugin_crates(plugins: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(plugins).unwrap_or_else(|e| panic!("reading {}: {e}", plugins.display()));
    for entry in entries.flatten() {
        let dir = entry.path();
        if dir.join("Cargo.toml").is_file() {
            if let Some(name) = dir.file_name().and_then(|n| n.to_str()) {
                out.push((name.to_string(), dir.clone()));
            }
        }
    }
    out.sort();
    out
}

/// Builds `plugins/NAME` (package `legate-plugin-NAME`, lib
/// `legate_plugin_NAME`) as `legate plugin build` does; returns the component.
fn build_plugin(crate_dir: &Path, name: &str, target_dir: &Path) -> PathBuf {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // The nested cargo must not see what cargo set for this build script (the
    // host crate's identity, its rustflags, a clippy wrapper): the plugins are
    // an ordinary release build, identical to the tests' `legate plugin build`.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let set_for_us = key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_CFG_")
            || key.starts_with("CARGO_FEATURE_")
            || key.starts_with("CARGO_MANIFEST_")
            || matches!(
                key,
                "CARGO_ENCODED_RUSTFLAGS"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_RUSTC_CURRENT_DIR"
                    | "RUSTC_WRAPPER"
                    | "RUSTC_WORKSPACE_WRAPPER"
                    | "CLIPPY_ARGS"
                    | "OUT_DIR"
                    | "TARGET"
                    | "HOST"
                    | "PROFILE"
                    | "OPT_LEVEL"
                    | "DEBUG"
                    | "NUM_JOBS"
            );
        if set_for_us {
            cmd.env_remove(key);
        }
    }
    cmd.current_dir(crate_dir)
        .args([
            "build",
            "--release",
            "--lib",
            "--target",
            TARGET,
            "--manifest-path",
        ])
        .arg(crate_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    for (key, value) in PROFILE {
        cmd.env(key, value);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running cargo to build {}: {e}", crate_dir.display()));
    if !status.success() {
        panic!(
            "building the builtin plugin {} failed (errors above); fix it, or build the host \
             without builtin plugins with LEGATE_BUILTIN_PLUGINS=off",
            crate_dir.display()
        );
    }
    let wasm = target_dir
        .join(TARGET)
        .join("release")
        .join(format!("legate_plugin_{}.wasm", name.replace('-', "_")));
    if !wasm.is_file() {
        panic!(
            "{} built, but {} is missing: is its package named legate-plugin-{name} with a cdylib lib?",
            crate_dir.display(),
            wasm.display()
        );
    }
    wasm
}
