//! The ledger: accounts with an overdraft limit, deposits, withdrawals and transfers.
//!
//! Invariants: `balance >= -overdraft_limit`; amounts are positive; nothing overflows `i64`;
//! an account is opened once, is never used after it is closed, and closes only at zero.

use crate::domain::{
    AggregateId, Conservation, Domain, LawScope, RejectCode, Rejection, Targets, Violation,
};
use serde::{Deserialize, Serialize};

/// The aggregate kind prefix of ledger accounts.
pub const KIND: &str = "account";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    OpenAccount {
        account: AggregateId,
        overdraft_limit: u64,
    },
    Deposit {
        account: AggregateId,
        amount: u64,
        memo: Option<String>,
    },
    Withdraw {
        account: AggregateId,
        amount: u64,
        memo: Option<String>,
    },
    Transfer {
        from: AggregateId,
        to: AggregateId,
        amount: u64,
        memo: Option<String>,
    },
    CloseAccount {
        account: AggregateId,
    },
}

/// Never reorder or remove variants: the position is the stored encoding (docs/FORMAT.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    AccountOpened {
        account: AggregateId,
        overdraft_limit: u64,
    },
    Deposited {
        account: AggregateId,
        amount: u64,
        memo: Option<String>,
    },
    Withdrew {
        account: AggregateId,
        amount: u64,
        memo: Option<String>,
    },
    Transferred {
        from: AggregateId,
        to: AggregateId,
        amount: u64,
        memo: Option<String>,
    },
    AccountClosed {
        account: AggregateId,
    },
}

impl Event {
    /// The stable snake_case event type name.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::AccountOpened { .. } => "account_opened",
            Self::Deposited { .. } => "deposited",
            Self::Withdrew { .. } => "withdrew",
            Self::Transferred { .. } => "transferred",
            Self::AccountClosed { .. } => "account_closed",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub balance: i64,
    pub overdraft_limit: u64,
    pub closed: bool,
}

/// The ledger domain.
pub struct Ledger;

/// Money enters only by deposits and leaves only by withdrawals; a transfer moves it between
/// two accounts and nets to zero.
static LAWS: [Conservation<Event, Account>; 1] = [Conservation {
    name: "ledger.money",
    statement: "the sum of all balances equals the sum of deposits minus the sum of withdrawals",
    scope: LawScope::Total,
    flow: money_flow,
    quantity: |account| i128::from(account.balance),
}];

fn money_flow(event: &Event, target: usize) -> i128 {
    match event {
        Event::Deposited { amount, .. } => i128::from(*amount),
        Event::Withdrew { amount, .. } => -i128::from(*amount),
        Event::Transferred { amount, .. } if target == 0 => -i128::from(*amount),
        Event::Transferred { amount, .. } => i128::from(*amount),
        Event::AccountOpened { .. } | Event::AccountClosed { .. } => 0,
    }
}

impl Domain for Ledger {
    type Command = Command;
    type Event = Event;
    type State = Account;

