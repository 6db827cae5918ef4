//! How plugin crates are compiled: the target and the release-profile overrides.
//! Shared, by `#[path]`, with host/build.rs (which builds the first-party plugins
//! embedded as `builtin:NAME`), so `legate plugin build` and the embedded plugins
//! come from identical compiler settings and share one cargo cache.

/// The target plugins are built for: it produces a component directly.
pub const TARGET: &str = "wasm32-wasip2";

/// Release-profile overrides for plugins, unless the user set them already:
/// fast code, no debug info, one codegen unit, full LTO. `opt-level = 3`, not
/// `"s"`: a plugin runs on every request, and its size only matters once, when
/// it is compiled at load (bench/README.md: the API-key auth plugin's added
/// cost per request fell by a fifth, its component grew to ~0.8 MiB).
pub const PROFILE: [(&str, &str); 6] = [
    ("CARGO_PROFILE_RELEASE_OPT_LEVEL", "3"),
    ("CARGO_PROFILE_RELEASE_LTO", "true"),
    ("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1"),
    ("CARGO_PROFILE_RELEASE_DEBUG", "false"),
    ("CARGO_PROFILE_RELEASE_STRIP", "true"),
    ("CARGO_PROFILE_RELEASE_PANIC", "abort"),
];
