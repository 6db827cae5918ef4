//! The transcoding rules and the JSON ↔ protobuf conversions they drive: the
//! `google.api.http` options of the configured services, read from the
//! descriptor set and validated at configure; request matching (method + path
//! template); building the request message from the JSON body, path variables
//! and query parameters; printing the response message as JSON.

use prost::Message;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor,
    MethodDescriptor, SerializeOptions, Value,
};
use serde_json::value::RawValue;
use serde_json::{Map, Value as Json};

use crate::config::{Config, PrintOptions};
use crate::template::{percent_decode, Capture, Template};

/// What of the request message the HTTP body carries (`HttpRule.body`).
#[derive(Debug, Clone)]
pub enum BodyMapping {
    /// No body (`GET`, `DELETE`…): a body sent anyway is ignored.
    None,
    /// `body: "*"`: the whole message (less the path variables).
    All,
    /// `body: "field"`: that field, given as its proto field path.
    Field(Vec<String>),
}

/// One HTTP binding of a gRPC method.
#[derive(Debug, Clone)]
pub struct Rule {
    /// `GET`, `POST`… (or a `custom` kind).
    pub http_method: String,
    /// The path template.
    pub template: Template,
    /// The gRPC method.
    pub method: MethodDescriptor,
    /// `/package.Service/Method`.
    pub grpc_path: String,
    /// What the body maps to.
    pub body: BodyMapping,
    /// `response_body`: the response field printed instead of the whole message.
    pub response_body: Option<FieldDescriptor>,
    /// `body: "*"` of a request type the direct JSON → protobuf path handles
    /// ([`crate::direct::eligible`]).
    pub direct: bool,
    /// A response type the direct protobuf → JSON printer handles
    /// ([`crate::direct::printable`]).
    pub printable: bool,
}

/// A request matched to a rule.
#[derive(Debug, Clone)]
pub struct Match {
    /// Index into [`Transcoder::rules`].
    pub rule: usize,
    /// The path variables, still percent-encoded.
    pub captures: Vec<Capture>,
    /// The raw query string (without `?`), possibly empty.
    pub query: String,
}

/// The validated rules and printing options: everything a request needs.
#[derive(Debug)]
pub struct Transcoder {
    /// All bindings of the configured services' unary methods.
    pub rules: Vec<Rule>,
    print: PrintOptions,
    ignored_query_parameters: Vec<String>,
    ignore_unknown_query_parameters: bool,
    query_param_unescape_plus: bool,
}

impl Transcoder {
    /// Builds the rules of `config.services` from an encoded `FileDescriptorSet`.
    /// `Err` is one line naming what is wrong (service, method, template) and the fix.
    pub fn new(config: &Config, descriptor_set: &[u8]) -> Result<Transcoder, String> {
        config.validate()?;
        let pool = DescriptorPool::decode(descriptor_set).map_err(|e| {
            format!(
                "invalid config: field `descriptor_file`: descriptor file {:?} is not a valid FileDescriptorSet: {e} (build it with `protoc --include_imports --descriptor_set_out=FILE ...`)",
                config.descriptor_file
            )
        })?;
        if config.services.is_empty() {
            return Err("invalid config: field `services`: the list is empty: name the services to transcode (package.Service)".into());
        }
        let http = pool.get_extension_by_name("google.api.http");
        let mut rules = Vec::new();
        for (i, name) in config.services.iter().enumerate() {
            let Some(service) = pool.get_service_by_name(name) else {
                let known: Vec<String> =
                    pool.services().map(|s| s.full_name().to_owned()).collect();
                return Err(format!(
                    "invalid config: field `services[{i}]`: service {name:?} is not in descriptor file {:?}; it has: {}",
                    config.descriptor_file,
                    if known.is_empty() {
                        "no services".to_owned()
                    } else {
                        known.join(", ")
                    }
                ));
            };
            let Some(http) = &http else {
                return Err(format!(
                    "invalid config: field `descriptor_file`: descriptor file {:?} has no google.api.http extension: import google/api/annotations.proto in the service's .proto and build the set with its imports (`protoc --include_imports`)",
                    config.descriptor_file
                ));
            };
            for method in service.methods() {
                // Every kind of method: a request stream comes from a JSON
                // array, a reply stream becomes one (README).
                let options = method.options();
                if !options.has_extension(http) {
                    continue;
                }
                let Value::Message(rule) = options.get_extension(http).into_owned() else {
                    continue;
                };
                add_rules(&mut rules, &method, &rule, true)?;
            }
        }
        if rules.is_empty() {
            return Err(format!(
                "invalid config: field `services`: services {} have no method with a google.api.http option: nothing to transcode",
                config.services.join(", ")
            ));
        }
        for (i, a) in rules.iter().enumerate() {
            if let Some(b) = rules[..i].iter().find(|b| {
                b.http_method == a.http_method
                    && b.template.segments == a.template.segments
                    && b.template.verb == a.template.verb
            }) {
                return Err(format!(
                    "{} {} is bound twice: by {} and by {}",
                    a.http_method,
                    a.template.source,
                    b.method.full_name(),
                    a.method.full_name()
                ));
            }
        }
        Ok(Transcoder {
            rules,
            print: config.print_options.clone(),
            ignored_query_parameters: config.ignored_query_parameters.clone(),
            ignore_unknown_query_parameters: config.ignore_unknown_query_parameters,
            query_param_unescape_plus: config.query_param_unescape_plus,
        })
    }

