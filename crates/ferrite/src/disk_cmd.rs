//! `ferrite disk create|info|convert|chain|revert|flatten`: make, describe and copy raw and
//! qcow2 images and manage external snapshot chains.
//!
//! Every failure is one line on stderr and exit status 2; create and convert write to a
//! temporary name and rename at the end, so nothing half-written stays behind.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use disk::{CreateSpec, DiskError, ImageFormat, ImageInfo};

use crate::cli::exit;

const DISK_HELP: &str = "\
Formats: raw and qcow2 (v3; v2 images are read too). Sizes: a plain number is bytes;
suffixes K, M, G, T are binary units (any case, optional B or iB); rounded up to 512 bytes.

Format probing: without a format option an image is qcow2 if it starts with the qcow2 magic,
raw otherwise. A guest can write a qcow2 header into a raw disk (naming any host file as its
backing file), so always give the format (e.g. --disk PATH,format=raw) for raw disks a guest
can write to.

Exit status: 0 done, 2 bad input or failure (the problem is printed as one line).";

/// `ferrite disk` options.
#[derive(Debug, Args)]
#[command(after_help = DISK_HELP)]
pub struct DiskArgs {
    /// What to do with disk images.
    #[command(subcommand)]
    pub command: DiskCommand,
}

/// `ferrite disk` subcommands.
#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Create an empty image (sparse raw, or qcow2 optionally on a backing file).
    Create(CreateArgs),
    /// Show format, sizes, cluster size, backing chain and qcow2 flags.
    Info(InfoArgs),
    /// Copy an image (any supported format, backing chain flattened) to a new sparse image.
    Convert(ConvertArgs),
    /// List a disk's snapshot chain, top image first, down to the base.
    Chain(crate::disk_chain_cmd::ChainArgs),
    /// Put a new empty top image over an element of the chain (the VM must be stopped); the
    /// images above it are kept, no longer used.
    Revert(crate::disk_chain_cmd::RevertArgs),
    /// Merge a chain into one standalone image (in place, or to --output).
    Flatten(crate::disk_chain_cmd::FlattenArgs),
}

/// `ferrite disk create` options.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Image format to create.
    #[arg(long, short = 'f', value_name = "raw|qcow2", default_value = "raw", value_parser = parse_format)]
    pub format: ImageFormat,
    /// Backing file (qcow2 only), recorded as given: a relative name resolves against the new
    /// image's directory.
    #[arg(long, short = 'b', value_name = "FILE")]
    pub backing: Option<String>,
    /// Format of the backing file (probed and recorded if not given).
    #[arg(long, short = 'F', value_name = "raw|qcow2", requires = "backing", value_parser = parse_format)]
    pub backing_format: Option<ImageFormat>,
    /// Overwrite an existing file.
    #[arg(long)]
    pub force: bool,
    /// Image to create.
    pub path: PathBuf,
    /// Virtual size (optional with --backing: the backing image's size).
    #[arg(value_parser = parse_size)]
    pub size: Option<u64>,
}

/// `ferrite disk info` options.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Image format (probed if not given).
    #[arg(long, short = 'f', value_name = "raw|qcow2", value_parser = parse_format)]
    pub format: Option<ImageFormat>,
    /// Image to describe.
    pub path: PathBuf,
}

/// `ferrite disk convert` options.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Output format.
    #[arg(short = 'O', long = "output-format", value_name = "raw|qcow2", default_value = "raw", value_parser = parse_format)]
    pub output_format: ImageFormat,
    /// Source format (probed if not given).
    #[arg(short = 'f', long = "format", value_name = "raw|qcow2", value_parser = parse_format)]
    pub format: Option<ImageFormat>,
    /// Overwrite an existing destination.
    #[arg(long)]
    pub force: bool,
    /// Source image.
    pub src: PathBuf,
    /// Destination image.
    pub dst: PathBuf,
}

/// Parse `raw` or `qcow2`.
pub fn parse_format(s: &str) -> Result<ImageFormat, String> {
    s.parse().map_err(|e: DiskError| e.to_string())
}

