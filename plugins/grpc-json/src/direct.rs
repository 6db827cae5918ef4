//! JSON straight to the protobuf wire format, for the common request bodies:
//! a `body: "*"` message of strings, numbers, bools, enums, nested messages
//! and lists of them. No `DynamicMessage` is built: building one allocates a
//! message, a field set and a descriptor handle per JSON object, and encoding
//! it walks that tree again, most of a request body's CPU time (the plugin's
//! `limits.cpu`: a 62 KB list of 2,000 small objects took ~5 ms in the host).
//!
//! Anything else gives up ([`None`]) and the caller takes the general path
//! (prost-reflect's proto3 JSON parser), which also words the errors: this
//! never decides that a body is wrong. It gives up on a message type with a
//! map, a `oneof` (proto3 `optional` included), a group, a `bytes` field or a
//! well-known type (rules checked once, [`eligible`]); and on a body with an
//! unknown or repeated key, a number given as a string, a fraction for an
//! integer, an unknown enum name, or anything malformed.
//!
//! The encoding is the one prost-reflect writes for the same message:
//! implicit-presence fields holding their default are left out, numeric
//! lists packed when the field is, nested messages length-delimited. Fields
//! go out in the body's order, which protobuf parsers accept as any other.

use std::collections::HashSet;
use std::fmt;

use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// Whether bodies of message type `desc` may take the direct path: no field,
/// here or in the messages it holds, is a map, in a `oneof`, a group, `bytes`
/// or a well-known type (each has a JSON form of its own).
pub fn eligible(desc: &MessageDescriptor) -> bool {
    plain(desc, Use::Encode)
}

/// What a message type is checked for by [`plain`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Use {
    /// Encoding JSON directly ([`eligible`]): no `bytes`.
    Encode,
    /// Printing directly ([`printable`]): `bytes` are fine (base64), an enum
    /// of a well-known type is not.
    Print,
}

/// Whether no field of `desc`, or of the messages it holds, has a JSON form
/// of its own for `what`: a map, a `oneof` member, a group, a well-known
/// type, and per [`Use`] `bytes` or a well-known enum.
fn plain(desc: &MessageDescriptor, what: Use) -> bool {
    fn walk(desc: &MessageDescriptor, what: Use, seen: &mut HashSet<String>) -> bool {
        if desc.full_name().starts_with("google.protobuf.") {
            return false;
        }
        if !seen.insert(desc.full_name().to_owned()) {
            return true;
        }
        desc.fields().all(|f| {
            !f.is_map()
                && !f.is_group()
                && f.containing_oneof().is_none()
                && match f.kind() {
                    Kind::Bytes => what == Use::Print,
                    Kind::Message(m) => walk(&m, what, seen),
                    Kind::Enum(e) => {
                        what == Use::Encode || !e.full_name().starts_with("google.protobuf.")
                    }
                    _ => true,
                }
        })
    }
    walk(desc, what, &mut HashSet::new())
}

/// The encoded message of type `desc` (which must be [`eligible`]) for the
/// JSON object `body`, or `None` to take the general path.
pub fn encode(desc: &MessageDescriptor, body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(body.len());
    let mut de = serde_json::Deserializer::from_slice(body);
    MessageSeed {
        desc,
        out: &mut out,
    }
    .deserialize(&mut de)
    .ok()?;
    de.end().ok()?;
    Some(out)
}