    /// The most specific rule for `method` and `path_and_query`, if any.
    pub fn find(&self, method: &str, path_and_query: &str) -> Option<Match> {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        let parts = Template::parts_of(path);
        let mut best: Option<(usize, Vec<Capture>)> = None;
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.http_method != method {
                continue;
            }
            let Some(captures) = rule.template.matches(path) else {
                continue;
            };
            let better = match &best {
                None => true,
                Some((j, _)) => rule
                    .template
                    .specificity_cmp(&self.rules[*j].template, parts)
                    .is_gt(),
            };
            if better {
                best = Some((i, captures));
            }
        }
        best.map(|(rule, captures)| Match {
            rule,
            captures,
            query: query.to_owned(),
        })
    }

    /// The encoded request messages for a matched request with HTTP body
    /// `body`. A unary or server-streaming method gets one
    /// ([`Transcoder::request_message`]). A client- or bidi-streaming one
    /// gets one per element of the body, a JSON array (Envoy's format), each
    /// built as a unary body would be, path variables and query parameters
    /// included; an empty body (or `[]`) is a stream with no message. Without
    /// a body in its rule, it gets one message, from the path and query.
    /// `Err` is a client error (400), saying what is wrong.
    pub fn request_messages(&self, m: &Match, body: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        let rule = self.rule(m)?;
        if !rule.method.is_client_streaming() || matches!(rule.body, BodyMapping::None) {
            return Ok(vec![self.request_message(m, body)?]);
        }
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Vec::new());
        }
        let input = rule.method.input();
        let items = match serde_json::from_slice::<Json>(body) {
            Ok(Json::Array(items)) => items,
            Ok(_) => {
                return Err(format!(
                    "{} takes a stream of {}: the body must be a JSON array of them, e.g. [{{...}}, {{...}}]",
                    rule.method.full_name(),
                    input.full_name()
                ))
            }
            Err(e) => return Err(format!("invalid JSON body: {e}")),
        };
        let bound = self.bound_fields(m, rule)?;
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                let mut msg = body_message(rule, &input, item)
                    .map_err(|e| format!("message {i} of the array: {e}"))?;
                merge_bound(&mut msg, &bound)?;
                Ok(msg.encode_to_vec())
            })
            .collect()
    }

    fn rule(&self, m: &Match) -> Result<&Rule, String> {
        self.rules
            .get(m.rule)
            .ok_or_else(|| "internal: no such rule".to_owned())
    }

    /// The encoded request message for a matched request with HTTP body
    /// `body`: the body per the rule, then the path variables, then the query
    /// parameters. `Err` is a client error (400), saying what is wrong.
    pub fn request_message(&self, m: &Match, body: &[u8]) -> Result<Vec<u8>, String> {
        let rule = self.rule(m)?;
        let input = rule.method.input();
        let bound = self.bound_fields(m, rule)?;
        // The common case, a whole message in the body and nothing in the
        // path or query, without building a message (`direct`); bodies it
        // does not take (and bad ones) go the general way.
        if rule.direct && bound.is_empty() && !body.iter().all(u8::is_ascii_whitespace) {
            if let Some(encoded) = crate::direct::encode(&input, body) {
                return Ok(encoded);
            }
        }
        let mut msg = match &rule.body {
            BodyMapping::None => DynamicMessage::new(input.clone()),
            _ if body.iter().all(u8::is_ascii_whitespace) => DynamicMessage::new(input.clone()),
            BodyMapping::All => {
                let mut de = serde_json::Deserializer::from_slice(body);
                let msg = DynamicMessage::deserialize_with_options(
                    input.clone(),
                    &mut de,
                    &DeserializeOptions::new().deny_unknown_fields(true),
                )
                .and_then(|m| de.end().map(|()| m))
                .map_err(|e| format!("invalid JSON body for {}: {e}", input.full_name()))?;
                msg
            }
            BodyMapping::Field(_) => {
                let value: Json =
                    serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
                body_message(rule, &input, value)?
            }
        };
        merge_bound(&mut msg, &bound)?;
        Ok(msg.encode_to_vec())
    }

    /// The path variables and query parameters of `m`, in order, as the
    /// fields they set in each request message.
    fn bound_fields(&self, m: &Match, rule: &Rule) -> Result<Vec<Bound>, String> {
        let input = rule.method.input();
        let mut bound = Vec::new();
        // The fields the path binds (by descriptor: a query key may use the
        // JSON name); looked up only when there is a query.
        let path_bound: Vec<Vec<FieldDescriptor>> = if m.query.is_empty() {
            Vec::new()
        } else {
            m.captures
                .iter()
                .filter_map(|c| field_path(&input, &c.field_path).ok())
                .collect()
        };
        for c in &m.captures {
            let value = percent_decode(&c.raw, c.multi_segment, false)
                .map_err(|e| format!("path variable {}: {e}", c.field_path.join(".")))?;
            bound.push(
                bind(&input, &c.field_path, &value, false)
                    .map_err(|e| format!("path variable {}: {e}", c.field_path.join(".")))?,
            );
        }
        for pair in m.query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let plus = self.query_param_unescape_plus;
            let key =
                percent_decode(k, false, plus).map_err(|e| format!("query parameter name: {e}"))?;
            if self.ignored_query_parameters.contains(&key) {
                continue;
            }
            if matches!(rule.body, BodyMapping::All) {
                if self.ignore_unknown_query_parameters {
                    continue;
                }
                return Err(format!(
                    "query parameter {key:?} is not allowed: every field of {} is in the body",
                    input.full_name()
                ));
            }
            let path: Vec<String> = key.split('.').map(str::to_owned).collect();
            // A field the path binds (or one inside it) is the path's: query
            // parameters are for the fields the path does not bind
            // (google.api.http), so `GET /v1/users/alice?name=bob` stays
            // alice, as the route, the logs and the filters before this one
            // saw it. Ignored, as grpc-gateway does (Envoy's transcoder adds
            // the query's bindings after the path's without leaving these
            // out).
            match field_path(&input, &path) {
                Ok(fields) if path_bound.iter().any(|p| fields.starts_with(p)) => continue,
                // Names no field: `bind` below says so (400), unless such
                // parameters are ignored.
                Err(_) if self.ignore_unknown_query_parameters => continue,
                _ => {}
            }
            let value = percent_decode(v, false, plus)
                .map_err(|e| format!("query parameter {key:?}: {e}"))?;
            bound.push(
                bind(&input, &path, &value, true)
                    .map_err(|e| format!("query parameter {key:?}: {e}"))?,
            );
        }
        Ok(bound)
    }

    /// The JSON body for a response message `payload` of the matched rule.
    /// `Err` means the upstream's message does not decode (502).
    pub fn response_json(&self, rule: usize, payload: &[u8]) -> Result<Vec<u8>, String> {
        let rule = self
            .rules
            .get(rule)
            .ok_or_else(|| "internal: no such rule".to_owned())?;
        let output = rule.method.output();
        // The common case, compact and without defaults, printed straight
        // from the wire; anything it does not take goes the general way.
        if rule.printable
            && rule.response_body.is_none()
            && !self.print.add_whitespace
            && !self.print.always_print_primitive_fields
        {
            let names = crate::direct::PrintNames {
                proto_field_names: self.print.preserve_proto_field_names,
                enum_numbers: self.print.always_print_enums_as_ints,
            };
            if let Some(mut out) = crate::direct::print(&output, payload, names) {
                out.push(b'\n');
                return Ok(out);
            }
        }
        let msg = DynamicMessage::decode(output.clone(), payload)
            .map_err(|e| format!("the upstream's {} does not decode: {e}", output.full_name()))?;
        let opts = |skip_default| {
            SerializeOptions::new()
                .skip_default_fields(skip_default)
                .use_proto_field_name(self.print.preserve_proto_field_names)
                .use_enum_numbers(self.print.always_print_enums_as_ints)
        };
        // Printed straight into the output, not through a `serde_json::Value`
        // tree: that tree cost an allocation per field and key (most of a
        // response's CPU time, against the plugin's `limits.cpu`), and it
        // stores numbers as f64, so a `float` 0.1 printed as
        // 0.10000000149011612; serde_json's writer prints an f32 as the
        // shortest text that reads back as it, as protobuf's JSON printers do.
        let print = |skip_default, pretty| {
            let mut out = Vec::with_capacity(payload.len().saturating_mul(2).saturating_add(16));
            let r = if pretty {
                msg.serialize_with_options(
                    &mut serde_json::Serializer::pretty(&mut out),
                    &opts(skip_default),
                )
            } else {
                msg.serialize_with_options(
                    &mut serde_json::Serializer::new(&mut out),
                    &opts(skip_default),
                )
            };
            r.map(|()| out)
                .map_err(|e| format!("printing {} as JSON: {e}", output.full_name()))
        };
        let skip_default = !self.print.always_print_primitive_fields;
        let pretty = self.print.add_whitespace;
        let mut out = match &rule.response_body {
            None => print(skip_default, pretty)?,
            Some(field) => {
                let key = if self.print.preserve_proto_field_names {
                    field.name()
                } else {
                    field.json_name()
                };
                // The field's text, cut out of the printed message as it is.
                let field_text = |json: &[u8]| -> Result<Option<String>, String> {
                    let mut top: std::collections::BTreeMap<String, Box<RawValue>> =
                        serde_json::from_slice(json).map_err(|e| format!("printing JSON: {e}"))?;
                    Ok(top.remove(key).map(|v| v.get().to_owned()))
                };
                // Omitted as a default value: print that default rather than nothing.
                let text = match field_text(&print(skip_default, pretty)?)? {
                    Some(t) => t,
                    None => field_text(&print(false, pretty)?)?.unwrap_or_else(|| "null".into()),
                };
                // Indented as a member of the message, one level deep: one
                // level less as the whole body. Every line break in pretty
                // JSON is layout (a string's own is escaped `\n`), and each is
                // followed by that level's two spaces at least.
                if pretty {
                    text.replace("\n  ", "\n").into_bytes()
                } else {
                    text.into_bytes()
                }
            }
        };
        out.push(b'\n');
        Ok(out)
    }
}

