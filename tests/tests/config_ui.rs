//! Golden tests of config error messages, in the spirit of rustc's UI tests.
//!
//! - `tests/ui/invalid/NAME.yaml` must fail to load (parse, validation, or the files it
//!   names, read as `legate check` reads them), and the rendered errors must equal
//!   `tests/ui/invalid/NAME.err` byte for byte. Files are named relative to the
//!   workspace root, so the output does not depend on where the checkout lives.
//! - `tests/ui/valid/NAME.yaml` must load (parse and validation; the certificates and
//!   other files they name are not there).
//!
//! `BLESS=1 cargo test -p legate-tests --test config_ui` rewrites the `.err` files from
//! the current output (and removes those whose `.yaml` is gone); review the diff before
//! committing it.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use legate_host::config::{check_files, parse_str};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_path_buf()
}

/// The files of `dir` with extension `ext`, sorted, as (path relative to the root, absolute).
fn files(dir: &str, ext: &str) -> Vec<(String, PathBuf)> {
    let root = workspace_root();
    let mut out: Vec<(String, PathBuf)> = fs::read_dir(root.join(dir))
        .unwrap_or_else(|e| panic!("cannot read {dir}: {e}"))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .map(|p| {
            let name = p
                .file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned();
            (format!("{dir}/{name}"), p)
        })
        .collect();
    out.sort();
    out
}

fn bless() -> bool {
    std::env::var_os("BLESS").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Loads a config file the way `legate` does, but named by its root-relative path.
/// With `files`, the files it names are read too, as `legate check` reads them
/// (`check_files`); the valid cases name files that are not there.
fn load(rel: &str, abs: &Path, files: bool) -> Result<(), String> {
    let text = fs::read_to_string(abs).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"));
    let base = abs.parent().expect("file has a directory");
    parse_str(rel, &text, base)
        .and_then(|cfg| {
            if files {
                check_files(rel, &text, base, &cfg)
            } else {
                Ok(())
            }
        })
        .map_err(|e| {
            let mut rendered = e.to_string();
            if !rendered.ends_with('\n') {
                rendered.push('\n');
            }
            rendered
        })
}

#[test]
fn invalid_configs_fail_with_the_expected_errors() {
    let cases = files("tests/ui/invalid", "yaml");
    assert!(cases.len() >= 30, "only {} invalid cases", cases.len());
    let mut failures = String::new();
    for (rel, abs) in &cases {
        let err_path = abs.with_extension("err");
        let rel_err = rel.replace(".yaml", ".err");
        let actual = match load(rel, abs, true) {
            Ok(()) => {
                let _ = writeln!(
                    failures,
                    "{rel}: loaded without error, but it is an invalid case\n"
                );
                continue;
            }
            Err(rendered) => rendered,
        };
        if bless() {
            fs::write(&err_path, &actual).unwrap_or_else(|e| panic!("cannot write {rel_err}: {e}"));
            continue;
        }
        match fs::read_to_string(&err_path) {
            Ok(expected) if expected == actual => {}
            Ok(expected) => {
                let _ = writeln!(
                    failures,
                    "{rel_err}: the errors differ (- expected, + actual):\n{}",
                    diff(&expected, &actual)
                );
            }
            Err(_) => {
                let _ = writeln!(
                    failures,
                    "{rel_err}: missing; the actual output is:\n{actual}"
                );
            }
        }
    }
    // An .err without its .yaml is a leftover from a renamed or deleted case.
    for (rel, abs) in files("tests/ui/invalid", "err") {
        if !abs.with_extension("yaml").exists() {
            if bless() {
                fs::remove_file(&abs).unwrap_or_else(|e| panic!("cannot remove {rel}: {e}"));
            } else {
                let _ = writeln!(failures, "{rel}: no matching .yaml; delete it\n");
            }
        }
    }
    assert!(
        failures.is_empty(),
        "\n{failures}run `BLESS=1 cargo test -p legate-tests --test config_ui` to accept the \
         actual output (review the diff first)"
    );
}

#[test]
fn valid_configs_load() {
    let cases = files("tests/ui/valid", "yaml");
    assert!(!cases.is_empty(), "no valid cases found");
    let mut failures = String::new();
    for (rel, abs) in &cases {
        if let Err(rendered) = load(rel, abs, false) {
            let _ = writeln!(failures, "{rel}: should load, but:\n{rendered}");
        }
    }
    assert!(failures.is_empty(), "\n{failures}");
}

/// A line diff (longest common subsequence): `-` lines only in `expected`, `+` lines
/// only in `actual`, two-space-indented lines in both.
fn diff(expected: &str, actual: &str) -> String {
    let a: Vec<&str> = expected.lines().collect();
    let b: Vec<&str> = actual.lines().collect();
    // lcs[i][j] = length of the LCS of a[i..] and b[j..].
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = String::new();
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            let _ = writeln!(out, "  {}", a[i]);
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            let _ = writeln!(out, "- {}", a[i]);
            i += 1;
        } else {
            let _ = writeln!(out, "+ {}", b[j]);
            j += 1;
        }
    }
    if expected.ends_with('\n') != actual.ends_with('\n') {
        out.push_str("(the final newline differs)\n");
    }
    out
}

#[test]
fn diff_marks_changed_lines() {
    let d = diff("a\nb\nc\n", "a\nx\nc\n");
    assert_eq!(d, "  a\n- b\n+ x\n  c\n");
    assert_eq!(diff("a\n", "a\n"), "  a\n");
    assert_eq!(diff("a\n", "a\nb\n"), "  a\n+ b\n");
    assert_eq!(diff("a", "a\n"), "  a\n(the final newline differs)\n");
}