/// The one error: give up, the general path will say what is wrong.
fn give_up<E: serde::de::Error>() -> E {
    E::custom("not for the direct path")
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        // Truncation intended: the low 7 bits, with the continuation bit.
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Wire types.
const VARINT: u32 = 0;
const I64: u32 = 1;
const LEN: u32 = 2;
const I32: u32 = 5;

fn key(out: &mut Vec<u8>, number: u32, wire: u32) {
    varint(out, (u64::from(number) << 3) | u64::from(wire));
}

/// `bytes` as a length-delimited field `number`.
fn len_field(out: &mut Vec<u8>, number: u32, bytes: &[u8]) {
    key(out, number, LEN);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// A JSON scalar, as the JSON parser gave it.
#[derive(Debug, Clone, Copy)]
enum Scalar<'a> {
    Bool(bool),
    I64(i64),
    U64(u64),
    F64(f64),
    Str(&'a str),
}

/// A scalar value encoded for its field kind: the wire type and whether it is
/// the kind's default (left out of a field without presence). `None`: not
/// for the direct path (a number as a string, out of range…).
fn scalar(kind: &Kind, v: Scalar<'_>, out: &mut Vec<u8>) -> Option<(u32, bool)> {
    let int = match v {
        Scalar::I64(n) => Some(i128::from(n)),
        Scalar::U64(n) => Some(i128::from(n)),
        _ => None,
    };
    match kind {
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 | Kind::Enum(_) => {
            let n = match (kind, v) {
                (Kind::Enum(e), Scalar::Str(name)) => e.get_value_by_name(name)?.number(),
                _ => i32::try_from(int?).ok()?,
            };
            match kind {
                Kind::Sint32 => varint(out, u64::from(((n << 1) ^ (n >> 31)) as u32)),
                Kind::Sfixed32 => {
                    out.extend_from_slice(&n.to_le_bytes());
                    return Some((I32, n == 0));
                }
                // Negative: sign-extended to ten bytes, as protobuf does.
                _ => varint(out, i64::from(n) as u64),
            }
            Some((VARINT, n == 0))
        }
        Kind::Uint32 | Kind::Fixed32 => {
            let n = u32::try_from(int?).ok()?;
            if matches!(kind, Kind::Fixed32) {
                out.extend_from_slice(&n.to_le_bytes());
                return Some((I32, n == 0));
            }
            varint(out, u64::from(n));
            Some((VARINT, n == 0))
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            let n = i64::try_from(int?).ok()?;
            match kind {
                Kind::Sint64 => varint(out, ((n << 1) ^ (n >> 63)) as u64),
                Kind::Sfixed64 => {
                    out.extend_from_slice(&n.to_le_bytes());
                    return Some((I64, n == 0));
                }
                _ => varint(out, n as u64),
            }
            Some((VARINT, n == 0))
        }
        Kind::Uint64 | Kind::Fixed64 => {
            let n = u64::try_from(int?).ok()?;
            if matches!(kind, Kind::Fixed64) {
                out.extend_from_slice(&n.to_le_bytes());
                return Some((I64, n == 0));
            }
            varint(out, n);
            Some((VARINT, n == 0))
        }
        Kind::Float | Kind::Double => {
            let f = match v {
                Scalar::I64(n) => n as f64,
                Scalar::U64(n) => n as f64,
                Scalar::F64(f) => f,
                _ => return None,
            };
            if matches!(kind, Kind::Double) {
                out.extend_from_slice(&f.to_le_bytes());
                return Some((I64, f == 0.0));
            }
            if !f.is_finite() || f.abs() > f64::from(f32::MAX) {
                return None;
            }
            // Narrowing intended: the float nearest the JSON number.
            let f = f as f32;
            out.extend_from_slice(&f.to_le_bytes());
            Some((I32, f == 0.0))
        }
        Kind::Bool => {
            let Scalar::Bool(b) = v else { return None };
            out.push(u8::from(b));
            Some((VARINT, !b))
        }
        Kind::String => {
            let Scalar::Str(s) = v else { return None };
            varint(out, s.len() as u64);
            out.extend_from_slice(s.as_bytes());
            Some((LEN, s.is_empty()))
        }
        Kind::Bytes | Kind::Message(_) => None,
    }
}

/// A message from a JSON object, appended to `out` (its fields, no length).
struct MessageSeed<'a> {
    desc: &'a MessageDescriptor,
    out: &'a mut Vec<u8>,
}

impl<'de> DeserializeSeed<'de> for MessageSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for MessageSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen: Vec<u32> = Vec::new();
        while let Some(field) = map.next_key_seed(KeySeed(self.desc))? {
            if seen.contains(&field.number()) {
                return Err(give_up());
            }
            seen.push(field.number());
            map.next_value_seed(FieldSeed {
                field: &field,
                out: self.out,
            })?;
        }
        Ok(())
    }
}

