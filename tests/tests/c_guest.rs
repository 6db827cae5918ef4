//! A Legate filter in C (examples/c-filter), built from source by
//! `scripts/build-c-filter.sh` exactly as its README says, is a component of
//! the `legate:filter/http-filter@0.1.3` shape: it exports
//! `legate:filter/http-handler@0.1.3` and imports only `legate:filter/*`
//! interfaces (no WASI: the filter uses no libc I/O).
//!
//! It also behaves as examples/c-filter/README.md says when wasmtime calls its
//! exports: a stub host provides the `headers` resource (a map in the store)
//! and traps on every other import, which the filter must not use. Running it
//! inside the proxy is the host's integration tests' job.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use legate_componentize::{describe, HTTP_HANDLER};
use wasmtime::component::{
    Component, ComponentExportIndex, Instance, Linker, Resource, ResourceType, Val,
};
use wasmtime::{Engine, Store, StoreContextMut};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs the build script into a fresh temp dir and returns the component.
fn build_c_filter() -> Vec<u8> {
    let out_dir = std::env::temp_dir().join(format!("legate-c-guest-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join("c_filter.wasm");
    let output = Command::new("bash")
        .arg(repo_root().join("scripts/build-c-filter.sh"))
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "scripts/build-c-filter.sh failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_dir_all(&out_dir).unwrap();
    bytes
}

/// One build per test binary: the tests share it.
fn c_filter() -> &'static [u8] {
    static BUILT: OnceLock<Vec<u8>> = OnceLock::new();
    BUILT.get_or_init(build_c_filter)
}

#[test]
fn c_filter_builds_into_an_http_filter_component() {
    let component = c_filter();

    // A component, not a core module: same magic, layer 1 in the version field.
    assert_eq!(&component[..4], b"\0asm", "not a wasm binary");
    assert_eq!(
        &component[4..8],
        &[0x0d, 0x00, 0x01, 0x00],
        "a core module, not a component"
    );

    let world = describe(component).unwrap();
    assert_eq!(world.exports, vec![HTTP_HANDLER.to_owned()], "{world}");
    assert!(
        world
            .imports
            .iter()
            .any(|i| i == "legate:filter/http@0.1.3"),
        "the filter reads and writes headers, so it imports `http`:\n{world}"
    );
    for import in &world.imports {
        assert!(
            import.starts_with("legate:filter/") && import.ends_with("@0.1.3"),
            "unexpected import `{import}` (the C filter should need no WASI):\n{world}"
        );
    }
    world.check_http_filter().unwrap();
}

// ---- calling the exports -------------------------------------------------

/// Marker types for the host resources the filter's phases receive.
struct Headers;
struct Exchange;
struct Buffer;

/// Header maps by resource rep; the stub host's whole state.
#[derive(Default)]
struct Host {
    maps: HashMap<u32, Vec<(String, Vec<u8>)>>,
}

const HTTP: &str = "legate:filter/http@0.1.3";

struct Filter {
    store: Store<Host>,
    instance: Instance,
    handler: ComponentExportIndex,
}

impl Filter {
    fn new() -> Filter {
        // Compiled once per test binary: unoptimized cranelift is slow.
        static COMPILED: OnceLock<(Engine, Component)> = OnceLock::new();
        let (engine, component) = COMPILED.get_or_init(|| {
            let engine = Engine::default();
            let component = Component::new(&engine, c_filter()).unwrap();
            (engine, component)
        });
        let mut linker = Linker::<Host>::new(engine);
        linker
            .instance("legate:filter/types@0.1.3")
            .unwrap()
            .resource("buffer", ResourceType::host::<Buffer>(), |_, _| Ok(()))
            .unwrap();
        let mut http = linker.instance(HTTP).unwrap();
        http.resource("headers", ResourceType::host::<Headers>(), |_, _| Ok(()))
            .unwrap();
        http.resource("exchange", ResourceType::host::<Exchange>(), |_, _| Ok(()))
            .unwrap();
        http.func_wrap(
            "[method]headers.get",
            |store: StoreContextMut<'_, Host>, (h, name): (Resource<Headers>, String)| {
                let map = &store.data().maps[&h.rep()];
                let value = map.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone());
                Ok((value,))
            },
        )
        .unwrap();
        // `set` returns result<_, error>: dynamic values spare a Rust mirror of
        // the `error` enum.
        http.func_new("[method]headers.set", |mut store, _ty, params, results| {
            let (Val::Resource(h), Val::String(name), Val::List(value)) =
                (&params[0], &params[1], &params[2])
            else {
                panic!("headers.set called with {params:?}");
            };
            let rep = h.try_into_resource::<Headers>(&mut store)?.rep();
            let value = value
                .iter()
                .map(|b| match b {
                    Val::U8(b) => *b,
                    other => panic!("not a byte: {other:?}"),
                })
                .collect();
            let map = store.data_mut().maps.entry(rep).or_default();
            map.retain(|(n, _)| n != name);
            map.push((name.clone(), value));
            results[0] = Val::Result(Ok(None));
            Ok(())
        })
        .unwrap();
        // Everything else (log, kv, callout, exchange methods...) traps if
        // called: this filter needs none of it.
        linker.define_unknown_imports_as_traps(component).unwrap();

        let mut store = Store::new(engine, Host::default());
        let instance = linker.instantiate(&mut store, component).unwrap();
        let handler = instance
            .get_export_index(&mut store, None, HTTP_HANDLER)
            .unwrap();
        Filter {
            store,
            instance,
            handler,
        }
    }

    fn call(&mut self, name: &str, params: &[Val]) -> Val {
        let index = self
            .instance
            .get_export_index(&mut self.store, Some(&self.handler), name)
            .unwrap();
        let func = self.instance.get_func(&mut self.store, index).unwrap();
        let mut results = [Val::Bool(false)];
        func.call(&mut self.store, params, &mut results).unwrap();
        let [result] = results;
        result
    }

    fn configure(&mut self, config: &str) -> Result<Val, String> {
        match self.call("configure", &[Val::String(config.to_owned())]) {
            Val::Result(Ok(Some(setup))) => Ok(*setup),
            Val::Result(Err(Some(message))) => match *message {
                Val::String(m) => Err(m),
                other => panic!("configure: err is not a string: {other:?}"),
            },
            other => panic!("configure returned {other:?}"),
        }
    }

    /// Calls a headers phase on a fresh map; returns the action and the map
    /// afterwards.
    fn headers_phase(
        &mut self,
        phase: &str,
        headers: &[(&str, &str)],
    ) -> (Val, Vec<(String, Vec<u8>)>) {
        const MAP: u32 = 1;
        let map = headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec()))
            .collect();
        self.store.data_mut().maps.insert(MAP, map);
        // Owned host handles, lent to the guest as borrows for the call.
        let exchange = Resource::<Exchange>::new_own(7)
            .try_into_resource_any(&mut self.store)
            .unwrap();
        let headers = Resource::<Headers>::new_own(MAP)
            .try_into_resource_any(&mut self.store)
            .unwrap();
        let action = self.call(
            phase,
            &[
                Val::U64(42),
                Val::Resource(exchange),
                Val::Resource(headers),
                Val::Bool(true),
            ],
        );
        let map = self.store.data_mut().maps.remove(&MAP).unwrap();
        (action, map)
    }
}

