//! The one `bindgen!` of the `legate:filter/http-filter@0.1.1` world (abi/wit).
//!
//! WIT resources are mapped with `with:` to the host types in [`super::host`], so
//! `Resource<T>` handles are typed and the same host types can serve a future 0.2
//! binding set side by side (abi/README.md §12). Every import may trap (a dangling
//! handle, a broken host invariant), so all imports are `trappable`. Exports are
//! synchronous: a guest call is a plain call on the worker's stack (WASI is
//! linked synchronously too, [`super::wasi`]).

wasmtime::component::bindgen!({
    world: "http-filter",
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

/// The `legate:filter/network-filter@0.1.1` world (L4 filters). The interfaces
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
