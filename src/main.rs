use clap::Parser;
use ftconv::cli::{self, Cli, Command, UsageError};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let quiet = cli.quiet;
    let result = match cli.command {
        Command::Inspect(a) => cli::inspect::run(a, quiet),
        Command::Quantize(a) => cli::quantize::run(a, quiet),
        Command::Adapter(a) => cli::adapter::run(a, quiet),
        Command::Ollama(a) => cli::ollama::run(a, quiet),
        Command::Merge(a) => cli::merge::run(a, quiet),
        Command::Package(a) => cli::package::run(a, quiet),
        Command::Finetune(a) => cli::finetune::run(a, quiet),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // a closed stdout (e.g. piped into `head`) is not a failure
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("ftconv: error: {msg}");
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