/// A member's name: the field it names (JSON or proto name), looked up
/// without copying the name.
struct KeySeed<'a>(&'a MessageDescriptor);

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = FieldDescriptor;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<FieldDescriptor, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = FieldDescriptor;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FieldDescriptor, E> {
        self.0
            .get_field_by_json_name(v)
            .or_else(|| self.0.get_field_by_name(v))
            .ok_or_else(give_up)
    }
}

/// One field's JSON value (`null`: not set), appended to `out` with its key.
struct FieldSeed<'a> {
    field: &'a FieldDescriptor,
    out: &'a mut Vec<u8>,
}

impl<'de> DeserializeSeed<'de> for FieldSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl FieldSeed<'_> {
    fn scalar<E: serde::de::Error>(self, v: Scalar<'_>) -> Result<(), E> {
        if self.field.is_list() {
            return Err(give_up());
        }
        let mut value = Vec::new();
        let (wire, default) = scalar(&self.field.kind(), v, &mut value).ok_or_else(give_up)?;
        if !default || self.field.supports_presence() {
            key(self.out, self.field.number(), wire);
            self.out.extend_from_slice(&value);
        }
        Ok(())
    }
}

impl<'de> Visitor<'de> for FieldSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field value")
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        self.scalar(Scalar::Bool(v))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.scalar(Scalar::I64(v))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.scalar(Scalar::U64(v))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        self.scalar(Scalar::F64(v))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.scalar(Scalar::Str(v))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        let Kind::Message(desc) = self.field.kind() else {
            return Err(give_up());
        };
        if self.field.is_list() {
            return Err(give_up());
        }
        let mut inner = Vec::new();
        MessageSeed {
            desc: &desc,
            out: &mut inner,
        }
        .visit_map(map)?;
        len_field(self.out, self.field.number(), &inner);
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if !self.field.is_list() {
            return Err(give_up());
        }
        let kind = self.field.kind();
        let number = self.field.number();
        if let Kind::Message(desc) = &kind {
            while seq
                .next_element_seed(ElementSeed::Message(desc, number, &mut *self.out))?
                .is_some()
            {}
            return Ok(());
        }
        let packed = self.field.is_packed();
        let mut values = Vec::new();
        while let Some(wire) = seq.next_element_seed(ElementSeed::Scalar(&kind, &mut values))? {
            if !packed {
                key(self.out, number, wire);
                self.out.append(&mut values);
            }
        }
        if packed && !values.is_empty() {
            len_field(self.out, number, &values);
        }
        Ok(())
    }
}

/// One element of a list: a message (appended with key `number` to the
/// output) or a scalar (its value appended; the wire type returned).
enum ElementSeed<'a> {
    Message(&'a MessageDescriptor, u32, &'a mut Vec<u8>),
    Scalar(&'a Kind, &'a mut Vec<u8>),
}

impl<'de> DeserializeSeed<'de> for ElementSeed<'_> {
    type Value = u32;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<u32, D::Error> {
        match self {
            ElementSeed::Message(desc, number, out) => {
                let mut inner = Vec::new();
                MessageSeed {
                    desc,
                    out: &mut inner,
                }
                .deserialize(d)?;
                len_field(out, number, &inner);
                Ok(LEN)
            }
            ElementSeed::Scalar(kind, out) => d.deserialize_any(ScalarElement(kind, out)),
        }
    }
}

struct ScalarElement<'a>(&'a Kind, &'a mut Vec<u8>);

