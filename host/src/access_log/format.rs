//! Access-log formats: Envoy's command operators (`%REQ(USER-AGENT)%`,
//! `%RESPONSE_CODE%`, `%START_TIME(%d/%b/%Y:%H:%M:%S %z)%`, ...) in a text line
//! (`access_log.format`) or a JSON object (`access_log.json_format`), parsed
//! once when the log is opened (and by `validate`, which reports a bad one at
//! its file:line:col). Without either, a line is [`Line`]'s own JSON.
//!
//! A format names the header fields it reads; [`Wants`] lists them, so a
//! request captures those fields only (and nothing without a format that asks).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::SystemTime;

use http::{HeaderMap, HeaderName};

use super::{civil, Line};
use crate::config::{AccessLog as Cfg, JsonFormat, JsonFormatValue};

/// How each line is written.
pub enum Format {
    /// [`Line`] as JSON (no `format` or `json_format`).
    Default,
    /// `format`: one text line.
    Text(Template),
    /// `json_format`: one JSON object, keys in the order configured.
    Json(Vec<(String, Node)>),
}

/// A format string: literal text and operators.
pub struct Template(Vec<Piece>);

enum Piece {
    Lit(String),
    Op(Op),
}

/// A `json_format` value.
pub enum Node {
    /// A format string; exactly one operator alone keeps its type (a number,
    /// or `null` when it has no value), as Envoy's typed JSON.
    Template(Template),
    Object(Vec<(String, Node)>),
    /// A number, bool or null written as configured.
    Literal(serde_json::Value),
}

/// One `%OPERATOR(arg):max%`.
struct Op {
    kind: Kind,
    /// `:N`: a text value is cut to its first N characters.
    max: Option<usize>,
}

/// Where a header operator's value comes from.
#[derive(Clone, Copy)]
enum Field {
    Method,
    Path,
    Authority,
    Scheme,
    Status,
    /// `x-request-id`: the id the request was handled with (Legate's own when
    /// it made one), the access log's `request_id`.
    RequestId,
    /// An index into the captured values of its direction.
    Captured(usize),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Request,
    Response,
    Trailers,
}

enum Kind {
    StartTime(Option<Vec<TimePiece>>),
    Header {
        dir: Direction,
        first: Field,
        alt: Option<Field>,
        /// `REQ_WITHOUT_QUERY`: the value up to its `?`.
        without_query: bool,
    },
    Protocol,
    ResponseCode,
    ResponseCodeDetails,
    ResponseFlags,
    BytesReceived,
    BytesSent,
    Duration,
    ResponseDuration,
    UpstreamHost,
    UpstreamCluster,
    UpstreamTransportFailureReason,
    UpstreamRequestAttemptCount,
    RouteName,
    DownstreamRemoteAddress {
        port: Port,
    },
    DownstreamDirectRemoteAddress {
        port: Port,
    },
    DownstreamLocalAddress {
        port: Port,
    },
    RequestedServerName,
    DownstreamPeerSubject,
    DownstreamTlsVersion,
    DownstreamTlsCipher,
    Hostname(Option<String>),
    GrpcStatus {
        style: GrpcStyle,
        headers: usize,
        trailers: usize,
    },
    /// Legate's own (no Envoy operator): the listener's name.
    Listener,
}

/// Which part of an address an operator writes.
#[derive(Clone, Copy)]
enum Port {
    /// `ip:port`.
    With,
    /// `ip`.
    Without,
    /// `port`, a number.
    Only,
}

#[derive(Clone, Copy)]
enum GrpcStyle {
    Camel,
    Snake,
    Number,
}

enum TimePiece {
    Lit(String),
    Year,
    Year2,
    Month,
    MonthName,
    MonthFull,
    Day,
    DaySpace,
    DayOfYear,
    Weekday,
    WeekdayFull,
    Hour,
    Minute,
    Second,
    Epoch,
    /// Fractional seconds, this many digits.
    Frac(u32),
}

/// The header fields a format reads, by direction; a request captures these
/// only ([`capture`]).
#[derive(Default)]
pub struct Wants {
    pub request: Vec<HeaderName>,
    pub response: Vec<HeaderName>,
    pub trailers: Vec<HeaderName>,
}

impl Wants {
    fn slot(&mut self, dir: Direction, name: HeaderName) -> usize {
        let list = match dir {
            Direction::Request => &mut self.request,
            Direction::Response => &mut self.response,
            Direction::Trailers => &mut self.trailers,
        };
        if let Some(i) = list.iter().position(|n| *n == name) {
            return i;
        }
        list.push(name);
        list.len() - 1
    }
}

/// The values of `names` in `map`, each field's values joined with `,`
/// (Envoy's), escaped as the log's other header values
/// ([`super::header_text`]); `None` for a field not there.
pub fn capture(names: &[HeaderName], map: &HeaderMap) -> Box<[Option<String>]> {
    names
        .iter()
        .map(|n| {
            let mut all = map.get_all(n).iter();
            all.next().map(|first| {
                let mut joined = super::header_text(first.as_bytes());
                for v in all {
                    joined.push(',');
                    joined.push_str(&super::header_text(v.as_bytes()));
                }
                joined
            })
        })
        .collect()
}

/// A format the config describes, and the header fields it reads.
///
/// # Errors
/// What is wrong with `format` or `json_format` (an unknown operator, a bad
/// argument), with the JSON key path of the value for `json_format`.
pub fn parse(cfg: &Cfg) -> Result<(Format, Wants), FormatError> {
    let mut wants = Wants::default();
    let format = parse_into(cfg, &mut wants)?;
    Ok((format, wants))
}

/// A format the config describes, whose header fields are added to `wants`
/// (the union of several logs' fields: its operators index into it).
///
/// # Errors
/// As [`parse`].
pub fn parse_into(cfg: &Cfg, wants: &mut Wants) -> Result<Format, FormatError> {
    let format = match (&cfg.format, &cfg.json_format) {
        (Some(text), _) => {
            let text = text.strip_suffix('\n').unwrap_or(text);
            if text.contains(['\n', '\r']) {
                return Err(FormatError {
                    path: Vec::new(),
                    message: "a line break inside `access_log.format`".into(),
                    help: "each request is one line, and Legate ends it: only a trailing `\\n` \
                           (Envoy's formats end with one) is allowed"
                        .into(),
                });
            }
            if text.is_empty() {
                return Err(FormatError {
                    path: Vec::new(),
                    message: "`access_log.format` is empty".into(),
                    help: "write the line's operators, e.g. `%REQ(:METHOD)% %REQ(:PATH)% \
                           %RESPONSE_CODE%`; remove `format` for the default JSON line"
                        .into(),
                });
            }
            Format::Text(template(text, wants).map_err(FormatError::plain)?)
        }
        (None, Some(json)) => Format::Json(object(json, wants, &mut Vec::new())?),
        (None, None) => Format::Default,
    };
    Ok(format)
}

