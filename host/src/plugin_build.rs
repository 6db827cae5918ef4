//! `legate plugin build PATH [--out FILE]`: build a filter crate into a
//! WebAssembly component with `cargo build --release --target wasm32-wasip2`,
//! optimized for speed through `CARGO_PROFILE_RELEASE_*` overrides (so it works for
//! crates outside this workspace, and the workspace's release profile keeps
//! its line tables for the host).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{bail, Context as _};
use clap::Subcommand;

pub use crate::plugin_profile::{PROFILE, TARGET};

/// The component-model binary header: `\0asm`, version 0x0d, layer 1.
pub const COMPONENT_MAGIC: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];

/// `legate plugin …`.
#[derive(Subcommand)]
pub enum PluginCommand {
    /// Build a plugin crate (a `cdylib` using legate-sdk) into a .wasm component.
    Build {
        /// The plugin crate: its directory or its Cargo.toml.
        path: PathBuf,
        /// Copy the component here (default: print the path of the built file).
        #[arg(short, long)]
        out: Option<PathBuf>,
    },
    /// List the plugins embedded in this binary (`module: builtin:NAME`), with
    /// their size and SHA-256 (for `sha256:` pinning).
    List,
    /// Measure what one instance of a component plugin costs: create, configure
    /// and drop it (what an instance per request would add to each request), and
    /// its linear memory (what each worker's instance holds).
    Measure {
        /// Config file.
        #[arg(short, long, default_value = "plugins.yaml")]
        config: PathBuf,
        /// The plugin's name in the config.
        plugin: String,
        /// Instances to create.
        #[arg(short = 'n', long, default_value_t = 1000)]
        iterations: u32,
    },
}

