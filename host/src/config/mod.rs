//! `plugins.yaml`: the schema of Legate's one config file, its loading with
//! file:line:col errors, and the `validate()` pass that checks what serde cannot.
//!
//! Every struct denies unknown keys. Items that a semantic error may need to point at
//! (listeners, virtual hosts, routes, clusters, endpoints, references) are wrapped in
//! [`Spanned`] so the error names the exact place. Defaults are documented next to
//! each field and in `docs/config.md`, with the reason they are safe.

mod files;
mod load;
mod source;
mod types;
mod validate;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
pub use serde_saphyr::{Location, Spanned};

pub use load::{
    check_file, check_files, check_files_carrying, error_at, load_file, parse_str, ConfigError,
    ConfigErrors, Origin,
};
pub(crate) use load::{endpoint_health_check_errors, error_at_path, key_position, mask_url};
pub use types::{ByteSize, Cidr, Dur, KvBackendKind, KvConfig, KvTls, Name, Percent, StatusRange};
pub use validate::addresses_overlap;
pub(crate) use validate::{normalize_domain, split_host_port};

/// The whole config file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Schema version; must be `1`.
    pub version: Spanned<u32>,
    /// The admin listener (stats, readiness, config dump, drain).
    #[serde(default)]
    pub admin: Admin,
    /// Where access-log lines go: one log, a list of them, or `off`; absent =
    /// no access log. A listener's own `access_log` replaces it for that
    /// listener ([`Listener::access_log`]).
    #[serde(default)]
    pub access_log: Option<AccessLogs>,
    /// How long a graceful shutdown waits for in-flight requests; also how long
    /// the TCP connections and WebSocket tunnels of a listener a reload replaced
    /// or removed stay open. Default 30s: long enough for ordinary requests,
    /// short enough for an orchestrator's grace period.
    #[serde(default = "defaults::drain_timeout")]
    pub drain_timeout: Dur,
    /// The zone this Legate runs in, for zone-aware routing (`--local-zone`
    /// overrides it); absent = unknown, no zone-aware routing.
    #[serde(default)]
    pub local_zone: Option<String>,
    /// Downstream listeners.
    #[serde(default)]
    pub listeners: Vec<Spanned<Listener>>,
    /// Named route tables (sets of virtual hosts) that HTTP listeners refer to.
    #[serde(default)]
    pub routes: Vec<Spanned<RouteTable>>,
    /// Upstream clusters.
    #[serde(default)]
    pub clusters: Vec<Spanned<Cluster>>,
    /// Wasm filter plugins (components of the `legate:filter/http-filter` world),
    /// referred to by name from listeners' `http.filters`.
    #[serde(default)]
    pub plugins: Vec<Spanned<Plugin>>,
    /// The plugins' shared KV store (see [`KvConfig`]); absent = in memory.
    #[serde(default)]
    pub kv: KvConfig,
    /// Distributed tracing (Zipkin v2 spans, W3C and B3 propagation; see
    /// [`Tracing`]); absent = no tracing headers are read or written.
    #[serde(default)]
    pub tracing: Option<Tracing>,
    /// The file this config was read from and its text ([`parse_str`] sets
    /// it): an error found only when the config is put to use (a plugin's
    /// `configure` refusing its `config`) is placed at its `file:line:col`
    /// with it. Not part of the config: not compared, not dumped.
    #[serde(skip)]
    pub origin: Option<std::sync::Arc<Origin>>,
    /// SHA-256 (hex) of the text this config was parsed from ([`parse_str`]),
    /// not a key of the file: the file watch compares the file with it. Hashing
    /// the file again once started would take an edit that landed while the
    /// process started (its plugins compiling) for the config in force.
    #[serde(skip)]
    pub source_sha256: Option<String>,
}

/// A Wasm filter plugin: a component, its configuration and its sandbox.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Plugin {
    /// Unique name, used in stats, logs and the 503 body of a failed plugin.
    pub name: Name,
    /// The `.wasm` file (relative to the config file), `builtin:NAME` for a
    /// first-party plugin embedded in the binary, or `native:NAME`.
    pub module: PathBuf,
    /// Expected SHA-256 of the module file (64 hex digits); a mismatch refuses the load.
    #[serde(default)]
    pub sha256: Option<Spanned<String>>,
    /// Any value; passed to the plugin's `configure` as JSON text (`null` if absent).
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    /// What happens to a request when the plugin fails (trap, deadline, memory cap):
    /// `closed` (default: answer 503 naming the plugin) or `open` (skip the plugin).
    #[serde(default)]
    pub fail: FailPolicy,
    /// The plugin's sandbox limits.
    #[serde(default)]
    pub limits: PluginLimits,
    /// What the plugin may reach outside itself.
    #[serde(default)]
    pub capabilities: Capabilities,
    /// Data files the plugin may read (`plugin.file(NAME)`), by name: paths
    /// relative to the config file, read by the host at every (re)load, so a
    /// sandboxed plugin gets e.g. a protobuf descriptor set without filesystem
    /// access. At most [`MAX_PLUGIN_FILES`] files of [`MAX_PLUGIN_FILE_SIZE`] each.
    #[serde(default)]
    pub files: std::collections::BTreeMap<Name, PathBuf>,
    /// Settings of a proxy-wasm (Envoy ABI 0.2.1) module; only for such modules
    /// (docs/proxy-wasm.md).
    #[serde(default)]
    pub proxy_wasm: Option<ProxyWasm>,
}

/// The most data files one plugin may be given (`files:`).
pub const MAX_PLUGIN_FILES: usize = 16;
/// The largest data file a plugin may be given: 16 MiB, the default memory cap of
/// an instance (the guest receives a copy).
pub const MAX_PLUGIN_FILE_SIZE: u64 = 16 << 20;

/// Settings of a proxy-wasm module (Envoy's `vm_config` and plugin `configuration`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyWasm {
    /// `root_id`: which root context of the module the plugin binds to (the
    /// `plugin_root_id` property). Default empty.
    #[serde(default)]
    pub root_id: String,
    /// `vm_id`: the scope of shared data and queues; plugins with the same `vm_id`
    /// share them. Default empty.
    #[serde(default)]
    pub vm_id: String,
    /// What `proxy_on_vm_start` reads as the VM configuration: a string as is, any
    /// other value as JSON text (as Envoy does).
    #[serde(default)]
    pub vm_config: Option<serde_json::Value>,
    /// What `proxy_on_configure` reads as the plugin configuration: a string as is,
    /// any other value as JSON text. Give this or the plugin's `config`, not both.
    #[serde(default)]
    pub plugin_config: Option<serde_json::Value>,
    /// Envoy's `allow_on_headers_stop_iteration` (Envoy 1.35+): `Pause` from a
    /// headers callback holds only the head while the body callbacks go on
    /// getting each chunk (Envoy's `StopIteration`). Default false, as Envoy:
    /// the host holds the whole message and calls no body callback until the
    /// filter resumes (`StopAllIterationAndWatermark`).
    #[serde(default)]
    pub allow_on_headers_stop_iteration: bool,
    /// The CPU time starting a VM may take: the module's start,
    /// `proxy_on_vm_start` and `proxy_on_configure` together (wall time 10×
    /// that). Default 1s, as a component's `configure`: a filter does little
    /// as it starts, and a worker starting a VM serves nothing meanwhile.
    /// Up to 60s, for a filter that compiles a large rule set as it starts
    /// (Coraza with the CRS); Envoy bounds none of it.
    #[serde(default)]
    pub start_cpu: Option<Spanned<Dur>>,
}

impl ProxyWasm {
    /// The longest `start_cpu` may be.
    pub const MAX_START_CPU: std::time::Duration = std::time::Duration::from_secs(60);

    /// `start_cpu`, or its default (a component's `configure` deadline).
    pub fn start_cpu(&self) -> std::time::Duration {
        self.start_cpu
            .as_ref()
            .map_or(crate::wasm::plugin::CONFIGURE_DEADLINE, |d| d.value.get())
    }
}

/// A plugin's failure policy.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FailPolicy {
    /// The request fails with 503 (the safe default for auth-like filters).
    #[default]
    Closed,
    /// The filter is skipped for the rest of the request.
    Open,
}

/// Sandbox limits of a plugin.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PluginLimits {
    /// Wall-clock deadline of one call into the plugin. Default 5ms: a filter does
    /// microseconds of work; a loop must not hold a worker.
    #[serde(default = "defaults::plugin_cpu")]
    pub cpu: Spanned<Dur>,
    /// Linear-memory cap of each instance. Default 16MiB.
    #[serde(default = "defaults::plugin_memory")]
    pub memory: Spanned<ByteSize>,
    /// The most body bytes the host buffers for this plugin (buffered body mode),
    /// per direction per exchange. Default 1MiB: the buffer is host memory held
    /// while the body arrives, so the cap bounds what one slow client can pin.
    #[serde(default = "defaults::plugin_body")]
    pub body: Spanned<ByteSize>,
    /// The longest one pause of this plugin may hold an exchange (waiting for
    /// its callouts or gRPC streams, or, for a proxy-wasm filter, any callback
    /// of its VM, to resume it); past it the pause fails by
    /// the failure policy. Default 300s, Envoy's `stream_idle_timeout`, which
    /// ends a stream a filter keeps paused; `0s` = no bound. Callouts have
    /// their own timeouts; this bounds what nothing else does: a pause on a gRPC
    /// stream that goes silent. On TCP listeners, a proxy-wasm network
    /// filter's pauses (of the new connection or of data it holds) too.
    #[serde(default = "defaults::plugin_pause")]
    pub pause: Spanned<Dur>,
}

impl Plugin {
    /// The module's file; `None` for a module compiled into the binary
    /// (`builtin:NAME`, `native:NAME`), which is never read from disk or watched.
    pub fn module_file(&self) -> Option<&std::path::Path> {
        let embedded = self.module.to_str().is_some_and(|m| {
            m.starts_with(crate::native::PREFIX) || m.starts_with(crate::wasm::builtin::PREFIX)
        });
        (!embedded).then_some(self.module.as_path())
    }
}

impl Default for PluginLimits {
    fn default() -> Self {
        PluginLimits {
            cpu: defaults::plugin_cpu(),
            memory: defaults::plugin_memory(),
            body: defaults::plugin_body(),
            pause: defaults::plugin_pause(),
        }
    }
}

/// What a plugin may reach: upstream clusters (callouts) and KV namespaces.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    /// Clusters the plugin may send callouts to.
    #[serde(default)]
    pub clusters: Vec<Spanned<Name>>,
    /// KV namespaces the plugin may open.
    #[serde(default)]
    pub kv: Vec<Name>,
}

/// One entry of a listener's filter chain.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FilterRef {
    /// The plugin (a `plugins:` entry).
    pub plugin: Spanned<Name>,
}

/// A route's override of one filter of the chain.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFilter {
    /// Skip the filter on this route.
    #[serde(default)]
    pub disabled: bool,
    /// Run the filter with this `config` instead of the plugin's on this route
    /// (a separate set of instances, configured with this value).
    #[serde(default)]
    pub config: Option<serde_json::Value>,
}

/// The admin listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Address to bind. Default `127.0.0.1:9901` (Envoy's port), loopback only
    /// because the admin API can drain the proxy.
    #[serde(default = "defaults::admin_address")]
    pub address: Spanned<String>,
    /// Must be `true` to bind the admin listener to a non-loopback address.
    #[serde(default)]
    pub allow_non_loopback: bool,
    /// Show plugin configs and header values in `GET /config_dump` as they are.
    /// Default false: they are replaced by a marker (with the config's sha256),
    /// since they hold secrets (JWT keys, credentials a route adds) that whoever
    /// can reach the admin port would otherwise read.
    #[serde(default)]
    pub config_dump_secrets: bool,
    /// DNS names (compared without case, any port) the admin API answers
    /// besides IP addresses and `localhost`. Default empty: a request to any
    /// other name is refused, so a web page on a name its owner re-points at
    /// the admin address (DNS rebinding) cannot read the answers; a name listed
    /// here is one you control, not the page's.
    #[serde(default)]
    pub allowed_hosts: Vec<Spanned<String>>,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            address: unspanned(defaults::admin_address_str()),
            allow_non_loopback: false,
            config_dump_secrets: false,
            allowed_hosts: Vec::new(),
        }
    }
}

/// The access log: one line per request, JSON unless `format` says otherwise.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLog {
    /// `stdout`, `stderr`, or a file path (appended to; relative to the config file).
    pub path: String,
    /// How long a line may wait in memory before the writer thread writes it out
    /// (sooner once 64KiB are waiting). Default 1s (Envoy's `--file-flush-interval-msec` is 10s): `tail -f` keeps up.
    #[serde(default = "defaults::access_log_flush_interval")]
    pub flush_interval: Dur,
    /// The most bytes of lines held in memory while the writer is behind (a slow
    /// disk, a blocked pipe); past it new lines are dropped and counted. Default 16MiB.
    #[serde(default = "defaults::access_log_buffer_limit")]
    pub buffer_limit: ByteSize,
    /// A text line of Envoy's command operators (`[%START_TIME%] "%REQ(:METHOD)%
    /// ..."`) instead of the default JSON object; absent = the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// A JSON object whose values are format strings (or nested objects, or
    /// literals), keys in the order written; absent = the default object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_format: Option<JsonFormat>,
    /// Which lines are written (Envoy's access-log filters, nginx's `if=`);
    /// absent = every line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<AccessLogFilter>,
}

/// `access_log` (top level and `listeners[].access_log`): one log (a
/// mapping), several (a list: every log whose filter passes gets the line), or
/// `off` (none). Serialized as written.
#[derive(Debug, Clone)]
pub enum AccessLogs {
    /// `off`: no log.
    Off,
    /// A mapping: one log.
    One(AccessLog),
    /// A list of logs.
    List(Vec<AccessLog>),
}

impl AccessLogs {
    /// The logs, in the order written (none for `off`).
    pub fn logs(&self) -> &[AccessLog] {
        match self {
            AccessLogs::Off => &[],
            AccessLogs::One(l) => std::slice::from_ref(l),
            AccessLogs::List(l) => l,
        }
    }

    /// The logs, to resolve their paths.
    pub(crate) fn logs_mut(&mut self) -> &mut [AccessLog] {
        match self {
            AccessLogs::Off => &mut [],
            AccessLogs::One(l) => std::slice::from_mut(l),
            AccessLogs::List(l) => l,
        }
    }
}