fn field<'a>(record: &'a Val, name: &str) -> &'a Val {
    let Val::Record(fields) = record else {
        panic!("not a record: {record:?}");
    };
    &fields.iter().find(|(n, _)| n == name).unwrap().1
}

fn bytes(list: &Val) -> Vec<u8> {
    let Val::List(items) = list else {
        panic!("not a list: {list:?}");
    };
    items
        .iter()
        .map(|b| match b {
            Val::U8(b) => *b,
            other => panic!("not a byte: {other:?}"),
        })
        .collect()
}

fn owned(headers: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec()))
        .collect()
}

#[test]
fn configure_declares_two_phases_and_rejects_non_objects() {
    let mut filter = Filter::new();
    for config in [
        "null",
        " {} ",
        r#"{"a": [1, -2.5e3, "x\u0041", true, null], "b": {}}"#,
    ] {
        let setup = filter
            .configure(config)
            .unwrap_or_else(|e| panic!("{config:?} rejected: {e}"));
        let Val::Flags(phases) = field(&setup, "phases") else {
            panic!("phases: {setup:?}");
        };
        let mut phases = phases.clone();
        phases.sort();
        assert_eq!(
            phases,
            ["request-headers", "response-headers"],
            "{config:?}"
        );
        assert_eq!(field(&setup, "tick-interval-ms"), &Val::U32(0));
    }
    for (config, why) in [
        ("42", "must be null or an object"),
        (r#""text""#, "must be null or an object"),
        ("[]", "must be null or an object"),
        ("{", "not valid JSON"),
        ("nul", "not valid JSON"),
        (r#"{"a" 1}"#, "not valid JSON"),
        ("{} {}", "trailing data"),
        ("", "empty"),
    ] {
        let message = filter
            .configure(config)
            .err()
            .unwrap_or_else(|| panic!("{config:?} accepted"));
        assert!(message.contains(why), "{config:?}: {message}");
        assert!(!message.contains('\n'), "one line: {message:?}");
    }
}

#[test]
fn request_headers_are_marked_or_blocked() {
    let mut filter = Filter::new();
    filter.configure("null").unwrap();

    for headers in [vec![], vec![("x-c-filter-block", "no")]] {
        let (action, after) = filter.headers_phase("on-request-headers", &headers);
        assert_eq!(action, Val::Variant("continue".into(), None), "{headers:?}");
        let mut expected = owned(&headers);
        expected.push(("x-c-filter".into(), b"seen".to_vec()));
        assert_eq!(after, expected);
    }

    for value in ["yes", "YES"] {
        let headers = [("x-c-filter-block", value)];
        let (action, after) = filter.headers_phase("on-request-headers", &headers);
        let Val::Variant(tag, Some(response)) = &action else {
            panic!("{value}: {action:?}");
        };
        assert_eq!(tag, "respond");
        assert_eq!(field(response, "status"), &Val::U16(403));
        assert_eq!(bytes(field(response, "body")), b"blocked by c-filter\n");
        assert_eq!(
            field(response, "details"),
            &Val::String("c_filter_block".into())
        );
        assert_eq!(after, owned(&headers), "a blocked request is not marked");
    }
}

#[test]
fn response_headers_get_the_language() {
    let mut filter = Filter::new();
    filter.configure("{}").unwrap();
    let (action, after) = filter.headers_phase("on-response-headers", &[("server", "up")]);
    assert_eq!(action, Val::Variant("continue".into(), None));
    assert_eq!(after, owned(&[("server", "up"), ("x-c-filter-lang", "c")]));
}

#[test]
fn many_calls_in_one_instance_keep_working() {
    // Each local response is malloc'd by the filter and freed by the
    // generated post-return code, and each call lends two borrows: an
    // ownership mistake there (double free, a borrow left undropped) traps
    // on repeated calls, which a single call can miss.
    let mut filter = Filter::new();
    filter.configure("null").unwrap();
    for _ in 0..2000 {
        let (action, _) =
            filter.headers_phase("on-request-headers", &[("x-c-filter-block", "yes")]);
        assert!(matches!(action, Val::Variant(ref t, _) if t == "respond"));
        let (action, _) = filter.headers_phase("on-request-headers", &[]);
        assert_eq!(action, Val::Variant("continue".into(), None));
    }
}
