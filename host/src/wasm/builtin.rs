//! The first-party plugins compiled into the binary (host/build.rs), named in
//! plugins.yaml as `module: builtin:NAME`.

include!(concat!(env!("OUT_DIR"), "/builtin_plugins.rs"));

/// The `module:` prefix naming an embedded plugin.
pub const PREFIX: &str = "builtin:";

/// The component of builtin plugin `name`, if this binary has it.
pub fn get(name: &str) -> Option<&'static [u8]> {
    BUILTINS.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}

/// The builtin plugins' names, for error messages ("builtin plugins: …").
pub fn names() -> Vec<&'static str> {
    BUILTINS.iter().map(|(n, _)| *n).collect()
}

/// What to tell a user whose config names a builtin this binary lacks.
pub fn missing_help() -> String {
    match SKIPPED {
        Some(why) => format!(
            "this legate has no builtin plugins ({why}); rebuild it after `scripts/setup.sh \
             wasm`, or give the path of a `.wasm` file built with `legate plugin build`"
        ),
        None => format!(
            "builtin plugins: {}; or give the path of a `.wasm` file",
            names().join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_is_a_component() {
        for (name, bytes) in BUILTINS {
            assert!(
                bytes.starts_with(&crate::plugin_build::COMPONENT_MAGIC),
                "builtin:{name} is not a component"
            );
        }
    }
}
