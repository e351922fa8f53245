//! The built-in domains' commands on the wire, one [`WireDomain`] per domain, registered in
//! [`DOMAINS`] (in the registry's stored-tag order).
//!
//! A domain says which command types it answers to, the fields each takes and their types, and
//! builds its command from the fields as read. The one-pass parser (`de.rs`) reads every field
//! straight into a [`Fields`] slot, by the table [`field_table`] assembles from the domains'
//! declarations (a field name means one type across every domain); nothing in the parser or
//! the validation names a domain. A declared domain's commands are read by its definition
//! instead (`declared.rs`).

use super::de::Quantity;
use super::{Item, WireError};
use keel_invariants::{Command, inventory, ledger};
use std::sync::LazyLock;

/// How the one-pass parser reads a field's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FieldType {
    /// A JSON string.
    Text,
    /// A non-negative integer: a JSON integer or a string of decimal digits.
    Quantity,
}

/// A field's value as read (a JSON `null` reads as absent).
#[derive(Debug)]
pub(super) enum Slot {
    Text(String),
    Quantity(Quantity),
}

/// Most distinct domain fields the parser has slots for (the table is checked against it).
pub(super) const FIELDS_MAX: usize = 12;

/// The domain fields of one command as read, by position in [`field_table`].
#[derive(Debug, Default)]
pub(super) struct Fields {
    slots: [Option<Slot>; FIELDS_MAX],
}

impl Fields {
    pub(super) fn set(&mut self, at: usize, value: Option<Slot>) {
        if let Some(slot) = self.slots.get_mut(at) {
            *slot = value;
        }
    }

    /// The names of the fields that were sent (not null), in table order.
    pub(super) fn present(&self) -> impl Iterator<Item = &'static str> + '_ {
        field_table()
            .iter()
            .zip(&self.slots)
            .filter_map(|((name, _), slot)| slot.is_some().then_some(*name))
    }

    fn take(&mut self, name: &str) -> Option<Slot> {
        let at = field_table().iter().position(|(n, _)| *n == name)?;
        self.slots.get_mut(at)?.take()
    }

    /// The text field `name`, taken out (`None`: absent).
    pub(super) fn text(&mut self, name: &str) -> Option<String> {
        match self.take(name) {
            Some(Slot::Text(text)) => Some(text),
            _ => None,
        }
    }

    /// The quantity field `name`, taken out (`None`: absent).
    pub(super) fn quantity(&mut self, name: &str) -> Option<Quantity> {
        match self.take(name) {
            Some(Slot::Quantity(q)) => Some(q),
            _ => None,
        }
    }
}

/// One domain's commands on the wire.
pub(super) trait WireDomain: Sync {
    /// Each command type it answers to, with the fields it takes besides `type`, `id` and
    /// `expected_version`.
    fn commands(&self) -> &'static [(&'static str, &'static [&'static str])];
    /// Every field its commands take, with its type.
    fn fields(&self) -> &'static [(&'static str, FieldType)];
    /// Builds the command `item` names from its fields (already checked to belong to it).
    fn build(&self, item: &Item<'_>, fields: &mut Fields) -> Result<Command, WireError>;
}

/// The built-in domains' wire layers, in the registry's order.
pub(super) static DOMAINS: [&dyn WireDomain; 2] = [&LedgerWire, &InventoryWire];

/// Every domain field, once, in registration order: what the parser's slots hold. A name that
/// two domains declare with different types is a programming error, found by a unit test.
pub(super) fn field_table() -> &'static [(&'static str, FieldType)] {
    static TABLE: LazyLock<Vec<(&'static str, FieldType)>> = LazyLock::new(|| {
        let mut table: Vec<(&'static str, FieldType)> = Vec::new();
        for (name, ty) in DOMAINS.iter().flat_map(|d| d.fields()) {
            if !table.iter().any(|(n, _)| n == name) {
                table.push((name, *ty));
            }
        }
        table.truncate(FIELDS_MAX);
        table
    });
    &TABLE
}

/// The domain that answers to command type `type_name`, and the fields that command takes.
pub(super) fn command(
    type_name: &str,
) -> Option<(&'static dyn WireDomain, &'static [&'static str])> {
    DOMAINS.iter().find_map(|d| {
        d.commands()
            .iter()
            .find(|(name, _)| *name == type_name)
            .map(|(_, fields)| (*d, *fields))
    })
}

/// Every built-in command type, for error messages.
pub(super) fn command_types() -> &'static str {
    static TYPES: LazyLock<String> = LazyLock::new(|| {
        DOMAINS
            .iter()
            .flat_map(|d| d.commands().iter().map(|(name, _)| *name))
            .collect::<Vec<_>>()
            .join(", ")
    });
    &TYPES
}

struct LedgerWire;

