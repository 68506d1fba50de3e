//! `cargo xtask demo`: replays the seed tutorial against the real agent in
//! network namespaces and prints what each connection saw.

use std::{path::PathBuf, process::ExitCode};

use filter_tests::demo;

const PREFIX: &str = "fwdemo";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut agent, mut examples) = (None, None);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--agent" => agent = args.next().map(PathBuf::from),
            "--examples" => examples = args.next().map(PathBuf::from),
            other => {
                eprintln!("fw-demo: unknown argument {other:?}; usage: fw-demo --agent PATH --examples DIR");
                return ExitCode::from(2);
            }
        }
    }
    let agent = agent.unwrap_or_else(filter_tests::agent_binary);
    let examples = examples.unwrap_or_else(|| PathBuf::from("examples"));
    if let Err(e) = ctrlc::set_handler(|| {
        // Hold both streams until exit: probes failing because their hosts
        // are being removed must not print misleading results meanwhile.
        let _out = std::io::stdout().lock();
        let mut err = std::io::stderr().lock();
        let _ = std::io::Write::write_all(
            &mut err,
            b"\ninterrupted: cleaning up namespaces, agent and pins\n",
        );
        demo::emergency_cleanup(PREFIX);
        std::process::exit(130);
    }) {
        eprintln!("fw-demo: cannot install the Ctrl-C handler: {e}");
        return ExitCode::from(2);
    }
    println!("Replaying the Calico policy tutorial (seed 003) with real connections.\n");
    // A panic inside (a failed `ip` command) still unwinds through the
    // guards, which remove what they created.
    let result =
        std::panic::catch_unwind(|| demo::run(&agent, &examples, PREFIX, &mut std::io::stdout()));
    match result {
        Ok(Ok(reports)) => {
            let bad: Vec<_> = reports.iter().filter(|r| !r.ok()).collect();
            if bad.is_empty() {
                println!("All {} steps behaved as the tutorial says. Namespaces, agent and pins are cleaned up.", reports.len());
                ExitCode::SUCCESS
            } else {
                println!("{} step(s) did not behave as the tutorial says.", bad.len());
                ExitCode::FAILURE
            }
        }
        Ok(Err(e)) => {
            eprintln!("fw-demo: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            demo::emergency_cleanup(PREFIX);
            ExitCode::FAILURE
        }
    }
}
