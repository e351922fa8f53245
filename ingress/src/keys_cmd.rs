//! `keel keys add|list|revoke`: manages the API key file that `keel serve --auth-keys` reads.
//! A running server picks the change up on SIGHUP.

use crate::auth::{self, KEY_FILE_VERSION, KeyEntry, KeyFile, Scope};
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Clone)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Subcommand, Debug, Clone)]
pub enum KeysCommand {
    /// Create a key: stores only its hash in FILE (created if missing) and prints the key,
    /// once, on stdout.
    Add {
        /// The key file.
        #[arg(long, env = "KEEL_AUTH_KEYS")]
        file: PathBuf,
        /// The key's id (recorded in every batch the key submits to): 1 to 64 of A-Z a-z 0-9 . _ -
        #[arg(long)]
        id: String,
        /// Comma-separated scopes: write, read, admin.
        #[arg(long, value_delimiter = ',', required = true, value_parser = parse_scope)]
        scopes: Vec<Scope>,
    },
    /// List the keys (ids, scopes, dates; never a key).
    List {
        #[arg(long, env = "KEEL_AUTH_KEYS")]
        file: PathBuf,
    },
    /// Revoke a key: it stays in the file (its id names batches in the log) but no longer
    /// authenticates.
    Revoke {
        #[arg(long, env = "KEEL_AUTH_KEYS")]
        file: PathBuf,
        #[arg(long)]
        id: String,
    },
}

fn parse_scope(text: &str) -> Result<Scope, String> {
    Scope::parse(text.trim())
        .ok_or_else(|| format!("unknown scope `{text}` (use write, read, admin)"))
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

fn read_or_new(file: &Path) -> anyhow::Result<KeyFile> {
    if file.exists() {
        Ok(KeyFile::read(file)?)
    } else {
        Ok(KeyFile {
            version: KEY_FILE_VERSION,
            keys: Vec::new(),
        })
    }
}

pub fn run(args: &KeysArgs) -> anyhow::Result<()> {
    match &args.command {
        KeysCommand::Add { file, id, scopes } => {
            auth::check_key_id(id).map_err(anyhow::Error::msg)?;
            let mut keys = read_or_new(file)?;
            if keys.keys.iter().any(|k| &k.id == id) {
                bail!(
                    "key id `{id}` is already in {} (ids are never reused: they name batches in the log)",
                    file.display()
                );
            }
            let key = auth::new_key().context("reading the system's random source")?;
            let mut scopes = scopes.clone();
            scopes.sort_by_key(|s| s.as_str());
            scopes.dedup();
            keys.keys.push(KeyEntry {
                id: id.clone(),
                hash: auth::hash_key(&key),
                scopes,
                created_at: now(),
                revoked_at: None,
            });
            keys.write(file)?;
            println!("{key}");
            eprintln!(
                "keel: key `{id}` added to {}; the key above is shown only once. A running server loads it on SIGHUP.",
                file.display()
            );
        }
        KeysCommand::List { file } => {
            let keys = KeyFile::read(file)?;
            println!("{:<24} {:<18} {:<22} REVOKED", "ID", "SCOPES", "CREATED");
            for key in &keys.keys {
                let scopes: Vec<_> = key.scopes.iter().map(|s| s.as_str()).collect();
                println!(
                    "{:<24} {:<18} {:<22} {}",
                    key.id,
                    scopes.join(","),
                    key.created_at,
                    key.revoked_at.as_deref().unwrap_or("-")
                );
            }
        }
        KeysCommand::Revoke { file, id } => {
            let mut keys = KeyFile::read(file)?;
            let Some(key) = keys.keys.iter_mut().find(|k| &k.id == id) else {
                bail!("no key `{id}` in {}", file.display());
            };
            if key.revoked_at.is_some() {
                eprintln!("keel: key `{id}` was already revoked");
                return Ok(());
            }
            key.revoked_at = Some(now());
            keys.write(file)?;
            eprintln!(
                "keel: key `{id}` revoked in {}; a running server drops it on SIGHUP",
                file.display()
            );
        }
    }
    Ok(())
}