impl Serialize for AccessLogs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            AccessLogs::Off => s.serialize_str("off"),
            AccessLogs::One(l) => l.serialize(s),
            AccessLogs::List(l) => l.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for AccessLogs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = AccessLogs;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a mapping (one log), a list of mappings (several) or `off`")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<AccessLogs, E> {
                if v == "off" {
                    Ok(AccessLogs::Off)
                } else {
                    Err(E::custom(format!(
                        "`{v}` is not an access log: write a mapping (`{{ path: ... }}`), a \
                         list of them, or `off` for none"
                    )))
                }
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, m: A) -> Result<AccessLogs, A::Error> {
                AccessLog::deserialize(serde::de::value::MapAccessDeserializer::new(m))
                    .map(AccessLogs::One)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, s: A) -> Result<AccessLogs, A::Error> {
                Vec::<AccessLog>::deserialize(serde::de::value::SeqAccessDeserializer::new(s))
                    .map(AccessLogs::List)
            }
        }
        d.deserialize_any(V)
    }
}

/// `access_log.filter`: a line is written when every condition given holds.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogFilter {
    /// Statuses (`404`, `"500-599"`) whose lines are written; empty = any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub statuses: Vec<StatusRange>,
    /// Only requests (sessions) that lasted at least this long; absent = any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_duration: Option<Dur>,
    /// Only lines with one of these `%RESPONSE_FLAGS%` (`[]`: with any flag);
    /// absent = any line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_flags: Option<Vec<String>>,
    /// The share of the lines that pass the other conditions written, drawn at
    /// random. Default 100%.
    #[serde(default = "defaults::hundred_percent")]
    pub percent: Percent,
}

/// `access_log.json_format`: its keys in the order written (a line's keys come
/// out in that order), each a format string, a nested object or a literal.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JsonFormat(pub Vec<(String, JsonFormatValue)>);

/// One `json_format` value.
#[derive(Debug, Clone, PartialEq)]
pub enum JsonFormatValue {
    /// A format string (`"%RESPONSE_CODE%"`, `"%REQ(HOST)% at %START_TIME%"`).
    Text(String),
    /// A nested object.
    Object(JsonFormat),
    /// A number, a bool or null, written as it is.
    Literal(serde_json::Value),
}

impl<'de> Deserialize<'de> for JsonFormat {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Map;
        impl<'de> serde::de::Visitor<'de> for Map {
            type Value = JsonFormat;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a mapping of JSON keys to format strings")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<JsonFormat, A::Error> {
                let mut out: Vec<(String, JsonFormatValue)> = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, JsonFormatValue>()? {
                    if out.iter().any(|(o, _)| *o == k) {
                        return Err(serde::de::Error::custom(format!(
                            "key `{k}` appears twice in `json_format`"
                        )));
                    }
                    out.push((k, v));
                }
                Ok(JsonFormat(out))
            }
        }
        d.deserialize_map(Map)
    }
}

impl<'de> Deserialize<'de> for JsonFormatValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = JsonFormatValue;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a format string, a nested mapping, a number, a bool or null")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<JsonFormatValue, E> {
                Ok(JsonFormatValue::Text(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<JsonFormatValue, E> {
                Ok(JsonFormatValue::Literal(v.into()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<JsonFormatValue, E> {
                Ok(JsonFormatValue::Literal(v.into()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<JsonFormatValue, E> {
                Ok(JsonFormatValue::Literal(v.into()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<JsonFormatValue, E> {
                Ok(JsonFormatValue::Literal(
                    serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into),
                ))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<JsonFormatValue, E> {
                Ok(JsonFormatValue::Literal(serde_json::Value::Null))
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<JsonFormatValue, E> {
                Ok(JsonFormatValue::Literal(serde_json::Value::Null))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                m: A,
            ) -> Result<JsonFormatValue, A::Error> {
                JsonFormat::deserialize(serde::de::value::MapAccessDeserializer::new(m))
                    .map(JsonFormatValue::Object)
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for JsonFormat {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            match v {
                JsonFormatValue::Text(t) => m.serialize_entry(k, t)?,
                JsonFormatValue::Object(o) => m.serialize_entry(k, o)?,
                JsonFormatValue::Literal(l) => m.serialize_entry(k, l)?,
            }
        }
        m.end()
    }
}

/// Distributed tracing, as Envoy's Zipkin tracer: the trace context of every
/// request is read (W3C `traceparent`, B3) and written upstream, and a span of
/// each sampled request is sent to a Zipkin collector (`crate::trace`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Tracing {
    /// The cluster the spans are POSTed to (a Zipkin collector, or anything
    /// that reads Zipkin v2 JSON: Jaeger, Tempo, the OpenTelemetry collector).
    pub collector_cluster: Spanned<Name>,
    /// The collector's path. Default `/api/v2/spans` (Zipkin's).
    #[serde(default = "defaults::tracing_collector_path")]
    pub collector_path: String,
    /// The span's `localEndpoint.serviceName`. Default `legate`.
    #[serde(default = "defaults::tracing_service_name")]
    pub service_name: String,
    /// The share of requests without a sampling decision of their own that are
    /// sampled (Envoy's `random_sampling`). Default 100%.
    #[serde(default = "defaults::hundred_percent")]
    pub random_sampling: Percent,
    /// How long a finished span may wait before its batch is sent (sooner once
    /// 100 wait). Default 1s.
    #[serde(default = "defaults::tracing_flush_interval")]
    pub flush_interval: Dur,
    /// The most finished spans held while the collector is slow or down;
    /// past it new spans are dropped and counted. Default 1000.
    #[serde(default = "defaults::tracing_max_buffered_spans")]
    pub max_buffered_spans: u32,
}

/// A downstream listener: HTTP (with optional TLS) or TCP.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// Unique name, used in stats.
    pub name: Name,
    /// `ip:port` to bind.
    pub address: Spanned<String>,
    /// HTTP listener settings; exactly one of `http` and `tcp`.
    #[serde(default)]
    pub http: Option<HttpListener>,
    /// TCP proxy settings; exactly one of `http` and `tcp`.
    #[serde(default)]
    pub tcp: Option<TcpProxy>,
    /// TLS termination; absent = plaintext (HTTP/1.1 and h2c prior knowledge).
    #[serde(default)]
    pub tls: Option<ListenerTls>,
    /// Connection and request limits.
    #[serde(default)]
    pub limits: Limits,
    /// Transparent-proxy mode: the listener receives connections redirected by
    /// iptables `REDIRECT` and reads their original destination with
    /// `SO_ORIGINAL_DST`. Such requests go to the cluster `original_dst` names.
    #[serde(default)]
    pub original_destination: bool,
    /// This listener's access logs (one, a list, or `off`), replacing the
    /// top-level `access_log` for it (nginx's inner `access_log`); absent =
    /// the top-level ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<AccessLogs>,
    /// Read a PROXY protocol header (v1 or v2) at the start of each connection
    /// and take its addresses as the client's and the local ones; absent = none
    /// is expected (a header would be taken for the connection's own bytes).
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// `clusters[].proxy_protocol`: the header Legate sends its upstreams.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamProxyProtocol {
    /// 1 (text) or 2 (binary). Default 1, as Envoy's.
    #[serde(default = "defaults::proxy_protocol_version")]
    pub version: u8,
}

/// `listeners[].proxy_protocol`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyProtocol {
    /// Close connections without a header. Default true: a listener behind a
    /// balancer that sends one should not take connections that bypass it as
    /// coming from the balancer's own address.
    #[serde(default = "defaults::yes")]
    pub required: bool,
}

/// Settings of an HTTP listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpListener {
    /// Name of the route table (`routes:` entry) this listener serves.
    pub routes: Spanned<Name>,
    /// Whether the downstream is trusted: if so, incoming `x-forwarded-*` and
    /// `x-request-id` are kept (and appended to). Default false: at the edge, a
    /// client must not be able to forge them.
    #[serde(default)]
    pub trust_downstream: bool,
    /// How many proxies in front of this listener append to `x-forwarded-for`
    /// (Envoy's `xff_num_trusted_hops`): the client address filters see is the
    /// `x-forwarded-for` entry this many places from the right, the peer when
    /// there are fewer entries or that one is no IP address. Needs
    /// `trust_downstream`. Default 0: the peer, as every entry is the client's
    /// to write unless a proxy you run added it.
    #[serde(default)]
    pub xff_num_trusted_hops: u32,
    /// What reaches the upstream of `x-forwarded-client-cert` (XFCC), as
    /// Envoy's `forward_client_cert_details`. Default `sanitize`, as Envoy:
    /// the header is removed from every request, from a trusted downstream
    /// too, since an upstream that reads it grants the identity it names and
    /// any client of a trusted listener (any workload of a mesh) could write
    /// it.
    #[serde(default)]
    pub forward_client_cert: ForwardClientCert,
    /// Which facts of the client certificate `append_forward` and
    /// `sanitize_set` write into XFCC, after `By` and `Hash` (always
    /// written). Absent: none, as Envoy.
    #[serde(default)]
    pub set_client_cert_details: Option<ClientCertDetails>,
    /// Generate `x-request-id` when the request has none (or is untrusted).
    /// Default true: request ids cost little and make logs joinable.
    #[serde(default = "defaults::yes")]
    pub generate_request_id: bool,
    /// Send the request's `x-request-id` back on every response (Envoy's
    /// `always_set_request_id_in_response`). Default false, as Envoy: the id
    /// tells a client nothing unless it reports it.
    #[serde(default)]
    pub request_id_in_response: bool,
    /// Add `via: <value>` to requests and responses; absent = no `via` header.
    #[serde(default)]
    pub via: Option<String>,
    /// The HTTP filter chain: plugins run in this order on requests and in
    /// reverse order on responses.
    #[serde(default)]
    pub filters: Vec<Spanned<FilterRef>>,
    /// Protocol upgrades (HTTP/1.1 `Upgrade:` values, compared case-insensitively)
    /// tunnelled to the upstream; any other is refused with `403` (`upgrade_failed`),
    /// as Envoy's `upgrade_configs`. A route's `upgrades` overrides this per type.
    /// Default `[websocket]`: WebSocket is the upgrade browsers make, and its
    /// handshake is checked end to end by the upstream (`Sec-WebSocket-Key` →
    /// `Sec-WebSocket-Accept`) before either side sends frames. `h2c` is never
    /// tunnelled (its upgrade headers are removed and the request is proxied).
    #[serde(default = "defaults::upgrades")]
    pub upgrades: Vec<String>,
    /// Accept WebSocket (and the other allowed upgrades) over HTTP/2: RFC
    /// 8441's extended CONNECT, advertised with `SETTINGS_ENABLE_CONNECT_PROTOCOL`
    /// and forwarded to HTTP/1.1 upstreams as an upgrade. Default false, as
    /// Envoy's `allow_connect`: a browser that sees the setting opens its
    /// WebSockets on the HTTP/2 connection instead of its own HTTP/1.1 one,
    /// which is worth choosing rather than getting with an upgrade.
    #[serde(default)]
    pub extended_connect: bool,
    /// RFC 3986 path normalization before filters and routes (`crate::path`):
    /// unreserved escapes decoded, dot segments removed. Default true, unlike
    /// Envoy's historic false: a route or filter that matches a path the
    /// upstream resolves differently is an authorization bypass.
    #[serde(default = "defaults::yes")]
    pub normalize_path: bool,
    /// Merge runs of `/` in the path into one. Default false, as Envoy: `//` is
    /// a distinct path to RFC 3986 and to some upstreams.
    #[serde(default)]
    pub merge_slashes: bool,
    /// What `%2F` and `%5C` in the path become. Default `keep`, as Envoy.
    #[serde(default)]
    pub path_with_escaped_slashes: EscapedSlashes,
    /// What a request header whose name holds `_` does (Envoy's
    /// `headers_with_underscores_action`). Default `allow`, as Envoy: names
    /// with `_` are valid HTTP; `reject` or `drop` at an edge in front of
    /// upstreams that read headers as CGI variables (`x_user` and `x-user`
    /// are both `HTTP_X_USER` there).
    #[serde(default)]
    pub headers_with_underscores: UnderscoreHeaders,
    /// Longest a request may go without activity (headers, body data or
    /// trailers of the request or the response), as Envoy's connection
    /// manager's `stream_idle_timeout`: before the response head, the client
    /// gets `408` (`stream_idle_timeout`); after it, the stream is reset (an
    /// HTTP/1.1 connection is closed). A route's `idle_timeout` overrides it.
    /// Default 5m, as Envoy: far above any live stream's silence, it only
    /// frees what a stalled peer would hold forever; `0s` disables.
    #[serde(default = "defaults::stream_idle_timeout")]
    pub stream_idle_timeout: Dur,
    /// Compress responses with gzip for clients that accept it (Envoy's
    /// compressor filter, nginx's `gzip on`); absent = never.
    #[serde(default)]
    pub compression: Option<Compression>,
}

/// `listeners[].http.compression`: gzip responses, as Envoy's compressor.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Compression {
    /// Responses whose `content-length` is below this are sent as they are.
    /// Default 30 bytes, as Envoy: gzip's own 18 bytes of framing make smaller
    /// ones larger.
    #[serde(default = "defaults::compression_min_length")]
    pub min_content_length: ByteSize,
    /// Media types compressed (a response's `content-type` without parameters,
    /// compared case-insensitively). Default Envoy's list of text types.
    #[serde(default = "defaults::compression_content_types")]
    pub content_types: Vec<String>,
    /// zlib's level, 1 (fastest) to 9 (smallest). Default 6, zlib's and
    /// Envoy's default.
    #[serde(default = "defaults::compression_level")]
    pub level: u32,
    /// Brotli too, for clients that accept it (preferred over gzip at equal
    /// weight: smaller); absent = not offered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brotli: Option<Brotli>,
    /// zstd too, for clients that accept it (preferred over brotli and gzip
    /// at equal weight: the least CPU for its size); absent = not offered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zstd: Option<Zstd>,
}

/// `compression.zstd`: the encoder's settings (Envoy's zstd compressor's).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Zstd {
    /// 1 (fastest) to 6. Default 3, zstd's and Envoy's. 7 and above hold
    /// 6MiB to 90MiB per response: refused.
    #[serde(default = "defaults::zstd_level")]
    pub level: u32,
    /// log2 of the window, 10 to 23 (RFC 9659 caps HTTP's at 8MiB). Default
    /// 19 (512KiB): each response's encoder holds about 2MiB at level 3.
    #[serde(default = "defaults::zstd_window_bits")]
    pub window_bits: u32,
}

/// `compression.brotli`: the encoder's settings (Envoy's brotli compressor's).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Brotli {
    /// 0 (fastest) to 6. Default 3, Envoy's: near gzip's CPU cost, smaller
    /// output. 7 and above hold 8MiB to 128MiB per response: refused.
    #[serde(default = "defaults::brotli_quality")]
    pub quality: u32,
    /// log2 of the window, 10 to 22. Default 18 (256KiB, Envoy's): the memory a
    /// stream's encoder holds grows with it.
    #[serde(default = "defaults::brotli_window_bits")]
    pub window_bits: u32,
}

/// What `x-forwarded-client-cert` (XFCC) the upstream gets (Envoy's
/// `forward_client_cert_details`). The modes that read or write the client
/// certificate apply to connections that presented a verified one (mTLS);
/// on any other the header is removed, as with `sanitize`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ForwardClientCert {
    /// Remove the header from every request.
    #[default]
    Sanitize,
    /// mTLS: forward the incoming header unchanged.
    ForwardOnly,
    /// mTLS: append this hop's element (the client certificate) to the
    /// incoming header, after a `,`.
    AppendForward,
    /// mTLS: replace the header with this hop's element.
    SanitizeSet,
    /// Forward the incoming header unchanged, mTLS or not.
    AlwaysForwardOnly,
}

impl ForwardClientCert {
    /// Whether the mode writes this hop's element (and so reads
    /// `set_client_cert_details`).
    pub fn sets(self) -> bool {
        matches!(self, Self::AppendForward | Self::SanitizeSet)
    }

    /// Whether the mode passes on what the downstream sent.
    pub fn forwards(self) -> bool {
        matches!(
            self,
            Self::ForwardOnly | Self::AppendForward | Self::AlwaysForwardOnly
        )
    }

    /// The name in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sanitize => "sanitize",
            Self::ForwardOnly => "forward_only",
            Self::AppendForward => "append_forward",
            Self::SanitizeSet => "sanitize_set",
            Self::AlwaysForwardOnly => "always_forward_only",
        }
    }
}

/// The client-certificate facts XFCC carries (Envoy's
/// `set_current_client_cert_details`); each is off unless set.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClientCertDetails {
    /// `Subject="<RFC 4514 subject>"`, written even when empty.
    #[serde(default)]
    pub subject: bool,
    /// `URI=<uri>` for each URI SAN (`URI=` when there is none): the SPIFFE id.
    #[serde(default)]
    pub uri: bool,
    /// `DNS=<name>` for each DNS SAN.
    #[serde(default)]
    pub dns: bool,
    /// `Cert="<URL-encoded PEM>"`: the client certificate.
    #[serde(default)]
    pub cert: bool,
    /// `Chain="<URL-encoded PEM>"`: the chain the client sent, its
    /// certificate first.
    #[serde(default)]
    pub chain: bool,
}

