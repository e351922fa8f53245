//! The inventory: SKUs with stock on hand and reservations per order.
//!
//! Invariants: `reserved <= on_hand`; `reserved` is the sum of the open reservations; quantities
//! are positive; nothing overflows; an order holds at most one reservation per SKU, and a
//! release or shipment needs one.

use crate::domain::{
    AggregateId, Conservation, Domain, LawScope, RejectCode, Rejection, Targets, Violation,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The aggregate kind prefix of SKUs.
pub const KIND: &str = "sku";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    CreateSku {
        sku: AggregateId,
        on_hand: u64,
    },
    Restock {
        sku: AggregateId,
        qty: u64,
    },
    Reserve {
        sku: AggregateId,
        qty: u64,
        order: String,
    },
    Release {
        sku: AggregateId,
        order: String,
    },
    Ship {
        sku: AggregateId,
        order: String,
    },
}

/// Never reorder or remove variants: the position is the stored encoding (docs/FORMAT.md).
/// `Released` and `Shipped` carry the quantity decided at the time, so applying them needs no
/// lookup and projections can show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    SkuCreated {
        sku: AggregateId,
        on_hand: u64,
    },
    Restocked {
        sku: AggregateId,
        qty: u64,
    },
    Reserved {
        sku: AggregateId,
        qty: u64,
        order: String,
    },
    Released {
        sku: AggregateId,
        qty: u64,
        order: String,
    },
    Shipped {
        sku: AggregateId,
        qty: u64,
        order: String,
    },
}

impl Event {
    /// The stable snake_case event type name.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::SkuCreated { .. } => "sku_created",
            Self::Restocked { .. } => "restocked",
            Self::Reserved { .. } => "reserved",
            Self::Released { .. } => "released",
            Self::Shipped { .. } => "shipped",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sku {
    pub on_hand: u64,
    pub reserved: u64,
    /// Open reservations: order -> quantity.
    pub reservations: BTreeMap<String, u64>,
}

/// Stock and reservations, each SKU on its own: stock enters by creation and restocking and
/// leaves by shipping; a reservation is opened by `reserved` and closed by `released` or
/// `shipped`, so what is still reserved is their difference.
static LAWS: [Conservation<Event, Sku>; 2] = [
    Conservation {
        name: "inventory.on_hand",
        statement: "each SKU's on_hand equals its created on_hand plus restocked minus shipped",
        scope: LawScope::PerAggregate,
        flow: stock_flow,
        quantity: |sku| i128::from(sku.on_hand),
    },
    Conservation {
        name: "inventory.reserved",
        statement: "each SKU's reserved equals its reserved minus released minus shipped quantities",
        scope: LawScope::PerAggregate,
        flow: reservation_flow,
        quantity: |sku| i128::from(sku.reserved),
    },
];

fn stock_flow(event: &Event, _target: usize) -> i128 {
    match event {
        Event::SkuCreated { on_hand, .. } => i128::from(*on_hand),
        Event::Restocked { qty, .. } => i128::from(*qty),
        Event::Shipped { qty, .. } => -i128::from(*qty),
        Event::Reserved { .. } | Event::Released { .. } => 0,
    }
}

fn reservation_flow(event: &Event, _target: usize) -> i128 {
    match event {
        Event::Reserved { qty, .. } => i128::from(*qty),
        Event::Released { qty, .. } | Event::Shipped { qty, .. } => -i128::from(*qty),
        Event::SkuCreated { .. } | Event::Restocked { .. } => 0,
    }
}

/// The inventory domain.
pub struct Inventory;

impl Domain for Inventory {
    type Command = Command;
    type Event = Event;
    type State = Sku;

    fn targets(command: &Command) -> Targets<'_> {
        match command {
            Command::CreateSku { sku, .. }
            | Command::Restock { sku, .. }
            | Command::Reserve { sku, .. }
            | Command::Release { sku, .. }
            | Command::Ship { sku, .. } => Targets::one(sku),
        }
    }