/// Why a format does not parse.
#[derive(Debug)]
pub struct FormatError {
    /// `json_format` keys down to the bad value (empty for `format`).
    pub path: Vec<String>,
    pub message: String,
    pub help: String,
}

impl FormatError {
    fn plain((message, help): (String, String)) -> Self {
        FormatError {
            path: Vec::new(),
            message,
            help,
        }
    }
}

fn object(
    json: &JsonFormat,
    wants: &mut Wants,
    path: &mut Vec<String>,
) -> Result<Vec<(String, Node)>, FormatError> {
    let mut out = Vec::with_capacity(json.0.len());
    for (k, v) in &json.0 {
        path.push(k.clone());
        let node = match v {
            JsonFormatValue::Text(t) => Node::Template(template(t, wants).map_err(|e| {
                let mut e = FormatError::plain(e);
                e.path.clone_from(path);
                e
            })?),
            JsonFormatValue::Object(o) => Node::Object(object(o, wants, path)?),
            JsonFormatValue::Literal(l) => Node::Literal(l.clone()),
        };
        path.pop();
        out.push((k.clone(), node));
    }
    Ok(out)
}

/// The operators [`parse`] knows, for its error's help.
const KNOWN: &str = "START_TIME, REQ, REQ_WITHOUT_QUERY, RESP, TRAILER, PROTOCOL, RESPONSE_CODE, \
     RESPONSE_CODE_DETAILS, RESPONSE_FLAGS, BYTES_RECEIVED, BYTES_SENT, DURATION, \
     RESPONSE_DURATION, UPSTREAM_HOST, UPSTREAM_CLUSTER, UPSTREAM_TRANSPORT_FAILURE_REASON, \
     UPSTREAM_REQUEST_ATTEMPT_COUNT, ROUTE_NAME, DOWNSTREAM_REMOTE_ADDRESS(_WITHOUT_PORT), \
     DOWNSTREAM_REMOTE_PORT, DOWNSTREAM_DIRECT_REMOTE_ADDRESS(_WITHOUT_PORT), \
     DOWNSTREAM_DIRECT_REMOTE_PORT, DOWNSTREAM_LOCAL_ADDRESS(_WITHOUT_PORT), \
     DOWNSTREAM_LOCAL_PORT, REQUESTED_SERVER_NAME, DOWNSTREAM_PEER_SUBJECT, \
     DOWNSTREAM_TLS_VERSION, DOWNSTREAM_TLS_CIPHER, HOSTNAME, GRPC_STATUS, LISTENER_NAME (docs/config.md, `access_log`)";

type ParseError = (String, String);

/// Parses one format string: text with `%OPERATOR(arg):max%` in it, `%%` a
/// literal `%`.
fn template(s: &str, wants: &mut Wants) -> Result<Template, ParseError> {
    let mut pieces = Vec::new();
    let mut lit = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        lit.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('%') {
            lit.push('%');
            rest = r;
            continue;
        }
        let name_len = rest
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(rest.len());
        let name = &rest[..name_len];
        rest = &rest[name_len..];
        if name.is_empty() {
            return Err((
                format!("a `%` not followed by an operator name in `{s}`"),
                "operators are written `%NAME%` (e.g. `%RESPONSE_CODE%`); write `%%` for a \
                 literal `%`"
                    .into(),
            ));
        }
        let mut arg = None;
        if let Some(r) = rest.strip_prefix('(') {
            // START_TIME's argument has `%`s of its own: the argument runs to
            // the first `)`.
            let Some(close) = r.find(')') else {
                return Err((
                    format!("`%{name}(` has no closing `)` in `{s}`"),
                    "write the argument in parentheses, e.g. `%REQ(USER-AGENT)%`".into(),
                ));
            };
            arg = Some(&r[..close]);
            rest = &r[close + 1..];
        }
        let mut max = None;
        if let Some(r) = rest.strip_prefix(':') {
            let digits = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
            let n = r[..digits].parse::<usize>().ok().filter(|n| *n > 0);
            let Some(n) = n else {
                return Err((
                    format!("`%{name}` has a bad length after `:` in `{s}`"),
                    "`:N` cuts the value to its first N characters; N is a number above 0".into(),
                ));
            };
            max = Some(n);
            rest = &r[digits..];
        }
        let Some(r) = rest.strip_prefix('%') else {
            return Err((
                format!("`%{name}` is not closed with `%` in `{s}`"),
                "operators are written `%NAME%`, `%NAME(ARG)%` or `%NAME(ARG):N%`; write `%%` \
                 for a literal `%`"
                    .into(),
            ));
        };
        rest = r;
        let kind = operator(name, arg, wants)?;
        if !lit.is_empty() {
            pieces.push(Piece::Lit(std::mem::take(&mut lit)));
        }
        pieces.push(Piece::Op(Op { kind, max }));
    }
    lit.push_str(rest);
    if !lit.is_empty() {
        pieces.push(Piece::Lit(lit));
    }
    Ok(Template(pieces))
}

