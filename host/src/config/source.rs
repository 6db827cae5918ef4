//! A located outline of the YAML text, used only to make error messages precise.
//!
//! serde tells us *that* something is wrong and roughly where; this outline tells us
//! *what* is there: the key path of a node (`listeners[0].limits`), the mapping a key
//! belongs to (serde-saphyr reports a missing field at the mapping's last key, we want
//! the mapping), and the position of a key inside an item that `validate()` only knows
//! by the item's own position (a cluster's `hash_on`). It is built from the parser's
//! events, so it sees exactly what the deserializer saw, flow style included.

use std::fmt;

use serde_saphyr::granit_parser::{Event, Parser};
use serde_saphyr::Location;

/// A 1-based line and column, as in [`Location`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Pos {
    pub line: u64,
    pub col: u64,
}

impl Pos {
    /// The position of a location; `None` when it is unknown.
    pub fn of(loc: &Location) -> Option<Pos> {
        (loc.line() != 0).then(|| Pos {
            line: loc.line(),
            col: loc.column(),
        })
    }
}

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    /// A mapping key.
    Key(String),
    /// A sequence index (0-based).
    Index(usize),
}

/// A key path from the top of the file, printed as `listeners[0].http.routes`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Path(pub Vec<Seg>);

impl Path {
    fn child(&self, seg: Seg) -> Path {
        let mut p = self.0.clone();
        p.push(seg);
        Path(p)
    }

    /// The last key of the path, if the path ends with one.
    pub fn last_key(&self) -> Option<&str> {
        match self.0.last() {
            Some(Seg::Key(k)) => Some(k),
            _ => None,
        }
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The keys of the path joined by `.`, without list indices
    /// (`listeners[0].http` → `listeners.http`): where a section is in the schema.
    pub fn pattern(&self) -> String {
        let keys: Vec<&str> = self
            .0
            .iter()
            .filter_map(|s| match s {
                Seg::Key(k) => Some(k.as_str()),
                Seg::Index(_) => None,
            })
            .collect();
        keys.join(".")
    }

    /// The path of the section this one is a key of (`listeners[0].http` →
    /// `listeners[0]`, `routes[0].virtual_hosts[1]` → `routes[0]`).
    pub fn parent_section(&self) -> Path {
        let mut p = self.0.clone();
        while matches!(p.last(), Some(Seg::Index(_))) {
            p.pop();
        }
        p.pop();
        Path(p)
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// What a node is.
#[derive(Debug)]
pub(crate) enum Kind {
    Map(Vec<Entry>),
    Seq(Vec<Node>),
    Scalar(String),
    /// `*alias`: its content lives at the anchor.
    Alias,
}

/// A node and where it starts.
#[derive(Debug)]
pub(crate) struct Node {
    pub pos: Pos,
    pub kind: Kind,
}

/// A mapping entry. Keys that are not scalars are recorded with an empty name.
#[derive(Debug)]
pub(crate) struct Entry {
    pub key: String,
    pub key_pos: Pos,
    pub value: Node,
}

impl Node {
    /// "a list", "a mapping", "`text`": what a person sees in the file.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Map(_) => "a mapping".into(),
            Kind::Seq(_) => "a list".into(),
            Kind::Scalar(s) if s.is_empty() || s == "~" || s == "null" => "nothing (null)".into(),
            Kind::Scalar(s) => format!("`{}`", shorten(s)),
            Kind::Alias => "an alias".into(),
        }
    }
}

/// Cuts long values so a message stays on one line.
pub(crate) fn shorten(s: &str) -> String {
    let one_line = s.replace('\n', "\\n");
    if one_line.chars().count() > 60 {
        let cut: String = one_line.chars().take(57).collect();
        format!("{cut}...")
    } else {
        one_line
    }
}

/// The outline of the first document of a YAML text.
#[derive(Debug)]
pub(crate) struct Outline {
    root: Node,
}

/// A collection being built while events stream by.
enum Open {
    Map {
        pos: Pos,
        entries: Vec<Entry>,
        key: Option<(String, Pos)>,
    },
    Seq {
        pos: Pos,
        items: Vec<Node>,
    },
}

impl Outline {
    /// Builds the outline; `None` if the text is not well-formed YAML (the parse error
    /// itself is reported by the deserializer).
    pub fn parse(source: &str) -> Option<Outline> {
        let mut stack: Vec<Open> = Vec::new();
        for event in Parser::new_from_str(source) {
            let (event, span) = event.ok()?;
            let pos = Pos {
                line: span.start.line() as u64,
                col: span.start.col() as u64 + 1,
            };
            let done = match event {
                Event::MappingStart(..) => {
                    stack.push(Open::Map {
                        pos,
                        entries: Vec::new(),
                        key: None,
                    });
                    None
                }
                Event::SequenceStart(..) => {
                    stack.push(Open::Seq {
                        pos,
                        items: Vec::new(),
                    });
                    None
                }
                Event::MappingEnd | Event::SequenceEnd => match stack.pop()? {
                    Open::Map { pos, entries, .. } => Some(Node {
                        pos,
                        kind: Kind::Map(entries),
                    }),
                    Open::Seq { pos, items } => Some(Node {
                        pos,
                        kind: Kind::Seq(items),
                    }),
                },
                Event::Scalar(text, ..) => Some(Node {
                    pos,
                    kind: Kind::Scalar(text.into_owned()),
                }),
                Event::Alias(_) => Some(Node {
                    pos,
                    kind: Kind::Alias,
                }),
                _ => None,
            };
            let Some(node) = done else { continue };
            match stack.last_mut() {
                None => return Some(Outline { root: node }),
                Some(Open::Seq { items, .. }) => items.push(node),
                Some(Open::Map { entries, key, .. }) => match key.take() {
                    None => {
                        let name = match &node.kind {
                            Kind::Scalar(s) => s.clone(),
                            _ => String::new(),
                        };
                        *key = Some((name, node.pos));
                    }
                    Some((name, key_pos)) => entries.push(Entry {
                        key: name,
                        key_pos,
                        value: node,
                    }),
                },
            }
        }
        None
    }

