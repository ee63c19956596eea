//! `ferrited`: the per-host daemon (see the `daemon` crate and docs/daemon.md).

fn main() -> std::process::ExitCode {
    daemon::main()
}
