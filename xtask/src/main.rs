//! Developer commands: `cargo xtask build-ebpf | build | test | demo`.
//!
//! The kernel toolchain recipe lives here, not in anyone's memory: every
//! command that builds first checks each prerequisite (Debian packages, the
//! pinned Rust toolchain with rust-src, bpf-linker linked against LLVM 22)
//! and installs what is missing, idempotently, saying what it does.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

/// Where the kernel crate's toolchain is named (its LLVM is the one
/// bpf-linker links against); read by [`toolchain`].
const TOOLCHAIN_FILE: &str = "filter-ebpf/rust-toolchain.toml";
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const CARGO_FUZZ_VERSION: &str = "0.13.1";
/// The release binaries: the agent and the demo.
const RELEASE_BUILD: &[&str] = &[
    "build",
    "--release",
    "-p",
    "filter-agent",
    "-p",
    "filter-tests",
];
const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "clang-22",
    "bpftool",
    "iproute2",
    "iputils-ping",
    "util-linux",
    "nftables",
    // `cargo xtask bench`'s real-traffic peers and tools.
    "iptables",
    "ipset",
    "xdp-tools",
    "ethtool",
];

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check and install prerequisites only.
    Prereqs,
    /// Build the kernel object (filter-ebpf) for bpfel-unknown-none.
    BuildEbpf,
    /// Build the kernel object, then the agent (release) embedding it.
    Build,
    /// Run unit, kernel and end-to-end tests (needs root; fails if a
    /// privileged test could not run).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Replay the seed tutorial in network namespaces with real traffic.
    Demo,
    /// Benchmarks (numbers for docs/performance.md, not pass/fail).
    Bench,
    /// Fuzz one target for a while (see fuzz/README.md).
    Fuzz {
        /// yaml_loader or selector_parser.
        target: String,
        /// How long to run.
        #[arg(long, default_value_t = 600)]
        seconds: u64,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let root = workspace_root();
    match cli.command {
        Cmd::Prereqs => prereqs(),
        Cmd::BuildEbpf => prereqs().and_then(|()| build_ebpf(&root)),
        Cmd::Build => {
            prereqs()?;
            build_ebpf(&root)?;
            cargo(&root, RELEASE_BUILD)
        }
        Cmd::Test { args } => {
            require_root("cargo xtask test")?;
            prereqs()?;
            test_prereqs()?;
            build_ebpf(&root)?;
            lint(&root)?;
            // The end-to-end tests drive the real binary.
            cargo(&root, &["build", "-p", "filter-agent"])?;
            let agent = root.join("target/debug/filter-agent");
            // Tests that could not run leave a note here (the corpus tests,
            // without the corpus): counted as skipped below.
            let not_run = root.join("target/tmp/not-run");
            let _ = std::fs::remove_dir_all(&not_run);
            let mut cmd = pinned_cargo();
            cmd.current_dir(&root)
                .args(["test", "--workspace"])
                .env("FILTER_REQUIRE_PRIVILEGED", "1")
                .env("FILTER_AGENT_BIN", &agent);
            if std::env::var_os("CI").is_some() {
                // CI has the policy corpus beside the clone: it must run.
                cmd.env("FILTER_REQUIRE_CORPUS", "1");
            }
            if !args.is_empty() {
                cmd.arg("--").args(&args);
            }
            let (passed, failed) = run_tests(&mut cmd)?;
            // A short smoke run of each fuzz target (long runs: cargo xtask fuzz).
            fuzz(
                &root,
                "selector_parser",
                &["-runs=20000".into(), "-max_total_time=60".into()],
            )?;
            fuzz(
                &root,
                "yaml_loader",
                &["-runs=5000".into(), "-max_total_time=60".into()],
            )?;
            let notes: Vec<String> = std::fs::read_dir(&not_run)
                .map(|d| {
                    d.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
                        .collect()
                })
                .unwrap_or_default();
            for note in &notes {
                println!("{note}");
            }
            if notes.is_empty() {
                println!("tests: {passed} passed, {failed} failed");
            } else {
                // Those tests returned early and were counted as passed.
                let skipped = notes.len() as u64;
                println!(
                    "tests: {} passed, {failed} failed, {skipped} skipped",
                    passed - skipped
                );
            }
            Ok(())
        }
        Cmd::Bench => {
            // Part 2 runs programs under BPF_PROG_TEST_RUN: root, and the
            // kernel object built first.
            require_root("cargo xtask bench")?;
            prereqs()?;
            build_ebpf(&root)?;
            build_ebpf_variant(
                &root,
                &[
                    "--features",
                    "bench-no-log",
                    "--target-dir",
                    BASELINE_TARGET_DIR,
                ],
            )?;
            cargo(&root, RELEASE_BUILD)?;
            let figures = root.join(FIGURES_DIR);
            std::fs::create_dir_all(&figures)
                .with_context(|| format!("create {}", figures.display()))?;
            let mut report = String::new();
            report += &tee(
                pinned_cargo().current_dir(&root).args([
                    "bench",
                    "-p",
                    "filter-agent",
                    "--bench",
                    "compile",
                ]),
                "cargo bench --bench compile",
            )?;
            report.push('\n');
            let mut cmd = Command::new(root.join("target/release/fw-bench"));
            cmd.current_dir(&root)
                .arg("--baseline")
                .arg(
                    root.join("filter-ebpf")
                        .join(BASELINE_TARGET_DIR)
                        .join("bpfel-unknown-none/release/filter-ebpf"),
                )
                .arg("--plots")
                .arg(&figures);
            report += &tee(&mut cmd, "fw-bench")?;
            report.push('\n');
            let mut cmd = Command::new(root.join("target/release/fw-traffic"));
            cmd.current_dir(&root)
                .env("FILTER_AGENT_BIN", root.join("target/release/filter-agent"))
                .arg("--plots")
                .arg(&figures);
            report += &tee(&mut cmd, "fw-traffic")?;
            write_report(&root.join(PERFORMANCE_DOC), &report)
        }
        Cmd::Fuzz { target, seconds } => {
            prereqs()?;
            test_prereqs()?;
            fuzz(&root, &target, &[format!("-max_total_time={seconds}")])
        }
        Cmd::Demo => {
            require_root("cargo xtask demo")?;
            prereqs()?;
            build_ebpf(&root)?;
            cargo(&root, RELEASE_BUILD)?;
            let mut cmd = Command::new(root.join("target/release/fw-demo"));
            cmd.current_dir(&root)
                .arg("--agent")
                .arg(root.join("target/release/filter-agent"))
                .arg("--examples")
                .arg(root.join("examples"));
            status(&mut cmd, "fw-demo")
        }
    }
}

