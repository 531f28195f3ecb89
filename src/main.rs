use std::process::ExitCode;

use clap::Parser;
use convo::{
    config::{Cli, Command, DistributeArgs, MigrateArgs, ServeArgs},
    startup::{self, Application, Database, StartupError},
    store, telemetry,
};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let logging = telemetry::init(cli.log_format);
    let result = match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Migrate(args) => migrate(args).await,
        Command::Distribute(args) => distribute(args).await,
    };
    // Every queued log line is out before the last word below.
    drop(logging);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("convo: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), StartupError> {
    let mut database = Database::resolve(&args.database).await?;
    let built = async {
        database.prepare(!args.skip_migrations).await?;
        Application::build(args.settings(database.app_url.clone())?).await
    }
    .await;
    let served = match built {
        Ok(app) => {
            database
                .supervise(app.run_until(startup::shutdown_signal()))
                .await
        }
        Err(error) => Err(error),
    };
    database.close().await;
    served
}

async fn migrate(args: MigrateArgs) -> Result<(), StartupError> {
    let database = Database::resolve(&args.database).await?;
    let migrated = async {
        if args.revert {
            let version = store::revert_last_migration(&database.url)
                .await
                .map_err(|e| StartupError::Migrations(e.to_string()))?;
            tracing::info!(%version, "reverted migration");
            Ok(())
        } else {
            database.prepare(true).await
        }
    }
    .await;
    database.close().await;
    migrated
}

async fn distribute(args: DistributeArgs) -> Result<(), StartupError> {
    let done = store::distribute(&args.database_url, args.shard_count)
        .await
        .map_err(|e| StartupError::Distribute(e.to_string()))?;
    if done.distributed.is_empty() && done.reference.is_empty() {
        tracing::info!("every table was already distributed");
    }
    for table in &done.distributed {
        tracing::info!(%table, "distributed by user_id");
    }
    for table in &done.reference {
        tracing::info!(%table, "made a reference table");
    }
    Ok(())
}
