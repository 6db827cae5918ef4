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

/// The handler interface an HTTP filter exports, at the version of
/// `abi/wit` (the newest a host of this tree implements; a component may
/// export any `0.1.z` up to it: [`WorldSummary::check_http_filter`]).
pub const HTTP_HANDLER: &str = "legate:filter/http-handler@0.1.3";

/// `abi/wit`, compiled in: what [`check_http_filter`](WorldSummary::check_http_filter)
/// reads the functions of `http-handler` from.
const ABI_WIT: &[(&str, &str)] = &[
    ("filter.wit", include_str!("../../../abi/wit/filter.wit")),
    ("host.wit", include_str!("../../../abi/wit/host.wit")),
    ("http.wit", include_str!("../../../abi/wit/http.wit")),
    ("network.wit", include_str!("../../../abi/wit/network.wit")),
    ("types.wit", include_str!("../../../abi/wit/types.wit")),
    ("worlds.wit", include_str!("../../../abi/wit/worlds.wit")),
];

/// The `legate:filter` package of `abi/wit`: its version and the functions
/// of `http-handler` (WIT names: `configure`, `on-request-headers`, …), which
/// a 0.1 host requires all of (adding one needs 0.2: abi/README.md §12).
pub fn abi_http_handler() -> Result<([u64; 3], Vec<String>)> {
    let mut sources = wit_parser::SourceMap::new();
    for (name, text) in ABI_WIT {
        sources.push_str(name, *text);
    }
    let group = sources
        .parse()
        .map_err(|(_, e)| anyhow::anyhow!("parsing the compiled-in abi/wit: {e}"))?;
    let mut resolve = Resolve::default();
    let pkg = resolve
        .push_group(group)
        .context("resolving the compiled-in abi/wit")?;
    let package = &resolve.packages[pkg];
    let version = package
        .name
        .version
        .as_ref()
        .map(|v| [v.major, v.minor, v.patch])
        .context("abi/wit has no package version")?;
    let id = package
        .interfaces
        .get("http-handler")
        .context("abi/wit has no interface `http-handler`")?;
    let functions = resolve.interfaces[*id].functions.keys().cloned().collect();
    Ok((version, functions))
}

