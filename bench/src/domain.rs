//! `--domain FILE`: the same load sent to a declared domain (docs/DOMAINS.md) instead of the
//! built-in ledger and inventory, so a file-defined domain can be measured against the built-in
//! one it mirrors (`examples/domains/ledger.toml` is the built-in ledger as a file).
//!
//! The file is read and compiled with the server's own loader ([`DomainSet::load`]), then
//! checked against what the chosen mix sends ([`Workload::sent_commands`]): every command by its
//! built-in name, every parameter the bench writes with a type and bounds that accept the values
//! written, and no required parameter the bench leaves out. A file that does not fit is refused
//! before anything is sent, naming the command and the parameter; one that fits gets every
//! command's `type` as `<domain>.<command>` ([`CommandTypes::qualified`]).
//!
//! The bench only writes: it never reads an aggregate back, so the declared ids
//! (`<kind>:<name>`, e.g. `cel_account:a1`) do not appear here.

use crate::workload::{CommandTypes, Mix, REJECT_AMOUNT, Sent, SentCommand};
use anyhow::{Context, bail};
use keel_invariants::declared::{CommandDef, DomainDef, DomainSet, Must, ParamType, Type, Value};
use std::path::Path;

/// The declared domain a load ran against, as the result records it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DomainInfo {
    /// The domain's `name` in the file (`cel_ledger`).
    pub name: String,
    /// The file, as given to `--domain`.
    pub file: String,
}

/// Reads, compiles and checks `path` for `mix` (what it sends is `sent`); returns the domain and
/// the command types to send.
pub fn load(
    path: &Path,
    mix: Mix,
    sent: &[SentCommand],
) -> anyhow::Result<(DomainInfo, CommandTypes)> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--domain: reading the domain file {file}"))?;
    load_text(&file, &text, mix, sent)
}

/// [`load`] of a file's text (`file` names it in messages).
pub fn load_text(
    file: &str,
    text: &str,
    mix: Mix,
    sent: &[SentCommand],
) -> anyhow::Result<(DomainInfo, CommandTypes)> {
    // The loader's error reads `FILE:LINE:COLUMN: problem`.
    let set = DomainSet::load(&[(file.to_owned(), text.to_owned())])
        .map_err(|error| anyhow::anyhow!("--domain: {error}"))?;
    let domain = set
        .domains()
        .first()
        .with_context(|| format!("--domain: {file} defines no domain"))?;
    let types = check(file, domain, mix, sent)?;
    Ok((
        DomainInfo {
            name: domain.name.clone(),
            file: file.to_owned(),
        },
        types,
    ))
}

