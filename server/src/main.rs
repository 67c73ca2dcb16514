//! The `vski` binary: parses the configuration and hands over to the library.

use std::process::ExitCode;

use clap::Parser;
use vski::config::{AdminCommand, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut logger = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if matches!(&cli.command, Command::Serve(c) if c.log_format == "json") {
        // One JSON object per line, for log shippers.
        logger.format(|buf, record| {
            use std::io::Write;
            let entry = serde_json::json!({
                "time": buf.timestamp_millis().to_string(),
                "level": record.level().as_str(),
                "target": record.target(),
                "message": record.args().to_string(),
            });
            writeln!(buf, "{entry}")
        });
    }
    logger.init();
    for warning in vski::config::unknown_env_warnings(std::env::vars_os().filter_map(|(k, _)| k.into_string().ok())) {
        log::warn!("{warning}");
    }
    match cli.command {
        Command::ImportPocketbase(options) => {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("vski: cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(vski::import::pocketbase::run(&options)) {
                Ok(r) => {
                    println!(
                        "imported {} collections ({}), {} records, {} files, {} users into '{}'",
                        r.collections.len(),
                        r.collections.join(", "),
                        r.records,
                        r.files,
                        r.users,
                        options.db
                    );
                    if r.users > 0 {
                        println!(
                            "users got random passwords (PocketBase never hands out password hashes): set new ones \
                             as an admin (PATCH the record with password and passwordConfirm)"
                        );
                    }
                    for rule in &r.dropped_rules {
                        println!("rule set to null (admins only), vski cannot read it: {rule}");
                    }
                    for s in &r.skipped {
                        println!("left out: {s}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vski: import stopped: {e}");
                    ExitCode::FAILURE
                }
            }
        }
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
        Command::Admin { command } => {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("vski: cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let done = match command {
                AdminCommand::Create {
                    email,
                    password,
                    password_stdin,
                    data_dir,
                    create,
                } => {
                    let password = match password {
                        Some(p) => p,
                        None => match read_password_line() {
                            Ok(p) => p,
                            Err(e) => {
                                eprintln!("vski: cannot read the password from standard input: {e}");
                                return ExitCode::FAILURE;
                            }
                        },
                    };
                    let _ = password_stdin;
                    rt.block_on(vski::admin_create(&data_dir, email.clone(), password, create))
                        .map(|id| println!("admin {email} saved (id {id})"))
                }
                AdminCommand::List { data_dir } => rt.block_on(vski::admin_list(&data_dir)).map(|admins| {
                    for (id, email, created) in admins {
                        println!("{id}  {email}  {created}");
                    }
                }),
                AdminCommand::Delete { email, data_dir } => rt
                    .block_on(vski::admin_delete(&data_dir, &email))
                    .map(|id| println!("admin {email} deleted (id {id})")),
            };
            match done {
                Ok(()) => ExitCode::SUCCESS,
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

/// The first line of standard input, without its line ending.
fn read_password_line() -> std::io::Result<String> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}
