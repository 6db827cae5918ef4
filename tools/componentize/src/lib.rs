//! Build steps for Legate filters written in languages other than Rust.
//!
//! Owns the two steps of a non-Rust guest build that need the component-model
//! tooling — generating C bindings from `abi/wit` and encoding a linked core
//! module as a component — plus a structural check of the result. It wraps the
//! `wit-bindgen-c` and `wit-component` library crates so the build needs no
//! `cargo install`ed CLI (`wit-bindgen`, `wasm-tools`): their versions are
//! pinned in `Cargo.lock` and they share `wasmparser`/`wit-parser` with
//! wasmtime.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use wit_component::{ComponentEncoder, DecodedWasm, WitPrinter};
use wit_parser::{Resolve, WorldItem, WorldKey};

/// The handler interface an HTTP filter must export.
pub const HTTP_HANDLER: &str = "legate:filter/http-handler@0.1.2";

/// Generates the C bindings of `world` (e.g. `http-filter`) of the WIT package
/// in `wit_dir` into `out_dir`: `<world>.h`, `<world>.c` and
/// `<world>_component_type.o` (the component type, linked into the module so
/// that [`componentize`] knows the world). Returns the files written.
pub fn generate_c_bindings(wit_dir: &Path, world: &str, out_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut resolve = Resolve::default();
    let (pkg, _sources) = resolve
        .push_path(wit_dir)
        .with_context(|| format!("parsing the WIT package in {}", wit_dir.display()))?;
    let world_id = resolve
        .select_world(&[pkg], Some(world))
        .with_context(|| format!("selecting world `{world}` in {}", wit_dir.display()))?;

    let mut files = wit_bindgen_core::Files::default();
    let opts = wit_bindgen_c::Opts {
        // The canonical ABI traps if an export returns while a `borrow` it
        // received is still live. With this, the generated export wrappers
        // drop the `exchange`/`headers`/`buffer` borrows after the filter's
        // function returns, so C code never calls `*_drop_borrow` itself.
        autodrop_borrows: wit_bindgen_c::Enabled::Yes,
        ..Default::default()
    };
    opts.build()
        .generate(&mut resolve, world_id, &mut files)
        .with_context(|| format!("generating C bindings for world `{world}`"))?;

    fs::create_dir_all(out_dir)
        .with_context(|| format!("creating the bindings directory {}", out_dir.display()))?;
    let mut written = Vec::new();
    for (name, contents) in files.iter() {
        let path = out_dir.join(name);
        fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// Encodes a linked core module (with its embedded component type, see
/// [`generate_c_bindings`]) as a component, validating the result.
///
/// `adapter` is the `wasi_snapshot_preview1` adapter module, needed only when
/// the core module imports WASI preview 1 functions; without one, such a module
/// is rejected with a message saying so.
pub fn componentize(module: &[u8], adapter: Option<&[u8]>) -> Result<Vec<u8>> {
    let mut encoder = ComponentEncoder::default()
        .validate(true)
        .module(module)
        .context("reading the core module (was the *_component_type.o object linked in?)")?;
    if let Some(adapter) = adapter {
        encoder = encoder
            .adapter("wasi_snapshot_preview1", adapter)
            .context("adding the wasi_snapshot_preview1 adapter")?;
    } else if imports_module(module, "wasi_snapshot_preview1")? {
        bail!(
            "the core module imports `wasi_snapshot_preview1` functions but no adapter was \
             given: avoid libc I/O in the filter (see examples/c-filter/README.md) or pass \
             the wasi_snapshot_preview1 reactor adapter"
        );
    }
    encoder.encode().context("encoding the component")
}

/// Whether the core module imports anything from module `name`.
fn imports_module(module: &[u8], name: &str) -> Result<bool> {
    for payload in wasmparser::Parser::new(0).parse_all(module) {
        if let wasmparser::Payload::ImportSection(reader) =
            payload.context("parsing the core module")?
        {
            for import in reader.into_imports() {
                if import.context("reading the core module's imports")?.module == name {
                    return Ok(true);
                }
            }
        }
    }
    Ok(false)
}

/// The top-level imports and exports of a component's world, by name:
/// interfaces as `namespace:package/interface@version`, functions as
/// `func <name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorldSummary {
    /// What the component needs from its host.
    pub imports: Vec<String>,
    /// What the component provides.
    pub exports: Vec<String>,
}

impl fmt::Display for WorldSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for name in &self.imports {
            writeln!(f, "import {name}")?;
        }
        for name in &self.exports {
            writeln!(f, "export {name}")?;
        }
        Ok(())
    }
}