/// Parse a disk size: bytes, or a number with a K/M/G/T suffix (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 10),
        Some('m') => (&body[..body.len() - 1], 20),
        Some('g') => (&body[..body.len() - 1], 30),
        Some('t') => (&body[..body.len() - 1], 40),
        _ => (body, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("size '{s}' is not a number (e.g. 10G, 512M, 1048576)"))?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .filter(|&b| b > 0 && b <= 1 << 56)
        .ok_or_else(|| format!("size '{s}' out of range (1 byte .. 64 PiB)"))?;
    Ok(bytes.div_ceil(512) * 512)
}

/// Run a `ferrite disk` subcommand; returns the exit status.
pub fn run(args: DiskArgs) -> i32 {
    let res = match args.command {
        DiskCommand::Create(a) => create(a),
        DiskCommand::Info(a) => info(a),
        DiskCommand::Convert(a) => convert(a),
        DiskCommand::Chain(a) => crate::disk_chain_cmd::chain(a),
        DiskCommand::Revert(a) => crate::disk_chain_cmd::revert(a),
        DiskCommand::Flatten(a) => crate::disk_chain_cmd::flatten(a),
    };
    match res {
        Ok(()) => 0,
        Err(msg) => {
            eprintln!("ferrite: {msg}");
            exit::USAGE
        }
    }
}

fn create(a: CreateArgs) -> Result<(), String> {
    let spec = CreateSpec {
        format: a.format,
        size: a.size,
        backing: a.backing,
        backing_format: a.backing_format,
        force: a.force,
    };
    disk::create_image(&a.path, &spec).map_err(|e| e.to_string())
}

fn info(a: InfoArgs) -> Result<(), String> {
    let info = disk::image_info(&a.path, a.format).map_err(|e| e.to_string())?;
    if a.json {
        let line = serde_json::to_string(&info).map_err(|e| e.to_string())?;
        println!("{line}");
    } else {
        print!("{}", render(&info));
    }
    Ok(())
}

/// The text form of `disk info`.
pub fn render(i: &ImageInfo) -> String {
    let mut out = format!(
        "image: {}\nformat: {}\nvirtual size: {} ({} bytes)\ndisk size: {} ({} bytes)\n",
        i.path.display(),
        i.format,
        human(i.virtual_size),
        i.virtual_size,
        human(i.disk_size),
        i.disk_size
    );
    if let Some(cs) = i.cluster_size {
        out += &format!("cluster size: {cs}\n");
    }
    if let Some(v) = i.qcow2_version {
        out += &format!("qcow2 version: {v}\n");
    }
    if let Some(b) = i.refcount_bits {
        out += &format!("refcount bits: {b}\n");
    }
    if i.format == ImageFormat::Qcow2 {
        out += &format!(
            "dirty: {}\ncorrupt: {}\nsnapshots: {}\n",
            i.dirty, i.corrupt, i.snapshots
        );
    }
    if let Some(b) = &i.backing_file {
        out += &format!("backing file: {b}\n");
    }
    if let Some(f) = &i.backing_format {
        out += &format!("backing file format: {f}\n");
    }
    for (n, e) in i.backing_chain.iter().enumerate() {
        out += &format!(
            "backing chain {}: {} ({})\n",
            n + 1,
            e.path.display(),
            e.format
        );
    }
    out
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn convert(a: ConvertArgs) -> Result<(), String> {
    disk::convert_image(&a.src, a.format, &a.dst, a.output_format, a.force)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_size_suffixes_are_binary() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("10g"), Ok(10 << 30));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
    }

    #[test]
    fn test_parse_size_rounds_up_to_sectors() {
        assert_eq!(parse_size("1000"), Ok(1024));
    }

    #[test]
    fn test_parse_size_garbage_is_error() {
        assert!(parse_size("ten").unwrap_err().contains("not a number"));
        assert!(parse_size("0").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("").is_err());
    }
}