    /// The value node starting at `pos` (the outermost one when several start there,
    /// e.g. a block mapping and its first key) and its path.
    pub fn node_at(&self, pos: Pos) -> Option<(Path, &Node)> {
        fn walk(node: &Node, path: Path, pos: Pos) -> Option<(Path, &Node)> {
            if node.pos == pos {
                return Some((path, node));
            }
            match &node.kind {
                Kind::Map(entries) => entries
                    .iter()
                    .find_map(|e| walk(&e.value, path.child(Seg::Key(e.key.clone())), pos)),
                Kind::Seq(items) => items
                    .iter()
                    .enumerate()
                    .find_map(|(i, n)| walk(n, path.child(Seg::Index(i)), pos)),
                _ => None,
            }
        }
        walk(&self.root, Path::default(), pos)
    }

    /// The mapping that has a key at `pos`, with its path.
    pub fn map_of_key_at(&self, pos: Pos) -> Option<(Path, &Node)> {
        fn walk(node: &Node, path: Path, pos: Pos) -> Option<(Path, &Node)> {
            match &node.kind {
                Kind::Map(entries) => {
                    if entries.iter().any(|e| e.key_pos == pos) {
                        return Some((path, node));
                    }
                    entries
                        .iter()
                        .find_map(|e| walk(&e.value, path.child(Seg::Key(e.key.clone())), pos))
                }
                Kind::Seq(items) => items
                    .iter()
                    .enumerate()
                    .find_map(|(i, n)| walk(n, path.child(Seg::Index(i)), pos)),
                _ => None,
            }
        }
        walk(&self.root, Path::default(), pos)
    }

    /// The value of the mapping entry whose key is at `pos`.
    pub fn value_of_key_at(&self, pos: Pos) -> Option<&Node> {
        fn walk(node: &Node, pos: Pos) -> Option<&Node> {
            match &node.kind {
                Kind::Map(entries) => entries.iter().find_map(|e| {
                    if e.key_pos == pos {
                        Some(&e.value)
                    } else {
                        walk(&e.value, pos)
                    }
                }),
                Kind::Seq(items) => items.iter().find_map(|n| walk(n, pos)),
                _ => None,
            }
        }
        walk(&self.root, pos)
    }

    /// [`Outline::descend`] from the top of the file.
    pub fn descend_from_root(&self, focus: &[Seg]) -> Option<Pos> {
        self.descend(self.root.pos, focus)
    }

