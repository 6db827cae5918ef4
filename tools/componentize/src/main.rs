//! `legate-componentize`: the command-line face of the library, called by
//! `scripts/build-c-filter.sh`. Subcommands map one to one onto the library
//! functions; see `usage()`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};

fn usage() -> &'static str {
    "usage:
  legate-componentize bindings <wit-dir> <world> <out-dir>
      C bindings (<world>.h, <world>.c, <world>_component_type.o) for a world
  legate-componentize component <core.wasm> <out.wasm> [--adapter <adapter.wasm>]
      encode a linked core module as a component (validated)
  legate-componentize describe <component.wasm>
      list the component's imports and exports
  legate-componentize check-http-filter <component.wasm>
      fail unless it exports legate:filter/http-handler@0.1.x (0.1.0 up to this
      tree's abi/wit) with every function, and imports only legate:filter/* and
      the WASI 0.2 interfaces a Legate host provides (no wasi:http)
  legate-componentize wit <component.wasm>
      print the component's WIT"
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn run(args: &[String]) -> Result<()> {
    let arg = |i: usize| -> Result<&str> {
        args.get(i)
            .map(String::as_str)
            .with_context(|| format!("missing argument\n{}", usage()))
    };
    match arg(0)? {
        "bindings" => {
            let files = legate_componentize::generate_c_bindings(
                Path::new(arg(1)?),
                arg(2)?,
                Path::new(arg(3)?),
            )?;
            for f in files {
                println!("{}", f.display());
            }
        }
        "component" => {
            let module = read(Path::new(arg(1)?))?;
            let out = PathBuf::from(arg(2)?);
            let adapter = match args.get(3).map(String::as_str) {
                Some("--adapter") => Some(read(Path::new(arg(4)?))?),
                Some(other) => bail!("unexpected argument `{other}`\n{}", usage()),
                None => None,
            };
            let component = legate_componentize::componentize(&module, adapter.as_deref())
                .with_context(|| format!("componentizing {}", arg(1).unwrap_or_default()))?;
            fs::write(&out, component).with_context(|| format!("writing {}", out.display()))?;
        }
        "describe" => {
            print!(
                "{}",
                legate_componentize::describe(&read(Path::new(arg(1)?))?)?
            );
        }
        "check-http-filter" => {
            let path = arg(1)?;
            legate_componentize::describe(&read(Path::new(path))?)?
                .check_http_filter()
                .with_context(|| format!("{path} is not a Legate HTTP filter"))?;
        }
        "wit" => print!(
            "{}",
            legate_componentize::print_wit(&read(Path::new(arg(1)?))?)?
        ),
        "-h" | "--help" | "help" => println!("{}", usage()),
        other => bail!("unknown subcommand `{other}`\n{}", usage()),
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("legate-componentize: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