/// What to do with escaped slashes (`%2F`, `%5C`) in a request path (Envoy's
/// `path_with_escaped_slashes_action`).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EscapedSlashes {
    /// Leave them escaped: they are not separators to routes or filters.
    #[default]
    Keep,
    /// Refuse the request with 400.
    Reject,
    /// Decode them (`%2F` → `/`, `%5C` → `\`) and forward the decoded path.
    Unescape,
}

/// What to do with a request header whose name contains `_` (Envoy's
/// `headers_with_underscores_action`; nginx drops them by default,
/// `underscores_in_headers off`).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UnderscoreHeaders {
    /// Pass them on.
    #[default]
    Allow,
    /// Remove them before filters, routes and the upstream see the request.
    Drop,
    /// Refuse the request with 400.
    Reject,
}

/// Settings of a TCP proxy listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TcpProxy {
    /// Cluster to forward bytes to.
    pub cluster: Spanned<Name>,
    /// Close the connection after this long with no bytes either way. Default 1h,
    /// as Envoy's tcp_proxy: long-lived database connections are normal.
    #[serde(default = "defaults::tcp_idle_timeout")]
    pub idle_timeout: Dur,
    /// The network (L4) filter chain: plugins that are network filters (a
    /// component exporting `network-handler`, or a proxy-wasm module). Downstream
    /// data runs through them in this order, upstream data in reverse order.
    #[serde(default)]
    pub filters: Vec<Spanned<FilterRef>>,
}

/// TLS termination on a listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// Certificates; the first is the default when SNI matches none.
    pub certificates: Vec<Spanned<CertificateConfig>>,
    /// Lowest TLS version accepted: `"1.2"` (default) or `"1.3"`.
    #[serde(default)]
    pub min_version: TlsVersion,
    /// Client-certificate verification (mTLS); absent = no client certificates.
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
    /// The cipher suites accepted, by IANA or OpenSSL name (Envoy's
    /// `tls_params.cipher_suites`, nginx's `ssl_ciphers`); empty = every
    /// suite rustls has (all AEAD with forward secrecy, so the default is
    /// what a hardening guide would pick).
    #[serde(default)]
    pub cipher_suites: Vec<String>,
    /// The key exchange groups accepted (Envoy's `ecdh_curves`, nginx's
    /// `ssl_ecdh_curve`): `X25519`, `P-256`, `P-384`; empty = all three.
    #[serde(default)]
    pub ecdh_curves: Vec<String>,
    /// Files of 80 random bytes each (`openssl rand 80`) that encrypt and
    /// decrypt stateless session tickets (Envoy's `session_ticket_keys`,
    /// nginx's `ssl_session_ticket_key`): the first encrypts new tickets, all
    /// decrypt. Instances given the same files resume each other's sessions,
    /// and so does one process across reloads and hot restarts. Empty = a
    /// random key of this listener (rotated every 6 hours), kept by a reload
    /// that leaves `tls` as it is.
    #[serde(default)]
    pub session_ticket_keys: Vec<PathBuf>,
    /// Issue stateless session tickets. Default true (resumption across the
    /// listener's workers without a shared cache); false = sessions resume
    /// only from this process's in-memory cache of the listener (Envoy's
    /// `disable_stateless_session_resumption`, nginx's
    /// `ssl_session_tickets off`).
    #[serde(default = "defaults::yes")]
    pub session_tickets: bool,
}

/// A certificate chain, its key, and the SNI names it serves.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// PEM certificate chain file.
    pub cert: PathBuf,
    /// PEM private key file; an encrypted PKCS#8 key needs `key_password_file`.
    pub key: PathBuf,
    /// A file whose first line is the password of an encrypted `key` (nginx's
    /// `ssl_password_file`, Envoy's `password`). Absent = the key is not
    /// encrypted.
    #[serde(default)]
    pub key_password_file: Option<PathBuf>,
    /// A DER OCSP response for the certificate (`openssl ocsp -respout`),
    /// stapled to handshakes while it is current (Envoy's `ocsp_staple`,
    /// nginx's `ssl_stapling_file`). Absent = no stapling.
    #[serde(default)]
    pub ocsp_staple: Option<PathBuf>,
    /// SNI names served by this certificate: exact or `*.suffix`. Absent = the names
    /// in the certificate's subjectAltName.
    #[serde(default)]
    pub server_names: Vec<String>,
}

/// Lowest accepted TLS protocol version.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    #[serde(rename = "1.2")]
    V1_2,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    V1_3,
}

/// Client-certificate verification.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientAuth {
    /// PEM file with the CA certificates client certificates must chain to.
    pub ca: PathBuf,
    /// Reject clients without a certificate. Default true (that is what mTLS means);
    /// false = verify a certificate when one is sent, allow anonymous clients.
    #[serde(default = "defaults::yes")]
    pub required: bool,
    /// PEM file of certificate revocation lists (`BEGIN X509 CRL` blocks, one
    /// per CA) a client certificate is checked against; absent = no
    /// revocation check. Re-read when it changes, as the certificates are.
    #[serde(default)]
    pub crl: Option<PathBuf>,
    /// Check only the client's own certificate against `crl`, not the
    /// intermediates above it. Default false, as Envoy's
    /// `only_verify_leaf_cert_crl`: every CA of the chain needs its CRL in
    /// `crl`, so a certificate under a CA without one is refused rather than
    /// passed unchecked.
    #[serde(default)]
    pub only_verify_leaf_cert_crl: bool,
}

/// Per-listener limits. Every default is chosen to be safe at the edge.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Open downstream connections per listener (across workers). Default 10000:
    /// far above normal use, well below the fd limit Legate raises itself to.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: u32,
    /// Total size of request headers. Default 60KiB, as Envoy.
    #[serde(default = "defaults::max_request_headers_size")]
    pub max_request_headers_size: ByteSize,
    /// Number of request headers. Default 100, as Envoy.
    #[serde(default = "defaults::max_request_headers")]
    pub max_request_headers: u32,
    /// Time allowed for a client to send a full request head (slowloris guard).
    /// Default 10s: a real client sends its headers in milliseconds.
    #[serde(default = "defaults::header_read_timeout")]
    pub header_read_timeout: Dur,
    /// Close a connection with no active request for this long. Default 60s, near
    /// nginx's keepalive_timeout.
    #[serde(default = "defaults::idle_timeout")]
    pub idle_timeout: Dur,
    /// HTTP/2 concurrent streams per connection. Default 100, Envoy's recommendation
    /// for edge proxies.
    #[serde(default = "defaults::max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// HTTP/2 flow-control window of each client stream (Envoy's
    /// `initial_stream_window_size`): what a client may upload on one stream
    /// before Legate passed it on, which Legate holds while the upstream does
    /// not read. Default 1MiB, hyper's.
    #[serde(default = "defaults::listener_stream_window_size")]
    pub initial_stream_window_size: ByteSize,
    /// HTTP/2 flow-control window of each client connection (Envoy's
    /// `initial_connection_window_size`). Default: `initial_stream_window_size`
    /// × `max_concurrent_streams` (at most 2^31-1), so that uploads whose
    /// upstream stopped reading never shut the window of the connection's
    /// other streams.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_connection_window_size: Option<ByteSize>,
    /// The longest an HTTP/1.1 lingering close reads and discards what the
    /// client still sends. Default 30s, nginx's `lingering_time`; 0s turns
    /// lingering close off.
    #[serde(default = "defaults::lingering_time")]
    pub lingering_time: Dur,
    /// How long a lingering close waits for the client's next bytes (or its
    /// close). Default 5s, nginx's `lingering_timeout`.
    #[serde(default = "defaults::lingering_timeout")]
    pub lingering_timeout: Dur,
    /// Requests one HTTP connection serves before it is closed gracefully
    /// (Envoy's `max_requests_per_connection`, nginx's `keepalive_requests`).
    /// Absent = no limit, as Envoy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    /// How long one HTTP connection lives before it is closed gracefully
    /// (Envoy's `max_connection_duration`, nginx's `keepalive_time`). Absent =
    /// no limit, as Envoy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connection_duration: Option<Dur>,
    /// HTTP/2 keep-alive PINGs to clients (Envoy's `connection_keepalive`
    /// of the connection manager's `http2_protocol_options`): a client that
    /// does not answer one within `timeout` is gone, and its connection is
    /// closed with its streams. Absent = none, as Envoy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_keepalive: Option<ConnectionKeepalive>,
}

impl Limits {
    /// The HTTP/2 stream window of client connections.
    pub fn stream_window(&self) -> u32 {
        h2_window(self.initial_stream_window_size.0)
    }

    /// The HTTP/2 connection window of client connections: the configured
    /// one, else the stream window × `max_concurrent_streams`.
    pub fn connection_window(&self) -> u32 {
        h2_connection_window(
            self.initial_stream_window_size,
            self.initial_connection_window_size,
            self.max_concurrent_streams,
        )
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: defaults::max_connections(),
            max_request_headers_size: defaults::max_request_headers_size(),
            max_request_headers: defaults::max_request_headers(),
            header_read_timeout: defaults::header_read_timeout(),
            idle_timeout: defaults::idle_timeout(),
            max_concurrent_streams: defaults::max_concurrent_streams(),
            initial_stream_window_size: defaults::listener_stream_window_size(),
            initial_connection_window_size: None,
            lingering_time: defaults::lingering_time(),
            lingering_timeout: defaults::lingering_timeout(),
            max_requests_per_connection: None,
            max_connection_duration: None,
            connection_keepalive: None,
        }
    }
}

/// A named route table: the virtual hosts an HTTP listener serves.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTable {
    /// Unique name, referred to by listeners.
    pub name: Name,
    /// Virtual hosts, matched by Host/:authority (see [`VirtualHost::domains`]).
    pub virtual_hosts: Vec<Spanned<VirtualHost>>,
}

/// A virtual host: a set of domains and the routes that serve them.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualHost {
    /// Unique name within the table, used in stats.
    pub name: Name,
    /// Host patterns: exact (`api.example.com`), suffix wildcard (`*.example.com`),
    /// prefix wildcard (`api.*`) or `*` (default vhost). A port in the request's host
    /// is ignored unless the pattern has one. Matching order: exact, then the longest
    /// suffix wildcard, then the longest prefix wildcard, then `*`.
    pub domains: Vec<Spanned<String>>,
    /// Routes, tried in order; the first that matches wins.
    pub routes: Vec<Spanned<Route>>,
    /// Headers changed in requests of every route here (after the route's own, so the
    /// virtual host's `set` has the last word, as in Envoy).
    #[serde(default)]
    pub request_headers: HeaderOps,
    /// Headers changed in responses of every route here (after the route's own).
    #[serde(default)]
    pub response_headers: HeaderOps,
    /// The CORS policy of every route here without its own (Envoy's virtual host
    /// `cors`); absent = none: requests pass as they are.
    #[serde(default)]
    pub cors: Option<Cors>,
}

/// A CORS policy (Envoy's `CorsPolicy`): which origins a browser may call the
/// routes from, answered by Legate for preflights and added to responses.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Cors {
    /// Origins allowed, each a string condition on the request's `origin`
    /// (`{ exact: "*" }` allows any). Required, not empty.
    pub allow_origins: Vec<StringMatch>,
    /// `access-control-allow-methods` of a preflight's answer. Default none:
    /// only the CORS-safelisted methods (GET, HEAD, POST).
    #[serde(default)]
    pub allow_methods: Vec<String>,
    /// `access-control-allow-headers` of a preflight's answer. Default none:
    /// only the CORS-safelisted request headers.
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// `access-control-expose-headers` of a response. Default none.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// `access-control-max-age` of a preflight's answer; absent = none (the
    /// browser's default, 5 seconds).
    #[serde(default)]
    pub max_age: Option<Dur>,
    /// `access-control-allow-credentials: true`: cookies and authorization may
    /// be sent. Default false.
    #[serde(default)]
    pub allow_credentials: bool,
}

/// Header manipulation: remove, then set, then add.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderOps {
    /// Appended (a header already present keeps its values).
    #[serde(default = "defaults::spanned")]
    pub add: Spanned<BTreeMap<String, String>>,
    /// Replaced (every existing value removed first).
    #[serde(default = "defaults::spanned")]
    pub set: Spanned<BTreeMap<String, String>>,
    /// Removed.
    #[serde(default = "defaults::spanned")]
    pub remove: Spanned<Vec<String>>,
}