/// The version of an interface name's `@x.y.z` (pre-release and build
/// metadata ignored).
fn version_of(name: &str) -> Option<[u64; 3]> {
    let (_, v) = name.split_once('@')?;
    let mut parts = v.split(['.', '-', '+']).map(|p| p.parse::<u64>().ok());
    Some([parts.next()??, parts.next()??, parts.next()??])
}

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
/// `func <name>`; and the functions of each exported interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorldSummary {
    /// What the component needs from its host.
    pub imports: Vec<String>,
    /// What the component provides.
    pub exports: Vec<String>,
    /// The functions of each exported interface (by its name in
    /// [`exports`](Self::exports)), WIT names.
    pub export_functions: Vec<(String, Vec<String>)>,
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
    /// Checks the shape a Legate host of this tree accepts for an HTTP
    /// filter: it exports `legate:filter/http-handler@0.1.z` for a `z` up to
    /// `abi/wit`'s (a host loads any 0.1 up to its own: abi/README.md §12),
    /// with every function of `abi/wit`'s `http-handler` (the host requires
    /// them all), and imports only `legate:filter/*` interfaces and the WASI
    /// 0.2 interfaces the host links (`legate_abi_rules::wasi::PROVIDED`:
    /// not `wasi:http`).
    pub fn check_http_filter(&self) -> Result<()> {
        let ([major, minor, patch], required) = abi_http_handler()?;
        let accepted = format!(
            "legate:filter/http-handler@{major}.{minor}.x ({major}.{minor}.0–{major}.{minor}.{patch})"
        );
        let handler = self.exports.iter().find(|e| {
            e.starts_with("legate:filter/http-handler@")
                && version_of(e).is_some_and(|[a, b, c]| a == major && b == minor && c <= patch)
        });
        let Some(handler) = handler else {
            bail!(
                "the component does not export {accepted} (it exports: {})",
                list_or_none(&self.exports)
            );
        };
        let present = self
            .export_functions
            .iter()
            .find(|(i, _)| i == handler)
            .map(|(_, f)| f.as_slice())
            .unwrap_or_default();
        let missing: Vec<String> = required
            .iter()
            .filter(|f| !present.contains(f))
            .cloned()
            .collect();
        if !missing.is_empty() {
            bail!(
                "the component's {handler} lacks {}: a Legate host requires every function of \
                 the interface, including those of phases the filter does not declare (give \
                 them empty bodies)",
                missing.join(", ")
            );
        }
        let unprovided: Vec<&str> = self
            .imports
            .iter()
            .map(String::as_str)
            .filter(|i| {
                legate_abi_rules::wasi::is_wasi(i) && !legate_abi_rules::wasi::is_provided(i)
            })
            .collect();
        if !unprovided.is_empty() {
            bail!(
                "the component imports {}, which a Legate host does not provide (abi/README.md \
                 §10: WASI 0.2 cli, clocks, filesystem, io, random, sockets only): filters \
                 reach upstreams with `callout`; for componentize-js build with \
                 `-d http -d fetch-event`",
                unprovided.join(", ")
            );
        }
        let foreign: Vec<&str> = self
            .imports
            .iter()
            .map(String::as_str)
            .filter(|i| !(i.starts_with("legate:filter/") || legate_abi_rules::wasi::is_wasi(i)))
            .collect();
        if !foreign.is_empty() {
            bail!(
                "the component imports what a Legate host does not provide: {}",
                foreign.join(", ")
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
    let export_functions = world
        .exports
        .iter()
        .filter_map(|(k, i)| match i {
            WorldItem::Interface { id, .. } => Some((
                name(k, i)?,
                resolve.interfaces[*id].functions.keys().cloned().collect(),
            )),
            _ => None,
        })
        .collect();
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
        export_functions,
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

    /// Every function of `http-handler`, as abi/wit has them.
    fn handler_functions() -> Vec<String> {
        abi_http_handler().unwrap().1
    }

    /// A summary whose exports each have every `http-handler` function.
    fn summary(imports: &[&str], exports: &[&str]) -> WorldSummary {
        WorldSummary {
            imports: imports.iter().map(|s| (*s).to_owned()).collect(),
            exports: exports.iter().map(|s| (*s).to_owned()).collect(),
            export_functions: exports
                .iter()
                .map(|s| ((*s).to_owned(), handler_functions()))
                .collect(),
        }
    }

    fn check(s: &WorldSummary) -> String {
        s.check_http_filter()
            .map(|()| "accepted".to_owned())
            .unwrap_or_else(|e| e.to_string())
    }

    #[test]
    fn the_handler_functions_and_version_come_from_abi_wit() {
        let (version, functions) = abi_http_handler().unwrap();
        assert_eq!(version_of(HTTP_HANDLER), Some(version));
        assert_eq!(functions.first().map(String::as_str), Some("configure"));
        for f in [
            "on-request-headers",
            "on-log",
            "on-callout-response",
            "on-done",
        ] {
            assert!(functions.iter().any(|g| g == f), "{f}: {functions:?}");
        }
        assert_eq!(functions.len(), 12, "{functions:?}");
    }

    #[test]
    fn http_filter_shape_is_accepted() {
        let ok = summary(
            &["legate:filter/http@0.1.3", "wasi:io/streams@0.2.0"],
            &[HTTP_HANDLER],
        );
        assert_eq!(check(&ok), "accepted");
        // componentize-py and componentize-js import newer WASI 0.2 patches.
        let ok = summary(
            &["wasi:cli/stderr@0.2.10", "wasi:random/random@0.2.3"],
            &[HTTP_HANDLER],
        );
        assert_eq!(check(&ok), "accepted");
    }

    #[test]
    fn an_older_0_1_handler_is_accepted_and_a_newer_or_0_2_one_is_not() {
        // Was "does not export legate:filter/http-handler@0.1.2" for a
        // component the host loads (built against abi 0.1.0).
        let old = summary(&[], &["legate:filter/http-handler@0.1.0"]);
        assert_eq!(check(&old), "accepted");
        for v in ["0.1.4", "0.2.0", "1.0.0"] {
            let err = check(&summary(&[], &[&format!("legate:filter/http-handler@{v}")]));
            assert!(
                err.contains("does not export legate:filter/http-handler@0.1.x (0.1.0–0.1.3)"),
                "{v}: {err}"
            );
        }
    }

    #[test]
    fn a_handler_missing_a_function_is_refused_naming_it() {
        // Was accepted: the host refuses it at load.
        let mut s = summary(&[], &[HTTP_HANDLER]);
        s.export_functions[0]
            .1
            .retain(|f| f != "on-done" && f != "on-log");
        let err = check(&s);
        assert!(
            err.starts_with(
                "the component's legate:filter/http-handler@0.1.3 lacks on-log, on-done: "
            ),
            "{err}"
        );
    }

    #[test]
    fn a_wasi_http_import_is_refused_naming_it() {
        // Was accepted (any `wasi:*` was): the host does not link wasi:http.
        let err = check(&summary(
            &["wasi:io/streams@0.2.10", "wasi:http/types@0.2.10"],
            &[HTTP_HANDLER],
        ));
        assert!(
            err.starts_with(
                "the component imports wasi:http/types@0.2.10, which a Legate host does not \
                 provide"
            ) && err.ends_with("for componentize-js build with `-d http -d fetch-event`"),
            "{err}"
        );
    }

    #[test]
    fn missing_handler_export_is_named() {
        let err = check(&summary(&[], &["legate:filter/network-handler@0.1.3"]));
        assert!(
            err.contains("does not export legate:filter/http-handler@0.1.x"),
            "{err}"
        );
        assert!(err.contains("network-handler"), "{err}");
    }

    #[test]
    fn foreign_imports_are_named() {
        let err = check(&summary(
            &[
                "legate:filter/http@0.1.3",
                "acme:evil/net@1.0.0",
                "func raw",
            ],
            &[HTTP_HANDLER],
        ));
        assert!(err.contains("acme:evil/net@1.0.0, func raw"), "{err}");
    }
}