impl ScalarElement<'_> {
    fn put<E: serde::de::Error>(self, v: Scalar<'_>) -> Result<u32, E> {
        // A list element is written even if it is the default.
        scalar(self.0, v, self.1)
            .map(|(wire, _)| wire)
            .ok_or_else(give_up)
    }
}

impl<'de> Visitor<'de> for ScalarElement<'_> {
    type Value = u32;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list element")
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<u32, E> {
        self.put(Scalar::Bool(v))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u32, E> {
        self.put(Scalar::I64(v))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u32, E> {
        self.put(Scalar::U64(v))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<u32, E> {
        self.put(Scalar::F64(v))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<u32, E> {
        self.put(Scalar::Str(v))
    }
}

/// Whether messages of type `desc` may be printed directly ([`print`]): as
/// [`eligible`], but `bytes` fields are fine (printed as base64).
pub fn printable(desc: &MessageDescriptor) -> bool {
    plain(desc, Use::Print)
}

/// How [`print`] names fields and enum values.
#[derive(Debug, Clone, Copy)]
pub struct PrintNames {
    /// `fail_code` rather than `failCode`.
    pub proto_field_names: bool,
    /// Enum values as numbers rather than names.
    pub enum_numbers: bool,
}

/// The compact proto3 JSON of the encoded message `payload` of type `desc`
/// (which must be [`printable`]), default fields left out, printed straight
/// from the wire (no `DynamicMessage`): the text prost-reflect prints for the
/// same message, fields in the descriptor's order. `None` (give up, the
/// general path decodes and words the error): a malformed message, a string
/// that is not UTF-8, a field with an unexpected wire type, a singular
/// message field given twice (which protobuf merges), an extension.
pub fn print(desc: &MessageDescriptor, payload: &[u8], names: PrintNames) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(payload.len().saturating_mul(2).saturating_add(16));
    print_message(desc, payload, names, &mut out, 0)?;
    Some(out)
}

/// Nesting deeper than this gives up (prost's own decoding limit is 100).
const MAX_DEPTH: u32 = 100;

fn read_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v: u64 = 0;
    for shift in (0..70).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        if shift == 63 && b > 1 {
            return None;
        }
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

/// One field occurrence on the wire: number, wire type, the value's bytes
/// (a varint's bytes too, read again when printed).
struct Occurrence<'a> {
    number: u32,
    wire: u32,
    bytes: &'a [u8],
}

fn occurrences(buf: &[u8]) -> Option<Vec<Occurrence<'_>>> {
    let mut all = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let key = read_varint(buf, &mut pos)?;
        let number = u32::try_from(key >> 3).ok().filter(|&n| n != 0)?;
        // Truncation intended: the low three bits.
        let wire = (key & 7) as u32;
        let start = pos;
        let end = match wire {
            VARINT => {
                read_varint(buf, &mut pos)?;
                pos
            }
            I64 => start.checked_add(8)?,
            I32 => start.checked_add(4)?,
            LEN => {
                let len = usize::try_from(read_varint(buf, &mut pos)?).ok()?;
                pos.checked_add(len)?
            }
            _ => return None,
        };
        let bytes = buf.get(if wire == LEN { pos } else { start }..end)?;
        pos = end;
        all.push(Occurrence {
            number,
            wire,
            bytes,
        });
    }
    Some(all)
}

/// The wire type a scalar of `kind` has unpacked.
fn wire_of(kind: &Kind) -> u32 {
    match kind {
        Kind::Fixed32 | Kind::Sfixed32 | Kind::Float => I32,
        Kind::Fixed64 | Kind::Sfixed64 | Kind::Double => I64,
        Kind::String | Kind::Bytes | Kind::Message(_) => LEN,
        _ => VARINT,
    }
}