impl Default for HeaderOps {
    fn default() -> Self {
        HeaderOps {
            add: defaults::spanned(),
            set: defaults::spanned(),
            remove: defaults::spanned(),
        }
    }
}

impl HeaderOps {
    /// True when no operation is configured.
    pub fn is_empty(&self) -> bool {
        self.add.value.is_empty() && self.set.value.is_empty() && self.remove.value.is_empty()
    }
}

/// A route: a match and exactly one action.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Name used in stats and the access log; default `<vhost>/<index>`.
    #[serde(default)]
    pub name: Option<Name>,
    /// What the request must look like.
    #[serde(rename = "match", default)]
    pub matcher: RouteMatch,
    /// Action: send to this cluster.
    #[serde(default)]
    pub cluster: Option<Spanned<Name>>,
    /// Action: split across clusters by weight (canary, blue-green).
    #[serde(default)]
    pub weighted_clusters: Option<Spanned<Vec<WeightedCluster>>>,
    /// Action: answer with a redirect.
    #[serde(default)]
    pub redirect: Option<Redirect>,
    /// Action: answer with a fixed status and body.
    #[serde(default)]
    pub direct_response: Option<DirectResponse>,
    /// Action: answer a load balancer's health check (Envoy's health check
    /// filter): 200 while Legate serves, 503 once it drains or fails them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthAnswer>,
    /// Path and host rewrite before forwarding.
    #[serde(default)]
    pub rewrite: Option<Rewrite>,
    /// Whole-request timeout, retries included. Default 15s, as Envoy; `0s` disables.
    #[serde(default = "defaults::route_timeout")]
    pub timeout: Dur,
    /// Timeout of each upstream attempt; absent (or `0s`) = only the route timeout applies.
    #[serde(default)]
    pub per_try_timeout: Option<Dur>,
    /// Stream idle timeout on this route, overriding the listener's
    /// `http.stream_idle_timeout` (Envoy's route `idle_timeout`); absent = the
    /// listener's, `0s` disables it here.
    #[serde(default)]
    pub idle_timeout: Option<Dur>,
    /// Retry policy; absent = no retries.
    #[serde(default)]
    pub retry: Option<RetryPolicy>,
    /// Largest request body accepted (413 beyond). Absent = unlimited: Legate streams
    /// bodies without buffering them, so a large body costs no memory.
    #[serde(default)]
    pub max_request_body: Option<ByteSize>,
    /// Fire-and-forget copies of the route's requests to another cluster.
    #[serde(default)]
    pub mirror: Option<Mirror>,
    /// Delays and aborts injected into a share of the route's requests
    /// (Envoy's HTTP fault filter); absent = none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// Request headers to change (applied before the virtual host's).
    #[serde(default)]
    pub request_headers: HeaderOps,
    /// Response headers to change (applied before the virtual host's).
    #[serde(default)]
    pub response_headers: HeaderOps,
    /// Per-route overrides of the listener's filters, by plugin name.
    #[serde(default)]
    pub filters: BTreeMap<Name, RouteFilter>,
    /// This route's CORS policy, replacing its virtual host's; absent = the
    /// virtual host's.
    #[serde(default)]
    pub cors: Option<Cors>,
    /// `false`: the listener's `http.compression` leaves this route's responses
    /// alone (an event stream, content compressed already). Default true.
    #[serde(default = "defaults::yes")]
    pub compression: bool,
    /// `false`: with a top-level `tracing`, this route's requests are passed
    /// on as without it (their trace headers untouched, no span): health
    /// checks and other noise. Default true.
    #[serde(default = "defaults::yes")]
    pub tracing: bool,
    /// Per-route overrides of the listener's `http.upgrades`, by upgrade type:
    /// `true` tunnels it on this route even if the listener does not list it,
    /// `false` refuses it here (Envoy's route `upgrade_configs` with `enabled`).
    /// Types not named follow the listener.
    #[serde(default)]
    pub upgrades: BTreeMap<String, bool>,
}

/// The match part of a route; all given conditions must hold.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// Path starts with this (the default is `/`: everything).
    #[serde(default)]
    pub prefix: Option<String>,
    /// Path equals this (query string excluded).
    #[serde(default)]
    pub path: Option<String>,
    /// Path matches this regular expression in full (query string excluded).
    #[serde(default)]
    pub regex: Option<Spanned<String>>,
    /// Methods allowed (any if empty).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Header conditions.
    #[serde(default)]
    pub headers: Vec<Spanned<ValueMatch>>,
    /// Query-parameter conditions.
    #[serde(default)]
    pub query: Vec<Spanned<ValueMatch>>,
    /// Conditions on the connection's verified client certificate (a
    /// listener with `tls.client_auth`).
    #[serde(default)]
    pub client_cert: Option<ClientCertMatch>,
    /// The client's address is in one of these ranges (nginx's `allow`); empty
    /// = any client.
    #[serde(default)]
    pub source_ips: Vec<Cidr>,
}

/// Conditions on the client certificate a listener verified (mTLS); all given
/// must hold. A condition on the subject or a SAN fails for a connection without
/// one. (Envoy's route `tls_context` match and RBAC's `authenticated`
/// principal, in the route match.)
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCertMatch {
    /// `true`: the client presented a certificate (one the listener's CA
    /// verified: the handshake fails otherwise); `false`: it presented none.
    #[serde(default)]
    pub presented: Option<bool>,
    /// Its subject, RFC 4514 (`CN=client,O=Example`), as the access log's
    /// `downstream_peer_subject`.
    #[serde(default)]
    pub subject: Option<StringMatch>,
    /// One of its subjectAltName URIs (a SPIFFE id).
    #[serde(default)]
    pub uri_san: Option<StringMatch>,
    /// One of its subjectAltName DNS names.
    #[serde(default)]
    pub dns_san: Option<StringMatch>,
}

/// A test of a string: exactly one of `exact`, `prefix`, `regex` (Envoy's
/// `StringMatcher`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StringMatch {
    /// The string equals this.
    #[serde(default)]
    pub exact: Option<String>,
    /// The string starts with this.
    #[serde(default)]
    pub prefix: Option<String>,
    /// The string matches this regular expression in full.
    #[serde(default)]
    pub regex: Option<String>,
}

/// A condition on a header or query parameter: exactly one of `exact`, `regex`,
/// `present`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ValueMatch {
    /// Header or parameter name (headers: case-insensitive).
    pub name: String,
    /// Value equals this.
    #[serde(default)]
    pub exact: Option<String>,
    /// Value matches this regular expression in full.
    #[serde(default)]
    pub regex: Option<String>,
    /// `true`: the name is present; `false`: it is absent.
    #[serde(default)]
    pub present: Option<bool>,
}

/// One cluster of a weighted split.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedCluster {
    /// Cluster name.
    pub cluster: Spanned<Name>,
    /// Relative weight (0 = no traffic).
    pub weight: u32,
}

/// A redirect answer. Unset parts keep the request's.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    /// New scheme (`http`/`https`).
    #[serde(default)]
    pub scheme: Option<String>,
    /// New host (may include a port).
    #[serde(default)]
    pub host: Option<String>,
    /// New path (replaces the whole path; the query is kept unless `strip_query`).
    #[serde(default)]
    pub path: Option<String>,
    /// Replace the matched route prefix with this.
    #[serde(default)]
    pub prefix_rewrite: Option<String>,
    /// Status: 301 (default), 302, 303, 307 or 308.
    #[serde(default = "defaults::redirect_code")]
    pub code: Spanned<u16>,
    /// Drop the query string.
    #[serde(default)]
    pub strip_query: bool,
}

/// A fixed answer.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DirectResponse {
    /// Status code.
    pub status: Spanned<u16>,
    /// Body (UTF-8 text); absent = empty.
    #[serde(default)]
    pub body: Option<String>,
    /// Content type of the body. Default `text/plain; charset=utf-8`.
    #[serde(default)]
    pub content_type: Option<String>,
}

/// A route's `health`: the answer to a load balancer's health check.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthAnswer {
    /// Clusters that must have at least this share of their endpoints
    /// healthy for a 200 (Envoy's `cluster_min_healthy_percentages`); empty =
    /// none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub min_healthy: Vec<MinHealthy>,
}

/// One `health.min_healthy` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MinHealthy {
    /// The cluster.
    pub cluster: Spanned<Name>,
    /// The least share of its endpoints that must be healthy.
    pub percent: Percent,
}

/// Request rewrite before forwarding.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    /// Replace the matched `prefix` with this (route must match by prefix).
    #[serde(default)]
    pub prefix: Option<String>,
    /// Regex substitution on the path.
    #[serde(default)]
    pub regex: Option<RegexRewrite>,
    /// Replace the Host/:authority sent upstream.
    #[serde(default)]
    pub host: Option<String>,
}

/// A regex path substitution (`$1`-style group references allowed).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegexRewrite {
    /// Pattern, matched anywhere in the path; every match is replaced.
    pub pattern: Spanned<String>,
    /// Replacement.
    pub substitution: String,
}

/// When and how often to retry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Conditions that trigger a retry.
    pub retry_on: Vec<RetryOn>,
    /// Retries after the first attempt. Default 1, as Envoy.
    #[serde(default = "defaults::num_retries")]
    pub num_retries: u32,
    /// Statuses that trigger a retry with `retriable-status-codes`.
    #[serde(default)]
    pub retriable_status_codes: Vec<u16>,
    /// First backoff; each retry doubles it (with full jitter). Default 25ms, as Envoy.
    #[serde(default = "defaults::backoff_base")]
    pub backoff_base: Dur,
    /// Backoff ceiling. Default 10 × `backoff_base`, as Envoy.
    #[serde(default)]
    pub backoff_max: Option<Dur>,
    /// Retry non-idempotent methods (POST, PATCH) too. Default false: a retried POST
    /// may apply twice.
    #[serde(default)]
    pub retry_non_idempotent: bool,
    /// Largest request body kept for replaying on retry; a larger body is streamed
    /// and not retried. Default 64KiB.
    #[serde(default = "defaults::retry_buffer")]
    pub buffer_limit: ByteSize,
}

/// A retry condition (Envoy's names).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// Any 5xx response, connect failure or reset.
    #[serde(rename = "5xx")]
    FiveXx,
    /// 502, 503, 504, connect failure or reset.
    GatewayError,
    /// The upstream connection could not be made.
    ConnectFailure,
    /// The upstream connection or stream was reset before a response.
    Reset,
    /// The statuses in `retriable_status_codes`.
    RetriableStatusCodes,
    /// The upstream refused the stream unprocessed (HTTP/2 `REFUSED_STREAM`, or
    /// above a GOAWAY's last stream): retried whatever the method.
    RefusedStream,
    /// gRPC status 1 `CANCELLED` in the response head (a trailers-only
    /// response), whatever the method, as Envoy's gRPC conditions.
    Cancelled,
    /// gRPC status 4 `DEADLINE_EXCEEDED` in the response head.
    DeadlineExceeded,
    /// gRPC status 8 `RESOURCE_EXHAUSTED` in the response head.
    ResourceExhausted,
    /// gRPC status 13 `INTERNAL` in the response head.
    Internal,
    /// gRPC status 14 `UNAVAILABLE` in the response head.
    Unavailable,
}

impl RetryOn {
    /// The gRPC status code this condition retries, if it is a gRPC one.
    pub fn grpc_status(self) -> Option<u8> {
        match self {
            RetryOn::Cancelled => Some(1),
            RetryOn::DeadlineExceeded => Some(4),
            RetryOn::ResourceExhausted => Some(8),
            RetryOn::Internal => Some(13),
            RetryOn::Unavailable => Some(14),
            _ => None,
        }
    }
}

/// An upstream cluster.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Unique name.
    pub name: Name,
    /// Endpoints. May be empty only for an `original_dst` cluster.
    #[serde(default)]
    pub endpoints: Vec<Spanned<EndpointConfig>>,
    /// Use each connection's original destination (SO_ORIGINAL_DST) as the endpoint,
    /// for transparent sidecars; `endpoints` must then be empty.
    #[serde(default)]
    pub original_dst: bool,
    /// Load-balancing policy. Default `round_robin`.
    #[serde(default)]
    pub lb_policy: LbPolicy,
    /// The hash key for `ring_hash`.
    #[serde(default)]
    pub hash_on: Option<HashOn>,
    /// Upstream protocol. Default `http1`.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// TCP (and TLS) connect timeout. Default 5s, as Envoy.
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: Dur,
    /// TLS to the upstream; absent = plaintext.
    #[serde(default)]
    pub tls: Option<UpstreamTls>,
    /// Idle keep-alive connections kept per endpoint per worker. Default 64.
    #[serde(default = "defaults::max_idle")]
    pub max_idle_per_endpoint: u32,
    /// Close an idle pooled connection after this long. Default 60s, below nginx's
    /// 75s keep-alive so Legate closes first; set it below the upstream's own idle
    /// timeout when that is shorter (Node.js and Apache close after 5s).
    #[serde(default = "defaults::pool_idle_timeout")]
    pub idle_timeout: Dur,
    /// Streams an HTTP/2 connection carries at once before the pool opens another
    /// connection to the endpoint (Envoy's `max_concurrent_streams`). Default 100,
    /// the least RFC 9113 recommends a server allow, so it stays within what the
    /// upstream accepts.
    #[serde(default = "defaults::cluster_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// HTTP/2 flow-control window of each stream (Envoy's
    /// `initial_stream_window_size`): what the upstream may send on one
    /// stream before Legate passed it on, which Legate holds while the client
    /// does not read. Default 2MiB.
    #[serde(default = "defaults::initial_stream_window_size")]
    pub initial_stream_window_size: ByteSize,
    /// HTTP/2 flow-control window of each connection (Envoy's
    /// `initial_connection_window_size`). Default: `initial_stream_window_size`
    /// × `max_concurrent_streams` (at most 2^31-1), so that streams whose
    /// clients stopped reading never shut the window of their connection's
    /// other streams.
    #[serde(default)]
    pub initial_connection_window_size: Option<ByteSize>,
    /// HTTP/2 keep-alive PINGs (Envoy's `connection_keepalive`); absent = none.
    #[serde(default)]
    pub connection_keepalive: Option<ConnectionKeepalive>,
    /// Active health checking of the endpoints; absent = none.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// Passive outlier detection (ejection on errors seen by requests); absent = none.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    /// Below this share of available endpoints, balance across all of them (and count
    /// `lb_healthy_panic`). Default 50%, as Envoy; `0%` disables panic mode.
    #[serde(default = "defaults::panic_threshold")]
    pub panic_threshold: Percent,
    /// Send each upstream connection's PROXY protocol header first (TCP
    /// listeners' clusters only); absent = none.
    #[serde(default)]
    pub proxy_protocol: Option<UpstreamProxyProtocol>,
    /// How much more than its share a priority level can take, in percent (Envoy's
    /// `overprovisioning_factor`): a level counts as whole while its available share
    /// of endpoints times this is at least 100%. Default 140, as Envoy.
    #[serde(default = "defaults::overprovisioning_factor")]
    pub overprovisioning_factor: u32,
    /// Limits on what the cluster may have in flight, across all workers.
    #[serde(default)]
    pub circuit_breakers: CircuitBreakers,
    /// Where the endpoints come from: `static` (the `endpoints` list, default),
    /// `dns` (the `endpoints` host names, re-resolved) or `file` (a watched file).
    #[serde(default)]
    pub discovery: Discovery,
    /// A latency-driven limit on attempts in flight; absent = none.
    #[serde(default)]
    pub adaptive_concurrency: Option<AdaptiveConcurrency>,
    /// Prefer endpoints in the process's `local_zone`; absent = zones are ignored.
    #[serde(default)]
    pub zone_aware: Option<ZoneAware>,
    /// The process's zone (the top-level `local_zone`), copied here when the config
    /// is loaded so a cluster needs nothing else.
    #[serde(skip)]
    pub local_zone: Option<String>,
}

