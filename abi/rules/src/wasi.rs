//! The WASI 0.2 interfaces a Legate host links for a component guest
//! (abi/README.md section 10): the set `wasmtime-wasi` 48's
//! `p2::add_to_linker_sync` defines (the host's `wasm::wasi::add_to_linker`
//! links it; keep this list in step when that changes). Everything else WASI
//! names — `wasi:http` above all, which componentize-js imports by default —
//! is not provided, and a component importing it does not load: the host
//! names the interface in its load error, and `legate-componentize
//! check-http-filter` refuses such a component before it reaches a host.

/// The WASI version line the host provides: any `0.2.z`.
pub const VERSION: (u64, u64) = (0, 2);

/// The interfaces provided (`package/interface`, without the version), sorted.
pub const PROVIDED: &[&str] = &[
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stderr",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stderr",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:clocks/monotonic-clock",
    "wasi:clocks/wall-clock",
    "wasi:filesystem/preopens",
    "wasi:filesystem/types",
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:random/random",
    "wasi:sockets/instance-network",
    "wasi:sockets/ip-name-lookup",
    "wasi:sockets/network",
    "wasi:sockets/tcp",
    "wasi:sockets/tcp-create-socket",
    "wasi:sockets/udp",
    "wasi:sockets/udp-create-socket",
];

/// Whether `name` is a WASI interface name (`wasi:…`, with or without a
/// version).
pub fn is_wasi(name: &str) -> bool {
    name.starts_with("wasi:")
}

/// Whether the host provides the WASI import `name`
/// (`wasi:io/streams@0.2.10`): one of [`PROVIDED`] at a `0.2.z` version (or
/// without a version). `false` for a name that is not WASI.
pub fn is_provided(name: &str) -> bool {
    let (interface, version) = match name.split_once('@') {
        Some((i, v)) => (i, Some(v)),
        None => (name, None),
    };
    let version_ok = version.is_none_or(|v| {
        let mut parts = v.split(['.', '-', '+']);
        let major = parts.next().and_then(|p| p.parse::<u64>().ok());
        let minor = parts.next().and_then(|p| p.parse::<u64>().ok());
        (major, minor) == (Some(VERSION.0), Some(VERSION.1))
    });
    version_ok && PROVIDED.binary_search(&interface).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provided_is_sorted_so_lookups_find_every_entry() {
        let mut sorted = PROVIDED.to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, PROVIDED);
        assert!(PROVIDED.iter().all(|i| is_provided(i)));
    }

    #[test]
    fn wasi_0_2_cli_io_and_friends_are_provided_and_wasi_http_is_not() {
        assert!(is_provided("wasi:io/streams@0.2.0"));
        assert!(is_provided("wasi:cli/stderr@0.2.10"));
        assert!(is_provided("wasi:sockets/tcp@0.2.3"));
        assert!(!is_provided("wasi:http/types@0.2.10"));
        assert!(!is_provided("wasi:http/outgoing-handler@0.2.0"));
        assert!(!is_provided("wasi:keyvalue/store@0.2.0-draft"));
        assert!(!is_provided("wasi:io/streams@0.3.0"));
        assert!(!is_provided("legate:filter/http@0.1.3"));
        assert!(is_wasi("wasi:http/types@0.2.10"));
        assert!(!is_wasi("legate:filter/http@0.1.3"));
    }
}