fn print_message(
    desc: &MessageDescriptor,
    buf: &[u8],
    names: PrintNames,
    out: &mut Vec<u8>,
    depth: u32,
) -> Option<()> {
    if depth > MAX_DEPTH {
        return None;
    }
    let occ = occurrences(buf)?;
    for o in &occ {
        if desc.get_field(o.number).is_none() && desc.get_extension(o.number).is_some() {
            return None;
        }
    }
    out.push(b'{');
    let mut first = true;
    for field in desc.fields() {
        let number = field.number();
        let kind = field.kind();
        let mut mine = occ.iter().filter(|o| o.number == number).peekable();
        if mine.peek().is_none() {
            continue;
        }
        let start = out.len();
        if !first {
            out.push(b',');
        }
        out.push(b'"');
        out.extend_from_slice(if names.proto_field_names {
            field.name().as_bytes()
        } else {
            field.json_name().as_bytes()
        });
        out.extend_from_slice(b"\":");
        let written = if field.is_list() {
            out.push(b'[');
            let mut n = 0usize;
            for o in mine {
                if let Kind::Message(m) = &kind {
                    if o.wire != LEN {
                        return None;
                    }
                    if n > 0 {
                        out.push(b',');
                    }
                    print_message(m, o.bytes, names, out, depth + 1)?;
                    n += 1;
                } else if o.wire == LEN && wire_of(&kind) != LEN {
                    // Packed.
                    let mut pos = 0;
                    while pos < o.bytes.len() {
                        if n > 0 {
                            out.push(b',');
                        }
                        print_scalar(&kind, o.bytes, &mut pos, names, out)?;
                        n += 1;
                    }
                } else {
                    if o.wire != wire_of(&kind) {
                        return None;
                    }
                    if n > 0 {
                        out.push(b',');
                    }
                    let mut pos = 0;
                    print_scalar(&kind, o.bytes, &mut pos, names, out)?;
                    n += 1;
                }
            }
            out.push(b']');
            n > 0
        } else if let Kind::Message(m) = &kind {
            let o = mine.next()?;
            if mine.next().is_some() || o.wire != LEN {
                return None;
            }
            print_message(m, o.bytes, names, out, depth + 1)?;
            true
        } else {
            // The last occurrence wins.
            let o = mine.last()?;
            if o.wire != wire_of(&kind) {
                return None;
            }
            let mut pos = 0;
            let default = print_scalar(&kind, o.bytes, &mut pos, names, out)?;
            !default || field.supports_presence()
        };
        if written {
            first = false;
        } else {
            out.truncate(start);
        }
    }
    out.push(b'}');
    Some(())
}

