//! `filter-agent selector EXPR --label k=v ...`: `true` or `false`.

use std::{collections::BTreeMap, process::ExitCode};

use crate::selector::Selector;

/// Arguments of `selector`.
#[derive(Debug, clap::Args)]
pub struct SelectorArgs {
    /// The selector, e.g. "ibm.role == 'worker_public'".
    pub expr: String,
    /// A label of the endpoint, KEY=VALUE (repeat for more).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
}

/// Prints `true` or `false`; a selector that does not parse is reported
/// with its position and exits 2.
pub fn run(args: SelectorArgs) -> anyhow::Result<ExitCode> {
    let mut labels = BTreeMap::new();
    for l in &args.labels {
        let Some((k, v)) = l.split_once('=') else {
            eprintln!("filter-agent selector: --label {l:?}: expected KEY=VALUE");
            return Ok(ExitCode::from(2));
        };
        labels.insert(k.to_owned(), v.to_owned());
    }
    match Selector::parse(&args.expr) {
        Ok(sel) => {
            println!("{}", sel.matches(&labels));
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!(
                "filter-agent selector: {e}\n  {}\n  {}^",
                args.expr,
                " ".repeat(e.position)
            );
            Ok(ExitCode::from(2))
        }
    }
}