fn operator(name: &str, arg: Option<&str>, wants: &mut Wants) -> Result<Kind, ParseError> {
    let no_arg = |k: Kind| match arg {
        None => Ok(k),
        Some(_) => Err((
            format!("`%{name}%` takes no argument"),
            format!("write `%{name}%`"),
        )),
    };
    use Kind as K;
    match name {
        "START_TIME" => Ok(K::StartTime(arg.map(time_format).transpose()?)),
        "REQ" | "REQ_WITHOUT_QUERY" | "RESP" | "TRAILER" => {
            let dir = match name {
                "REQ" | "REQ_WITHOUT_QUERY" => Direction::Request,
                "RESP" => Direction::Response,
                _ => Direction::Trailers,
            };
            let Some(arg) = arg else {
                return Err((
                    format!("`%{name}%` needs a header name"),
                    format!("write e.g. `%{name}(X-REQUEST-ID)%`, or `%{name}(X-A?X-B)%` for X-B when X-A is absent"),
                ));
            };
            let (first, alt) = match arg.split_once('?') {
                Some((a, b)) => (a, Some(b)),
                None => (arg, None),
            };
            let first = field(dir, first, wants)?;
            let alt = alt.map(|a| field(dir, a, wants)).transpose()?;
            Ok(K::Header {
                dir,
                first,
                alt,
                without_query: name == "REQ_WITHOUT_QUERY",
            })
        }
        "PROTOCOL" => no_arg(K::Protocol),
        "RESPONSE_CODE" => no_arg(K::ResponseCode),
        "RESPONSE_CODE_DETAILS" => no_arg(K::ResponseCodeDetails),
        "RESPONSE_FLAGS" => no_arg(K::ResponseFlags),
        "BYTES_RECEIVED" => no_arg(K::BytesReceived),
        "BYTES_SENT" => no_arg(K::BytesSent),
        "DURATION" => no_arg(K::Duration),
        "RESPONSE_DURATION" => no_arg(K::ResponseDuration),
        "UPSTREAM_HOST" => no_arg(K::UpstreamHost),
        "UPSTREAM_CLUSTER" => no_arg(K::UpstreamCluster),
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => no_arg(K::UpstreamTransportFailureReason),
        "UPSTREAM_REQUEST_ATTEMPT_COUNT" => no_arg(K::UpstreamRequestAttemptCount),
        "ROUTE_NAME" => no_arg(K::RouteName),
        "DOWNSTREAM_REMOTE_ADDRESS" => no_arg(K::DownstreamRemoteAddress { port: Port::With }),
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => no_arg(K::DownstreamRemoteAddress {
            port: Port::Without,
        }),
        "DOWNSTREAM_REMOTE_PORT" => no_arg(K::DownstreamRemoteAddress { port: Port::Only }),
        "DOWNSTREAM_DIRECT_REMOTE_ADDRESS" => {
            no_arg(K::DownstreamDirectRemoteAddress { port: Port::With })
        }
        "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT" => {
            no_arg(K::DownstreamDirectRemoteAddress {
                port: Port::Without,
            })
        }
        "DOWNSTREAM_DIRECT_REMOTE_PORT" => {
            no_arg(K::DownstreamDirectRemoteAddress { port: Port::Only })
        }
        "DOWNSTREAM_LOCAL_ADDRESS" => no_arg(K::DownstreamLocalAddress { port: Port::With }),
        "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => no_arg(K::DownstreamLocalAddress {
            port: Port::Without,
        }),
        "DOWNSTREAM_LOCAL_PORT" => no_arg(K::DownstreamLocalAddress { port: Port::Only }),
        "REQUESTED_SERVER_NAME" => no_arg(K::RequestedServerName),
        "DOWNSTREAM_PEER_SUBJECT" => no_arg(K::DownstreamPeerSubject),
        "DOWNSTREAM_TLS_VERSION" => no_arg(K::DownstreamTlsVersion),
        "DOWNSTREAM_TLS_CIPHER" => no_arg(K::DownstreamTlsCipher),
        "HOSTNAME" => no_arg(K::Hostname(hostname())),
        "LISTENER_NAME" => no_arg(K::Listener),
        "GRPC_STATUS" => {
            let style = match arg {
                None | Some("CAMEL_STRING") => GrpcStyle::Camel,
                Some("SNAKE_STRING") => GrpcStyle::Snake,
                Some("NUMBER") => GrpcStyle::Number,
                Some(other) => {
                    return Err((
                        format!("`%GRPC_STATUS({other})%`: unknown style"),
                        "the styles are CAMEL_STRING (the default: `NotFound`), SNAKE_STRING \
                         (`NOT_FOUND`) and NUMBER (`5`)"
                            .into(),
                    ))
                }
            };
            let name = HeaderName::from_static("grpc-status");
            Ok(K::GrpcStatus {
                style,
                headers: wants.slot(Direction::Response, name.clone()),
                trailers: wants.slot(Direction::Trailers, name),
            })
        }
        _ => Err((
            format!("unknown access-log operator `%{name}%`"),
            format!("the operators are {KNOWN}"),
        )),
    }
}

/// A header operator's field: a pseudo-header of its direction, or a field
/// to capture. `host` is `:authority` (as Envoy keeps it).
fn field(dir: Direction, name: &str, wants: &mut Wants) -> Result<Field, ParseError> {
    let lower = name.to_ascii_lowercase();
    let pseudo = match (dir, lower.as_str()) {
        (Direction::Request, ":method") => Some(Field::Method),
        (Direction::Request, ":path") => Some(Field::Path),
        (Direction::Request, ":authority" | "host") => Some(Field::Authority),
        (Direction::Request, ":scheme") => Some(Field::Scheme),
        (Direction::Request, "x-request-id") => Some(Field::RequestId),
        (Direction::Response, ":status") => Some(Field::Status),
        _ => None,
    };
    if let Some(p) = pseudo {
        return Ok(p);
    }
    if lower.starts_with(':') {
        return Err((
            format!("`{name}` is not a pseudo-header Legate logs here"),
            "requests have :method, :path, :authority and :scheme, responses :status".into(),
        ));
    }
    let h = HeaderName::from_bytes(lower.as_bytes()).map_err(|_| {
        (
            format!("`{name}` is not a header name"),
            "write a header field name, e.g. `%REQ(USER-AGENT)%`".into(),
        )
    })?;
    Ok(Field::Captured(wants.slot(dir, h)))
}

fn time_format(f: &str) -> Result<Vec<TimePiece>, ParseError> {
    let mut out = Vec::new();
    let mut lit = String::new();
    let mut chars = f.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            lit.push(c);
            continue;
        }
        let mut spec = chars.next();
        let mut digits = None;
        if let Some(d) = spec
            .and_then(|d| d.to_digit(10))
            .filter(|d| (1..=9).contains(d))
        {
            digits = Some(d);
            spec = chars.next();
        }
        let piece = match (digits, spec) {
            (Some(d), Some('f')) => TimePiece::Frac(d),
            (None, Some('f')) => TimePiece::Frac(9),
            (None, Some('%')) => {
                lit.push('%');
                continue;
            }
            (None, Some('z')) => {
                lit.push_str("+0000");
                continue;
            }
            (None, Some('Z')) => {
                lit.push_str("UTC");
                continue;
            }
            (None, Some(s)) => match s {
                'Y' => TimePiece::Year,
                'y' => TimePiece::Year2,
                'm' => TimePiece::Month,
                'b' | 'h' => TimePiece::MonthName,
                'B' => TimePiece::MonthFull,
                'd' => TimePiece::Day,
                'e' => TimePiece::DaySpace,
                'j' => TimePiece::DayOfYear,
                'a' => TimePiece::Weekday,
                'A' => TimePiece::WeekdayFull,
                'H' => TimePiece::Hour,
                'M' => TimePiece::Minute,
                'S' => TimePiece::Second,
                's' => TimePiece::Epoch,
                'F' | 'T' => {
                    // Shorthands, spelled out.
                    let (a, b, c, sep) = if s == 'F' {
                        (TimePiece::Year, TimePiece::Month, TimePiece::Day, "-")
                    } else {
                        (TimePiece::Hour, TimePiece::Minute, TimePiece::Second, ":")
                    };
                    if !lit.is_empty() {
                        out.push(TimePiece::Lit(std::mem::take(&mut lit)));
                    }
                    out.extend([
                        a,
                        TimePiece::Lit(sep.into()),
                        b,
                        TimePiece::Lit(sep.into()),
                        c,
                    ]);
                    continue;
                }
                _ => return Err(bad_time(f, &format!("%{s}"))),
            },
            (d, s) => {
                let mut what = String::from("%");
                if let Some(d) = d {
                    let _ = write!(what, "{d}");
                }
                if let Some(s) = s {
                    what.push(s);
                }
                return Err(bad_time(f, &what));
            }
        };
        if !lit.is_empty() {
            out.push(TimePiece::Lit(std::mem::take(&mut lit)));
        }
        out.push(piece);
    }
    if !lit.is_empty() {
        out.push(TimePiece::Lit(lit));
    }
    Ok(out)
}

