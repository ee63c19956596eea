//! `ferrite vm clone SNAPSHOT --count N`: start N clones of a snapshot through ferrited, each
//! with its own MAC, vsock CID, VM generation ID and qcow2 overlay disks.

use api::client::Client;
use api::CloneRequest;
use clap::Args;

use super::{print_json, spinner, vm_table, Failed, Global, Res};

/// `ferrite vm clone`.
#[derive(Debug, Args)]
pub struct CloneArgs {
    /// The snapshot: `VM/SNAPSHOT`, or `SNAPSHOT` with --vm.
    #[arg(value_name = "[VM/]SNAPSHOT")]
    pub snapshot: String,
    /// How many clones to start.
    #[arg(long, short = 'n', default_value_t = 1)]
    pub count: u32,
    /// The VM the snapshot was taken of (instead of `VM/` in SNAPSHOT).
    #[arg(long, value_name = "NAME")]
    pub vm: Option<String>,
    /// Clones are named `<prefix>-1`, `<prefix>-2`, ... (default `<vm>-clone`).
    #[arg(long, value_name = "P")]
    pub name_prefix: Option<String>,
    /// Print the API's JSON.
    #[arg(long)]
    pub json: bool,
}

/// (VM, snapshot) from `VM/SNAPSHOT` or `SNAPSHOT` + `--vm`.
fn source(a: &CloneArgs) -> Res<(String, String)> {
    match (a.snapshot.split_once('/'), &a.vm) {
        (Some((vm, snap)), None) => Ok((vm.to_string(), snap.to_string())),
        (None, Some(vm)) => Ok((vm.clone(), a.snapshot.clone())),
        (Some(_), Some(_)) => Err(Failed(format!(
            "{:?} names the VM and so does --vm: give one of them",
            a.snapshot
        ))),
        (None, None) => Err(Failed(format!(
            "which VM's snapshot is {:?}? write VM/{} or add --vm VM",
            a.snapshot, a.snapshot
        ))),
    }
}

/// Run `ferrite vm clone`.
pub fn run(g: &Global, c: &Client, a: CloneArgs) -> Res {
    let (vm, snapshot) = source(&a)?;
    let req = CloneRequest {
        count: a.count,
        prefix: a.name_prefix.clone(),
    };
    let json = a.json || g.json;
    let spinner = spinner::Spinner::start(format!("Cloning {vm}/{snapshot} x{}", a.count), json);
    let vms = c.clone_snapshot(&vm, &snapshot, &req);
    spinner.finish();
    let vms = vms?;
    if json {
        print_json(&vms)
    } else {
        print!("{}", vm_table(&vms, super::now_ms()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(snapshot: &str, vm: Option<&str>) -> CloneArgs {
        CloneArgs {
            snapshot: snapshot.into(),
            count: 2,
            vm: vm.map(str::to_string),
            name_prefix: None,
            json: false,
        }
    }

    #[test]
    fn test_source_takes_vm_from_the_path_or_the_flag_but_not_both() {
        assert_eq!(
            source(&args("web/s1", None)).unwrap(),
            ("web".to_string(), "s1".to_string())
        );
        assert_eq!(
            source(&args("s1", Some("web"))).unwrap(),
            ("web".to_string(), "s1".to_string())
        );
        assert!(source(&args("web/s1", Some("db"))).is_err());
        assert!(source(&args("s1", None)).unwrap_err().0.contains("--vm"));
    }
}
