//! `stork-agent`: Stork's in-RAM agent.
//!
//! As PID 1 in the initrd it mounts, loads drivers, brings up the boot NIC, switches root into
//! the ephemeral image when there is one ([`stage`]), then enlists the machine or runs its task
//! ([`init`]). Run any other way it only offers read-only subcommands, so a developer can try
//! it on a workstation without side effects.

mod appliance;
mod console;
mod deploy;
mod heartbeat;
mod init;
mod inventory;
mod modules;
mod mounts;
mod net;
mod power;
mod stage;
mod step;
mod task;

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
usage: stork-agent inventory [--root DIR]
  Prints this machine's inventory as JSON, read from DIR/proc and DIR/sys (DIR defaults to /).
Run as PID 1 from the Stork initrd, stork-agent enlists the machine and powers it off.";

#[derive(Debug, PartialEq, Eq)]
enum Command {
    Inventory { root: PathBuf },
    Help,
}

fn parse_args(args: &[String]) -> Result<Command, String> {
    let mut args = args.iter().map(String::as_str);
    match args.next() {
        Some("inventory") => {
            let mut root = PathBuf::from("/");
            while let Some(arg) = args.next() {
                match arg {
                    "--root" => {
                        root = args.next().ok_or("--root needs a directory")?.into();
                    }
                    other => return Err(format!("unexpected argument {other:?}")),
                }
            }
            Ok(Command::Inventory { root })
        }
        Some("help" | "--help" | "-h") => Ok(Command::Help),
        Some(other) => Err(format!("unknown command {other:?}")),
        None => Err("not running as PID 1; nothing to do without a command".into()),
    }
}

fn main() -> ExitCode {
    // Lossy: `args()` would panic on a word that is not UTF-8, and PID 1 must not.
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    // The kernel passes stray command-line words to init as arguments: as PID 1 only stage
    // 1's marker for stage 2 counts.
    if std::process::id() == 1 {
        init::run(stage::Stage::from_args(&args));
    }
    match parse_args(&args) {
        Ok(Command::Inventory { root }) => {
            let inv = inventory::collect(&root);
            match serde_json::to_string_pretty(&inv) {
                Ok(json) => {
                    println!("{json}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("stork-agent: inventory: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Ok(Command::Help) => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("stork-agent: {why}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, String> {
        parse_args(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn parses_the_inventory_command() {
        assert_eq!(
            parse(&["inventory"]),
            Ok(Command::Inventory { root: "/".into() })
        );
        assert_eq!(
            parse(&["inventory", "--root", "/tmp/fake"]),
            Ok(Command::Inventory {
                root: "/tmp/fake".into()
            })
        );
        assert_eq!(parse(&["--help"]), Ok(Command::Help));
    }

    #[test]
    fn rejects_what_it_does_not_know() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["inventory", "--root"]).is_err());
        assert!(parse(&["inventory", "--bogus"]).is_err());
        assert!(parse(&["enlist"]).is_err());
    }
}
