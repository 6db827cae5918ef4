//! The one `bindgen!` of the `legate:filter/http-filter-kv@0.1.3` world
//! (abi/wit): `http-filter` plus the optional `kv-handler` export, so that
//! [`FilterPre`] requires `http-handler` and takes `kv-handler` where it is.
//!
//! WIT resources are mapped with `with:` to the host types in [`super::host`], so
//! `Resource<T>` handles are typed and the same host types can serve a future 0.2
//! binding set side by side (abi/README.md §12). Every import may trap (a dangling
//! handle, a broken host invariant), so all imports are `trappable`. Exports are
//! synchronous: a guest call is a plain call on the worker's stack (WASI is
//! linked synchronously too, [`super::wasi`]).

wasmtime::component::bindgen!({
    world: "http-filter-kv",
    path: "../abi/wit",
    imports: { default: trappable },
    with: {
        "legate:filter/types.buffer": super::host::BufferRes,
        "legate:filter/http.headers": super::host::HeadersRes,
        "legate:filter/http.exchange": super::host::ExchangeRes,
        "legate:filter/metrics.counter": super::host::MetricRes,
        "legate:filter/metrics.gauge": super::host::MetricRes,
        "legate:filter/metrics.histogram": super::host::MetricRes,
        "legate:filter/kv.namespace": super::host::NamespaceRes,
    },
});

use exports::legate::filter::{http_handler, kv_handler};
use wasmtime::component::{Instance, InstancePre};
use wasmtime::AsContextMut;

/// The name a component exports `kv-handler` under (any 0.1.z matches).
const KV_HANDLER: &str = "legate:filter/kv-handler";

/// A linked HTTP filter component, ready to instantiate: the generated
/// world's `Pre`, except that `kv-handler` is optional (a component built
/// without it, e.g. against 0.1.0 or 0.1.1, loads; abi/README.md §12).
pub struct FilterPre<T: 'static> {
    pre: InstancePre<T>,
    http: http_handler::GuestIndices,
    kv: Option<kv_handler::GuestIndices>,
}

impl<T: 'static> Clone for FilterPre<T> {
    fn clone(&self) -> Self {
        FilterPre {
            pre: self.pre.clone(),
            http: self.http.clone(),
            kv: self.kv.clone(),
        }
    }
}

impl<T: 'static> FilterPre<T> {
    /// Finds the exports. Errors: no `http-handler`, or a `kv-handler` of
    /// the wrong shape.
    pub fn new(pre: InstancePre<T>) -> wasmtime::Result<Self> {
        let http = http_handler::GuestIndices::new(&pre)?;
        let kv = match kv_handler::GuestIndices::new(&pre) {
            Ok(kv) => Some(kv),
            Err(e) => {
                let engine = pre.engine();
                let exported = pre
                    .component()
                    .component_type()
                    .exports(engine)
                    .any(|(name, _)| name.starts_with(KV_HANDLER));
                if exported {
                    return Err(e.context(format!("its `{KV_HANDLER}` export does not fit")));
                }
                None
            }
        };
        Ok(FilterPre { pre, http, kv })
    }

    /// The engine the component was compiled for.
    pub fn engine(&self) -> &wasmtime::Engine {
        self.pre.engine()
    }

    /// Instantiates the component in `store`.
    pub fn instantiate(&self, mut store: impl AsContextMut<Data = T>) -> wasmtime::Result<Filter> {
        let instance: Instance = self.pre.instantiate(&mut store)?;
        let http = self.http.load(&mut store, &instance)?;
        let kv = match &self.kv {
            Some(kv) => Some(kv.load(&mut store, &instance)?),
            None => None,
        };
        Ok(Filter { http, kv })
    }
}

/// An instantiated HTTP filter's exports.
pub struct Filter {
    http: http_handler::Guest,
    kv: Option<kv_handler::Guest>,
}

impl Filter {
    /// `http-handler`.
    pub fn legate_filter_http_handler(&self) -> &http_handler::Guest {
        &self.http
    }

    /// `kv-handler`, if the component exports it.
    pub fn legate_filter_kv_handler(&self) -> Option<&kv_handler::Guest> {
        self.kv.as_ref()
    }
}

/// The `legate:filter/network-filter@0.1.3` world (L4 filters). The interfaces
/// it shares with `http-filter` are the ones generated above (`with:`), so one
/// set of `Host` impls serves both worlds.
pub mod network {
    wasmtime::component::bindgen!({
        world: "network-filter",
        path: "../abi/wit",
        imports: { default: trappable },
            with: {
            "legate:filter/types": super::legate::filter::types,
            "legate:filter/log": super::legate::filter::log,
            "legate:filter/clock": super::legate::filter::clock,
            "legate:filter/random": super::legate::filter::random,
            "legate:filter/metrics": super::legate::filter::metrics,
            "legate:filter/kv": super::legate::filter::kv,
            "legate:filter/callout": super::legate::filter::callout,
            "legate:filter/plugin": super::legate::filter::plugin,
            "legate:filter/network.connection": crate::wasm::host::ConnectionRes,
        },
    });
}