/// The largest HTTP/2 flow-control window (RFC 9113 §6.9.1: 2^31-1).
pub const MAX_H2_WINDOW: u64 = (1 << 31) - 1;
/// The smallest HTTP/2 flow-control window a cluster may set: the protocol's
/// initial 65535 (RFC 9113 §6.9.2), as Envoy's lower bound.
pub const MIN_H2_WINDOW: u64 = 65_535;

impl Cluster {
    /// The HTTP/2 stream window, clamped into the protocol's range (validation
    /// refuses values out of it).
    pub fn stream_window(&self) -> u32 {
        h2_window(self.initial_stream_window_size.0)
    }

    /// The HTTP/2 connection window: the configured one, else the stream
    /// window × `max_concurrent_streams` (at most 2^31-1).
    pub fn connection_window(&self) -> u32 {
        h2_connection_window(
            self.initial_stream_window_size,
            self.initial_connection_window_size,
            self.max_concurrent_streams,
        )
    }
}

/// An HTTP/2 flow-control window of `bytes`, clamped into the protocol's range
/// (validation refuses values out of it).
fn h2_window(bytes: u64) -> u32 {
    u32::try_from(bytes.clamp(MIN_H2_WINDOW, MAX_H2_WINDOW)).unwrap_or(u32::MAX >> 1)
}

/// An HTTP/2 connection window: `configured`, else the stream window ×
/// `streams`, so that streams stalled by their peer never shut the window of
/// their connection's other streams (at most 2^31-1).
fn h2_connection_window(stream: ByteSize, configured: Option<ByteSize>, streams: u32) -> u32 {
    h2_window(match configured {
        Some(w) => w.0,
        None => u64::from(h2_window(stream.0)).saturating_mul(u64::from(streams.max(1))),
    })
}

/// HTTP/2 keep-alive PINGs on a cluster's connections, or a listener's
/// (Envoy's `connection_keepalive`); see docs/config.md.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionKeepalive {
    /// A PING is sent after this long without a frame from the peer (to an
    /// upstream while a stream is open; to a client whatever it has open).
    /// Required.
    pub interval: Dur,
    /// The connection is closed (its streams reset) when a PING is not answered
    /// within this. Default 20s.
    #[serde(default = "defaults::keepalive_timeout")]
    pub timeout: Dur,
}

/// Adaptive concurrency (gradient controller) of a cluster; see docs/config.md.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveConcurrency {
    /// How often the limit is recomputed from the window's p90 latency. Default 100ms.
    #[serde(default = "defaults::ac_sample_window")]
    pub sample_window: Dur,
    /// How often minRTT is measured again. Default 60s.
    #[serde(default = "defaults::ac_min_rtt_interval")]
    pub min_rtt_interval: Dur,
    /// A random extra delay, up to this share of `min_rtt_interval`, before each
    /// new minRTT measurement, so a fleet started together does not pin all its
    /// limits at the same moment. Default 15%, as Envoy.
    #[serde(default = "defaults::ac_jitter")]
    pub jitter: Percent,
    /// Attempts sampled (at `min_concurrency`) per minRTT measurement. Default 50.
    #[serde(default = "defaults::ac_min_rtt_samples")]
    pub min_rtt_samples: u32,
    /// Latency tolerated above minRTT before the limit shrinks. Default 25%.
    #[serde(default = "defaults::ac_buffer")]
    pub buffer: Percent,
    /// The lowest limit, and the one used while measuring minRTT. Default 3.
    #[serde(default = "defaults::ac_min_concurrency")]
    pub min_concurrency: u32,
    /// The limit after the first minRTT measurement. Default 100.
    #[serde(default = "defaults::ac_initial_concurrency")]
    pub initial_concurrency: u32,
    /// The highest limit. Default 1000, as Envoy.
    #[serde(default = "defaults::ac_max_concurrency")]
    pub max_concurrency: u32,
}

/// Zone-aware routing of a cluster; see docs/config.md.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneAware {
    /// Below this many endpoints zones are ignored. Default 6, as Envoy.
    #[serde(default = "defaults::zone_min_cluster_size")]
    pub min_cluster_size: u32,
}

impl Config {
    /// Sets the process's zone (the top-level `local_zone` and every cluster's copy).
    pub fn set_local_zone(&mut self, zone: Option<String>) {
        for c in &mut self.clusters {
            c.value.local_zone.clone_from(&zone);
        }
        self.local_zone = zone;
    }
}

/// Fault injection on a route (Envoy's HTTP fault filter); see docs/config.md.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Hold a share of the requests before they go upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// Answer a share of the requests locally instead of forwarding them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// `fault.delay`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FaultDelay {
    /// How long a delayed request is held.
    pub duration: Dur,
    /// The share of requests delayed. Default 100%.
    #[serde(default = "defaults::hundred_percent")]
    pub percent: Percent,
}

/// `fault.abort`: exactly one of `status` and `grpc_status`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FaultAbort {
    /// The HTTP status answered (200–599).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// A gRPC status (0–16) answered in gRPC's trailers-only form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
    /// The share of requests aborted. Default 100%.
    #[serde(default = "defaults::hundred_percent")]
    pub percent: Percent,
}

/// Request mirroring (shadowing) of a route; see docs/config.md.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    /// The cluster the copies go to.
    pub cluster: Spanned<Name>,
    /// The share of requests mirrored. Default 100%.
    #[serde(default = "defaults::hundred_percent")]
    pub percent: Percent,
    /// Requests whose body is larger are not mirrored. Default 64KiB.
    #[serde(default = "defaults::mirror_max_body")]
    pub max_body: ByteSize,
    /// A mirrored request not answered within this time is abandoned. Default 5s.
    #[serde(default = "defaults::mirror_timeout")]
    pub timeout: Dur,
}

/// Service discovery of a cluster's endpoints; see docs/config.md.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Discovery {
    /// `static` (default), `dns` or `file`.
    #[serde(rename = "type", default)]
    pub kind: DiscoveryType,
    /// `dns`: `strict` (every address of every host is an endpoint, default) or
    /// `logical` (one endpoint per host: its first address).
    #[serde(default)]
    pub dns_lookup: DnsLookup,
    /// `dns`: time between two resolutions. Default 5s, as Envoy.
    #[serde(default = "defaults::dns_refresh_rate")]
    pub dns_refresh_rate: Dur,
    /// `dns`: re-resolve when the answers' smallest TTL expires (at least 1s apart)
    /// instead of every `dns_refresh_rate`. Default false.
    #[serde(default)]
    pub dns_respect_ttl: bool,
    /// `dns`: when to ask again after a failed resolution: `base_interval`, then
    /// doubling up to `max_interval` (with jitter) until one succeeds. Default
    /// unset: a failure waits `dns_refresh_rate`, as Envoy.
    #[serde(default)]
    pub dns_failure_refresh_rate: Option<RefreshRate>,
    /// `dns`: name servers (`ip` or `ip:port`), tried in order. Default: the
    /// `nameserver` lines of /etc/resolv.conf.
    #[serde(default)]
    pub dns_resolvers: Vec<Spanned<String>>,
    /// `dns`: how long one query waits for an answer. Default 2s.
    #[serde(default = "defaults::dns_timeout")]
    pub dns_timeout: Dur,
    /// `dns`: how long the cluster may wait for its first answer ("warming", as
    /// Envoy's `initial_fetch_timeout`): at start `/ready` says 503 until every
    /// `dns` cluster has answered or this passed; a reload that changes the names
    /// waits this long at most for them before it goes live. Default 5s.
    #[serde(default = "defaults::initial_fetch_timeout")]
    pub initial_fetch_timeout: Dur,
    /// `file`: the endpoint file (YAML or JSON; relative to the config file).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// `file`: how often the file is re-read. Default 1s.
    #[serde(default = "defaults::watch_interval")]
    pub watch_interval: Dur,
}

impl Default for Discovery {
    fn default() -> Self {
        Discovery {
            kind: DiscoveryType::Static,
            dns_lookup: DnsLookup::Strict,
            dns_refresh_rate: defaults::dns_refresh_rate(),
            dns_respect_ttl: false,
            dns_failure_refresh_rate: None,
            dns_resolvers: Vec::new(),
            dns_timeout: defaults::dns_timeout(),
            initial_fetch_timeout: defaults::initial_fetch_timeout(),
            path: None,
            watch_interval: defaults::watch_interval(),
        }
    }
}

/// The backoff of `dns_failure_refresh_rate` (Envoy's `Cluster.RefreshRate`).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RefreshRate {
    /// The wait after the first failure; each further failure doubles it. Required.
    pub base_interval: Dur,
    /// The longest wait. Default 10 × `base_interval`, as Envoy.
    #[serde(default)]
    pub max_interval: Option<Dur>,
}

impl RefreshRate {
    /// `max_interval`, or its default (never below `base_interval`).
    pub fn max(&self) -> std::time::Duration {
        let base = self.base_interval.get();
        self.max_interval
            .map_or_else(|| base.saturating_mul(10), Dur::get)
            .max(base)
    }
}

/// Where a cluster's endpoints come from.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DiscoveryType {
    /// The `endpoints` list, host names resolved once at load.
    #[default]
    Static,
    /// The `endpoints` host names, resolved with A/AAAA queries, again and again.
    Dns,
    /// A watched endpoint file.
    File,
}

/// How DNS answers become endpoints.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DnsLookup {
    /// Every address is an endpoint (Envoy's STRICT_DNS).
    #[default]
    Strict,
    /// One endpoint per host, at its first address; new connections follow the
    /// answers (Envoy's LOGICAL_DNS).
    Logical,
}

/// Active health checks: exactly one of `http` and `tcp`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// An HTTP GET whose status must be one of `expected_statuses`.
    #[serde(default)]
    pub http: Option<HttpHealthCheck>,
    /// A TCP connect, optionally sending bytes and expecting bytes back.
    #[serde(default)]
    pub tcp: Option<TcpHealthCheck>,
    /// A gRPC `grpc.health.v1.Health/Check` call that must answer `SERVING`.
    #[serde(default)]
    pub grpc: Option<GrpcHealthCheck>,
    /// Time between two checks of one endpoint. Default 5s.
    #[serde(default = "defaults::hc_interval")]
    pub interval: Dur,
    /// A random extra wait of up to this much is added to each interval, so checks
    /// from many proxies do not arrive in lockstep. Default 0ms.
    #[serde(default = "defaults::zero")]
    pub interval_jitter: Dur,
    /// A check not answered within this time fails. Default 1s.
    #[serde(default = "defaults::hc_timeout")]
    pub timeout: Dur,
    /// Passed checks in a row that return an unhealthy endpoint to rotation. Default 2.
    #[serde(default = "defaults::hc_healthy_threshold")]
    pub healthy_threshold: u32,
    /// Failed checks in a row that take an endpoint out of rotation. Default 3. An
    /// HTTP answer with an unexpected status takes it out at once, as in Envoy.
    #[serde(default = "defaults::hc_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
}

/// A gRPC health check (Envoy's `grpc_health_check`): the standard health
/// service's `Check`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcHealthCheck {
    /// The `service` asked about; default empty: the server as a whole.
    #[serde(default)]
    pub service_name: String,
    /// `:authority` sent. Default: the cluster's name, as Envoy.
    #[serde(default)]
    pub authority: Option<String>,
}

/// An HTTP health check.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpHealthCheck {
    /// Path (and query) requested.
    pub path: String,
    /// Host/`:authority` sent. Default: the cluster's name, as Envoy.
    #[serde(default)]
    pub host: Option<String>,
    /// Statuses that mean healthy: numbers or `"lo-hi"` ranges. Default `[200]`, as
    /// Envoy.
    #[serde(default = "defaults::expected_statuses")]
    pub expected_statuses: Vec<StatusRange>,
}

/// A TCP health check: connect, then optionally send and expect bytes.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TcpHealthCheck {
    /// Bytes written after connecting; absent = nothing.
    #[serde(default)]
    pub send: Option<Payload>,
    /// Bytes that must appear in what the endpoint sends back; absent = a successful
    /// connect is enough.
    #[serde(default)]
    pub expect: Option<Payload>,
}

/// Bytes written as text or as hex: exactly one of `text` and `hex`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// The bytes as UTF-8 text.
    #[serde(default)]
    pub text: Option<String>,
    /// The bytes as hex digits (`"50494e470d0a"`).
    #[serde(default)]
    pub hex: Option<String>,
}

impl Payload {
    /// The bytes; `None` when the hex is invalid (validation rejects that).
    pub fn bytes(&self) -> Option<Vec<u8>> {
        match (&self.text, &self.hex) {
            (Some(t), None) => Some(t.as_bytes().to_vec()),
            (None, Some(h)) => decode_hex(h),
            _ => None,
        }
    }
}

/// Decodes hex digits (whitespace ignored); `None` if not an even number of them.
pub(crate) fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if digits.is_empty() || !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .chunks(2)
        .map(|pair| {
            let hi = char::from(pair[0]).to_digit(16)?;
            let lo = char::from(pair[1]).to_digit(16)?;
            u8::try_from(hi * 16 + lo).ok()
        })
        .collect()
}