/// The request message a JSON body `value` gives under `rule`'s body mapping
/// (`*`: the whole message; a field path: that field). Not for `BodyMapping::None`
/// (an empty message).
fn body_message(
    rule: &Rule,
    input: &MessageDescriptor,
    value: Json,
) -> Result<DynamicMessage, String> {
    match &rule.body {
        BodyMapping::None => Ok(DynamicMessage::new(input.clone())),
        BodyMapping::All => json_to_message(input, value)
            .map_err(|e| format!("invalid JSON body for {}: {e}", input.full_name())),
        BodyMapping::Field(path) => {
            let wrapped = path.iter().rev().fold(value, |v, name| {
                Json::Object(Map::from_iter([(name.clone(), v)]))
            });
            json_to_message(input, wrapped)
                .map_err(|e| format!("invalid JSON body for field {}: {e}", path.join(".")))
        }
    }
}

/// A field a path variable or query parameter sets: its path from the
/// request message, and the value (for a repeated field, the items to append).
#[derive(Debug)]
struct Bound {
    fields: Vec<FieldDescriptor>,
    value: Value,
}

/// Sets the path variables and query parameters (`bound`, in order) in `msg`,
/// field by field: a scalar given again overrides the body's (a default value
/// such as `0` or `""` too: merging encoded messages would skip those),
/// repeated values append.
fn merge_bound(msg: &mut DynamicMessage, bound: &[Bound]) -> Result<(), String> {
    for b in bound {
        let (last, parents) = b
            .fields
            .split_last()
            .ok_or_else(|| "internal: empty field path".to_owned())?;
        let mut m = &mut *msg;
        for f in parents {
            m = match m.get_field_mut(f) {
                Value::Message(inner) => inner,
                _ => return Err(format!("internal: {} is not a message", f.full_name())),
            };
        }
        match (&b.value, m.get_field_mut(last)) {
            (Value::List(items), Value::List(list)) => list.extend(items.iter().cloned()),
            _ => m.set_field(last, b.value.clone()),
        }
    }
    Ok(())
}