    /// Starting from the node at `anchor`, follows `focus` as far as the file has it and
    /// returns the position of the deepest step found: a key's position for a key step,
    /// an item's for an index step. `None` when even the anchor is not found.
    pub fn descend(&self, anchor: Pos, focus: &[Seg]) -> Option<Pos> {
        let (_, mut node) = self.node_at(anchor)?;
        let mut at = anchor;
        for seg in focus {
            let next = match (&node.kind, seg) {
                (Kind::Map(entries), Seg::Key(k)) => entries
                    .iter()
                    .find(|e| e.key == *k)
                    .map(|e| (e.key_pos, &e.value)),
                (Kind::Seq(items), Seg::Index(i)) => items.get(*i).map(|n| (n.pos, n)),
                _ => None,
            };
            match next {
                Some((pos, child)) => {
                    at = pos;
                    node = child;
                }
                None => break,
            }
        }
        Some(at)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // in tests a panic is the failure report
mod tests {
    use super::*;

    const SRC: &str = "\
version: 1
listeners:
  - name: web
    address: x
    http: { routes: main, extra: [a, {b: c}] }
  - {name: b}
";

    fn pos(line: u64, col: u64) -> Pos {
        Pos { line, col }
    }

    #[test]
    fn paths_of_block_and_flow_nodes() {
        let o = Outline::parse(SRC).unwrap();
        let (path, node) = o.node_at(pos(3, 5)).unwrap();
        assert_eq!(path.to_string(), "listeners[0]");
        assert!(matches!(node.kind, Kind::Map(_)));
        let (path, node) = o.node_at(pos(5, 38)).unwrap();
        assert_eq!(path.to_string(), "listeners[0].http.extra[1]");
        assert_eq!(node.describe(), "a mapping");
        let (path, node) = o.node_at(pos(5, 35)).unwrap();
        assert_eq!(path.to_string(), "listeners[0].http.extra[0]");
        assert_eq!(node.describe(), "`a`");
        assert_eq!(o.node_at(pos(6, 5)).unwrap().0.to_string(), "listeners[1]");
        assert!(o.node_at(pos(1, 1)).unwrap().0.is_root());
        assert_eq!(o.node_at(pos(4, 14)).unwrap().1.describe(), "`x`");
    }

    #[test]
    fn mapping_of_a_key() {
        let o = Outline::parse(SRC).unwrap();
        let (path, map) = o.map_of_key_at(pos(5, 5)).unwrap();
        assert_eq!(path.to_string(), "listeners[0]");
        assert_eq!(map.pos, pos(3, 5));
        let (path, map) = o.map_of_key_at(pos(5, 27)).unwrap();
        assert_eq!(path.to_string(), "listeners[0].http");
        assert_eq!(map.pos, pos(5, 11));
        assert!(
            o.map_of_key_at(pos(4, 14)).is_none(),
            "a value is not a key"
        );
    }

    #[test]
    fn descend_stops_at_the_deepest_existing_step() {
        let o = Outline::parse(SRC).unwrap();
        let key = |k: &str| Seg::Key(k.into());
        assert_eq!(
            o.descend(pos(3, 5), &[key("http"), key("extra")]),
            Some(pos(5, 27))
        );
        assert_eq!(
            o.descend(pos(3, 5), &[key("http"), key("extra"), Seg::Index(1)]),
            Some(pos(5, 38))
        );
        assert_eq!(
            o.descend(pos(3, 5), &[key("tls"), key("x")]),
            Some(pos(3, 5))
        );
        assert_eq!(o.descend(pos(9, 9), &[key("http")]), None);
    }

    #[test]
    fn patterns_and_parent_sections() {
        let key = |k: &str| Seg::Key(k.into());
        let p = Path(vec![
            key("routes"),
            Seg::Index(0),
            key("virtual_hosts"),
            Seg::Index(1),
        ]);
        assert_eq!(p.pattern(), "routes.virtual_hosts");
        assert_eq!(p.parent_section().to_string(), "routes[0]");
        let p = Path(vec![key("listeners"), Seg::Index(0), key("http")]);
        assert_eq!(p.parent_section().to_string(), "listeners[0]");
    }

    #[test]
    fn malformed_yaml_has_no_outline() {
        assert!(Outline::parse("a: [b").is_none());
    }

    #[test]
    fn shorten_keeps_messages_on_one_line() {
        assert_eq!(shorten("a\nb"), "a\\nb");
        assert_eq!(shorten(&"x".repeat(100)).chars().count(), 60);
    }
}
