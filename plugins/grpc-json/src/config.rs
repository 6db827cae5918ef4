//! The plugin's configuration: the serde schema (`deny_unknown_fields`) with
//! its defaults. Building the rules from the descriptor set it names is
//! [`crate::rules`]'s job.

use serde::Deserialize;

/// The granted file that holds the `FileDescriptorSet` unless configured.
pub const DEFAULT_DESCRIPTOR_FILE: &str = "descriptors";

/// The plugin's `config:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Which file granted under the plugin's `files:` holds the encoded
    /// `FileDescriptorSet` (built with its imports, so `google.api.http` is in it).
    #[serde(default = "default_descriptor_file")]
    pub descriptor_file: String,
    /// Fully-qualified services to transcode (`package.Service`). Required:
    /// a descriptor set often holds more services than should be exposed.
    pub services: Vec<String>,
    /// How responses are printed as JSON.
    #[serde(default)]
    pub print_options: PrintOptions,
    /// Query parameters that are not mapped to fields (and not rejected),
    /// e.g. an `access_token` an auth filter consumes.
    #[serde(default)]
    pub ignored_query_parameters: Vec<String>,
    /// Drop every query parameter that names no field of the request message
    /// (and every one of a `body: "*"` rule, which leaves no field to the
    /// query) instead of answering 400, as Envoy's
    /// `ignore_unknown_query_parameters`: for clients that add parameters no
    /// one lists beforehand (a cache buster `_=…`, `utm_*` tags). Off by
    /// default, as Envoy: a misspelt parameter is then a 400 the client sees,
    /// not a value silently left out. A parameter naming a field still has to
    /// fit it.
    #[serde(default)]
    pub ignore_unknown_query_parameters: bool,
    /// Decode `+` in query parameters as a space (HTML form encoding). Off by
    /// default, as Envoy's `query_param_unescape_plus`: RFC 3986 gives `+` no
    /// meaning in a query, so `?q=a+b` is the string `a+b` (a space is
    /// `%20`).
    #[serde(default)]
    pub query_param_unescape_plus: bool,
}

impl Config {
    /// What the schema cannot say: a name listed twice in `services` or
    /// `ignored_query_parameters` is an error in the SDK's form, naming the
    /// second entry, so the host places it at that key. Listed twice, a
    /// service would bind each of its rules twice, and a parameter is
    /// ignored once either way: the second entry is a slip (a merge of two
    /// lists, a typo of another name), which the operator should see.
    pub fn validate(&self) -> Result<(), String> {
        for (key, list) in [
            ("services", &self.services),
            ("ignored_query_parameters", &self.ignored_query_parameters),
        ] {
            for (i, name) in list.iter().enumerate() {
                if let Some(first) = list[..i].iter().position(|n| n == name) {
                    return Err(format!(
                        "invalid config: field `{key}[{i}]`: {name:?} is listed twice (also at `{key}[{first}]`): remove one"
                    ));
                }
            }
        }
        Ok(())
    }
}

fn default_descriptor_file() -> String {
    DEFAULT_DESCRIPTOR_FILE.to_owned()
}

/// Envoy's `print_options`; every default is the canonical proto3 JSON mapping.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PrintOptions {
    /// Indent the JSON (two spaces).
    #[serde(default)]
    pub add_whitespace: bool,
    /// Print fields that have their default value (`0`, `""`, `false`, `[]`);
    /// by default they are omitted, as the mapping says.
    #[serde(default)]
    pub always_print_primitive_fields: bool,
    /// Print enums as numbers rather than their names.
    #[serde(default)]
    pub always_print_enums_as_ints: bool,
    /// Use the `.proto` field names (`fail_code`) rather than lowerCamelCase
    /// JSON names (`failCode`).
    #[serde(default)]
    pub preserve_proto_field_names: bool,
}