fn json_to_message(desc: &MessageDescriptor, value: Json) -> Result<DynamicMessage, String> {
    DynamicMessage::deserialize_with_options(
        desc.clone(),
        value,
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .map_err(|e| e.to_string())
}

/// Reads one `HttpRule` (and its `additional_bindings`) into `rules`.
fn add_rules(
    rules: &mut Vec<Rule>,
    method: &MethodDescriptor,
    rule: &DynamicMessage,
    top: bool,
) -> Result<(), String> {
    let name = method.full_name();
    let text = |field: &str| match rule.get_field_by_name(field).as_deref() {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    };
    let mut pattern = None;
    for verb in ["get", "put", "post", "delete", "patch"] {
        if let Some(p) = text(verb) {
            pattern = Some((verb.to_ascii_uppercase(), p));
        }
    }
    if let Some(Value::Message(custom)) = rule.get_field_by_name("custom").as_deref() {
        let get = |f: &str| match custom.get_field_by_name(f).as_deref() {
            Some(Value::String(s)) => s.clone(),
            _ => String::new(),
        };
        let (kind, path) = (get("kind"), get("path"));
        if !kind.is_empty() && !path.is_empty() {
            pattern = Some((kind, path));
        }
    }
    let Some((http_method, source)) = pattern else {
        return Err(format!(
            "method {name}: google.api.http rule has no pattern (get, put, post, delete, patch or custom)"
        ));
    };
    let template = Template::parse(&source)
        .map_err(|e| format!("method {name}: path template {source:?}: {e}"))?;
    let input = method.input();
    for v in &template.variables {
        resolve(&input, &v.field_path, false).map_err(|e| {
            format!(
                "method {name}: path template {source:?}: variable {{{}}}: {e}",
                v.field_path.join(".")
            )
        })?;
    }
    let body = match text("body").as_deref() {
        None => BodyMapping::None,
        Some("*") => BodyMapping::All,
        Some(b) => {
            let path: Vec<String> = b.split('.').map(str::to_owned).collect();
            field_path(&input, &path).map_err(|e| format!("method {name}: body {b:?}: {e}"))?;
            BodyMapping::Field(path)
        }
    };
    let response_body = match text("response_body") {
        None => None,
        Some(f) => Some(method.output().get_field_by_name(&f).ok_or_else(|| {
            format!(
                "method {name}: response_body {f:?}: {} has no field {f}",
                method.output().full_name()
            )
        })?),
    };
    let direct = matches!(body, BodyMapping::All) && crate::direct::eligible(&input);
    let printable = crate::direct::printable(&method.output());
    rules.push(Rule {
        direct,
        printable,
        http_method,
        template,
        method: method.clone(),
        grpc_path: format!("/{}/{}", method.parent_service().full_name(), method.name()),
        body,
        response_body,
    });
    if top {
        if let Some(Value::List(more)) = rule.get_field_by_name("additional_bindings").as_deref() {
            for b in more {
                if let Value::Message(b) = b {
                    // Bindings cannot nest (http.proto): deeper ones are ignored.
                    add_rules(rules, method, b, false)?;
                }
            }
        }
    }
    Ok(())
}

/// The fields along `path` from `desc` (proto or JSON names); every field but
/// the last must be a singular message.
fn field_path(desc: &MessageDescriptor, path: &[String]) -> Result<Vec<FieldDescriptor>, String> {
    let mut out = Vec::with_capacity(path.len());
    let mut cur = desc.clone();
    for (i, name) in path.iter().enumerate() {
        let field = cur
            .get_field_by_name(name)
            .or_else(|| cur.get_field_by_json_name(name))
            .ok_or_else(|| format!("{} has no field {name:?}", cur.full_name()))?;
        if i + 1 < path.len() {
            match field.kind() {
                Kind::Message(m) if !field.is_list() && !field.is_map() => cur = m,
                _ => {
                    return Err(format!(
                        "{}.{name} is not a message, so it has no field {:?}",
                        cur.full_name(),
                        path[i + 1]
                    ))
                }
            }
        }
        out.push(field);
    }
    Ok(out)
}

/// Well-known message types whose JSON form is a string or a primitive, so a
/// path or query value can set them.
fn is_scalar_like(m: &MessageDescriptor) -> bool {
    matches!(
        m.full_name(),
        "google.protobuf.Timestamp"
            | "google.protobuf.Duration"
            | "google.protobuf.FieldMask"
            | "google.protobuf.DoubleValue"
            | "google.protobuf.FloatValue"
            | "google.protobuf.Int64Value"
            | "google.protobuf.UInt64Value"
            | "google.protobuf.Int32Value"
            | "google.protobuf.UInt32Value"
            | "google.protobuf.BoolValue"
            | "google.protobuf.StringValue"
            | "google.protobuf.BytesValue"
    )
}

/// The leaf field a path variable or query parameter sets: it must be a
/// scalar, an enum or a scalar-like well-known type; repeated only if allowed.
fn resolve(
    desc: &MessageDescriptor,
    path: &[String],
    repeated_ok: bool,
) -> Result<FieldDescriptor, String> {
    let fields = field_path(desc, path)?;
    let leaf = fields
        .last()
        .cloned()
        .ok_or_else(|| "empty field path".to_owned())?;
    if leaf.is_map() {
        return Err(format!(
            "{} is a map, which cannot be set from a URL",
            leaf.full_name()
        ));
    }
    if leaf.is_list() && !repeated_ok {
        return Err(format!(
            "{} is repeated, which a path variable cannot set",
            leaf.full_name()
        ));
    }
    if let Kind::Message(m) = leaf.kind() {
        if !is_scalar_like(&m) {
            return Err(format!(
                "{} is a message ({}), not a scalar field",
                leaf.full_name(),
                m.full_name()
            ));
        }
    }
    Ok(leaf)
}

/// Sets `path` = `value` in the JSON object `root` (by proto field names),
/// typed for the leaf field so the proto3 JSON parser accepts it: bools as
/// JSON booleans, enum numbers as numbers, everything else as a string
/// (numbers, enum names, base64 bytes, timestamps are strings in the mapping).
fn bind(
    desc: &MessageDescriptor,
    path: &[String],
    value: &str,
    repeated_ok: bool,
) -> Result<Bound, String> {
    let leaf = resolve(desc, path, repeated_ok)?;
    let fields = field_path(desc, path)?;
    let is_bool = match leaf.kind() {
        Kind::Bool => true,
        Kind::Message(m) => m.full_name() == "google.protobuf.BoolValue",
        _ => false,
    };
    let json = if is_bool {
        match value {
            "true" => Json::Bool(true),
            "false" => Json::Bool(false),
            _ => return Err(format!("{value:?} is not a bool (true or false)")),
        }
    } else if matches!(leaf.kind(), Kind::Enum(_)) && value.parse::<i32>().is_ok() {
        value
            .parse::<i64>()
            .map(|n| Json::Number(n.into()))
            .unwrap_or_else(|_| Json::String(value.to_owned()))
    } else {
        Json::String(value.to_owned())
    };
    // Parsed by the proto3 JSON mapping in a message of its own, then taken
    // out typed (a default value too: `get_field` gives it either way).
    let alone = fields.iter().rev().fold(
        if leaf.is_list() {
            Json::Array(vec![json])
        } else {
            json
        },
        |v, f| Json::Object(Map::from_iter([(f.name().to_owned(), v)])),
    );
    let parsed = json_to_message(desc, alone)
        .map_err(|e| format!("{value:?} does not fit {}: {e}", leaf.full_name()))?;
    let (last, parents) = fields
        .split_last()
        .ok_or_else(|| "empty field path".to_owned())?;
    let mut m = parsed;
    for f in parents {
        m = match m.get_field(f).into_owned() {
            Value::Message(inner) => inner,
            _ => return Err(format!("{} is not a message", f.full_name())),
        };
    }
    let value = m.get_field(last).into_owned();
    Ok(Bound { fields, value })
}