/// Checks that `domain` takes every command in `sent` as the bench writes it; every problem is
/// one line `FILE: problem`.
pub fn check(
    file: &str,
    domain: &DomainDef,
    mix: Mix,
    sent: &[SentCommand],
) -> anyhow::Result<CommandTypes> {
    // The loader allows only lowercase letters, digits and `_` in names: the qualified names
    // are written into JSON bodies without escaping (workload.rs), so make sure of it here.
    let plain = |name: &str| {
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    if !plain(&domain.name) {
        bail!(
            "{file}: domain name `{}` is not lowercase letters, digits and _",
            domain.name
        );
    }
    let mut problems = Vec::new();
    let mut exists_codes = Vec::new();
    for wanted in sent {
        let Some(command) = domain.commands.iter().find(|c| c.name == wanted.command) else {
            let commands: Vec<&str> = sent.iter().map(|c| c.command).collect();
            problems.push(format!(
                "domain `{}` has no command `{}` (the {} mix sends {})",
                domain.name,
                wanted.command,
                mix.name(),
                commands.join(", ")
            ));
            continue;
        };
        problems.extend(check_command(command, wanted));
        if matches!(wanted.command, "open_account" | "create_sku") {
            exists_codes.extend(
                command
                    .targets
                    .iter()
                    .filter(|t| t.must == Must::NotExist)
                    .map(|t| t.code.clone()),
            );
        }
    }
    if !problems.is_empty() {
        bail!(
            "{}",
            problems
                .iter()
                .map(|p| format!("{file}: {p}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    Ok(CommandTypes::qualified(&domain.name, exists_codes))
}

/// What is wrong with `command` for the parameters the bench writes into it.
fn check_command(command: &CommandDef, wanted: &SentCommand) -> Vec<String> {
    let qualified = command.qualified();
    let names: Vec<&str> = wanted.params.iter().map(|(name, _)| *name).collect();
    let mut problems = Vec::new();
    for &(name, value) in &wanted.params {
        let Some(param) = command.params.iter().find(|p| p.name == name) else {
            let hint = if name == "memo" {
                " (it is sent with --payload-bytes above 0)"
            } else {
                ""
            };
            problems.push(format!(
                "command `{qualified}` has no parameter `{name}` (the bench sends {}){hint}",
                names.join(", ")
            ));
            continue;
        };
        let refuse = |shown: String, why: String| {
            format!(
                "parameter `{name}` of `{qualified}` refuses a value the bench sends ({shown}): {why}"
            )
        };
        match (value, &param.ty) {
            (Sent::Text { bytes_max }, ParamType::Id(_) | ParamType::Value(Type::String)) => {
                // The longest value the bench writes (checked with the loader's own bounds).
                if let Err(why) = param.check(&Value::String("x".repeat(bytes_max))) {
                    problems.push(refuse(format!("a string of {bytes_max} bytes"), why));
                }
            }
            (Sent::Integer { min, max }, ParamType::Value(ty @ (Type::Int | Type::Uint))) => {
                for n in [min, max] {
                    let hint = if n == REJECT_AMOUNT {
                        ", the amount --reject-ratio designs to be rejected"
                    } else {
                        ""
                    };
                    let value = match ty {
                        Type::Uint => Ok(Value::Uint(n)),
                        _ => i64::try_from(n)
                            .map(Value::Int)
                            .map_err(|_| format!("is above int's max {}", i64::MAX)),
                    };
                    if let Err(why) = value.and_then(|v| param.check(&v)) {
                        problems.push(refuse(format!("{n}{hint}"), why));
                    }
                }
            }
            (Sent::Text { bytes_max }, other) => problems.push(format!(
                "parameter `{name}` of `{qualified}` is `{}`; the bench sends a string of up to {bytes_max} bytes (give it type id or string)",
                other.name()
            )),
            (Sent::Integer { min, max }, other) => problems.push(format!(
                "parameter `{name}` of `{qualified}` is `{}`; the bench sends an integer from {min} to {max} (give it type uint or int)",
                other.name()
            )),
        }
    }
    for param in command.params.iter().filter(|p| !p.optional) {
        if !names.contains(&param.name.as_str()) {
            problems.push(format!(
                "command `{qualified}` requires parameter `{}`, which the bench does not send (it sends {}); make it optional",
                param.name,
                names.join(", ")
            ));
        }
    }
    problems
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::workload::{INITIAL_BALANCE, Workload};

    fn repo_file(path: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
    }

    fn workload(mix: Mix, reject_ratio: f64, payload_bytes: usize) -> Workload {
        Workload {
            mix,
            accounts: 10_000,
            skus: 1000,
            payload_bytes,
            reject_ratio,
            seed: 1,
            run_id: "mabcdefg".into(),
            types: CommandTypes::builtin(),
            ids: crate::workload::IdShape::Counter,
        }
    }

    fn sent(mix: Mix) -> Vec<SentCommand> {
        workload(mix, 0.1, 64).sent_commands(64)
    }

    /// The example ledger, the built-in ledger as a file.
    fn ledger_text() -> String {
        std::fs::read_to_string(repo_file("examples/domains/ledger.toml")).unwrap()
    }

    fn refusal(text: &str, mix: Mix, sent: &[SentCommand]) -> String {
        load_text("x.toml", text, mix, sent)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn the_example_files_fit_their_mixes_and_qualify_every_type() {
        let (info, types) = load(
            &repo_file("examples/domains/ledger.toml"),
            Mix::Ledger,
            &sent(Mix::Ledger),
        )
        .unwrap();
        assert_eq!(info.name, "cel_ledger");
        assert!(
            info.file.ends_with("examples/domains/ledger.toml"),
            "{info:?}"
        );
        assert_eq!(types.open_account, "cel_ledger.open_account");
        assert_eq!(types.deposit, "cel_ledger.deposit");
        assert_eq!(types.transfer, "cel_ledger.transfer");
        assert!(types.is_benign_setup_rejection("account_exists"));
        assert!(!types.is_benign_setup_rejection("sku_exists"));

        let (info, types) = load(
            &repo_file("examples/domains/inventory.toml"),
            Mix::Inventory,
            &sent(Mix::Inventory),
        )
        .unwrap();
        assert_eq!(info.name, "cel_inventory");
        assert_eq!(
            [
                &types.create_sku,
                &types.reserve,
                &types.ship,
                &types.release
            ],
            [
                "cel_inventory.create_sku",
                "cel_inventory.reserve",
                "cel_inventory.ship",
                "cel_inventory.release"
            ]
        );
        assert!(types.is_benign_setup_rejection("sku_exists"));
    }

    #[test]
    fn a_missing_command_is_named_with_what_the_mix_sends() {
        let error = refusal(&ledger_text(), Mix::Inventory, &sent(Mix::Inventory));
        assert_eq!(
            error.lines().next().unwrap(),
            "x.toml: domain `cel_ledger` has no command `create_sku` (the inventory mix sends \
             create_sku, reserve, ship, release)"
        );
        assert_eq!(error.lines().count(), 4, "{error}");

        let without_transfer = ledger_text().replace("[commands.transfer", "[commands.move");
        let without_transfer = without_transfer.replace("flows.transfer", "flows.move");
        let error = refusal(&without_transfer, Mix::Ledger, &sent(Mix::Ledger));
        assert_eq!(
            error,
            "x.toml: domain `cel_ledger` has no command `transfer` (the ledger mix sends \
             open_account, deposit, transfer)"
        );
    }

    #[test]
    fn a_missing_parameter_is_named_and_memo_only_with_a_payload() {
        let text = ledger_text().replace(
            "params.memo = { type = \"string\", optional = true, max_len = 4096 }\n\n[[commands.transfer.preconditions]]",
            "\n[[commands.transfer.preconditions]]",
        );
        assert_ne!(text, ledger_text());
        let error = refusal(&text, Mix::Ledger, &sent(Mix::Ledger));
        assert_eq!(
            error,
            "x.toml: command `cel_ledger.transfer` has no parameter `memo` (the bench sends \
             from, to, amount, memo) (it is sent with --payload-bytes above 0)"
        );
        // Without a payload the bench writes no memo, and the file fits.
        let no_memo = workload(Mix::Ledger, 0.0, 0).sent_commands(1);
        load_text("x.toml", &text, Mix::Ledger, &no_memo).unwrap();
    }

    #[test]
    fn types_bounds_and_required_parameters_are_checked() {
        let text = ledger_text()
            // transfer's amount bounded below what --reject-ratio sends.
            .replacen(
                "params.from = { type = \"id\", kind = \"cel_account\" }\nparams.to = { type = \"id\", kind = \"cel_account\" }\nparams.amount = { type = \"uint\", min = 1, max = 9223372036854775807 }",
                "params.from = { type = \"id\", kind = \"cel_account\" }\nparams.to = { type = \"id\", kind = \"cel_account\" }\nparams.amount = { type = \"uint\", min = 1, max = 1000 }",
                1,
            )
            // open_account requires a parameter the bench does not send.
            .replacen(
                "params.overdraft_limit = { type = \"uint\", optional = true, max = 9223372036854775807 }",
                "params.overdraft_limit = { type = \"uint\", max = 9223372036854775807 }",
                1,
            );
        let error = refusal(&text, Mix::Ledger, &sent(Mix::Ledger));
        assert!(
            error.contains(
                "x.toml: parameter `amount` of `cel_ledger.transfer` refuses a value the bench \
                 sends (9223372036854775807, the amount --reject-ratio designs to be rejected): \
                 is 9223372036854775807, above its max 1000"
            ),
            "{error}"
        );
        assert!(
            error.contains(
                "x.toml: command `cel_ledger.open_account` requires parameter `overdraft_limit`, \
                 which the bench does not send (it sends account); make it optional"
            ),
            "{error}"
        );
        // A deposit amount sent as a string parameter.
        let text = ledger_text().replacen(
            "params.amount = { type = \"uint\", min = 1, max = 9223372036854775807 }",
            "params.amount = { type = \"string\" }",
            1,
        );
        let text = text.replace("flows.deposit = { account = \"int(params.amount)\" }\n", "");
        let text = text.replace(
            "balance = \"account.balance + int(params.amount)\"",
            "balance = \"account.balance + 1\"",
        );
        let error = refusal(&text, Mix::Ledger, &sent(Mix::Ledger));
        assert_eq!(
            error,
            format!(
                "x.toml: parameter `amount` of `cel_ledger.deposit` is `string`; the bench sends \
                 an integer from {INITIAL_BALANCE} to {INITIAL_BALANCE} (give it type uint or int)"
            )
        );
    }

    #[test]
    fn a_file_that_does_not_load_is_refused_with_its_position() {
        let error = refusal("name = \"x\"\nbogus = 1\n", Mix::Ledger, &sent(Mix::Ledger));
        assert!(error.starts_with("--domain: x.toml:"), "{error}");
        let missing = load(
            Path::new("/nonexistent/domain.toml"),
            Mix::Ledger,
            &sent(Mix::Ledger),
        )
        .unwrap_err();
        assert!(
            format!("{missing:#}").contains("reading the domain file /nonexistent/domain.toml"),
            "{missing:#}"
        );
    }
}
