//! The `smsgw` command line. Errors become exit codes here and nowhere else.

use clap::{Parser, Subcommand};
use smsgw::config::{self, LogFormat, Settings};
use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc returns freed memory to the system promptly; with glibc's allocator the memory of
/// expired transactions and of config parsing stayed in RSS for good. Its version 2 (the `v2`
/// feature) cost a few per cent less CPU per message, but kept 1,524 bytes per registration in
/// RSS after the registration benchmark against 903 with this version 3.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Transparent huge pages off for this process. Where the system setting is `always`, the
/// allocator's purges of freed memory split huge pages and fresh ones are zeroed 2 MiB at a time,
/// both on whichever thread touches the memory: at 7,000 MESSAGEs/s the answers' p99 was 4–8 ms
/// with them and 2.2–3.9 ms without, and RSS about 30 % lower (BENCHMARKS.md, sixth session).
fn without_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and changes nothing but this
    // process's THP flag; failure (a kernel without it) leaves the default, which is harmless.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

#[derive(Parser)]
#[command(
    name = "smsgw",
    version,
    about = "A PBX SMS gateway between SIP and Twilio Programmable Messaging"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check the configuration, then run the gateway until SIGINT or SIGTERM.
    Run {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Log as JSON lines (overrides log.format).
        #[arg(long)]
        log_json: bool,
    },
    /// Check the configuration and print every problem; exit non-zero if there is one.
    Check {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print the webhook URL of each SMS configuration (paste it into Twilio's console under
    /// "A message comes in"), or of the one named.
    WebhookUrl {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        name: Option<String>,
        /// Replace the token: the old URL stops working (restart a running gateway).
        #[arg(long)]
        rotate: bool,
    },
    /// List the account's numbers with their SMS/MMS capability and messaging webhook, and flag
    /// configured DIDs that are missing, not SMS-capable, or pointing elsewhere.
    Verify {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        name: String,
        /// Set smsgw's webhook URL as SmsUrl on every configured DID.
        #[arg(long)]
        apply: bool,
    },
    /// Run the Twilio stand-in, or make it post an inbound SMS.
    TwilioSim(Box<smsgw::cli::SimArgs>),
}

/// Exit status for a configuration that does not validate (EX_CONFIG).
const EXIT_CONFIG: u8 = 78;

fn load(path: &std::path::Path) -> Result<Settings, ExitCode> {
    config::load(path).map_err(|e| {
        eprint!("smsgw: {}: {e}", path.display());
        ExitCode::from(EXIT_CONFIG)
    })
}

fn init_logging(settings: &Settings, json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json || settings.log.format == LogFormat::Json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, inside the
/// runtime and before anything is bound: installed on first poll instead, a SIGTERM arriving just
/// after "ready" was logged killed the process instead of stopping it gracefully.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
        let mut interrupt = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
        async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = term.recv() => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// One-shot commands and the stand-in run on one thread: they never need more, and a stand-in
/// sharing a machine with the gateway under test should not add wakeups across cores.
fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("async runtime")
        .block_on(f)
}

fn exit(result: anyhow::Result<bool>) -> ExitCode {
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("smsgw: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    without_transparent_huge_pages();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match load(&config) {
            Ok(s) => {
                println!(
                    "{}: OK ({} extensions, {} trunks, {} SMS configurations)",
                    config.display(),
                    s.extensions.len(),
                    s.trunks.len(),
                    s.sms.len()
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::WebhookUrl {
            config,
            name,
            rotate,
        } => {
            let settings = match load(&config) {
                Ok(s) => s,
                Err(code) => return code,
            };
            exit(block_on(smsgw::cli::webhook_url(settings, name, rotate)))
        }
        Command::Verify {
            config,
            name,
            apply,
        } => {
            let settings = match load(&config) {
                Ok(s) => s,
                Err(code) => return code,
            };
            exit(block_on(smsgw::cli::verify(settings, name, apply)))
        }
        Command::TwilioSim(args) => {
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .init();
            exit(block_on(smsgw::cli::twilio_sim(*args)))
        }
        Command::Run { config, log_json } => {
            let settings = match load(&config) {
                Ok(s) => s,
                Err(code) => return code,
            };
            init_logging(&settings, log_json);
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("smsgw: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let shutdown = {
                let _in_runtime = runtime.enter();
                shutdown_signal()
            };
            match runtime.block_on(smsgw::app::run(settings, shutdown)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    // The messages already carry their cause; no chain to print.
                    tracing::error!("{e}");
                    eprintln!("smsgw: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