/// Run a `legate plugin` command.
pub fn run(command: PluginCommand) -> ExitCode {
    match command {
        PluginCommand::Build { path, out } => match build(&path, out.as_deref()) {
            Ok(built) => {
                println!("{}", built.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        PluginCommand::List => {
            if crate::wasm::builtin::BUILTINS.is_empty() {
                eprintln!("{}", crate::wasm::builtin::missing_help());
            }
            for (name, bytes) in crate::wasm::builtin::BUILTINS {
                println!(
                    "builtin:{name}\t{} bytes\tsha256:{}",
                    bytes.len(),
                    crate::reload::sha256_hex(bytes)
                );
            }
            ExitCode::SUCCESS
        }
        PluginCommand::Measure {
            config,
            plugin,
            iterations,
        } => {
            let cost = crate::config::load_file(&config)
                .map_err(|e| anyhow::anyhow!("invalid config\n{e}"))
                .and_then(|c| crate::wasm::measure_instances(&c, &plugin, iterations));
            match cost {
                Ok(c) => {
                    println!(
                        "plugin {plugin}: instantiate + configure + drop: {:.1} us (mean of {iterations}); \
                         linear memory per instance: {} KiB",
                        c.instantiate.as_secs_f64() * 1e6,
                        c.memory / 1024
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// A `cargo` command (the one running us, if any) without the variables cargo
/// sets for the crate it compiles or runs. A nested cargo started from a test or
/// `cargo run` would otherwise see the outer crate's `CARGO_MANIFEST_DIR` etc.,
/// which rustc recorded as inputs of every crate using `env!` on them: those
/// crates then look changed and rebuild, for minutes, on every nested call.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let set_by_cargo = matches!(
            key,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_MANIFEST_LINKS"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_RUSTC_CURRENT_DIR"
                | "OUT_DIR"
        ) || key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_EXE_");
        if set_by_cargo {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Build the crate at `path`; returns where the component is (`out` if given).
pub fn build(path: &Path, out: Option<&Path>) -> anyhow::Result<PathBuf> {
    build_in(path, out, None)
}

/// As [`build`], with cargo's target directory set (tests use one of their own so
/// the nested cargo never waits for the lock of the build running them).
pub fn build_in(
    path: &Path,
    out: Option<&Path>,
    target_dir: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    let manifest = if path.is_dir() {
        path.join("Cargo.toml")
    } else {
        path.to_path_buf()
    };
    if !manifest.is_file() {
        bail!(
            "no such crate: {} has no Cargo.toml (give the plugin crate's directory or manifest)",
            path.display()
        );
    }
    let manifest = manifest
        .canonicalize()
        .with_context(|| format!("resolving {}", manifest.display()))?;
    let crate_dir = manifest.parent().unwrap_or(Path::new("."));
    let (package, lib) = plugin_package(&manifest)?;
    check_target(crate_dir)?;

    let mut cmd = cargo();
    cmd.current_dir(crate_dir)
        .args(["build", "--release", "--lib", "--target", TARGET])
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["--message-format", "json-render-diagnostics"])
        .args(
            target_dir
                .map(|d| ["--target-dir".as_ref(), d.as_os_str()])
                .into_iter()
                .flatten(),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in PROFILE {
        if std::env::var_os(key).is_none() {
            cmd.env(key, value);
        }
    }
    let mut child = cmd.spawn().context("running cargo (is it on PATH?)")?;
    // Cargo's progress and compiler errors go to the user as they come; they
    // are kept to recognize a missing target.
    let stderr = child.stderr.take();
    let relay = std::thread::spawn(move || {
        let mut seen = String::new();
        if let Some(stderr) = stderr {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                seen.push_str(&line);
                seen.push('\n');
            }
        }
        seen
    });
    let mut wasm = None;
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(file) = artifact(&line, &package, &lib) {
                wasm = Some(file);
            }
        }
    }
    let status = child.wait().context("waiting for cargo")?;
    let seen = relay.join().unwrap_or_default();
    if !status.success() {
        if seen.contains("may not be installed") || seen.contains("can't find crate for `std`") {
            bail!("the {TARGET} target is not installed: run `scripts/setup.sh wasm` (or `rustup target add {TARGET}`)");
        }
        bail!(
            "cargo build failed for {} (see the errors above)",
            manifest.display()
        );
    }
    let wasm = wasm.with_context(|| {
        format!(
            "cargo built {package} but reported no .wasm file: is its [lib] crate-type \"cdylib\"?"
        )
    })?;
    check_component(&wasm)?;
    match out {
        Some(out) => {
            std::fs::copy(&wasm, out)
                .with_context(|| format!("copying {} to {}", wasm.display(), out.display()))?;
            Ok(out.to_path_buf())
        }
        None => Ok(wasm),
    }
}

/// The package name and lib target name of the crate at `manifest`; errors
/// if it has no `cdylib` library.
fn plugin_package(manifest: &Path) -> anyhow::Result<(String, String)> {
    let output = cargo()
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--manifest-path",
        ])
        .arg(manifest)
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo metadata")?;
    if !output.status.success() {
        bail!(
            "cargo metadata failed for {} (see above)",
            manifest.display()
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("parsing cargo metadata output")?;
    let packages = meta["packages"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let package = packages
        .iter()
        .find(|p| {
            p["manifest_path"]
                .as_str()
                .and_then(|m| Path::new(m).canonicalize().ok())
                .is_some_and(|m| m == manifest)
        })
        .with_context(|| {
            format!(
                "{} is not a package manifest (a virtual workspace?): give a plugin crate",
                manifest.display()
            )
        })?;
    let name = package["name"].as_str().unwrap_or_default().to_owned();
    let lib = package["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "cdylib"))
        })
        .and_then(|t| t["name"].as_str())
        .with_context(|| {
            format!("crate {name} has no cdylib library: add `[lib] crate-type = [\"cdylib\"]` to its Cargo.toml")
        })?;
    Ok((name, lib.to_owned()))
}

/// Fail early, with the fix, if rustup knows the target is missing. Without
/// rustup the build itself reports it.
fn check_target(crate_dir: &Path) -> anyhow::Result<()> {
    let Ok(output) = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(crate_dir)
        .stderr(Stdio::null())
        .output()
    else {
        return Ok(());
    };
    if output.status.success()
        && !String::from_utf8_lossy(&output.stdout)
            .lines()
            .any(|l| l.trim() == TARGET)
    {
        bail!("the {TARGET} target is not installed: run `scripts/setup.sh wasm` (or `rustup target add {TARGET}`)");
    }
    Ok(())
}

/// The `.wasm` file of a `compiler-artifact` message for the plugin's lib.
fn artifact(line: &str, package: &str, lib: &str) -> Option<PathBuf> {
    let msg: serde_json::Value = serde_json::from_str(line).ok()?;
    if msg["reason"] != "compiler-artifact" || msg["target"]["name"] != lib {
        return None;
    }
    let id = msg["package_id"].as_str()?;
    // Package ids name the package: "path+file:///…#name@0.1.0" or "…#0.1.0".
    if !id.contains(&format!("#{package}@")) && !id.contains(&format!("/{package}#")) {
        return None;
    }
    msg["filenames"]
        .as_array()?
        .iter()
        .filter_map(|f| f.as_str())
        .find(|f| f.ends_with(".wasm"))
        .map(PathBuf::from)
}

/// Checks the built file is a component exporting a `legate:filter` handler.
/// A crate that never calls `legate_sdk::export!` still builds, into a
/// component exporting nothing, which every load refuses: say so here, where
/// the fix is.
fn check_component(wasm: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(wasm).with_context(|| format!("reading {}", wasm.display()))?;
    if !bytes.starts_with(&COMPONENT_MAGIC) {
        bail!(
            "{} is not a WebAssembly component (a core module?); plugins must be built for {TARGET}",
            wasm.display()
        );
    }
    if !crate::reload::abi_of(&bytes).starts_with("legate:filter@") {
        bail!(
            "{} exports no `legate:filter` handler, so no host can load it: export the \
             filter with `legate_sdk::export!(YourFilter);` (an HTTP filter) or \
             `legate_sdk::export_network!(YourFilter);` (a TCP filter) at the crate's root",
            wasm.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(package_id: &str, target: &str, files: &[&str]) -> String {
        serde_json::json!({
            "reason": "compiler-artifact",
            "package_id": package_id,
            "target": { "name": target, "kind": ["cdylib", "rlib"] },
            "filenames": files,
        })
        .to_string()
    }

    #[test]
    fn finds_the_wasm_of_the_plugin_lib_only() {
        let wasm = "/t/wasm32-wasip2/release/my_plugin.wasm";
        let rlib = "/t/wasm32-wasip2/release/libmy_plugin.rlib";
        // Both package id spellings cargo uses for path packages.
        for id in [
            "path+file:///src/plugins/x#my-plugin@0.1.0",
            "path+file:///src/my-plugin#0.1.0",
        ] {
            let line = message(id, "my_plugin", &[rlib, wasm]);
            assert_eq!(
                artifact(&line, "my-plugin", "my_plugin"),
                Some(PathBuf::from(wasm)),
                "{id}"
            );
        }
        // A dependency's artifact, or another target, is not the plugin.
        let dep = message(
            "registry+https://github.com/rust-lang/crates.io-index#serde@1.0.0",
            "my_plugin",
            &[wasm],
        );
        assert_eq!(artifact(&dep, "my-plugin", "my_plugin"), None);
        let other = message("path+file:///src/my-plugin#0.1.0", "helper", &[wasm]);
        assert_eq!(artifact(&other, "my-plugin", "my_plugin"), None);
        assert_eq!(artifact("not json", "my-plugin", "my_plugin"), None);
    }

    #[test]
    fn a_core_module_is_not_a_component() {
        let dir = std::env::temp_dir().join(format!("legate-plugin-magic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let core = dir.join("core.wasm");
        std::fs::write(&core, [0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00]).unwrap();
        let err = check_component(&core).unwrap_err().to_string();
        assert!(err.contains("not a WebAssembly component"), "{err}");
        // A component exporting no handler: a crate without `export!`.
        let component = dir.join("component.wasm");
        std::fs::write(&component, COMPONENT_MAGIC).unwrap();
        let err = check_component(&component).unwrap_err().to_string();
        assert!(
            err.ends_with(
                "component.wasm exports no `legate:filter` handler, so no host can load it: \
                 export the filter with `legate_sdk::export!(YourFilter);` (an HTTP filter) \
                 or `legate_sdk::export_network!(YourFilter);` (a TCP filter) at the crate's \
                 root"
            ),
            "{err}"
        );
        // One exporting `legate:filter/http-handler@0.1.3` (an instance
        // export of an empty instance: the name is what is checked) passes.
        let name = "legate:filter/http-handler@0.1.3";
        let mut c = COMPONENT_MAGIC.to_vec();
        // Instance section: one instance made of no exports.
        c.extend([5, 3, 1, 0x01, 0]);
        // Export section: `name` as instance 0.
        let mut body = vec![1, 0, u8::try_from(name.len()).unwrap()];
        body.extend(name.as_bytes());
        body.extend([0x05, 0, 0]);
        c.push(11);
        c.push(u8::try_from(body.len()).unwrap());
        c.extend(body);
        std::fs::write(&component, &c).unwrap();
        check_component(&component).unwrap();
    }
}