/// The document `cargo xtask bench` writes its run into, between
/// [`REPORT_BEGIN`] and [`REPORT_END`], and where its figures go.
const PERFORMANCE_DOC: &str = "docs/performance.md";
const FIGURES_DIR: &str = "docs/performance";
const REPORT_BEGIN: &str = "<!-- cargo xtask bench: begin (generated, do not edit) -->";
const REPORT_END: &str = "<!-- cargo xtask bench: end -->";

/// Runs `cmd`, echoing each line of its standard output as it comes and
/// handing it to `each`; returns how it exited.
fn echo(
    cmd: &mut Command,
    what: &str,
    mut each: impl FnMut(&str),
) -> Result<std::process::ExitStatus> {
    use std::io::{BufRead, BufReader};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("start {what}"))?;
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        let line = line.with_context(|| format!("read {what}'s output"))?;
        println!("{line}");
        each(&line);
    }
    child.wait().with_context(|| format!("wait for {what}"))
}

/// Runs `cmd`, echoing its standard output as it comes; returns that output.
fn tee(cmd: &mut Command, what: &str) -> Result<String> {
    let mut out = String::new();
    let st = echo(cmd, what, |line| {
        out += line;
        out.push('\n');
    })?;
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(out)
}

/// Puts `report` (with when and where it ran, and the figures) between the
/// markers of `doc`, leaving the rest of it as it is.
fn write_report(doc: &Path, report: &str) -> Result<()> {
    let text = std::fs::read_to_string(doc).with_context(|| format!("read {}", doc.display()))?;
    let (Some(begin), Some(end)) = (text.find(REPORT_BEGIN), text.find(REPORT_END)) else {
        bail!(
            "{} lacks the markers {REPORT_BEGIN} … {REPORT_END}",
            doc.display()
        );
    };
    let when = output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let kernel = output("uname", &["-r"]).unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut section = format!(
        "{REPORT_BEGIN}\n\nWritten by `cargo xtask bench` at {}, Linux {}, {cpus} × {cpu}.\n\n",
        when.trim(),
        kernel.trim()
    );
    // The parts' headings sit under the section's own.
    for line in report.lines() {
        if line.starts_with('#') {
            section.push('#');
        }
        section += line;
        section.push('\n');
    }
    section += &format!(
        "\n![Per-packet cost]({0}/per-packet.svg)\n\n![Real traffic]({0}/traffic.svg)\n\n![Update latency]({0}/updates.svg)\n\n{REPORT_END}",
        FIGURES_DIR.trim_start_matches("docs/")
    );
    let updated = format!(
        "{}{section}{}",
        &text[..begin],
        &text[end + REPORT_END.len()..]
    );
    std::fs::write(doc, updated).with_context(|| format!("write {}", doc.display()))?;
    println!("xtask: wrote the run into {}", doc.display());
    Ok(())
}

