//! The `vski` binary: parses the configuration and hands over to the library.

use std::process::ExitCode;

use clap::Parser;
use vski::config::{AdminCommand, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    for warning in vski::config::unknown_env_warnings(std::env::vars_os().filter_map(|(k, _)| k.into_string().ok())) {
        log::warn!("{warning}");
    }
    match cli.command {
        Command::Healthcheck { port, host } => match vski::healthcheck(&host, port) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vski: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve(config) => {
            let config = *config;
            let result = actix_web::rt::System::new().block_on(vski::serve(config));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vski: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Admin {
            command:
                AdminCommand::Create {
                    email,
                    password,
                    data_dir,
                    create,
                },
        } => {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("vski: cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(vski::admin_create(&data_dir, email.clone(), password, create)) {
                Ok(id) => {
                    println!("admin {email} saved (id {id})");
                    ExitCode::SUCCESS
                }
                Err(vski::error::ApiError::BadRequest { message, data }) => {
                    let details: Vec<String> = data.iter().map(|(k, v)| format!("{k}: {}", v.message)).collect();
                    eprintln!("vski: {message} {}", details.join("; "));
                    ExitCode::FAILURE
                }
                // Setup problems (directory, lock) are for the operator: the cause, unprefixed.
                Err(vski::error::ApiError::Internal { source, .. }) => {
                    eprintln!("vski: {source}");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("vski: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