    fn decide(
        command: &Command,
        primary: Option<&Sku>,
        _: Option<&Sku>,
    ) -> Result<Event, Rejection> {
        match command {
            Command::CreateSku { sku, on_hand } => {
                if primary.is_some() {
                    return Err(Rejection::new(
                        RejectCode::SkuExists,
                        format!("{sku} already exists"),
                    ));
                }
                Ok(Event::SkuCreated {
                    sku: sku.clone(),
                    on_hand: *on_hand,
                })
            }
            Command::Restock { sku, qty } => {
                let current = existing(sku, primary)?;
                positive(*qty)?;
                if current.on_hand.checked_add(*qty).is_none() {
                    return Err(Rejection::new(
                        RejectCode::Overflow,
                        format!("restocking {qty} overflows {sku}'s on_hand"),
                    ));
                }
                Ok(Event::Restocked {
                    sku: sku.clone(),
                    qty: *qty,
                })
            }
            Command::Reserve { sku, qty, order } => {
                let current = existing(sku, primary)?;
                positive(*qty)?;
                if current.reservations.contains_key(order) {
                    return Err(Rejection::new(
                        RejectCode::ReservationExists,
                        format!("order {order} already holds a reservation on {sku}"),
                    ));
                }
                let available = current.on_hand.saturating_sub(current.reserved);
                if *qty > available {
                    return Err(Rejection::new(
                        RejectCode::InsufficientStock,
                        format!("{sku} has {available} available; cannot reserve {qty}"),
                    ));
                }
                Ok(Event::Reserved {
                    sku: sku.clone(),
                    qty: *qty,
                    order: order.clone(),
                })
            }
            Command::Release { sku, order } => {
                let qty = reservation(sku, existing(sku, primary)?, order)?;
                Ok(Event::Released {
                    sku: sku.clone(),
                    qty,
                    order: order.clone(),
                })
            }
            Command::Ship { sku, order } => {
                let qty = reservation(sku, existing(sku, primary)?, order)?;
                Ok(Event::Shipped {
                    sku: sku.clone(),
                    qty,
                    order: order.clone(),
                })
            }
        }
    }

    fn event_targets(event: &Event) -> Targets<'_> {
        match event {
            Event::SkuCreated { sku, .. }
            | Event::Restocked { sku, .. }
            | Event::Reserved { sku, .. }
            | Event::Released { sku, .. }
            | Event::Shipped { sku, .. } => Targets::one(sku),
        }
    }

    fn apply(event: &Event, _target: usize, state: Option<Sku>) -> Sku {
        let mut sku = state.unwrap_or_default();
        // Wrapping/saturating arithmetic: `decide` refused every overflow, and `apply` must not
        // fail. The audit's invariant check catches a state only a corrupt log could produce.
        match event {
            Event::SkuCreated { on_hand, .. } => {
                sku = Sku {
                    on_hand: *on_hand,
                    reserved: 0,
                    reservations: BTreeMap::new(),
                };
            }
            Event::Restocked { qty, .. } => sku.on_hand = sku.on_hand.wrapping_add(*qty),
            Event::Reserved { qty, order, .. } => {
                sku.reserved = sku.reserved.wrapping_add(*qty);
                sku.reservations.insert(order.clone(), *qty);
            }
            Event::Released { qty, order, .. } => {
                sku.reserved = sku.reserved.wrapping_sub(*qty);
                sku.reservations.remove(order);
            }
            Event::Shipped { qty, order, .. } => {
                sku.reserved = sku.reserved.wrapping_sub(*qty);
                sku.on_hand = sku.on_hand.wrapping_sub(*qty);
                sku.reservations.remove(order);
            }
        }
        sku
    }

    fn check(state: &Sku) -> Result<(), Violation> {
        if state.reserved > state.on_hand {
            return Err(Violation {
                invariant: "reserved <= on_hand".into(),
                detail: format!(
                    "reserved {} exceeds on_hand {}",
                    state.reserved, state.on_hand
                ),
            });
        }
        let sum = state
            .reservations
            .values()
            .try_fold(0u64, |acc, q| acc.checked_add(*q));
        if sum != Some(state.reserved) {
            return Err(Violation {
                invariant: "reserved == sum(reservations)".into(),
                detail: format!(
                    "reserved {} but reservations sum to {sum:?}",
                    state.reserved
                ),
            });
        }
        if let Some((order, _)) = state.reservations.iter().find(|(_, q)| **q == 0) {
            return Err(Violation {
                invariant: "reservations are positive".into(),
                detail: format!("order {order} reserves 0"),
            });
        }
        Ok(())
    }

    fn conservation() -> &'static [Conservation<Event, Sku>] {
        &LAWS
    }
}

fn existing<'a>(id: &AggregateId, state: Option<&'a Sku>) -> Result<&'a Sku, Rejection> {
    state.ok_or_else(|| Rejection::new(RejectCode::SkuNotFound, format!("{id} does not exist")))
}

fn positive(qty: u64) -> Result<(), Rejection> {
    if qty == 0 {
        return Err(Rejection::new(
            RejectCode::InvalidAmount,
            "qty must be greater than 0",
        ));
    }
    Ok(())
}

fn reservation(id: &AggregateId, sku: &Sku, order: &str) -> Result<u64, Rejection> {
    sku.reservations.get(order).copied().ok_or_else(|| {
        Rejection::new(
            RejectCode::ReservationNotFound,
            format!("order {order} holds no reservation on {id}"),
        )
    })
}