/// `cargo fmt --check` and `clippy -D warnings` on the workspace and the
/// kernel crate: the bar every commit meets.
fn lint(root: &Path) -> Result<()> {
    cargo(root, &["fmt", "--all", "--check"])?;
    cargo(
        root,
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    let ebpf = root.join("filter-ebpf");
    status(
        pinned_cargo().current_dir(&ebpf).args(["fmt", "--check"]),
        "cargo fmt --check (filter-ebpf)",
    )?;
    status(
        pinned_cargo()
            .current_dir(&ebpf)
            .args([
                "clippy",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ])
            .env("RUSTC_BOOTSTRAP", "1"),
        "cargo clippy (filter-ebpf)",
    )
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn require_root(what: &str) -> Result<()> {
    if nix_is_root() {
        Ok(())
    } else {
        bail!("{what} needs root (network namespaces, BPF programs, bpffs); run it as root or with sudo")
    }
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn status(cmd: &mut Command, what: &str) -> Result<()> {
    let st = cmd.status().with_context(|| format!("start {what}"))?;
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output; returns the totals, which the
/// caller prints as the closing line (`tests: N passed, M failed`), since
/// cargo's own last line belongs to whichever test binary ran last.
fn run_tests(cmd: &mut Command) -> Result<(u64, u64)> {
    let (mut passed, mut failed) = (0u64, 0u64);
    let st = echo(cmd, "cargo test", |line| {
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .trim_start_matches("ok. ")
                            .trim_start_matches("FAILED. ")
                            .strip_suffix(word)
                    })
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
        }
    })?;
    if !st.success() {
        println!("tests: {passed} passed, {failed} failed");
        bail!("cargo test failed ({st})");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok((passed, failed))
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    status(
        pinned_cargo().current_dir(root).args(args),
        &format!("cargo {}", args.join(" ")),
    )
}

/// `cargo +<the pinned toolchain>`: the agent needs it too (aya's minimum
/// Rust is that release), while xtask itself builds with whatever
/// toolchain runs it, so `cargo xtask` works before the pinned one is
/// installed.
fn pinned_cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg(format!("+{}", toolchain()));
    cmd
}

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The kernel crate's toolchain, as [`TOOLCHAIN_FILE`] names it.
fn toolchain() -> &'static str {
    static CHANNEL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CHANNEL.get_or_init(|| {
        let file = workspace_root().join(TOOLCHAIN_FILE);
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        text.lines()
            .find_map(|l| {
                let v = l.trim().strip_prefix("channel")?.trim().strip_prefix('=')?;
                Some(v.trim().trim_matches('"').to_owned())
            })
            .unwrap_or_else(|| panic!("{}: no channel", file.display()))
    })
}

/// What the tests need beyond the kernel build: cargo-fuzz for the fuzz
/// smoke runs.
fn test_prereqs() -> Result<()> {
    if !output("cargo", &["fuzz", "--version"]).is_some_and(|v| v.contains(CARGO_FUZZ_VERSION)) {
        eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
        status(
            pinned_cargo().args([
                "install",
                "cargo-fuzz",
                "--version",
                CARGO_FUZZ_VERSION,
                "--locked",
            ]),
            "cargo install cargo-fuzz",
        )?;
    }
    Ok(())
}

