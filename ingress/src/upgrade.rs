//! `keel upgrade --data DIR`: rewrites a format-1 store as a format-2 store and keeps the old
//! one.
//!
//! The new store is written into `DIR.v2-upgrading` next to `DIR` (removed first if a crashed
//! upgrade left it), through [`keel_engine::upgrade_v1`], which verifies format 1's hash chain
//! and tip while converting. Only when that succeeded is `DIR` renamed to `DIR.v1` and the new
//! store to `DIR`: a failure at any point leaves `DIR` as it was. `DIR.v1` stays until the
//! operator deletes it.

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};

fn sibling(dir: &Path, suffix: &str) -> anyhow::Result<PathBuf> {
    let name = dir
        .file_name()
        .with_context(|| format!("{} has no directory name", dir.display()))?;
    let mut name = name.to_os_string();
    name.push(suffix);
    Ok(dir.with_file_name(name))
}

pub fn run(dir: &Path) -> anyhow::Result<()> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("no store at {}", dir.display()))?;
    let kept = sibling(&dir, ".v1")?;
    let staging = sibling(&dir, ".v2-upgrading")?;
    if kept.exists() {
        bail!(
            "{} exists: an earlier upgrade kept the old store there; move or delete it first",
            kept.display()
        );
    }
    if let keel_sequencer::LockProbe::Held { pid } = keel_sequencer::store_lock(&dir) {
        bail!(
            "{} is in use by process {pid}; stop keel serve before upgrading",
            dir.display()
        );
    }
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("removing the leftover {}", staging.display()))?;
    }
    let started = std::time::Instant::now();
    let summary = keel_sequencer::upgrade_v1_store(&dir, &staging, &mut |batches| {
        eprintln!("keel upgrade: {batches} batches rewritten")
    });
    let summary = match summary {
        Ok(summary) => summary,
        Err(error) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(error).context(format!(
                "{} was not upgraded and is unchanged",
                dir.display()
            ));
        }
    };
    std::fs::rename(&dir, &kept)
        .with_context(|| format!("moving {} to {}", dir.display(), kept.display()))?;
    std::fs::rename(&staging, &dir).with_context(|| {
        format!(
            "moving {} to {} (the old store is at {})",
            staging.display(),
            dir.display(),
            kept.display()
        )
    })?;
    println!(
        "upgraded {} to format {}: {} batches, {} events, {} aggregates, {} command ids in {:.1} s\n\
         format-1 tip: {}\n\
         new tip:      {}\n\
         the old store is kept at {}; delete it once `keel audit --data {}` says INTACT\n\
         the batch hashes changed: re-create the JetStream stream and rebuild the projection",
        dir.display(),
        keel_sequencer::FORMAT_VERSION,
        summary.batches,
        summary.events,
        summary.aggregates,
        summary.command_ids,
        started.elapsed().as_secs_f64(),
        summary.v1_tip,
        summary.tip,
        kept.display(),
        dir.display(),
    );
    Ok(())
}
