//! `pw-noop-filter`: a proxy-wasm filter that does nothing, for the issue's
//! cost ratio of a no-op through proxy-wasm against the same no-op through the
//! native ABI (bench/noop-filter).
//!
//! Every callback is the SDK's default (continue), as in the SDK's smallest
//! examples: what a request pays is the proxy-wasm ABI's fixed cost, i.e. the
//! callbacks Envoy's ABI makes (context create, request and response headers,
//! response body, done, log, delete) and the SDK's dispatch of each.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Noop))
    }
}

struct Noop;

impl Context for Noop {}

impl HttpContext for Noop {}
