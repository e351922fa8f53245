//! The disk a directory is on: device, file system and mount point, as `findmnt` reports them.
//! Every result names it, so that a benchmark of the wrong disk (the VM's `/tmp` instead of its
//! data disk) shows in the result itself.

use serde::Serialize;
use serde_json::Value;
use std::fmt;
use std::path::Path;
use std::process::Command;

/// Where a directory's data lands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DataDisk {
    /// The directory asked about.
    pub dir: String,
    /// The mounted device (`/dev/nvme1n1`, `overlay`, `tmpfs`).
    pub device: String,
    pub fstype: String,
    /// The mount point holding `dir`.
    pub mount: String,
}

impl DataDisk {
    /// Asks `findmnt` (util-linux) about `dir`; `None` when it cannot say (no findmnt, no
    /// such directory). A missing answer is reported as unknown, never guessed.
    pub fn of(dir: &Path) -> Option<Self> {
        let output = Command::new("findmnt")
            .args(["-J", "-o", "SOURCE,FSTYPE,TARGET", "--target"])
            .arg(dir)
            .output()
            .ok()
            .filter(|o| o.status.success())?;
        let mut disk = parse_findmnt_json(&String::from_utf8_lossy(&output.stdout))?;
        disk.dir = dir.display().to_string();
        Some(disk)
    }
}

impl fmt::Display for DataDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}, mounted at {}) for {}",
            self.device, self.fstype, self.mount, self.dir
        )
    }
}

/// The first file system of `findmnt -J -o SOURCE,FSTYPE,TARGET`'s output.
pub fn parse_findmnt_json(text: &str) -> Option<DataDisk> {
    let value: Value = serde_json::from_str(text).ok()?;
    let fs = value.get("filesystems")?.get(0)?;
    let field = |key: &str| fs.get(key).and_then(Value::as_str).map(str::to_owned);
    Some(DataDisk {
        dir: String::new(),
        device: field("source")?,
        fstype: field("fstype")?,
        mount: field("target")?,
    })
}

/// The line the summaries print.
pub fn describe(disk: Option<&DataDisk>) -> String {
    disk.map_or_else(
        || "unknown (findmnt gave no answer)".to_owned(),
        ToString::to_string,
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests may unwrap
    use super::*;

    #[test]
    fn findmnt_json_names_device_filesystem_and_mount() {
        let text = r#"{"filesystems": [{"source":"/dev/nvme1n1","fstype":"ext4","target":"/var/lib/keel"}]}"#;
        let disk = parse_findmnt_json(text).unwrap();
        assert_eq!(disk.device, "/dev/nvme1n1");
        assert_eq!(disk.fstype, "ext4");
        assert_eq!(disk.mount, "/var/lib/keel");
        assert!(parse_findmnt_json("{}").is_none());
        assert!(parse_findmnt_json("not json").is_none());
    }

    #[test]
    fn a_real_directory_has_a_disk() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DataDisk::of(dir.path()).unwrap();
        assert!(!disk.device.is_empty() && disk.mount.starts_with('/'));
        assert_eq!(disk.dir, dir.path().display().to_string());
        assert!(DataDisk::of(Path::new("/nonexistent/keel/dir")).is_none());
    }
}