fn bad_time(f: &str, what: &str) -> ParseError {
    (
        format!("`{what}` in `%START_TIME({f})%` is not a time field Legate writes"),
        "the fields are %Y %y %m %b %B %d %e %j %a %A %H %M %S %s %F %T %z %Z, %f and %1f..%9f \
         (fractions of a second), %% (times are UTC)"
            .into(),
    )
}

/// This host's name (`%HOSTNAME%`), read once when the format is parsed;
/// `None` (no value) if the kernel does not say.
fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// A request header operation's value with operators (`x-real-ip:
/// "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"`, Envoy's header value
/// formatters, nginx's `proxy_set_header X-Real-IP $remote_addr`), rendered
/// per request by [`HeaderTemplate::render`].
#[derive(Debug)]
pub struct HeaderTemplate {
    template: Template,
    /// The request fields its `%REQ(...)%`s read.
    request: Vec<HeaderName>,
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Template({} pieces)", self.0.len())
    }
}

/// What a request header value may say: the request and its connection, not
/// what only its answer will tell.
fn known_at_request(k: &Kind) -> bool {
    match k {
        Kind::Header { dir, .. } => *dir == Direction::Request,
        Kind::StartTime(_)
        | Kind::Protocol
        | Kind::RouteName
        | Kind::DownstreamRemoteAddress { .. }
        | Kind::DownstreamDirectRemoteAddress { .. }
        | Kind::DownstreamLocalAddress { .. }
        | Kind::RequestedServerName
        | Kind::DownstreamPeerSubject
        | Kind::DownstreamTlsVersion
        | Kind::DownstreamTlsCipher
        | Kind::Hostname(_)
        | Kind::Listener => true,
        _ => false,
    }
}

/// A header value as config wrote it: literal text (`%%` for a `%`), or a
/// template of the operators a request has.
pub enum HeaderValueSpec {
    Literal(String),
    Template(HeaderTemplate),
}

/// Parses a request header operation's value.
///
/// # Errors
/// A bad operator, or one whose value is not known before the request goes
/// upstream (a response's).
pub fn header_value(v: &str) -> Result<HeaderValueSpec, (String, String)> {
    if !v.contains('%') {
        return Ok(HeaderValueSpec::Literal(v.to_string()));
    }
    let mut wants = Wants::default();
    let template = template(v, &mut wants)?;
    let late = template
        .0
        .iter()
        .any(|p| matches!(p, Piece::Op(op) if !known_at_request(&op.kind)));
    if late {
        return Err((
            format!("`{v}` reads what only the response tells"),
            "a request header can say the request and its connection: %REQ(...)%, the \
             DOWNSTREAM_* addresses, TLS and certificate operators, %REQUESTED_SERVER_NAME%, \
             %START_TIME%, %PROTOCOL%, %ROUTE_NAME%, %LISTENER_NAME%, %HOSTNAME%"
                .into(),
        ));
    }
    if template.0.iter().all(|p| matches!(p, Piece::Lit(_))) {
        let mut lit = String::new();
        for p in &template.0 {
            if let Piece::Lit(l) = p {
                lit.push_str(l);
            }
        }
        return Ok(HeaderValueSpec::Literal(lit));
    }
    Ok(HeaderValueSpec::Template(HeaderTemplate {
        template,
        request: wants.request,
    }))
}

/// The request facts a [`HeaderTemplate`] reads.
pub struct RequestFacts<'a> {
    pub listener: &'a str,
    pub route: Option<&'a str>,
    pub method: &'a str,
    pub path: &'a str,
    pub authority: &'a str,
    /// `HTTP/1.1`, `HTTP/2.0` (as the access log's line has it).
    pub protocol: String,
    /// The client (`ip:port`; the trusted proxies' client, port 0).
    pub client: String,
    /// The connection's peer when `client` is a reported one.
    pub peer: Option<String>,
    pub start: SystemTime,
    pub local: SocketAddr,
    pub scheme: &'static str,
    pub tls: Option<(&'static str, &'static str)>,
    pub sni: Option<&'a str>,
    pub peer_subject: Option<&'a str>,
    pub request_id: Option<&'a str>,
}

impl HeaderTemplate {
    /// The value for this request, its `%REQ(...)%`s read from `headers` (the
    /// request as it goes upstream); `None` when it comes out empty (Envoy
    /// adds no header then) or is no valid header value.
    pub fn render(
        &self,
        facts: &RequestFacts<'_>,
        headers: &HeaderMap,
    ) -> Option<http::HeaderValue> {
        let captured = capture(&self.request, headers);
        let line = Line {
            attempts: 0,
            authority: Some(facts.authority),
            bytes_received: 0,
            bytes_sent: 0,
            cause: None,
            client: facts.client.clone(),
            cluster: None,
            downstream_peer_subject: facts.peer_subject,
            duration_ms: 0.0,
            listener: facts.listener,
            method: Some(facts.method),
            path: Some(facts.path),
            peer: facts.peer.clone(),
            protocol: Some(facts.protocol.clone()),
            referer: None,
            request_id: facts.request_id,
            requested_server_name: facts.sni,
            response_duration_ms: None,
            route: facts.route,
            route_table: None,
            start_time: super::timestamp(facts.start),
            status: 0,
            time: String::new(),
            upstream: None,
            upstream_transport_failure_reason: None,
            user_agent: None,
            virtual_host: None,
            x_forwarded_for: None,
            facts: super::Facts {
                start: Some(facts.start),
                local: Some(facts.local),
                scheme: Some(facts.scheme),
                grpc: false,
                tls: facts.tls,
                request: &captured,
                response: &[],
                trailers: &[],
            },
        };
        let mut s = String::new();
        // An operator without a value adds nothing (Envoy's header formatter).
        self.template.text_with(&line, "", &mut s);
        if s.is_empty() {
            return None;
        }
        http::HeaderValue::from_str(&s).ok()
    }
}