/// Passive outlier detection, as Envoy's.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    /// Consecutive 5xx answers (or connect failures, resets, timeouts) that eject an
    /// endpoint. Default 5; 0 turns this detector off.
    #[serde(default = "defaults::five")]
    pub consecutive_5xx: u32,
    /// Consecutive 502/503/504 answers (or connect failures, resets, timeouts) that
    /// eject an endpoint. Default 0 (off), as Envoy's, which detects them but
    /// enforces 0% by default; they count toward `consecutive_5xx` anyway.
    #[serde(default)]
    pub consecutive_gateway_failure: u32,
    /// How often ejections are reviewed (un-ejection, success rate). Default 10s.
    #[serde(default = "defaults::od_interval")]
    pub interval: Dur,
    /// An endpoint is ejected for this times the number of its ejections. Default 30s.
    #[serde(default = "defaults::od_base_ejection_time")]
    pub base_ejection_time: Dur,
    /// The longest an ejection lasts. Default: the larger of 300s and
    /// `base_ejection_time`, as Envoy.
    #[serde(default)]
    pub max_ejection_time: Option<Dur>,
    /// At most this share of the endpoints is ejected at once (but at least one may
    /// be). Default 10%.
    #[serde(default = "defaults::od_max_ejection_percent")]
    pub max_ejection_percent: Percent,
    /// Ejection of endpoints whose success rate is far below the others'; absent = off.
    #[serde(default)]
    pub success_rate: Option<SuccessRate>,
}

/// Success-rate outlier detection: each `interval`, an endpoint whose success rate is
/// below `mean - stdev_factor × stdev` of the endpoints' rates is ejected.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SuccessRate {
    /// Endpoints with enough requests needed for the statistics. Default 5.
    #[serde(default = "defaults::five")]
    pub minimum_hosts: u32,
    /// Requests an endpoint needs in the interval to be judged. Default 100.
    #[serde(default = "defaults::sr_request_volume")]
    pub request_volume: u32,
    /// How many standard deviations below the mean ejects. Default 1.9.
    #[serde(default = "defaults::sr_stdev_factor")]
    pub stdev_factor: f64,
}

/// Per-cluster circuit breakers (Envoy's defaults); counted across all workers.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakers {
    /// Upstream connections open (or opening). Default 1024.
    #[serde(default = "defaults::breaker_limit")]
    pub max_connections: u32,
    /// Attempts waiting for a new connection to open. Default 1024.
    #[serde(default = "defaults::breaker_limit")]
    pub max_pending_requests: u32,
    /// Attempts in flight. Default 1024.
    #[serde(default = "defaults::breaker_limit")]
    pub max_requests: u32,
    /// Retries in flight. Default 3.
    #[serde(default = "defaults::breaker_retries")]
    pub max_retries: u32,
    /// Limits retries in flight to a share of the requests in flight instead of
    /// `max_retries`; absent = `max_retries` applies.
    #[serde(default)]
    pub retry_budget: Option<RetryBudget>,
}

impl Default for CircuitBreakers {
    fn default() -> Self {
        CircuitBreakers {
            max_connections: defaults::breaker_limit(),
            max_pending_requests: defaults::breaker_limit(),
            max_requests: defaults::breaker_limit(),
            max_retries: defaults::breaker_retries(),
            retry_budget: None,
        }
    }
}

/// A retry budget, as Envoy's.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBudget {
    /// Retries in flight allowed, as a share of the attempts in flight. Default 20%.
    #[serde(default = "defaults::budget_percent")]
    pub percent: Percent,
    /// Retries in flight always allowed, however few requests are. Default 3.
    #[serde(default = "defaults::budget_min_concurrency")]
    pub min_concurrency: u32,
}

/// One upstream endpoint.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// `ip:port` or `host:port` (a host name is resolved once, at load).
    pub address: String,
    /// Relative weight for `round_robin`/`random`/`ring_hash`. Default 1.
    #[serde(default = "defaults::weight")]
    pub weight: u32,
    /// The zone (failure domain) the endpoint runs in; absent = unknown.
    #[serde(default)]
    pub zone: Option<String>,
    /// Priority level (Envoy's locality `priority`): 0, the default, is the highest;
    /// a higher number takes traffic only as the levels above it lose endpoints.
    #[serde(default)]
    pub priority: u32,
    /// Free-form metadata, shown in `/clusters`.
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
    /// This endpoint's own health-check settings (Envoy's
    /// `endpoint.health_check_config`); absent = the cluster's.
    #[serde(default)]
    pub health_check: Option<EndpointHealthCheck>,
}

/// How the cluster's active health checks reach one endpoint, over the cluster's
/// `health_check` (Envoy's `endpoint.health_check_config`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EndpointHealthCheck {
    /// Host/`:authority` of this endpoint's HTTP checks, over the cluster's
    /// `health_check.http.host` (Envoy's `hostname`); absent = that one.
    #[serde(default)]
    pub host: Option<String>,
    /// The port checked instead of the endpoint's (Envoy's `port_value`), at the
    /// endpoint's address; absent = the endpoint's port.
    #[serde(default)]
    pub port: Option<u16>,
}

/// Load-balancing policy.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    /// Weighted round robin (smooth, as nginx).
    #[default]
    RoundRobin,
    /// Power of two choices on active requests.
    LeastRequest,
    /// Weighted random.
    Random,
    /// Consistent hashing on `hash_on` (Ketama ring).
    RingHash,
}

/// What `ring_hash` hashes; exactly one field.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HashOn {
    /// A request header's value.
    #[serde(default)]
    pub header: Option<String>,
    /// A cookie's value.
    #[serde(default)]
    pub cookie: Option<String>,
    /// With `cookie`: a request without the cookie gets one made by Legate
    /// (`Set-Cookie` on its response, this `Max-Age`; `0s`: a session
    /// cookie), as Envoy's `cookie.ttl`, so the client sticks to the endpoint
    /// it reached. Absent: none is made (safe: Legate sets no cookie unasked).
    #[serde(default)]
    pub cookie_ttl: Option<Dur>,
    /// The `Path` of a made cookie. Default `/`: the whole site sticks to one
    /// endpoint, not only the path of the first request.
    #[serde(default)]
    pub cookie_path: Option<String>,
    /// Mark a made cookie `Secure` (sent back over HTTPS only). Default false:
    /// a plaintext listener's clients could not send it back.
    #[serde(default)]
    pub cookie_secure: bool,
    /// A made cookie's `SameSite` attribute; absent: none (the browser's
    /// default, `Lax` in current ones).
    #[serde(default)]
    pub cookie_same_site: Option<SameSite>,
    /// The client's IP address.
    #[serde(default)]
    pub source_ip: bool,
}

/// A cookie's `SameSite` attribute.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SameSite {
    /// `SameSite=Strict`: sent on same-site requests only.
    Strict,
    /// `SameSite=Lax`: also on top-level navigations from other sites.
    Lax,
    /// `SameSite=None`: on cross-site requests too (needs `Secure`).
    None,
}

impl SameSite {
    /// The attribute's value as written in `Set-Cookie`.
    pub fn as_str(self) -> &'static str {
        match self {
            SameSite::Strict => "Strict",
            SameSite::Lax => "Lax",
            SameSite::None => "None",
        }
    }
}

/// Upstream HTTP protocol.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with a keep-alive pool.
    #[default]
    Http1,
    /// HTTP/2 (h2c without TLS); needed for gRPC.
    H2,
    /// Chosen by ALPN (requires `tls`); HTTP/1.1 if the upstream offers no ALPN.
    Auto,
}

/// TLS towards an upstream.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// SNI and the name checked in the certificate. Default: the endpoint's host.
    #[serde(default)]
    pub sni: Option<String>,
    /// PEM CA file to trust; absent = the Mozilla roots (webpki-roots).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS; needs `client_key`.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// Client key (PEM).
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// A file whose first line is the password of an encrypted `client_key`;
    /// needs `client_key`.
    #[serde(default)]
    pub key_password_file: Option<PathBuf>,
    /// PEM file of certificate revocation lists the upstream's certificate is
    /// checked against (needs `ca`); absent = no revocation check.
    #[serde(default)]
    pub crl: Option<PathBuf>,
    /// Check only the upstream's own certificate against `crl`. Default
    /// false: every CA of its chain needs its CRL (Envoy's default).
    #[serde(default)]
    pub only_verify_leaf_cert_crl: bool,
    /// The subjectAltNames the upstream's certificate may have (Envoy's
    /// `match_typed_subject_alt_names`): one of them must match. Given, they
    /// replace the check of the certificate's names against the SNI (a mesh
    /// peer's SPIFFE certificate has a URI SAN and no DNS name); empty = the
    /// SNI check.
    #[serde(default)]
    pub match_subject_alt_names: Vec<SanMatch>,
    /// The cipher suites offered, as a listener's `cipher_suites`; empty =
    /// every suite rustls has.
    #[serde(default)]
    pub cipher_suites: Vec<String>,
    /// The key exchange groups offered, as a listener's `ecdh_curves`;
    /// empty = all of them.
    #[serde(default)]
    pub ecdh_curves: Vec<String>,
}

/// One subjectAltName an upstream's certificate may have: exactly one of
/// `uri` and `dns`, each a [`StringMatch`].
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SanMatch {
    /// A URI SAN (a SPIFFE id: `spiffe://mesh/ns/app/sa/api`).
    #[serde(default)]
    pub uri: Option<StringMatch>,
    /// A DNS SAN, compared as it is written in the certificate (a wildcard
    /// SAN is the string `*.example.com`).
    #[serde(default)]
    pub dns: Option<StringMatch>,
}

/// Builds a [`Spanned`] with an unknown location, for defaults.
pub fn unspanned<T>(value: T) -> Spanned<T> {
    Spanned::new(
        value,
        serde_saphyr::Location::UNKNOWN,
        serde_saphyr::Location::UNKNOWN,
    )
}

/// Default values, one function each because serde's `default =` wants a path.
pub(crate) mod defaults {
    use super::*;

    pub fn spanned<T: Default>() -> Spanned<T> {
        unspanned(T::default())
    }
    pub fn yes() -> bool {
        true
    }
    pub fn upgrades() -> Vec<String> {
        vec!["websocket".into()]
    }
    pub fn admin_address_str() -> String {
        "127.0.0.1:9901".into()
    }
    pub fn admin_address() -> Spanned<String> {
        unspanned(admin_address_str())
    }
    pub fn ac_sample_window() -> Dur {
        Dur::millis(100)
    }
    pub fn ac_min_rtt_interval() -> Dur {
        Dur::secs(60)
    }
    pub fn ac_jitter() -> Percent {
        Percent(15.0)
    }
    pub fn ac_min_rtt_samples() -> u32 {
        50
    }
    pub fn ac_buffer() -> Percent {
        Percent(25.0)
    }
    pub fn ac_min_concurrency() -> u32 {
        3
    }
    pub fn ac_initial_concurrency() -> u32 {
        100
    }
    pub fn ac_max_concurrency() -> u32 {
        1000
    }
    pub fn zone_min_cluster_size() -> u32 {
        6
    }
    pub fn hundred_percent() -> Percent {
        Percent(100.0)
    }
    pub fn mirror_max_body() -> ByteSize {
        ByteSize(64 * 1024)
    }
    pub fn mirror_timeout() -> Dur {
        Dur::secs(5)
    }
    pub fn dns_refresh_rate() -> Dur {
        Dur::secs(5)
    }
    pub fn dns_timeout() -> Dur {
        Dur::secs(2)
    }
    pub fn initial_fetch_timeout() -> Dur {
        Dur::secs(5)
    }
    pub fn watch_interval() -> Dur {
        Dur::secs(1)
    }
    pub fn brotli_quality() -> u32 {
        3
    }

    pub fn brotli_window_bits() -> u32 {
        18
    }

    pub fn zstd_level() -> u32 {
        3
    }

    pub fn zstd_window_bits() -> u32 {
        19
    }