impl WireDomain for LedgerWire {
    fn commands(&self) -> &'static [(&'static str, &'static [&'static str])] {
        &[
            ("open_account", &["account", "overdraft_limit"]),
            ("deposit", &["account", "amount", "memo"]),
            ("withdraw", &["account", "amount", "memo"]),
            ("transfer", &["from", "to", "amount", "memo"]),
            ("close_account", &["account"]),
        ]
    }

    fn fields(&self) -> &'static [(&'static str, FieldType)] {
        &[
            ("account", FieldType::Text),
            ("overdraft_limit", FieldType::Quantity),
            ("amount", FieldType::Quantity),
            ("memo", FieldType::Text),
            ("from", FieldType::Text),
            ("to", FieldType::Text),
        ]
    }

    fn build(&self, item: &Item<'_>, f: &mut Fields) -> Result<Command, WireError> {
        use ledger::Command as L;
        let account = |f: &mut Fields| item.aggregate(ledger::KIND, "account", f.text("account"));
        Ok(Command::from(match item.kind {
            "open_account" => L::OpenAccount {
                account: account(f)?,
                overdraft_limit: match f.quantity("overdraft_limit") {
                    Some(n) => item.count("overdraft_limit", Some(n))?,
                    None => 0,
                },
            },
            "deposit" => L::Deposit {
                account: account(f)?,
                amount: item.positive("amount", f.quantity("amount"))?,
                memo: item.memo(f.text("memo"))?,
            },
            "withdraw" => L::Withdraw {
                account: account(f)?,
                amount: item.positive("amount", f.quantity("amount"))?,
                memo: item.memo(f.text("memo"))?,
            },
            "transfer" => L::Transfer {
                from: item.aggregate(ledger::KIND, "from", f.text("from"))?,
                to: item.aggregate(ledger::KIND, "to", f.text("to"))?,
                amount: item.positive("amount", f.quantity("amount"))?,
                memo: item.memo(f.text("memo"))?,
            },
            "close_account" => L::CloseAccount {
                account: account(f)?,
            },
            other => return Err(item.unknown_type(other)),
        }))
    }
}

struct InventoryWire;

impl WireDomain for InventoryWire {
    fn commands(&self) -> &'static [(&'static str, &'static [&'static str])] {
        &[
            ("create_sku", &["sku", "on_hand"]),
            ("restock", &["sku", "qty"]),
            ("reserve", &["sku", "qty", "order"]),
            ("release", &["sku", "order"]),
            ("ship", &["sku", "order"]),
        ]
    }

    fn fields(&self) -> &'static [(&'static str, FieldType)] {
        &[
            ("sku", FieldType::Text),
            ("on_hand", FieldType::Quantity),
            ("qty", FieldType::Quantity),
            ("order", FieldType::Text),
        ]
    }

    fn build(&self, item: &Item<'_>, f: &mut Fields) -> Result<Command, WireError> {
        use inventory::Command as I;
        let sku = |f: &mut Fields| item.aggregate(inventory::KIND, "sku", f.text("sku"));
        Ok(Command::from(match item.kind {
            "create_sku" => I::CreateSku {
                sku: sku(f)?,
                on_hand: item.count("on_hand", f.quantity("on_hand"))?,
            },
            "restock" => I::Restock {
                sku: sku(f)?,
                qty: item.positive("qty", f.quantity("qty"))?,
            },
            "reserve" => I::Reserve {
                sku: sku(f)?,
                qty: item.positive("qty", f.quantity("qty"))?,
                order: item.name("order", f.text("order"))?,
            },
            "release" => I::Release {
                sku: sku(f)?,
                order: item.name("order", f.text("order"))?,
            },
            "ship" => I::Ship {
                sku: sku(f)?,
                order: item.name("order", f.text("order"))?,
            },
            other => return Err(item.unknown_type(other)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_has_one_type_and_a_slot() {
        let mut seen: Vec<(&str, FieldType)> = Vec::new();
        for (name, ty) in DOMAINS.iter().flat_map(|d| d.fields()) {
            if let Some((_, other)) = seen.iter().find(|(n, _)| n == name) {
                assert_eq!(other, ty, "field `{name}` has two types");
            } else {
                seen.push((name, *ty));
            }
        }
        assert!(
            seen.len() <= FIELDS_MAX,
            "{} fields > {FIELDS_MAX}",
            seen.len()
        );
        assert_eq!(field_table().len(), seen.len());
        for field in ["type", "id", "expected_version"] {
            assert!(seen.iter().all(|(n, _)| *n != field), "`{field}` is common");
        }
    }

    #[test]
    fn every_command_field_is_declared_and_every_type_is_one_domains() {
        let mut types: Vec<&str> = Vec::new();
        for domain in DOMAINS {
            for (name, fields) in domain.commands() {
                assert!(!types.contains(name), "`{name}` answered by two domains");
                types.push(name);
                for field in *fields {
                    assert!(
                        domain.fields().iter().any(|(n, _)| n == field),
                        "{name} takes undeclared field `{field}`"
                    );
                }
            }
        }
        // The registry's own list of built-in command types is the wire's.
        let registry: Vec<&str> = keel_invariants::builtin_domains()
            .iter()
            .flat_map(|d| d.command_types())
            .collect();
        assert_eq!(types, registry);
    }
}