/// An operator's value on one line.
enum Value<'a> {
    Absent,
    Text(Cow<'a, str>),
    Number(u64),
}

impl Format {
    /// Writes `line` (without its line break) to `out`.
    pub fn render(&self, line: &Line<'_>, out: &mut Vec<u8>) {
        match self {
            // Serializing plain fields cannot fail.
            Format::Default => {
                let _ = serde_json::to_writer(&mut *out, line);
            }
            Format::Text(t) => {
                let mut s = String::new();
                t.text(line, &mut s);
                out.extend_from_slice(s.as_bytes());
            }
            Format::Json(o) => {
                let mut s = String::new();
                json_object(o, line, &mut s);
                out.extend_from_slice(s.as_bytes());
            }
        }
    }
}

impl Template {
    /// The template as text: an operator without a value is `-` (Envoy's).
    fn text(&self, line: &Line<'_>, s: &mut String) {
        self.text_with(line, "-", s);
    }

    /// The template as text, `absent` for an operator without a value.
    fn text_with(&self, line: &Line<'_>, absent: &str, s: &mut String) {
        for p in &self.0 {
            match p {
                Piece::Lit(l) => s.push_str(l),
                Piece::Op(op) => match op.value(line) {
                    Value::Absent => s.push_str(absent),
                    Value::Text(t) => s.push_str(&t),
                    Value::Number(n) => {
                        let _ = write!(s, "{n}");
                    }
                },
            }
        }
    }
}

fn json_object(o: &[(String, Node)], line: &Line<'_>, s: &mut String) {
    s.push('{');
    for (i, (k, v)) in o.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        json_string(k, s);
        s.push(':');
        match v {
            Node::Object(o) => json_object(o, line, s),
            Node::Literal(l) => s.push_str(&l.to_string()),
            Node::Template(t) => match t.0.as_slice() {
                [Piece::Op(op)] => match op.value(line) {
                    Value::Absent => s.push_str("null"),
                    Value::Number(n) => {
                        let _ = write!(s, "{n}");
                    }
                    Value::Text(t) => json_string(&t, s),
                },
                _ => {
                    let mut text = String::new();
                    t.text(line, &mut text);
                    json_string(&text, s);
                }
            },
        }
    }
    s.push('}');
}

fn json_string(v: &str, s: &mut String) {
    // A `String` serializes infallibly.
    s.push_str(&serde_json::to_string(v).unwrap_or_default());
}

impl Op {
    fn value<'a>(&'a self, line: &'a Line<'a>) -> Value<'a> {
        let v = self.kind.value(line);
        match (v, self.max) {
            (Value::Text(t), Some(max)) => match t.char_indices().nth(max) {
                Some((cut, _)) => Value::Text(match t {
                    Cow::Borrowed(b) => Cow::Borrowed(&b[..cut]),
                    Cow::Owned(mut o) => {
                        o.truncate(cut);
                        Cow::Owned(o)
                    }
                }),
                None => Value::Text(t),
            },
            (v, _) => v,
        }
    }
}

fn text(v: Option<&str>) -> Value<'_> {
    v.map_or(Value::Absent, |t| Value::Text(Cow::Borrowed(t)))
}

fn address(addr: Option<SocketAddr>, port: Port) -> Value<'static> {
    match (addr, port) {
        (None, _) => Value::Absent,
        (Some(a), Port::With) => Value::Text(Cow::Owned(a.to_string())),
        (Some(a), Port::Without) => Value::Text(Cow::Owned(a.ip().to_string())),
        (Some(a), Port::Only) => Value::Number(u64::from(a.port())),
    }
}

impl Kind {
    fn value<'a>(&'a self, line: &'a Line<'a>) -> Value<'a> {
        let f = &line.facts;
        let tcp = line.protocol.as_deref() == Some("TCP");
        match self {
            Kind::StartTime(None) => Value::Text(Cow::Borrowed(&line.start_time)),
            Kind::StartTime(Some(pieces)) => match f.start {
                Some(t) => Value::Text(Cow::Owned(strftime(pieces, t))),
                None => Value::Absent,
            },
            Kind::Header {
                dir,
                first,
                alt,
                without_query,
            } => {
                let v =
                    header(line, *dir, *first).or_else(|| alt.and_then(|a| header(line, *dir, a)));
                match v {
                    None => Value::Absent,
                    Some(Cow::Borrowed(b)) if *without_query => {
                        Value::Text(Cow::Borrowed(b.split_once('?').map_or(b, |(p, _)| p)))
                    }
                    Some(Cow::Owned(mut o)) if *without_query => {
                        if let Some(i) = o.find('?') {
                            o.truncate(i);
                        }
                        Value::Text(Cow::Owned(o))
                    }
                    Some(t) => Value::Text(t),
                }
            }
            Kind::Protocol => match line.protocol.as_deref() {
                Some("HTTP/2.0") => Value::Text(Cow::Borrowed("HTTP/2")),
                Some("HTTP/3.0") => Value::Text(Cow::Borrowed("HTTP/3")),
                Some("TCP") | None => Value::Absent,
                Some(p) => Value::Text(Cow::Borrowed(p)),
            },
            Kind::ResponseCode => Value::Number(u64::from(line.status)),
            Kind::ResponseCodeDetails => match line.cause {
                Some(c) => Value::Text(Cow::Borrowed(c)),
                None if line.response_duration_ms.is_some() => {
                    Value::Text(Cow::Borrowed("via_upstream"))
                }
                None => Value::Absent,
            },
            Kind::ResponseFlags => text(line.cause.and_then(|c| response_flag(c, tcp))),
            Kind::BytesReceived => Value::Number(line.bytes_received),
            Kind::BytesSent => Value::Number(line.bytes_sent),
            Kind::Duration => Value::Number(whole_ms(line.duration_ms)),
            Kind::ResponseDuration => line
                .response_duration_ms
                .map_or(Value::Absent, |d| Value::Number(whole_ms(d))),
            Kind::UpstreamHost => text(line.upstream.as_deref()),
            Kind::UpstreamCluster => text(line.cluster),
            Kind::UpstreamTransportFailureReason => text(line.upstream_transport_failure_reason),
            Kind::UpstreamRequestAttemptCount => Value::Number(u64::from(line.attempts)),
            Kind::RouteName => text(line.route),
            Kind::DownstreamRemoteAddress { port } => address(line.client.parse().ok(), *port),
            Kind::DownstreamDirectRemoteAddress { port } => address(
                line.peer.as_deref().unwrap_or(&line.client).parse().ok(),
                *port,
            ),
            Kind::DownstreamLocalAddress { port } => address(f.local, *port),
            Kind::RequestedServerName => text(line.requested_server_name),
            Kind::DownstreamPeerSubject => text(line.downstream_peer_subject),
            Kind::DownstreamTlsVersion => text(f.tls.map(|(v, _)| v)),
            Kind::DownstreamTlsCipher => text(f.tls.map(|(_, c)| c)),
            Kind::Hostname(h) => text(h.as_deref()),
            Kind::Listener => Value::Text(Cow::Borrowed(line.listener)),
            Kind::GrpcStatus {
                style,
                headers,
                trailers,
            } => {
                if !f.grpc {
                    return Value::Absent;
                }
                let raw = f
                    .trailers
                    .get(*trailers)
                    .and_then(Option::as_deref)
                    .or_else(|| f.response.get(*headers).and_then(Option::as_deref));
                // Without a `grpc-status` (a plain 503 from a proxy on the
                // way), the status gRPC's HTTP mapping gives, as Envoy's.
                let code = match raw {
                    Some(r) => r.trim().parse::<u64>(),
                    None => Ok(u64::from(legate_abi_rules::grpc::status_of_http(
                        line.status,
                    ))),
                };
                match code {
                    Ok(n) => match (style, GRPC_NAMES.get(n as usize)) {
                        (GrpcStyle::Number, _) => Value::Number(n),
                        // A code gRPC does not define: its digits, as text.
                        (_, None) => Value::Text(Cow::Owned(n.to_string())),
                        (GrpcStyle::Camel, Some((camel, _))) => Value::Text(Cow::Borrowed(camel)),
                        (GrpcStyle::Snake, Some((_, snake))) => Value::Text(Cow::Borrowed(snake)),
                    },
                    Err(_) => raw.map_or(Value::Absent, |r| Value::Text(Cow::Borrowed(r))),
                }
            }
        }
    }
}