    pub fn tracing_collector_path() -> String {
        "/api/v2/spans".to_string()
    }
    pub fn tracing_service_name() -> String {
        "legate".to_string()
    }
    pub fn tracing_flush_interval() -> Dur {
        Dur::secs(1)
    }
    pub fn tracing_max_buffered_spans() -> u32 {
        1000
    }
    pub fn access_log_flush_interval() -> Dur {
        Dur::secs(1)
    }
    pub fn access_log_buffer_limit() -> ByteSize {
        ByteSize(16 << 20)
    }
    pub fn drain_timeout() -> Dur {
        Dur::secs(30)
    }
    pub fn tcp_idle_timeout() -> Dur {
        Dur::secs(3600)
    }
    pub fn max_connections() -> u32 {
        10_000
    }
    pub fn max_request_headers_size() -> ByteSize {
        ByteSize(60 * 1024)
    }
    pub fn max_request_headers() -> u32 {
        100
    }
    pub fn header_read_timeout() -> Dur {
        Dur::secs(10)
    }
    pub fn idle_timeout() -> Dur {
        Dur::secs(60)
    }
    pub fn max_concurrent_streams() -> u32 {
        100
    }
    pub fn lingering_time() -> Dur {
        Dur::secs(30)
    }
    pub fn lingering_timeout() -> Dur {
        Dur::secs(5)
    }
    pub fn route_timeout() -> Dur {
        Dur::secs(15)
    }
    pub fn stream_idle_timeout() -> Dur {
        Dur::secs(300)
    }
    pub fn redirect_code() -> Spanned<u16> {
        unspanned(301)
    }
    pub fn num_retries() -> u32 {
        1
    }
    pub fn backoff_base() -> Dur {
        Dur::millis(25)
    }
    pub fn retry_buffer() -> ByteSize {
        ByteSize(64 * 1024)
    }
    pub fn connect_timeout() -> Dur {
        Dur::secs(5)
    }
    pub fn max_idle() -> u32 {
        64
    }
    pub fn pool_idle_timeout() -> Dur {
        Dur::secs(60)
    }
    pub fn initial_stream_window_size() -> ByteSize {
        ByteSize(2 << 20)
    }
    pub fn listener_stream_window_size() -> ByteSize {
        ByteSize(1 << 20)
    }
    pub fn keepalive_timeout() -> Dur {
        Dur::secs(20)
    }
    pub fn cluster_max_concurrent_streams() -> u32 {
        100
    }
    pub fn weight() -> u32 {
        1
    }
    pub fn overprovisioning_factor() -> u32 {
        140
    }
    pub fn compression_min_length() -> ByteSize {
        ByteSize(30)
    }
    pub fn compression_content_types() -> Vec<String> {
        [
            "application/javascript",
            "application/json",
            "application/xhtml+xml",
            "image/svg+xml",
            "text/css",
            "text/html",
            "text/plain",
            "text/xml",
        ]
        .map(String::from)
        .to_vec()
    }
    pub fn compression_level() -> u32 {
        6
    }
    pub fn proxy_protocol_version() -> u8 {
        1
    }
    pub fn zero() -> Dur {
        Dur::millis(0)
    }
    pub fn five() -> u32 {
        5
    }
    pub fn panic_threshold() -> Percent {
        Percent(50.0)
    }
    pub fn hc_interval() -> Dur {
        Dur::secs(5)
    }
    pub fn hc_timeout() -> Dur {
        Dur::secs(1)
    }
    pub fn hc_healthy_threshold() -> u32 {
        2
    }
    pub fn hc_unhealthy_threshold() -> u32 {
        3
    }
    pub fn expected_statuses() -> Vec<StatusRange> {
        vec![StatusRange { lo: 200, hi: 200 }]
    }
    pub fn od_interval() -> Dur {
        Dur::secs(10)
    }
    pub fn od_base_ejection_time() -> Dur {
        Dur::secs(30)
    }
    pub fn od_max_ejection_percent() -> Percent {
        Percent(10.0)
    }
    pub fn sr_request_volume() -> u32 {
        100
    }
    pub fn sr_stdev_factor() -> f64 {
        1.9
    }
    pub fn breaker_limit() -> u32 {
        1024
    }
    pub fn breaker_retries() -> u32 {
        3
    }
    pub fn budget_percent() -> Percent {
        Percent(20.0)
    }
    pub fn budget_min_concurrency() -> u32 {
        3
    }
    pub fn plugin_cpu() -> Spanned<Dur> {
        unspanned(Dur::millis(5))
    }
    pub fn plugin_memory() -> Spanned<ByteSize> {
        unspanned(ByteSize(16 << 20))
    }
    pub fn plugin_body() -> Spanned<ByteSize> {
        unspanned(ByteSize(1 << 20))
    }
    pub fn plugin_pause() -> Spanned<Dur> {
        unspanned(Dur::secs(300))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // in tests a panic is the failure report
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;
    use std::time::Duration;

    use serde::de::DeserializeOwned;

    use super::*;

    fn parse(src: &str) -> Config {
        parse_str("test.yaml", src, Path::new("/etc/legate")).unwrap_or_else(|e| panic!("{e}"))
    }

    const MINIMAL: &str = "\
version: 1
listeners:
  - { name: web, address: \"0.0.0.0:8080\", http: { routes: main } }
routes:
  - name: main
    virtual_hosts:
      - { name: all, domains: [\"*\"], routes: [{ cluster: app }] }
clusters:
  - { name: app, endpoints: [{ address: \"127.0.0.1:9000\" }] }
";

    /// `MINIMAL` with a top-level `access_log` and listener `web`'s own
    /// (flow style, on its line), and a second listener `health` with `own`.
    fn with_logs(top: &str, web: &str, health: &str) -> String {
        MINIMAL
            .replace("version: 1\n", &format!("version: 1\naccess_log: {top}\n"))
            .replace(
                "http: { routes: main } }\n",
                &format!(
                    "http: {{ routes: main }}, access_log: {web} }}\n  - {{ name: health, \
                     address: \"0.0.0.0:8081\", http: {{ routes: main }}, access_log: {health} }}\n"
                ),
            )
    }

    fn load_error(src: &str) -> String {
        match parse_str("test.yaml", src, Path::new("/etc/legate")) {
            Ok(_) => panic!("accepted:\n{src}"),
            Err(e) => e.to_string(),
        }
    }

    /// `access_log` is a mapping, a list or `off`, at the top level and on a
    /// listener; each log's relative path is resolved against the config's
    /// directory; the form written is the form dumped.
    #[test]
    fn access_logs_are_a_mapping_a_list_or_off() {
        let c = parse(&with_logs(
            "{ path: logs/all.log }",
            "[{ path: logs/web.json }, { path: stderr, format: '%RESPONSE_CODE%', filter: { statuses: [\"500-599\"] } }]",
            "off",
        ));
        let top = c.access_log.as_ref().unwrap();
        assert!(matches!(top, AccessLogs::One(_)));
        assert_eq!(top.logs()[0].path, "/etc/legate/logs/all.log");
        let web = c.listeners[0].value.access_log.as_ref().unwrap();
        let AccessLogs::List(list) = web else {
            panic!("{web:?}")
        };
        assert_eq!(list[0].path, "/etc/legate/logs/web.json");
        assert_eq!(list[1].path, "stderr");
        assert_eq!(list[1].filter.as_ref().unwrap().statuses.len(), 1);
        let health = c.listeners[1].value.access_log.as_ref().unwrap();
        assert!(matches!(health, AccessLogs::Off) && health.logs().is_empty());
        assert_eq!(serde_json::to_value(health).unwrap(), "off");
        assert!(serde_json::to_value(web).unwrap().is_array());
        assert!(serde_json::to_value(top).unwrap().is_object());
        // Without its own, a listener has none here (it writes the top level's).
        assert!(parse(MINIMAL).listeners[0].value.access_log.is_none());
        // `off` at the top level: no log, as without the key.
        let c = parse(&MINIMAL.replace("version: 1\n", "version: 1\naccess_log: off\n"));
        assert!(c.access_log.unwrap().logs().is_empty());
        // Two logs of one path with the same settings: one writer, fine.
        parse(&with_logs(
            "{ path: a.log }",
            "[{ path: a.log }, { path: ./a.log, format: '%RESPONSE_CODE%' }]",
            "{ path: a.log }",
        ));
    }

    #[test]
    fn access_log_shapes_that_are_refused() {
        // Another word than `off`.
        let e = load_error(&with_logs("{ path: a.log }", "on", "off"));
        assert!(e.contains("`on` is not an access log"), "{e}");
        // An empty list: `off` says it.
        let e = load_error(&with_logs("{ path: a.log }", "[]", "off"));
        assert!(e.contains("`access_log` is an empty list"), "{e}");
        assert!(e.contains("test.yaml:4:"), "{e}");
        // A listener's log is checked as the top level's, at its place.
        let e = load_error(&with_logs(
            "{ path: a.log }",
            "[{ path: b.log }, { path: c.log, format: '%NOPE%' }]",
            "off",
        ));
        assert!(e.contains("test.yaml:4:") && e.contains("NOPE"), "{e}");
        let e = load_error(&with_logs(
            "{ path: a.log }",
            "{ path: b.log, flush_interval: 2m }",
            "off",
        ));
        assert!(e.contains("`access_log.flush_interval` is 120s"), "{e}");
        let e = load_error(&with_logs(
            "{ path: a.log }",
            "[{ path: b.log, colour: red }]",
            "off",
        ));
        assert!(e.contains("colour"), "{e}");
        // One file, two writer settings: refused, naming the other log.
        let e = load_error(&with_logs(
            "{ path: a.log }",
            "off",
            "[{ path: b.log }, { path: a.log, flush_interval: 5s }]",
        ));
        assert!(
            e.contains("writes the file the top-level `access_log` writes"),
            "{e}"
        );
        let e = load_error(&with_logs(
            "{ path: stdout }",
            "[{ path: b.log, buffer_limit: 1MiB }]",
            "{ path: b.log }",
        ));
        assert!(
            e.contains("the file listener `web`'s `access_log` (entry 0) writes"),
            "{e}"
        );
    }

    #[test]
    fn limits_defaults_are_the_documented_ones() {
        let l = Limits::default();
        assert_eq!(l.max_connections, 10_000);
        assert_eq!(l.max_request_headers_size, ByteSize(60 * 1024));
        assert_eq!(l.max_request_headers, 100);
        assert_eq!(l.header_read_timeout.get(), Duration::from_secs(10));
        assert_eq!(l.idle_timeout.get(), Duration::from_secs(60));
        assert_eq!(l.max_concurrent_streams, 100);
        assert_eq!(l.lingering_time.get(), Duration::from_secs(30));
        assert_eq!(l.lingering_timeout.get(), Duration::from_secs(5));
    }

    /// The `Default` impls and serde's per-field defaults are written separately;
    /// an empty mapping must give the same values as `Default`.
    #[test]
    fn serde_defaults_agree_with_default_impls() {
        let json = |v: &dyn erased::Ser| v.json();
        let limits: Limits = serde_saphyr::from_str("{}").unwrap();
        assert_eq!(json(&limits), json(&Limits::default()));
        let admin: Admin = serde_saphyr::from_str("{}").unwrap();
        assert_eq!(json(&admin), json(&Admin::default()));
        let ops: HeaderOps = serde_saphyr::from_str("{}").unwrap();
        assert_eq!(json(&ops), json(&HeaderOps::default()));
        assert!(ops.is_empty());
        let m: RouteMatch = serde_saphyr::from_str("{}").unwrap();
        assert_eq!(json(&m), json(&RouteMatch::default()));
        let tls: UpstreamTls = serde_saphyr::from_str("{}").unwrap();
        assert_eq!(json(&tls), json(&UpstreamTls::default()));
    }

    /// Serialization through `dyn`, so one helper compares values of any section.
    mod erased {
        pub trait Ser {
            fn json(&self) -> serde_json::Value;
        }
        impl<T: serde::Serialize> Ser for T {
            fn json(&self) -> serde_json::Value {
                serde_json::to_value(self).unwrap()
            }
        }
    }

    #[test]
    fn h2_connection_window_follows_the_stream_window_and_stays_in_range() {
        let cluster = |extra: &str| -> Cluster {
            serde_saphyr::from_str(&format!("{{ name: c, protocol: h2{extra} }}")).unwrap()
        };
        let c = cluster(", initial_stream_window_size: 1MiB, max_concurrent_streams: 10");
        assert_eq!(c.connection_window(), 10 << 20);
        // The product past 2^31-1 is the protocol's largest window.
        let c = cluster(", max_concurrent_streams: 5000");
        assert_eq!(u64::from(c.connection_window()), MAX_H2_WINDOW);
        let c = cluster(", initial_connection_window_size: 64MiB");
        assert_eq!(c.connection_window(), 64 << 20);
        assert_eq!(c.stream_window(), 2 << 20);
    }

    #[test]
    fn minimal_config_gets_safe_defaults() {
        let c = parse(MINIMAL);
        assert_eq!(c.admin.address.value, "127.0.0.1:9901");
        assert!(!c.admin.allow_non_loopback);
        assert!(!c.admin.config_dump_secrets);
        assert!(c.access_log.is_none());
        assert_eq!(c.drain_timeout.get(), Duration::from_secs(30));
        assert!(c.plugins.is_empty());

        let l = &c.listeners[0].value;
        let http = l.http.as_ref().unwrap();
        assert!(!http.trust_downstream);
        assert!(http.generate_request_id);
        assert!(http.via.is_none());
        assert!(http.normalize_path && !http.merge_slashes);
        assert_eq!(http.path_with_escaped_slashes, EscapedSlashes::Keep);
        assert_eq!(http.headers_with_underscores, UnderscoreHeaders::Allow);
        assert_eq!(http.stream_idle_timeout.get(), Duration::from_secs(300));
        assert!(l.tls.is_none() && l.tcp.is_none() && !l.original_destination);
        assert_eq!(l.limits.max_connections, Limits::default().max_connections);

        let vh = &c.routes[0].value.virtual_hosts[0].value;
        assert!(vh.request_headers.is_empty() && vh.response_headers.is_empty());
        let r = &vh.routes[0].value;
        assert!(r.name.is_none());
        assert_eq!(r.timeout.get(), Duration::from_secs(15));
        assert!(r.idle_timeout.is_none());
        assert!(r.per_try_timeout.is_none() && r.retry.is_none() && r.rewrite.is_none());
        assert!(
            r.max_request_body.is_none(),
            "bodies are streamed: unlimited by default"
        );
        assert!(r.matcher.prefix.is_none() && r.matcher.methods.is_empty());

        let cl = &c.clusters[0].value;
        assert_eq!(cl.lb_policy, LbPolicy::RoundRobin);
        assert_eq!(cl.protocol, UpstreamProtocol::Http1);
        assert_eq!(cl.connect_timeout.get(), Duration::from_secs(5));
        assert_eq!(cl.max_idle_per_endpoint, 64);
        assert_eq!(cl.idle_timeout.get(), Duration::from_secs(60));
        assert_eq!(cl.max_concurrent_streams, 100);
        // HTTP/2 windows: 2 MiB a stream, room for every stream's on the connection.
        assert_eq!(cl.stream_window(), 2 << 20);
        assert_eq!(cl.connection_window(), 200 << 20);
        assert!(cl.connection_keepalive.is_none(), "no PINGs by default");
        assert!(cl.tls.is_none() && cl.hash_on.is_none() && !cl.original_dst);
        assert_eq!(cl.endpoints[0].value.weight, 1);
    }

    #[test]
    fn defaults_inside_optional_sections() {
        let c = parse(
            "\
version: 1
listeners:
  - name: db
    address: 127.0.0.1:6432
    tcp: { cluster: app }
    tls:
      certificates: [{ cert: c.pem, key: k.pem }]
      client_auth: { ca: ca.pem }
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - { match: { prefix: /old }, redirect: { prefix_rewrite: /new } }
          - { cluster: app, retry: { retry_on: [reset] } }
clusters:
  - { name: app, endpoints: [{ address: \"127.0.0.1:9000\" }] }
",
        );
        let l = &c.listeners[0].value;
        assert_eq!(
            l.tcp.as_ref().unwrap().idle_timeout.get(),
            Duration::from_secs(3600)
        );
        let tls = l.tls.as_ref().unwrap();
        assert_eq!(tls.min_version, TlsVersion::V1_2);
        assert!(
            tls.client_auth.as_ref().unwrap().required,
            "mTLS means required"
        );
        assert!(tls.certificates[0].value.server_names.is_empty());

        let routes = &c.routes[0].value.virtual_hosts[0].value.routes;
        let rd = routes[0].value.redirect.as_ref().unwrap();
        assert_eq!(rd.code.value, 301);
        assert!(!rd.strip_query && rd.scheme.is_none() && rd.host.is_none());
        let retry = routes[1].value.retry.as_ref().unwrap();
        assert_eq!(retry.num_retries, 1);
        assert_eq!(retry.backoff_base.get(), Duration::from_millis(25));
        assert!(
            retry.backoff_max.is_none(),
            "10 × backoff_base, applied by the router"
        );
        assert!(!retry.retry_non_idempotent);
        assert_eq!(retry.buffer_limit, ByteSize(64 * 1024));
        assert!(retry.retriable_status_codes.is_empty());
    }

    // ---- The schema, the reference example and the docs cover each other. ----

    /// The keys a section accepts, as serde reports them for an unknown key.
    fn fields<T: DeserializeOwned>() -> Vec<&'static str> {
        match serde_saphyr::from_str::<T>("__probe__: 1").map(|_| ()) {
            Err(e) => match load::innermost(&e) {
                serde_saphyr::Error::SerdeUnknownField { expected, .. } => expected.clone(),
                other => panic!("no field list in {other}"),
            },
            Ok(()) => panic!("probe key accepted"),
        }
    }

    /// The values an enum accepts.
    fn variants<T: DeserializeOwned>() -> Vec<&'static str> {
        match serde_saphyr::from_str::<T>("__probe__").map(|_| ()) {
            Err(e) => match load::innermost(&e) {
                serde_saphyr::Error::SerdeUnknownVariant { expected, .. } => expected.clone(),
                other => panic!("no variant list in {other}"),
            },
            Ok(()) => panic!("probe value accepted"),
        }
    }

    const ROUTE: &str = "routes.virtual_hosts.routes";

    /// Each section of the schema: the docs heading that describes it, where it
    /// appears in the YAML (key paths without list indices), and its keys.
    fn sections() -> Vec<(&'static str, Vec<String>, Vec<&'static str>)> {
        let at = |paths: &[&str]| paths.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        let route = |sub: &str| vec![format!("{ROUTE}.{sub}")];
        vec![
            ("Top level", at(&[""]), fields::<Config>()),
            ("`admin`", at(&["admin"]), fields::<Admin>()),
            (
                "`access_log`",
                at(&["access_log", "listeners.access_log"]),
                fields::<AccessLog>(),
            ),
            (
                "`routes[].virtual_hosts[].routes[].fault`",
                route("fault"),
                fields::<Fault>(),
            ),
            (
                "`routes[].virtual_hosts[].routes[].fault.delay`",
                route("fault.delay"),
                fields::<FaultDelay>(),
            ),
            (
                "`routes[].virtual_hosts[].routes[].fault.abort`",
                route("fault.abort"),
                fields::<FaultAbort>(),
            ),
            (
                "`routes[].virtual_hosts[].routes[].health`",
                route("health"),
                fields::<HealthAnswer>(),
            ),
            (
                "`routes[].virtual_hosts[].routes[].health.min_healthy[]`",
                route("health.min_healthy"),
                fields::<MinHealthy>(),
            ),
            (
                "`access_log.filter`",
                at(&["access_log.filter", "listeners.access_log.filter"]),
                fields::<AccessLogFilter>(),
            ),
            ("`tracing`", at(&["tracing"]), fields::<Tracing>()),
            ("`listeners[]`", at(&["listeners"]), fields::<Listener>()),
            (
                "`listeners[].http`",
                at(&["listeners.http"]),
                fields::<HttpListener>(),
            ),
            (
                "`listeners[].http.set_client_cert_details`",
                at(&["listeners.http.set_client_cert_details"]),
                fields::<ClientCertDetails>(),
            ),
            (
                "`listeners[].http.filters[]`",
                at(&["listeners.http.filters"]),
                fields::<FilterRef>(),
            ),
            ("`plugins[]`", at(&["plugins"]), fields::<Plugin>()),
            (
                "`plugins[].limits`",
                at(&["plugins.limits"]),
                fields::<PluginLimits>(),
            ),
            (
                "`plugins[].capabilities`",
                at(&["plugins.capabilities"]),
                fields::<Capabilities>(),
            ),
            (
                "`plugins[].proxy_wasm`",
                at(&["plugins.proxy_wasm"]),
                fields::<ProxyWasm>(),
            ),
            (
                "`routes[].virtual_hosts[].routes[].filters`",
                vec![
                    format!("{ROUTE}.filters.auth"),
                    format!("{ROUTE}.filters.headers"),
                ],
                fields::<RouteFilter>(),
            ),
            (
                "`listeners[].http.compression`",
                at(&["listeners.http.compression"]),
                fields::<Compression>(),
            ),
            (
                "`listeners[].http.compression.brotli`",
                at(&["listeners.http.compression.brotli"]),
                fields::<Brotli>(),
            ),
            (
                "`listeners[].http.compression.zstd`",
                at(&["listeners.http.compression.zstd"]),
                fields::<Zstd>(),
            ),
            (
                "`listeners[].proxy_protocol`",
                at(&["listeners.proxy_protocol"]),
                fields::<ProxyProtocol>(),
            ),
            (
                "`clusters[].proxy_protocol`",
                at(&["clusters.proxy_protocol"]),
                fields::<UpstreamProxyProtocol>(),
            ),
            (
                "`routes[].virtual_hosts[].cors`",
                vec!["routes.virtual_hosts.cors".into(), format!("{ROUTE}.cors")],
                fields::<Cors>(),
            ),
            (
                "`listeners[].tcp`",
                at(&["listeners.tcp"]),
                fields::<TcpProxy>(),
            ),
            (
                "`listeners[].tcp.filters[]`",
                at(&["listeners.tcp.filters"]),
                fields::<FilterRef>(),
            ),
            (
                "`listeners[].tls`",
                at(&["listeners.tls"]),
                fields::<ListenerTls>(),
            ),
            (
                "`listeners[].tls.certificates[]`",
                at(&["listeners.tls.certificates"]),
                fields::<CertificateConfig>(),
            ),
            (
                "`listeners[].tls.client_auth`",
                at(&["listeners.tls.client_auth"]),
                fields::<ClientAuth>(),
            ),
            (
                "`listeners[].limits`",
                at(&["listeners.limits"]),
                fields::<Limits>(),
            ),
            ("`routes[]`", at(&["routes"]), fields::<RouteTable>()),
            (
                "`routes[].virtual_hosts[]`",
                at(&["routes.virtual_hosts"]),
                fields::<VirtualHost>(),
            ),
            (
                "Header operations",
                vec![
                    "routes.virtual_hosts.request_headers".into(),
                    "routes.virtual_hosts.response_headers".into(),
                    format!("{ROUTE}.request_headers"),
                    format!("{ROUTE}.response_headers"),
                ],
                fields::<HeaderOps>(),
            ),
            (
                "`routes[].virtual_hosts[].routes[]`",
                vec![ROUTE.into()],
                fields::<Route>(),
            ),
            (
                "`routes[].virtual_hosts[].routes[].match`",
                route("match"),
                fields::<RouteMatch>(),
            ),
            (
                "`routes[].virtual_hosts[].routes[].match.headers[]`",
                vec![
                    format!("{ROUTE}.match.headers"),
                    format!("{ROUTE}.match.query"),
                ],
                fields::<ValueMatch>(),
            ),
            (
                "`routes[].virtual_hosts[].routes[].weighted_clusters[]`",
                route("weighted_clusters"),
                fields::<WeightedCluster>(),
            ),
            (
                "`routes[].virtual_hosts[].routes[].redirect`",
                route("redirect"),
                fields::<Redirect>(),
            ),
            (
                "`routes[].virtual_hosts[].routes[].direct_response`",
                route("direct_response"),
                fields::<DirectResponse>(),
            ),
            (
                "`routes[].virtual_hosts[].routes[].rewrite`",
                route("rewrite"),
                fields::<Rewrite>(),
            ),
            (
                "`routes[].virtual_hosts[].routes[].rewrite.regex`",
                route("rewrite.regex"),
                fields::<RegexRewrite>(),
            ),
            (
                "`routes[].virtual_hosts[].routes[].retry`",
                route("retry"),
                fields::<RetryPolicy>(),
            ),
            ("`clusters[]`", at(&["clusters"]), fields::<Cluster>()),
            (
                "`clusters[].endpoints[]`",
                at(&["clusters.endpoints"]),
                fields::<EndpointConfig>(),
            ),
            (
                "`clusters[].endpoints[].health_check`",
                at(&["clusters.endpoints.health_check"]),
                fields::<EndpointHealthCheck>(),
            ),
            (
                "`routes[].virtual_hosts[].routes[].mirror`",
                at(&["routes.virtual_hosts.routes.mirror"]),
                fields::<Mirror>(),
            ),
            (
                "`clusters[].adaptive_concurrency`",
                at(&["clusters.adaptive_concurrency"]),
                fields::<AdaptiveConcurrency>(),
            ),
            (
                "`clusters[].zone_aware`",
                at(&["clusters.zone_aware"]),
                fields::<ZoneAware>(),
            ),
            (
                "`clusters[].discovery`",
                at(&["clusters.discovery"]),
                fields::<Discovery>(),
            ),
            (
                "`clusters[].hash_on`",
                at(&["clusters.hash_on"]),
                fields::<HashOn>(),
            ),
            (
                "`clusters[].tls`",
                at(&["clusters.tls"]),
                fields::<UpstreamTls>(),
            ),
            (
                "`clusters[].health_check`",
                at(&["clusters.health_check"]),
                fields::<HealthCheck>(),
            ),
            (
                "`clusters[].health_check.http`",
                at(&["clusters.health_check.http"]),
                fields::<HttpHealthCheck>(),
            ),
            (
                "`clusters[].health_check.grpc`",
                at(&["clusters.health_check.grpc"]),
                fields::<GrpcHealthCheck>(),
            ),
            (
                "`clusters[].health_check.tcp`",
                at(&["clusters.health_check.tcp"]),
                fields::<TcpHealthCheck>(),
            ),
            (
                "Payloads",
                at(&[
                    "clusters.health_check.tcp.send",
                    "clusters.health_check.tcp.expect",
                ]),
                fields::<Payload>(),
            ),
            (
                "`clusters[].outlier_detection`",
                at(&["clusters.outlier_detection"]),
                fields::<OutlierDetection>(),
            ),
            (
                "`clusters[].outlier_detection.success_rate`",
                at(&["clusters.outlier_detection.success_rate"]),
                fields::<SuccessRate>(),
            ),
            (
                "`clusters[].circuit_breakers`",
                at(&["clusters.circuit_breakers"]),
                fields::<CircuitBreakers>(),
            ),
            (
                "`clusters[].circuit_breakers.retry_budget`",
                at(&["clusters.circuit_breakers.retry_budget"]),
                fields::<RetryBudget>(),
            ),
        ]
    }

    fn enum_values() -> Vec<&'static str> {
        [
            variants::<TlsVersion>(),
            variants::<EscapedSlashes>(),
            variants::<UnderscoreHeaders>(),
            variants::<RetryOn>(),
            variants::<LbPolicy>(),
            variants::<UpstreamProtocol>(),
            variants::<FailPolicy>(),
            variants::<DiscoveryType>(),
            variants::<DnsLookup>(),
        ]
        .concat()
    }

    fn workspace_file(rel: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// Key paths (`listeners.tls.certificates.server_names`) and scalar values of a
    /// YAML document.
    fn keys_and_values(yaml: &str) -> (BTreeSet<String>, BTreeSet<String>) {
        fn walk(
            v: &serde_json::Value,
            path: &str,
            keys: &mut BTreeSet<String>,
            values: &mut BTreeSet<String>,
        ) {
            match v {
                serde_json::Value::Object(m) => {
                    for (k, v) in m {
                        let p = if path.is_empty() {
                            k.clone()
                        } else {
                            format!("{path}.{k}")
                        };
                        keys.insert(p.clone());
                        walk(v, &p, keys, values);
                    }
                }
                serde_json::Value::Array(items) => {
                    for v in items {
                        walk(v, path, keys, values);
                    }
                }
                serde_json::Value::String(s) => {
                    values.insert(s.clone());
                }
                other => {
                    values.insert(other.to_string());
                }
            }
        }
        let doc: serde_json::Value = serde_saphyr::from_str(yaml).unwrap();
        let (mut keys, mut values) = (BTreeSet::new(), BTreeSet::new());
        walk(&doc, "", &mut keys, &mut values);
        (keys, values)
    }

    #[test]
    fn full_example_uses_every_key_and_value() {
        let full = workspace_file("tests/ui/valid/full.yaml");
        parse(&full);
        let (keys, values) = keys_and_values(&full);
        let mut missing = Vec::new();
        for (heading, paths, fields) in sections() {
            for f in fields {
                let used = paths.iter().any(|p| {
                    keys.contains(&if p.is_empty() {
                        f.to_string()
                    } else {
                        format!("{p}.{f}")
                    })
                });
                if !used {
                    missing.push(format!("{heading}: {f}"));
                }
            }
        }
        for v in enum_values() {
            if !values.contains(v) {
                missing.push(format!("value {v}"));
            }
        }
        assert!(missing.is_empty(), "full.yaml does not use: {missing:?}");
    }

    #[test]
    fn docs_describe_every_key_and_nothing_else() {
        let docs = workspace_file("docs/config.md");
        // Prose only: a `#` line inside a code block is a YAML comment, not a heading.
        let mut in_code = false;
        let lines: Vec<&str> = docs
            .lines()
            .map(|l| {
                if l.starts_with("```") {
                    in_code = !in_code;
                    ""
                } else if in_code {
                    ""
                } else {
                    l
                }
            })
            .collect();
        let mut problems = Vec::new();
        for (heading, _, fields) in sections() {
            let Some(start) = lines
                .iter()
                .position(|l| l.starts_with('#') && l.contains(heading))
            else {
                problems.push(format!("no heading for {heading}"));
                continue;
            };
            // Rows of the section's key table: | `key` | type | default | meaning |
            // (value tables, headed `| Value |`, list enum values instead).
            let mut rows = BTreeSet::new();
            let mut in_key_table = false;
            for l in lines[start + 1..]
                .iter()
                .take_while(|l| !l.starts_with('#'))
            {
                if !l.starts_with('|') {
                    in_key_table = false;
                } else if l.starts_with("| Key |") {
                    in_key_table = true;
                } else if let (true, Some(rest)) = (in_key_table, l.strip_prefix("| `")) {
                    rows.insert(rest.split('`').next().unwrap_or_default());
                }
            }
            for f in &fields {
                if !rows.contains(f) {
                    problems.push(format!("{heading}: `{f}` is not documented"));
                }
            }
            for r in &rows {
                if !fields.contains(r) {
                    problems.push(format!(
                        "{heading}: `{r}` is documented but not in the schema"
                    ));
                }
            }
        }
        for v in enum_values() {
            if !docs.contains(&format!("`{v}`")) && !docs.contains(&format!("`\"{v}\"`")) {
                problems.push(format!("value `{v}` is not documented"));
            }
        }
        // Value tables list nothing but values of the schema's enums.
        let values = enum_values();
        let mut in_value_table = false;
        for l in &lines {
            if !l.starts_with('|') {
                in_value_table = false;
            } else if l.starts_with("| Value |") {
                in_value_table = true;
            } else if let (true, Some(rest)) = (in_value_table, l.strip_prefix("| `")) {
                let v = rest.split('`').next().unwrap_or_default();
                if !values.contains(&v) {
                    problems.push(format!("value `{v}` is documented but not in the schema"));
                }
            }
        }
        assert!(problems.is_empty(), "docs/config.md: {problems:#?}");
    }

    #[test]
    fn docs_embed_the_full_example() {
        let docs = workspace_file("docs/config.md");
        let full = workspace_file("tests/ui/valid/full.yaml");
        assert!(
            docs.contains(&format!("```yaml\n{full}```")),
            "docs/config.md must contain tests/ui/valid/full.yaml verbatim in a yaml block"
        );
    }
}
