//! `ferrite disk chain|revert|flatten`: external snapshot chains of stopped VMs' disks.

use std::path::{Path, PathBuf};

use clap::Args;
use disk::{ChainEntry, ImageFormat, RevertOutcome};

use crate::disk_cmd::parse_format;

/// The disk's top image, named on the command line.
#[derive(Debug, Args)]
pub struct TopImage {
    /// Format of the top image (probed if not given).
    #[arg(long, short = 'f', value_name = "raw|qcow2", value_parser = parse_format)]
    pub format: Option<ImageFormat>,
    /// The disk's top image (for revert and flatten its VM must be stopped).
    pub path: PathBuf,
}

/// `ferrite disk chain` options.
#[derive(Debug, Args)]
pub struct ChainArgs {
    /// Print one JSON array (top image first) instead of text.
    #[arg(long)]
    pub json: bool,
    /// The image.
    #[command(flatten)]
    pub image: TopImage,
}

/// `ferrite disk revert` options.
#[derive(Debug, Args)]
pub struct RevertArgs {
    /// The chain element to go back to: its number in `ferrite disk chain` (0 is the top)
    /// or its path.
    #[arg(long, value_name = "N|PATH")]
    pub to: String,
    /// The new top image to create (default: BASE@reverted-SECONDS.qcow2 next to the
    /// element, BASE being the disk's base name).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// The image.
    #[command(flatten)]
    pub image: TopImage,
}

/// `ferrite disk flatten` options.
#[derive(Debug, Args)]
pub struct FlattenArgs {
    /// Write the standalone image here instead of replacing IMAGE.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Format of the standalone image (default: the top image's format).
    #[arg(short = 'O', long = "output-format", value_name = "raw|qcow2", value_parser = parse_format)]
    pub output_format: Option<ImageFormat>,
    /// Overwrite an existing --output file.
    #[arg(long, requires = "output")]
    pub force: bool,
    /// The image.
    #[command(flatten)]
    pub image: TopImage,
}

fn to_json(v: &impl serde::Serialize) -> Result<String, String> {
    serde_json::to_string(v).map_err(|e| e.to_string())
}

/// The text form of a chain: one `N: PATH (FORMAT)` line per image, top first.
pub fn render_chain(chain: &[ChainEntry]) -> String {
    chain
        .iter()
        .enumerate()
        .map(|(n, e)| format!("{n}: {} ({})\n", e.path.display(), e.format))
        .collect()
}

/// `ferrite disk chain`.
pub fn chain(a: ChainArgs) -> Result<(), String> {
    let chain = disk::image_chain(&a.image.path, a.image.format).map_err(|e| e.to_string())?;
    if a.json {
        println!("{}", to_json(&chain)?);
    } else {
        print!("{}", render_chain(&chain));
    }
    Ok(())
}

/// The text form of a revert's outcome.
pub fn render_revert(r: &RevertOutcome) -> String {
    let mut out = format!(
        "new top image: {} (on {})\n",
        r.overlay.display(),
        r.base.display()
    );
    for d in &r.detached {
        out += &format!(
            "no longer in the chain (kept; delete it when nothing uses it): {}\n",
            d.display()
        );
    }
    out
}

fn default_revert_output(
    path: &Path,
    format: Option<ImageFormat>,
    to: &str,
) -> Result<PathBuf, String> {
    let chain = disk::image_chain(path, format).map_err(|e| e.to_string())?;
    let element = to
        .parse::<usize>()
        .ok()
        .and_then(|i| chain.get(i))
        .map(|e| e.path.clone())
        .unwrap_or_else(|| PathBuf::from(to));
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(disk::overlay_path(&element, &format!("reverted-{secs}")))
}

/// `ferrite disk revert`.
pub fn revert(a: RevertArgs) -> Result<(), String> {
    let output = match a.output {
        Some(o) => o,
        None => default_revert_output(&a.image.path, a.image.format, &a.to)?,
    };
    let outcome =
        disk::revert(&a.image.path, a.image.format, &a.to, &output).map_err(|e| e.to_string())?;
    if a.json {
        println!("{}", to_json(&outcome)?);
    } else {
        print!("{}", render_revert(&outcome));
    }
    Ok(())
}

/// `ferrite disk flatten`.
pub fn flatten(a: FlattenArgs) -> Result<(), String> {
    let out = disk::flatten(
        &a.image.path,
        a.image.format,
        a.output.as_deref(),
        a.output_format,
        a.force,
    )
    .map_err(|e| e.to_string())?;
    println!("standalone image: {}", out.display());
    Ok(())
}