/// gRPC's status codes 0..=16: Envoy's CAMEL_STRING and SNAKE_STRING names.
const GRPC_NAMES: [(&str, &str); 17] = [
    ("OK", "OK"),
    ("Canceled", "CANCELLED"),
    ("Unknown", "UNKNOWN"),
    ("InvalidArgument", "INVALID_ARGUMENT"),
    ("DeadlineExceeded", "DEADLINE_EXCEEDED"),
    ("NotFound", "NOT_FOUND"),
    ("AlreadyExists", "ALREADY_EXISTS"),
    ("PermissionDenied", "PERMISSION_DENIED"),
    ("ResourceExhausted", "RESOURCE_EXHAUSTED"),
    ("FailedPrecondition", "FAILED_PRECONDITION"),
    ("Aborted", "ABORTED"),
    ("OutOfRange", "OUT_OF_RANGE"),
    ("Unimplemented", "UNIMPLEMENTED"),
    ("Internal", "INTERNAL"),
    ("Unavailable", "UNAVAILABLE"),
    ("DataLoss", "DATA_LOSS"),
    ("Unauthenticated", "UNAUTHENTICATED"),
];

fn whole_ms(ms: f64) -> u64 {
    // Durations are never negative; `as` saturates.
    ms.floor() as u64
}

/// A header operator's field on `line`.
fn header<'a>(line: &'a Line<'a>, dir: Direction, f: Field) -> Option<Cow<'a, str>> {
    let facts = &line.facts;
    let b = Cow::Borrowed;
    match f {
        Field::Method => line.method.map(b),
        Field::Path => line.path.map(b),
        Field::Authority => line.authority.map(b),
        Field::Scheme => facts.scheme.map(b),
        Field::RequestId => line.request_id.map(b),
        Field::Status => {
            (line.protocol.as_deref() != Some("TCP")).then(|| Cow::Owned(line.status.to_string()))
        }
        Field::Captured(i) => {
            let list = match dir {
                Direction::Request => facts.request,
                Direction::Response => facts.response,
                Direction::Trailers => facts.trailers,
            };
            list.get(i).and_then(Option::as_deref).map(b)
        }
    }
}

/// The flags [`response_flag`] gives, for `access_log.filter.response_flags`.
pub const RESPONSE_FLAGS: [&str; 12] = [
    "NR", "UH", "UF", "UO", "UT", "UR", "UPE", "SI", "DC", "DR", "DT", "FI",
];

/// Envoy's `%RESPONSE_FLAGS%` for a line's cause: the short names Envoy logs
/// for the same outcome; `None` for a cause Envoy has no flag for (a filter's
/// answer, a bad request, a direct response).
pub fn response_flag(cause: &str, tcp: bool) -> Option<&'static str> {
    // (Every flag returned here is in `RESPONSE_FLAGS`.)
    Some(match cause {
        "no_route" => "NR",
        "no_healthy_upstream" => "UH",
        "upstream_connect_failure" | "upstream_connect_timeout" => "UF",
        "overloaded" => "UO",
        "upstream_timeout" | "upstream_per_try_timeout" => "UT",
        "upstream_reset" | "response_body_failed" => "UR",
        "upstream_protocol_error" => "UPE",
        // An upgraded exchange's tunnel idle too (HTTP lines only: a TCP
        // session's idle timeout has no flag).
        "stream_idle_timeout" => "SI",
        "idle_timeout" if !tcp => "SI",
        "downstream_disconnect" if !tcp => "DC",
        "downstream_reset" if !tcp => "DR",
        "max_connection_duration" => "DT",
        "no_original_destination" => "UH",
        crate::fault::ABORT_CAUSE => "FI",
        _ => return None,
    })
}

