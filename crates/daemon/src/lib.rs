//! `ferrited`: one daemon per host that defines, starts, supervises and monitors many VMs.
//!
//! Each VM runs in its own `ferrite run` process (its own session, its own cgroup) driven
//! through its control socket; the daemon can die or be restarted at any time and re-adopts
//! the VMs that are still running. See docs/ARCHITECTURE.md ("The daemon").

pub mod app;
pub mod args;
pub mod clones;
pub mod console;
pub mod disk_snapshots;
pub mod error;
pub mod metrics;
pub mod migration;
pub mod paths;
pub mod peer;
pub mod procfs;
pub mod resources;
pub mod routes;
pub mod server;
pub mod snapshots;
pub mod spec;
pub mod stats;
pub mod stream_tls;
pub mod supervisor;
pub mod vmm_link;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use crate::app::{Capacity, Daemon};
use crate::args::DaemonArgs;

/// Run the daemon with the process's arguments until SIGTERM/SIGINT (VMs keep running).
pub fn main() -> ExitCode {
    let args = DaemonArgs::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRITE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferrited: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ferrited: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: DaemonArgs) -> Result<(), String> {
    args.migration_tls().map_err(|e| e.to_string())?;
    let db = args.state_dir.join("ferrite.db");
    let store = store::Store::open(&db).map_err(|e| error::internal(e).message)?;
    let cgroups = if args.no_cgroups {
        None
    } else {
        Some(cgroups::CgroupManager::detect().map_err(|e| {
            format!(
                "{}: run as root on a host with cgroups, or pass --no-cgroups",
                error::internal(e).message
            )
        })?)
    };
    let host = cgroups::host_capacity().map_err(|e| error::internal(e).message)?;
    let capacity = Capacity {
        cpus: host.cpus,
        memory_mib: host.memory_bytes >> 20,
    };
    let listener = server::bind_unix(&args.socket).map_err(|e| e.to_string())?;
    let tls = match (
        &args.tls_listen,
        &args.tls_cert,
        &args.tls_key,
        &args.tls_client_ca,
    ) {
        (Some(addr), Some(cert), Some(key), Some(ca)) => {
            let config = server::tls_config(cert, key, ca).map_err(|e| e.to_string())?;
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("Cannot listen on {addr}: {e}"))?;
            Some((tcp, config))
        }
        _ => None,
    };
    let daemon = Arc::new(Daemon::new(args, store, cgroups, capacity));
    load_and_adopt(&daemon).await?;

    let router = routes::router(daemon.clone());
    if let Some((tcp, config)) = tls {
        tokio::spawn(server::serve_tls(tcp, config, router.clone()));
    }
    tokio::spawn(server::serve_unix(listener, router));
    tracing::info!(socket = %daemon.args.socket.display(), "ferrited ready");
    autostart(&daemon).await;

    wait_for_signal().await;
    tracing::info!("ferrited exiting; running VMs keep running and are re-adopted on restart");
    let _ = std::fs::remove_file(&daemon.args.socket);
    Ok(())
}

/// Load every stored VM and take back those whose VMM still runs.
async fn load_and_adopt(daemon: &Arc<Daemon>) -> Result<(), String> {
    let records = daemon
        .store
        .list_vms()
        .map_err(|e| error::internal(e).message)?;
    for rec in &records {
        match app::from_record(rec) {
            Ok((spec, runtime)) => {
                let slot = daemon.insert_slot(spec, runtime);
                daemon.adopt(&slot).await;
            }
            Err(e) => tracing::error!("{e}; skipping it"),
        }
    }
    Ok(())
}

async fn autostart(daemon: &Arc<Daemon>) {
    for slot in daemon.slots() {
        if !slot.spec().autostart || slot.runtime().state.is_active() {
            continue;
        }
        let _guard = slot.op_lock.lock().await;
        if let Err(e) = daemon.start_locked(&slot, true, None).await {
            daemon.event(&slot.name, "autostart-failed", e.message);
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