/// Checks each prerequisite of the kernel build (and of the tests' tools:
/// Debian packages) and installs what is missing; on a prepared machine it
/// installs nothing.
fn prereqs() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output("dpkg-query", &["-W", "-f=${Status}", p])
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
        require_root("installing Debian packages")?;
        status(Command::new("apt-get").arg("update"), "apt-get update")?;
        status(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
            "apt-get install",
        )?;
    }

    let has_toolchain = output("rustup", &["toolchain", "list"])
        .is_some_and(|s| s.lines().any(|l| l.starts_with(toolchain())));
    let has_src = has_toolchain
        && output(
            "rustup",
            &[
                "component",
                "list",
                "--installed",
                "--toolchain",
                toolchain(),
            ],
        )
        .is_some_and(|s| s.lines().any(|l| l.starts_with("rust-src")));
    if !has_src {
        eprintln!("xtask: installing Rust {} with rust-src", toolchain());
        status(
            Command::new("rustup").args([
                "toolchain",
                "install",
                toolchain(),
                "--profile",
                "minimal",
                "-c",
                "rust-src",
                "-c",
                "rustfmt",
                "-c",
                "clippy",
            ]),
            "rustup toolchain install",
        )?;
    }

    if !bpf_linker_ok() {
        eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (takes a few minutes)");
        status(
            pinned_cargo()
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                    "--force",
                ])
                .env("LLVM_PREFIX", LLVM_PREFIX),
            "cargo install bpf-linker",
        )?;
        if !bpf_linker_ok() {
            bail!("bpf-linker {BPF_LINKER_VERSION} is installed but not linked against {LLVM_PREFIX}; is ~/.cargo/bin on PATH?");
        }
    }
    Ok(())
}

/// Runs a cargo-fuzz target on a scratch copy of its seed corpus (libFuzzer
/// adds inputs to the corpus it is given; the seeds in git stay as they are).
fn fuzz(root: &Path, target: &str, libfuzzer_args: &[String]) -> Result<()> {
    let dir = root.join("fuzz");
    let scratch = dir.join("target/scratch-corpus").join(target);
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).with_context(|| format!("create {}", scratch.display()))?;
    let seeds = dir.join("corpus").join(target);
    for e in std::fs::read_dir(&seeds).with_context(|| format!("read {}", seeds.display()))? {
        let e = e?;
        std::fs::copy(e.path(), scratch.join(e.file_name()))?;
    }
    eprintln!("xtask: fuzzing {target} ({})", libfuzzer_args.join(" "));
    status(
        pinned_cargo()
            .current_dir(&dir)
            .args(["fuzz", "run", "--sanitizer", "none", target])
            .arg(&scratch)
            .arg("--")
            .args(libfuzzer_args)
            .env("RUSTC_BOOTSTRAP", "1"),
        &format!("cargo fuzz run {target}"),
    )
}

/// bpf-linker of the pinned version, dynamically linked to LLVM 22.
fn bpf_linker_ok() -> bool {
    let Some(version) = output("bpf-linker", &["--version"]) else {
        return false;
    };
    if !version.contains(BPF_LINKER_VERSION) {
        return false;
    }
    let Some(path) = output("sh", &["-c", "command -v bpf-linker"]) else {
        return false;
    };
    output("ldd", &[path.trim()]).is_some_and(|l| l.contains("libLLVM.so.22"))
}

fn build_ebpf(root: &Path) -> Result<()> {
    build_ebpf_variant(root, &[])
}

/// Where `cargo xtask bench` builds its baseline kernel object (the
/// pipeline without the Log record path: feature `bench-no-log`).
const BASELINE_TARGET_DIR: &str = "target/bench-no-log";

/// Builds the kernel object with extra cargo arguments (features, target
/// directory); checks the default object exists when there are none.
fn build_ebpf_variant(root: &Path, extra: &[&str]) -> Result<()> {
    let dir = root.join("filter-ebpf");
    eprintln!(
        "xtask: building the kernel object (filter-ebpf, bpfel-unknown-none) {}",
        extra.join(" ")
    );
    status(
        pinned_cargo()
            .current_dir(&dir)
            .args([
                "build",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
            ])
            .args(extra)
            // build-std is unstable; the pinned stable toolchain allows it so.
            .env("RUSTC_BOOTSTRAP", "1")
            // Only the kernel crate's own flags apply.
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS"),
        "build filter-ebpf",
    )?;
    if !extra.is_empty() {
        return Ok(());
    }
    let object = dir.join("target/bpfel-unknown-none/release/filter-ebpf");
    if !object.exists() {
        bail!(
            "the kernel build succeeded but {} is missing",
            object.display()
        );
    }
    Ok(())
}