/// `t` written by a parsed `%START_TIME(...)%` format.
fn strftime(pieces: &[TimePiece], t: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
    ];
    let c = civil(t);
    let mut s = String::new();
    for p in pieces {
        let _ = match p {
            TimePiece::Lit(l) => {
                s.push_str(l);
                Ok(())
            }
            TimePiece::Year => write!(s, "{:04}", c.year),
            TimePiece::Year2 => write!(s, "{:02}", c.year.rem_euclid(100)),
            TimePiece::Month => write!(s, "{:02}", c.month),
            TimePiece::MonthName => s.write_str(&MONTHS[(c.month as usize - 1) % 12][..3]),
            TimePiece::MonthFull => s.write_str(MONTHS[(c.month as usize - 1) % 12]),
            TimePiece::Day => write!(s, "{:02}", c.day),
            TimePiece::DaySpace => write!(s, "{:2}", c.day),
            TimePiece::DayOfYear => write!(s, "{:03}", c.yday),
            TimePiece::Weekday => s.write_str(&DAYS[c.weekday as usize % 7][..3]),
            TimePiece::WeekdayFull => s.write_str(DAYS[c.weekday as usize % 7]),
            TimePiece::Hour => write!(s, "{:02}", c.hour),
            TimePiece::Minute => write!(s, "{:02}", c.minute),
            TimePiece::Second => write!(s, "{:02}", c.second),
            TimePiece::Epoch => write!(s, "{}", c.epoch),
            TimePiece::Frac(d) => {
                let v = c.nanos / 10u32.pow(9 - d);
                write!(s, "{v:0width$}", width = *d as usize)
            }
        };
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg(format: Option<&str>, json: Option<&str>) -> Cfg {
        Cfg {
            path: "stdout".into(),
            flush_interval: crate::config::Dur::secs(1),
            buffer_limit: crate::config::ByteSize(1 << 20),
            format: format.map(str::to_string),
            json_format: json.map(|j| serde_saphyr::from_str(j).unwrap()),
            filter: None,
        }
    }

    /// 2024-02-29T13:04:05.123456789Z, a Thursday, day 60 of a leap year.
    fn t() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::new(1_709_211_845, 123_456_789)
    }

    fn line<'a>(req: &'a [Option<String>], resp: &'a [Option<String>]) -> Line<'a> {
        Line {
            attempts: 2,
            authority: Some("example.com"),
            bytes_received: 3,
            bytes_sent: 1234,
            client: "10.0.0.1:5555".into(),
            cluster: Some("backend"),
            duration_ms: 12.7,
            method: Some("GET"),
            path: Some("/a?b=1"),
            peer: Some("127.0.0.1:4000".into()),
            protocol: Some("HTTP/2.0".into()),
            request_id: Some("rid-1"),
            response_duration_ms: Some(5.2),
            route: Some("r1"),
            route_table: Some("main"),
            start_time: super::super::timestamp(t()),
            status: 200,
            time: super::super::timestamp(t()),
            upstream: Some("127.0.0.1:8080".into()),
            user_agent: Some("curl/8"),
            virtual_host: Some("all"),
            facts: super::super::Facts {
                start: Some(t()),
                local: Some("127.0.0.2:443".parse().unwrap()),
                scheme: Some("https"),
                grpc: false,
                tls: Some(("TLSv1.3", "TLS_AES_128_GCM_SHA256")),
                request: req,
                response: resp,
                trailers: &[],
            },
            ..Line::blank()
        }
    }

    fn render(f: &Format, l: &Line<'_>) -> String {
        let mut out = Vec::new();
        f.render(l, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn envoys_default_format_renders_with_dashes_for_what_is_absent() {
        let c = cfg(
            Some(
                "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" \
                 %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% \
                 %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \
                 \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \
                 \"%UPSTREAM_HOST%\"\n",
            ),
            None,
        );
        let (f, wants) = parse(&c).unwrap();
        // Only the fields that are not in the line already are captured.
        assert_eq!(
            wants.request,
            ["x-envoy-original-path", "x-forwarded-for", "user-agent"]
        );
        assert_eq!(wants.response, ["x-envoy-upstream-service-time"]);
        let req = [
            None,
            Some("1.2.3.4".to_string()),
            Some("curl/8".to_string()),
        ];
        let got = render(&f, &line(&req, &[None]));
        assert_eq!(
            got,
            "[2024-02-29T13:04:05.123Z] \"GET /a?b=1 HTTP/2\" 200 - 3 1234 12 - \"1.2.3.4\" \
             \"curl/8\" \"rid-1\" \"example.com\" \"127.0.0.1:8080\""
        );
    }

    #[test]
    fn operators_read_the_line() {
        let c = cfg(
            Some(
                "%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% \
                 %DOWNSTREAM_REMOTE_PORT% %DOWNSTREAM_DIRECT_REMOTE_ADDRESS% \
                 %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_PORT% %REQ(:SCHEME)% \
                 %REQ(HOST)% %UPSTREAM_CLUSTER% %ROUTE_NAME% %UPSTREAM_REQUEST_ATTEMPT_COUNT% \
                 %RESPONSE_DURATION% %RESPONSE_CODE_DETAILS% %LISTENER_NAME% %RESP(:STATUS)% \
                 %REQ(USER-AGENT):3% %REQ_WITHOUT_QUERY(:PATH)% %DOWNSTREAM_TLS_VERSION% \
                 %DOWNSTREAM_TLS_CIPHER% 100%%",
            ),
            None,
        );
        let (f, _) = parse(&c).unwrap();
        let req = [Some("curl/8".to_string())];
        assert_eq!(
            render(&f, &line(&req, &[])),
            "10.0.0.1:5555 10.0.0.1 5555 127.0.0.1:4000 127.0.0.2:443 443 https example.com \
             backend r1 2 5 via_upstream web 200 cur /a TLSv1.3 TLS_AES_128_GCM_SHA256 100%"
        );
        // Local replies: the cause, and Envoy's flag for it.
        let c = cfg(
            Some("%RESPONSE_CODE_DETAILS% %RESPONSE_FLAGS% %RESPONSE_DURATION%"),
            None,
        );
        let (f, _) = parse(&c).unwrap();
        for (cause, want) in [
            ("no_route", "no_route NR -"),
            ("upstream_connect_failure", "upstream_connect_failure UF -"),
            ("overloaded", "overloaded UO -"),
            ("upstream_timeout", "upstream_timeout UT -"),
            ("downstream_disconnect", "downstream_disconnect DC -"),
            ("plugin:unauthorized", "plugin:unauthorized - -"),
        ] {
            let mut l = line(&[], &[]);
            l.cause = Some(cause);
            l.response_duration_ms = None;
            assert_eq!(render(&f, &l), want);
        }
    }

    #[test]
    fn json_format_keeps_order_types_and_nesting() {
        let c = cfg(
            None,
            Some(
                "zeta: \"%RESPONSE_CODE%\"\nalpha: \"%REQ(X-NOPE)%\"\nup:\n  cluster: \
                 \"%UPSTREAM_CLUSTER%\"\n  took: \"%DURATION%\"\ntag: \"v=%RESPONSE_CODE% \
                 %REQ(X-NOPE)%\"\nversion: 2\non: true\nua: \"%REQ(USER-AGENT)%\"\n",
            ),
        );
        let (f, _) = parse(&c).unwrap();
        let req = [None, Some("a \"quoted\" agent".to_string())];
        assert_eq!(
            render(&f, &line(&req, &[])),
            r#"{"zeta":200,"alpha":null,"up":{"cluster":"backend","took":12},"tag":"v=200 -","version":2,"on":true,"ua":"a \"quoted\" agent"}"#
        );
    }

    #[test]
    fn grpc_status_is_envoys() {
        let c = cfg(
            Some("%GRPC_STATUS% %GRPC_STATUS(SNAKE_STRING)% %GRPC_STATUS(NUMBER)%"),
            None,
        );
        let (f, wants) = parse(&c).unwrap();
        assert_eq!(wants.response, ["grpc-status"]);
        assert_eq!(wants.trailers, ["grpc-status"]);
        let status = |resp: &[Option<String>], trailers: &[Option<String>], grpc, code| {
            let mut l = line(&[], resp);
            l.facts.trailers = trailers;
            l.facts.grpc = grpc;
            l.status = code;
            render(&f, &l)
        };
        let five = [Some("5".to_string())];
        // From the trailers, else the head (trailers-only).
        assert_eq!(status(&[None], &five, true, 200), "NotFound NOT_FOUND 5");
        assert_eq!(status(&five, &[], true, 200), "NotFound NOT_FOUND 5");
        // None at all: gRPC's mapping of the HTTP status.
        assert_eq!(
            status(&[None], &[], true, 503),
            "Unavailable UNAVAILABLE 14"
        );
        // Not a gRPC request: no value.
        assert_eq!(status(&five, &[], false, 200), "- - -");
        // A code gRPC does not define: its digits.
        let odd = [Some("17".to_string())];
        assert_eq!(status(&odd, &[], true, 200), "17 17 17");
    }

    #[test]
    fn request_header_values_take_request_operators() {
        assert!(matches!(header_value("plain"), Ok(HeaderValueSpec::Literal(l)) if l == "plain"));
        assert!(matches!(header_value("100%%"), Ok(HeaderValueSpec::Literal(l)) if l == "100%"));
        let late = header_value("%RESPONSE_CODE%").err().unwrap();
        assert!(late.0.contains("only the response tells"), "{}", late.0);
        assert!(header_value("50%").is_err());
        let Ok(HeaderValueSpec::Template(tpl)) =
            header_value("%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% via %REQ(X-A)%%REQ(X-NOPE)%")
        else {
            panic!("a template");
        };
        let facts = RequestFacts {
            listener: "web",
            route: Some("r"),
            method: "GET",
            path: "/p?q",
            authority: "a.example",
            protocol: "HTTP/1.1".into(),
            client: "10.0.0.9:1234".into(),
            peer: None,
            start: t(),
            local: "127.0.0.1:80".parse().unwrap(),
            scheme: "http",
            tls: None,
            sni: None,
            peer_subject: None,
            request_id: None,
        };
        let mut h = HeaderMap::new();
        h.insert("x-a", "b".parse().unwrap());
        // An operator without a value adds nothing to the text.
        assert_eq!(tpl.render(&facts, &h).unwrap(), "10.0.0.9 via b");
        let Ok(HeaderValueSpec::Template(empty)) = header_value("%REQ(X-NOPE)%") else {
            panic!("a template");
        };
        assert_eq!(empty.render(&facts, &h), None);
    }

    #[test]
    fn the_default_is_the_json_line() {
        let (f, wants) = parse(&cfg(None, None)).unwrap();
        assert!(wants.request.is_empty() && wants.response.is_empty());
        let v: serde_json::Value = serde_json::from_str(&render(&f, &line(&[], &[]))).unwrap();
        assert_eq!(v["status"], 200);
        assert_eq!(v["protocol"], "HTTP/2.0");
    }

    #[test]
    fn start_time_takes_strftime_fields() {
        let c = cfg(
            Some(
                "%START_TIME(%d/%b/%Y:%H:%M:%S %z)% %START_TIME(%F %T.%3f)% \
                 %START_TIME(%s.%6f %a %A %B %j %y %e %Z %f %%)%",
            ),
            None,
        );
        let (f, _) = parse(&c).unwrap();
        assert_eq!(
            render(&f, &line(&[], &[])),
            "29/Feb/2024:13:04:05 +0000 2024-02-29 13:04:05.123 1709211845.123456 Thu Thursday \
             February 060 24 29 UTC 123456789 %"
        );
        // Day of the year across a leap year's end and a common year's March.
        let at = |secs| super::super::civil(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!((at(1_735_603_200).yday, at(1_735_603_200).day), (366, 31)); // 2024-12-31
        assert_eq!(at(1_735_689_600).yday, 1); // 2025-01-01
        assert_eq!(at(1_740_787_200).yday, 60); // 2025-03-01
        assert_eq!(at(0).weekday, 4); // 1970-01-01, a Thursday
    }

    #[test]
    fn bad_formats_say_what_is_wrong() {
        for (format, want) in [
            ("%NOPE%", "unknown access-log operator `%NOPE%`"),
            ("%REQ%", "`%REQ%` needs a header name"),
            ("%REQ(BAD NAME)%", "`BAD NAME` is not a header name"),
            ("%REQ(:STATUS)%", "`:STATUS` is not a pseudo-header"),
            ("%RESPONSE_CODE", "`%RESPONSE_CODE` is not closed with `%`"),
            ("%REQ(A", "`%REQ(` has no closing `)`"),
            ("%REQ(A):0%", "bad length after `:`"),
            ("%DURATION(X)%", "`%DURATION%` takes no argument"),
            ("100% done", "a `%` not followed by an operator name"),
            ("%START_TIME(%Q)%", "`%Q` in `%START_TIME(%Q)%`"),
            (
                "%GRPC_STATUS(LOUD)%",
                "`%GRPC_STATUS(LOUD)%`: unknown style",
            ),
            ("a\nb", "a line break inside `access_log.format`"),
            ("", "`access_log.format` is empty"),
        ] {
            let e = parse(&cfg(Some(format), None)).err().unwrap();
            assert!(e.message.contains(want), "{format:?}: {}", e.message);
            assert!(e.path.is_empty());
        }
        let e = parse(&cfg(None, Some("a: ok\nb:\n  c: \"%NOPE%\"\n")))
            .err()
            .unwrap();
        assert_eq!(e.path, ["b", "c"]);
    }

    #[test]
    fn headers_are_captured_joined_and_escaped() {
        let mut h = HeaderMap::new();
        h.append("x-a", "1".parse().unwrap());
        h.append("x-a", "2".parse().unwrap());
        h.append("x-b", http::HeaderValue::from_bytes(b"caf\xe9\\").unwrap());
        let names = [
            HeaderName::from_static("x-a"),
            HeaderName::from_static("x-b"),
            HeaderName::from_static("x-c"),
        ];
        assert_eq!(
            &*capture(&names, &h),
            [
                Some("1,2".to_string()),
                Some("caf\\xE9\\x5C".to_string()),
                None
            ]
        );
    }
}