impl WorldSummary {
    /// Checks the shape the Legate host accepts for an HTTP filter: it
    /// exports [`HTTP_HANDLER`] and imports only `legate:filter/*` and
    /// `wasi:*` interfaces.
    pub fn check_http_filter(&self) -> Result<()> {
        if !self.exports.iter().any(|e| e == HTTP_HANDLER) {
            bail!(
                "the component does not export {HTTP_HANDLER} (it exports: {})",
                list_or_none(&self.exports)
            );
        }
        let foreign: Vec<&String> = self
            .imports
            .iter()
            .filter(|i| !(i.starts_with("legate:filter/") || i.starts_with("wasi:")))
            .collect();
        if !foreign.is_empty() {
            bail!(
                "the component imports what a Legate host does not provide: {}",
                foreign
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(())
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "nothing".to_owned()
    } else {
        items.join(", ")
    }
}

/// Decodes a component and names its world's imports and exports.
pub fn describe(component: &[u8]) -> Result<WorldSummary> {
    let (resolve, world) = match wit_component::decode(component)
        .context("decoding the component (is it a component, not a core module?)")?
    {
        DecodedWasm::Component(resolve, world) => (resolve, world),
        DecodedWasm::WitPackage(..) => bail!("this is a WIT package, not a component"),
    };
    let world = &resolve.worlds[world];
    let name = |key: &WorldKey, item: &WorldItem| -> Option<String> {
        match item {
            WorldItem::Interface { id, .. } => Some(
                resolve
                    .id_of(*id)
                    .unwrap_or_else(|| resolve.name_world_key(key)),
            ),
            WorldItem::Function(f) => Some(format!("func {}", f.name)),
            // Types are carried along by the interfaces that use them.
            WorldItem::Type { .. } => None,
        }
    };
    Ok(WorldSummary {
        imports: world
            .imports
            .iter()
            .filter_map(|(k, i)| name(k, i))
            .collect(),
        exports: world
            .exports
            .iter()
            .filter_map(|(k, i)| name(k, i))
            .collect(),
    })
}

/// The WIT text of a component's world (what `wasm-tools component wit`
/// prints).
pub fn print_wit(component: &[u8]) -> Result<String> {
    let decoded = wit_component::decode(component).context("decoding the component")?;
    let resolve = decoded.resolve();
    let pkg = decoded.package();
    let nested: Vec<_> = resolve
        .packages
        .iter()
        .map(|(id, _)| id)
        .filter(|id| *id != pkg)
        .collect();
    let mut printer = WitPrinter::default();
    printer
        .print(resolve, pkg, &nested)
        .context("printing the component's WIT")?;
    Ok(printer.output.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(imports: &[&str], exports: &[&str]) -> WorldSummary {
        WorldSummary {
            imports: imports.iter().map(|s| (*s).to_owned()).collect(),
            exports: exports.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn http_filter_shape_is_accepted() {
        let ok = summary(
            &["legate:filter/http@0.1.2", "wasi:io/streams@0.2.0"],
            &[HTTP_HANDLER],
        );
        assert!(ok.check_http_filter().is_ok());
    }

    #[test]
    fn missing_handler_export_is_named() {
        let err = summary(&[], &["legate:filter/network-handler@0.1.2"])
            .check_http_filter()
            .map(|()| "accepted".to_owned())
            .unwrap_or_else(|e| e.to_string());
        assert!(
            err.contains("does not export legate:filter/http-handler@0.1.2"),
            "{err}"
        );
        assert!(err.contains("network-handler"), "{err}");
    }

    #[test]
    fn foreign_imports_are_named() {
        let err = summary(
            &[
                "legate:filter/http@0.1.2",
                "acme:evil/net@1.0.0",
                "func raw",
            ],
            &[HTTP_HANDLER],
        )
        .check_http_filter()
        .map(|()| "accepted".to_owned())
        .unwrap_or_else(|e| e.to_string());
        assert!(err.contains("acme:evil/net@1.0.0, func raw"), "{err}");
    }
}