/// Prints the scalar of `kind` at `pos` in `buf` (advanced past it);
/// `Some(true)` if it is the kind's default.
fn print_scalar(
    kind: &Kind,
    buf: &[u8],
    pos: &mut usize,
    names: PrintNames,
    out: &mut Vec<u8>,
) -> Option<bool> {
    use std::io::Write as _;
    fn fixed<const N: usize>(buf: &[u8], pos: &mut usize) -> Option<[u8; N]> {
        let b = buf.get(*pos..pos.checked_add(N)?)?;
        *pos += N;
        <[u8; N]>::try_from(b).ok()
    }
    let four = |pos: &mut usize| fixed::<4>(buf, pos);
    let eight = |pos: &mut usize| fixed::<8>(buf, pos);
    let default = match kind {
        Kind::Int32 | Kind::Enum(_) => {
            // Truncation intended: protobuf's int32 decoding.
            let n = read_varint(buf, pos)? as i32;
            match kind {
                Kind::Enum(e) if !names.enum_numbers => match e.get_value(n) {
                    Some(v) => {
                        serde_json::to_writer(&mut *out, v.name()).ok()?;
                    }
                    None => write!(out, "{n}").ok()?,
                },
                _ => write!(out, "{n}").ok()?,
            }
            n == 0
        }
        Kind::Sint32 => {
            let v = read_varint(buf, pos)? as u32;
            let n = ((v >> 1) as i32) ^ -((v & 1) as i32);
            write!(out, "{n}").ok()?;
            n == 0
        }
        Kind::Uint32 => {
            let n = read_varint(buf, pos)? as u32;
            write!(out, "{n}").ok()?;
            n == 0
        }
        Kind::Int64 => {
            let n = read_varint(buf, pos)? as i64;
            write!(out, "\"{n}\"").ok()?;
            n == 0
        }
        Kind::Sint64 => {
            let v = read_varint(buf, pos)?;
            let n = ((v >> 1) as i64) ^ -((v & 1) as i64);
            write!(out, "\"{n}\"").ok()?;
            n == 0
        }
        Kind::Uint64 => {
            let n = read_varint(buf, pos)?;
            write!(out, "\"{n}\"").ok()?;
            n == 0
        }
        Kind::Bool => {
            let b = read_varint(buf, pos)? != 0;
            out.extend_from_slice(if b { b"true" } else { b"false" });
            !b
        }
        Kind::Fixed32 => {
            let n = u32::from_le_bytes(four(pos)?);
            write!(out, "{n}").ok()?;
            n == 0
        }
        Kind::Sfixed32 => {
            let n = i32::from_le_bytes(four(pos)?);
            write!(out, "{n}").ok()?;
            n == 0
        }
        Kind::Fixed64 => {
            let n = u64::from_le_bytes(eight(pos)?);
            write!(out, "\"{n}\"").ok()?;
            n == 0
        }
        Kind::Sfixed64 => {
            let n = i64::from_le_bytes(eight(pos)?);
            write!(out, "\"{n}\"").ok()?;
            n == 0
        }
        Kind::Float => {
            let f = f32::from_le_bytes(four(pos)?);
            if f.is_finite() {
                serde_json::to_writer(&mut *out, &f).ok()?;
            } else {
                out.extend_from_slice(non_finite(f64::from(f)));
            }
            f == 0.0
        }
        Kind::Double => {
            let f = f64::from_le_bytes(eight(pos)?);
            if f.is_finite() {
                serde_json::to_writer(&mut *out, &f).ok()?;
            } else {
                out.extend_from_slice(non_finite(f));
            }
            f == 0.0
        }
        Kind::String => {
            let s = std::str::from_utf8(buf.get(*pos..)?).ok()?;
            *pos = buf.len();
            serde_json::to_writer(&mut *out, s).ok()?;
            s.is_empty()
        }
        Kind::Bytes => {
            let b = buf.get(*pos..)?;
            *pos = buf.len();
            out.push(b'"');
            base64(b, out);
            out.push(b'"');
            b.is_empty()
        }
        Kind::Message(_) => return None,
    };
    Some(default)
}

fn non_finite(f: f64) -> &'static [u8] {
    if f.is_nan() {
        b"\"NaN\""
    } else if f > 0.0 {
        b"\"Infinity\""
    } else {
        b"\"-Infinity\""
    }
}

/// Standard base64 with padding, as the proto3 JSON mapping prints `bytes`.
fn base64(bytes: &[u8], out: &mut Vec<u8>) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let sym = |i: u32| ALPHABET[(i & 63) as usize];
    out.reserve(bytes.len().div_ceil(3) * 4);
    let mut chunks = bytes.chunks_exact(3);
    for c in &mut chunks {
        let n = (u32::from(c[0]) << 16) | (u32::from(c[1]) << 8) | u32::from(c[2]);
        out.extend_from_slice(&[sym(n >> 18), sym(n >> 12), sym(n >> 6), sym(n)]);
    }
    match *chunks.remainder() {
        [a] => {
            let n = u32::from(a) << 16;
            out.extend_from_slice(&[sym(n >> 18), sym(n >> 12), b'=', b'=']);
        }
        [a, b] => {
            let n = (u32::from(a) << 16) | (u32::from(b) << 8);
            out.extend_from_slice(&[sym(n >> 18), sym(n >> 12), sym(n >> 6), b'=']);
        }
        _ => {}
    }
}