    fn targets(command: &Command) -> Targets<'_> {
        match command {
            Command::OpenAccount { account, .. }
            | Command::Deposit { account, .. }
            | Command::Withdraw { account, .. }
            | Command::CloseAccount { account } => Targets::one(account),
            Command::Transfer { from, to, .. } => Targets::two(from, to),
        }
    }

    fn decide(
        command: &Command,
        primary: Option<&Account>,
        secondary: Option<&Account>,
    ) -> Result<Event, Rejection> {
        match command {
            Command::OpenAccount {
                account,
                overdraft_limit,
            } => {
                if primary.is_some() {
                    return Err(Rejection::new(
                        RejectCode::AccountExists,
                        format!("{account} already exists"),
                    ));
                }
                if i64::try_from(*overdraft_limit).is_err() {
                    return Err(Rejection::new(
                        RejectCode::Overflow,
                        format!("overdraft_limit {overdraft_limit} exceeds {}", i64::MAX),
                    ));
                }
                Ok(Event::AccountOpened {
                    account: account.clone(),
                    overdraft_limit: *overdraft_limit,
                })
            }
            Command::Deposit {
                account,
                amount,
                memo,
            } => {
                let current = open(account, primary)?;
                credited(account, current, *amount)?;
                Ok(Event::Deposited {
                    account: account.clone(),
                    amount: *amount,
                    memo: memo.clone(),
                })
            }
            Command::Withdraw {
                account,
                amount,
                memo,
            } => {
                let current = open(account, primary)?;
                debited(account, current, *amount)?;
                Ok(Event::Withdrew {
                    account: account.clone(),
                    amount: *amount,
                    memo: memo.clone(),
                })
            }
            Command::Transfer {
                from,
                to,
                amount,
                memo,
            } => {
                if from == to {
                    return Err(Rejection::new(
                        RejectCode::SameAccount,
                        format!("cannot transfer from {from} to itself"),
                    ));
                }
                let source = open(from, primary)?;
                let target = open(to, secondary)?;
                debited(from, source, *amount)?;
                credited(to, target, *amount)?;
                Ok(Event::Transferred {
                    from: from.clone(),
                    to: to.clone(),
                    amount: *amount,
                    memo: memo.clone(),
                })
            }
            Command::CloseAccount { account } => {
                let current = open(account, primary)?;
                if current.balance != 0 {
                    return Err(Rejection::new(
                        RejectCode::BalanceNotZero,
                        format!(
                            "{account} has balance {}; only a zero balance closes",
                            current.balance
                        ),
                    ));
                }
                Ok(Event::AccountClosed {
                    account: account.clone(),
                })
            }
        }
    }

    fn event_targets(event: &Event) -> Targets<'_> {
        match event {
            Event::AccountOpened { account, .. }
            | Event::Deposited { account, .. }
            | Event::Withdrew { account, .. }
            | Event::AccountClosed { account } => Targets::one(account),
            Event::Transferred { from, to, .. } => Targets::two(from, to),
        }
    }

    fn apply(event: &Event, target: usize, state: Option<Account>) -> Account {
        let mut account = state.unwrap_or_default();
        // Wrapping arithmetic: `decide` refused every overflow, and `apply` must not fail. The
        // audit's invariant check catches a state that only a corrupt log could produce.
        match event {
            Event::AccountOpened {
                overdraft_limit, ..
            } => {
                account = Account {
                    balance: 0,
                    overdraft_limit: *overdraft_limit,
                    closed: false,
                };
            }
            Event::Deposited { amount, .. } => {
                account.balance = account.balance.wrapping_add_unsigned(*amount);
            }
            Event::Withdrew { amount, .. } => {
                account.balance = account.balance.wrapping_sub_unsigned(*amount);
            }
            Event::Transferred { amount, .. } => {
                account.balance = if target == 0 {
                    account.balance.wrapping_sub_unsigned(*amount)
                } else {
                    account.balance.wrapping_add_unsigned(*amount)
                };
            }
            Event::AccountClosed { .. } => account.closed = true,
        }
        account
    }

    fn check(state: &Account) -> Result<(), Violation> {
        let floor = -i128::from(state.overdraft_limit);
        if i128::from(state.balance) < floor {
            return Err(Violation {
                invariant: "balance >= -overdraft_limit".into(),
                detail: format!(
                    "balance {} is below -{}",
                    state.balance, state.overdraft_limit
                ),
            });
        }
        if i64::try_from(state.overdraft_limit).is_err() {
            return Err(Violation {
                invariant: "overdraft_limit <= i64::MAX".into(),
                detail: format!("overdraft_limit {}", state.overdraft_limit),
            });
        }
        if state.closed && state.balance != 0 {
            return Err(Violation {
                invariant: "closed accounts hold zero".into(),
                detail: format!("closed account has balance {}", state.balance),
            });
        }
        Ok(())
    }

    fn conservation() -> &'static [Conservation<Event, Account>] {
        &LAWS
    }
}

/// The account, which must exist and be open.
fn open<'a>(id: &AggregateId, state: Option<&'a Account>) -> Result<&'a Account, Rejection> {
    match state {
        None => Err(Rejection::new(
            RejectCode::AccountNotFound,
            format!("{id} does not exist"),
        )),
        Some(account) if account.closed => Err(Rejection::new(
            RejectCode::AccountClosed,
            format!("{id} is closed"),
        )),
        Some(account) => Ok(account),
    }
}

fn positive(amount: u64) -> Result<i64, Rejection> {
    if amount == 0 {
        return Err(Rejection::new(
            RejectCode::InvalidAmount,
            "amount must be greater than 0",
        ));
    }
    i64::try_from(amount).map_err(|_| {
        Rejection::new(
            RejectCode::Overflow,
            format!("amount {amount} exceeds {}", i64::MAX),
        )
    })
}

/// The balance after crediting `amount`, or why it cannot be.
fn credited(id: &AggregateId, account: &Account, amount: u64) -> Result<i64, Rejection> {
    let amount = positive(amount)?;
    account.balance.checked_add(amount).ok_or_else(|| {
        Rejection::new(
            RejectCode::Overflow,
            format!("crediting {amount} overflows {id}'s balance"),
        )
    })
}

/// The balance after debiting `amount`, or why it cannot be.
fn debited(id: &AggregateId, account: &Account, amount: u64) -> Result<i64, Rejection> {
    let amount = positive(amount)?;
    let floor = -i128::from(account.overdraft_limit);
    let after = i128::from(account.balance) - i128::from(amount);
    if after < floor {
        return Err(Rejection::new(
            RejectCode::InsufficientFunds,
            format!(
                "{id} has balance {} and overdraft limit {}; cannot debit {amount}",
                account.balance, account.overdraft_limit
            ),
        ));
    }
    i64::try_from(after).map_err(|_| {
        Rejection::new(
            RejectCode::Overflow,
            format!("debiting {amount} overflows {id}'s balance"),
        )
    })
}
