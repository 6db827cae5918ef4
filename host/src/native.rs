//! Native filters: Rust filters compiled into the host, behind the same
//! [`HttpFilter`] trait as Wasm plugins, so a chain does not care which kind a
//! filter is. A plugin entry selects one with `module: native:NAME`.
//!
//! The one native filter today is `noop` (continues at once): the baseline that
//! bench/filters.sh compares Wasm filters with, so the measured cost of a Wasm
//! filter is the sandbox's, not the chain's.

use std::sync::Arc;

use crate::filter::{Exchange, HttpFilter, Phases, Verdict};

/// The `module:` prefix that selects a native filter.
pub const PREFIX: &str = "native:";

/// Native filters by name.
pub const NAMES: &[&str] = &["noop"];

/// The native filter `kind` for plugin `name`; `config` is the plugin's (or a
/// route's) config, which `noop` does not take.
pub fn load(
    name: &str,
    kind: &str,
    config: Option<&serde_json::Value>,
) -> anyhow::Result<Arc<dyn HttpFilter>> {
    match kind {
        "noop" => {
            if config.is_some_and(|c| !c.is_null()) {
                anyhow::bail!(
                    "plugin `{name}`: the native filter `noop` takes no config; remove `config`"
                );
            }
            Ok(Arc::new(Noop {
                name: name.to_owned(),
            }))
        }
        other => anyhow::bail!(
            "plugin `{name}`: no native filter `{other}` (known: {}); use `module: {PREFIX}noop` \
             or the path of a .wasm file",
            NAMES.join(", ")
        ),
    }
}

/// Passes every request on untouched: one request-headers call, nothing else.
struct Noop {
    name: String,
}

impl HttpFilter for Noop {
    fn name(&self) -> &str {
        &self.name
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST_HEADERS
    }

    fn fail_open(&self) -> bool {
        false
    }

    fn on_request_headers(
        &self,
        _worker: usize,
        _x: &mut Exchange,
        _end_of_stream: bool,
    ) -> Result<Verdict, String> {
        Ok(Verdict::Continue)
    }

    fn on_response_headers(
        &self,
        _worker: usize,
        _x: &mut Exchange,
        _end_of_stream: bool,
    ) -> Result<Verdict, String> {
        Ok(Verdict::Continue)
    }

    fn on_log(&self, _worker: usize, _x: &mut Exchange) {}

    fn on_done(&self, _worker: usize, _context: u64, _detached: bool) {}
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn loads_noop_and_refuses_what_it_cannot_be() {
        let f = load("n", "noop", None).unwrap();
        assert_eq!(f.name(), "n");
        assert_eq!(f.phases().0, Phases::REQUEST_HEADERS.0);
        assert!(load("n", "noop", Some(&serde_json::Value::Null)).is_ok());
        let e = load("n", "noop", Some(&serde_json::json!({"a": 1})))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("takes no config"), "{e}");
        let e = load("n", "gzip", None).err().unwrap().to_string();
        assert!(
            e.contains("no native filter `gzip`") && e.contains("noop"),
            "{e}"
        );
    }
}
