//! Typed, checked CEL expressions for declarative domains.
//!
//! A domain file's preconditions, effects and invariants are CEL expressions. The `cel` crate
//! only parses them; this module type-checks the syntax tree once, at load, against the
//! declared names of a [`Scope`], and compiles it into a typed tree ([`Expr`]) that evaluates
//! with checked arithmetic and no name lookups: every name is a [`Slot`], an index into a flat
//! array of [`Value`]s. Evaluation is deterministic: no clock, randomness or IO.
//!
//! # Supported subset
//!
//! * Types: `int`, `uint`, `bool`, `string`, `timestamp` (µs since the Unix epoch), `duration`
//!   (µs) and `map(string, T)` with `T` one of the scalar types.
//! * Literals: `5`, `-3`, `5u`, `true`, `"text"`; map literals `{"a": 1, "b": 2}` with string
//!   literal keys (no duplicates) and values of one type. The empty map literal `{}` is refused
//!   (its type cannot be inferred): use a map's current value and `.without(...)`. Doubles,
//!   bytes, `null` and lists are refused.
//! * Names: plain variables (`now`) and object fields (`flight.capacity`); an object alone is
//!   not a value. `m.key` on a map value is `m["key"]`.
//! * Arithmetic: `+ - * / %` and unary `-` on `int` and on `uint` (never mixed: convert with
//!   `int()` or `uint()`), all checked: overflow is [`EvalError::Overflow`], `/ 0` and `% 0`
//!   are [`EvalError::DivisionByZero`]. `string + string` (results longer than
//!   [`MAX_STRING_LEN`] bytes are an overflow). `timestamp ± duration`, `duration + timestamp`,
//!   `timestamp - timestamp` (a duration), `duration ± duration`, unary `-` on durations, all
//!   checked; timestamps must stay within CEL's range, years 0001 to 9999.
//! * Comparisons: `== !=` on two values of one type (maps included) and `< <= > >=` on two
//!   values of one scalar type; `int` and `uint` compare with each other exactly (CEL's
//!   heterogeneous numeric comparison).
//! * Logic: `&&`, `||`, `!`, `c ? a : b` (branches of one type). `&&` and `||` evaluate left to
//!   right and short-circuit: `false && (1 / 0 == 1)` is `false`, but `(1 / 0 == 1) && false` is
//!   an error (CEL's commutative error absorption is not implemented).
//! * Maps: `m[k]` ([`EvalError::NoSuchKey`] when absent), `k in m`, `size(m)` / `m.size()`,
//!   `m.all(k, pred)` and `m.exists(k, pred)` over the keys, in key order, short-circuiting
//!   (an error in the predicate is returned as is). A comprehension inside a comprehension is
//!   refused, as are `map`, `filter`, `exists_one` and `has()` (use `"key" in m`).
//! * Keel extensions on maps: `m.with(k, v)` is `m` with key `k` set to `v`;
//!   `m.without(k)` is `m` without key `k` (no error when absent); `sum(m)` is the checked sum
//!   of the values of a `map(string, int)` or `map(string, uint)`.
//! * Strings: `size(s)` / `s.size()` (Unicode code points, as CEL specifies),
//!   `s.startsWith(x)`, `s.endsWith(x)`, `s.contains(x)`.
//! * Conversions: `int(x)` from `int`, `uint` (checked) and `timestamp` (whole seconds since the
//!   epoch, rounded down); `uint(x)` from `uint` and `int` (checked); `string(x)` from `int`,
//!   `uint`, `bool`, `string`, `timestamp` (RFC 3339 in UTC, e.g. `2023-11-14T22:13:20.123456Z`,
//!   fractional digits only when not zero, trailing zeros trimmed) and `duration` (seconds,
//!   e.g. `90s`, `1.5s`, `-0.000001s`). `duration("1h30m")` and
//!   `timestamp("2026-01-02T03:04:05Z")` take a string literal only and are converted at
//!   compile time. Durations are a sequence of decimal numbers, each with a unit among `h`, `m`,
//!   `s`, `ms`, `us` (or `µs`) and `ns` (an optional leading sign, `"0"` alone allowed; the total
//!   must be whole microseconds). Timestamps are RFC 3339: `YYYY-MM-DDTHH:MM:SS`, optional
//!   fraction (microsecond precision), then `Z` or an offset `±HH:MM`.
//! * `size()` results are `int`.
//!
//! Anything else is a [`CompileError`] naming the construct. The source length, node count and
//! nesting depth are bounded by [`Limits`].

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};

use cel::common::ast::{
    CallExpr, ComprehensionExpr, EntryExpr, Expr as Ast, IdedExpr, LiteralValue, SelectExpr,
    SourceInfo, operators,
};
use cel::parser::Parser;

/// The longest string a concatenation may produce, in bytes.
pub const MAX_STRING_LEN: usize = 65_536;

const MICROS_PER_SECOND: i64 = 1_000_000;
const MICROS_PER_DAY: i64 = 86_400 * MICROS_PER_SECOND;
/// 0001-01-01T00:00:00Z, CEL's earliest timestamp.
const MIN_TIMESTAMP: i64 = -62_135_596_800 * MICROS_PER_SECOND;
/// 9999-12-31T23:59:59.999999Z, CEL's latest timestamp.
const MAX_TIMESTAMP: i64 = 253_402_300_800 * MICROS_PER_SECOND - 1;

/// The type of a value or an expression.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Type {
    Int,
    Uint,
    Bool,
    String,
    /// Microseconds since the Unix epoch.
    Timestamp,
    /// Microseconds.
    Duration,
    /// A map keyed by strings whose values have the given scalar type (no nested maps).
    Map(Box<Type>),
}

impl Type {
    /// The type's CEL spelling: `int`, `uint`, `bool`, `string`, `timestamp`, `duration`,
    /// `map(string, int)`.
    pub fn name(&self) -> String {
        match self {
            Type::Map(value) => format!("map(string, {})", value.name()),
            scalar => scalar.scalar_name().to_string(),
        }
    }

    fn scalar_name(&self) -> &'static str {
        match self {
            Type::Int => "int",
            Type::Uint => "uint",
            Type::Bool => "bool",
            Type::String => "string",
            Type::Timestamp => "timestamp",
            Type::Duration => "duration",
            Type::Map(_) => "map",
        }
    }

    fn is_map(&self) -> bool {
        matches!(self, Type::Map(_))
    }

    /// Whether a value of this type may be stored in a slot: scalars, and maps of scalars.
    fn is_valid(&self) -> bool {
        match self {
            Type::Map(value) => !value.is_map(),
            _ => true,
        }
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// A value: of a slot, or of an expression.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Value {
    Int(i64),
    Uint(u64),
    Bool(bool),
    String(String),
    /// Microseconds since the Unix epoch.
    Timestamp(i64),
    /// Microseconds.
    Duration(i64),
    Map(BTreeMap<String, Value>),
}

impl Value {
    /// The value's type. A map's value type is that of its first value; the empty map's type is
    /// reported as `map(string, int)` (it has every map type).
    pub fn type_of(&self) -> Type {
        match self {
            Value::Int(_) => Type::Int,
            Value::Uint(_) => Type::Uint,
            Value::Bool(_) => Type::Bool,
            Value::String(_) => Type::String,
            Value::Timestamp(_) => Type::Timestamp,
            Value::Duration(_) => Type::Duration,
            Value::Map(map) => Type::Map(Box::new(
                map.values().next().map_or(Type::Int, Value::type_of),
            )),
        }
    }

    /// The zero value of `ty`: `0`, `0u`, `false`, `""`, the epoch, a zero duration, an empty
    /// map.
    pub fn default_of(ty: &Type) -> Value {
        match ty {
            Type::Int => Value::Int(0),
            Type::Uint => Value::Uint(0),
            Type::Bool => Value::Bool(false),
            Type::String => Value::String(String::new()),
            Type::Timestamp => Value::Timestamp(0),
            Type::Duration => Value::Duration(0),
            Type::Map(_) => Value::Map(BTreeMap::new()),
        }
    }

    /// Whether the value has type `ty` (a map's values are all checked: the empty map has every
    /// map type).
    fn has_type(&self, ty: &Type) -> bool {
        match (self, ty) {
            (Value::Int(_), Type::Int)
            | (Value::Uint(_), Type::Uint)
            | (Value::Bool(_), Type::Bool)
            | (Value::String(_), Type::String)
            | (Value::Timestamp(_), Type::Timestamp)
            | (Value::Duration(_), Type::Duration) => true,
            (Value::Map(map), Type::Map(value)) => map.values().all(|v| v.has_type(value)),
            _ => false,
        }
    }

    fn kind_name(&self) -> &'static str {
        match self {
            Value::Int(_) => "int",
            Value::Uint(_) => "uint",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Timestamp(_) => "timestamp",
            Value::Duration(_) => "duration",
            Value::Map(_) => "map",
        }
    }
}

/// Index of a variable in the evaluation environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot(pub usize);

/// The names an expression may use. Two forms: plain variables (`now`, `amount`) and objects
/// with fields (`params.amount`, `flight.capacity`, `seat.held_by`): an object is only a
/// namespace, `flight` alone is not a value; `flight.capacity` is one slot.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    vars: BTreeMap<String, (Slot, Type)>,
    objects: BTreeMap<String, BTreeMap<String, (Slot, Type)>>,
    types: Vec<Type>,
}

impl Scope {
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares `name` of type `ty` at the next free slot and returns it; a name declared twice
    /// (as a variable or as an object) is an error naming it.
    pub fn var(&mut self, name: &str, ty: Type) -> Result<Slot, String> {
        check_identifier(name)?;
        check_slot_type(name, &ty)?;
        if self.vars.contains_key(name) || self.objects.contains_key(name) {
            return Err(format!("`{name}` is declared twice"));
        }
        let slot = Slot(self.types.len());
        self.vars.insert(name.to_string(), (slot, ty.clone()));
        self.types.push(ty);
        Ok(slot)
    }

    /// Declares `object.field` of type `ty` at the next free slot and returns it; a field
    /// declared twice, or an object named like a variable, is an error naming it.
    pub fn field(&mut self, object: &str, field: &str, ty: Type) -> Result<Slot, String> {
        check_identifier(object)?;
        check_identifier(field)?;
        check_slot_type(&format!("{object}.{field}"), &ty)?;
        if self.vars.contains_key(object) {
            return Err(format!(
                "`{object}` is declared twice: as a variable and as an object"
            ));
        }
        let fields = self.objects.entry(object.to_string()).or_default();
        if fields.contains_key(field) {
            return Err(format!("`{object}.{field}` is declared twice"));
        }
        let slot = Slot(self.types.len());
        fields.insert(field.to_string(), (slot, ty.clone()));
        self.types.push(ty);
        Ok(slot)
    }

    /// The number of slots.
    pub fn len(&self) -> usize {
        self.types.len()
    }

    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }

    /// The declared type of `slot`, if declared.
    pub fn slot_type(&self, slot: Slot) -> Option<&Type> {
        self.types.get(slot.0)
    }
}

fn check_identifier(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let valid = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid name (letters, digits and `_`, not starting with a digit)"
        ))
    }
}

fn check_slot_type(name: &str, ty: &Type) -> Result<(), String> {
    if ty.is_valid() {
        Ok(())
    } else {
        Err(format!(
            "`{name}` has type {ty}: map values must be scalars, maps do not nest"
        ))
    }
}

/// A compilation error: where in the expression's source and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileError {
    /// Byte offset in the expression source where the problem is, 0 if unknown.
    pub offset: usize,
    pub message: String,
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (at offset {})", self.message, self.offset)
    }
}

impl std::error::Error for CompileError {}

/// An evaluation error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EvalError {
    /// A checked operation overflowed; the message names the operation and the expression.
    Overflow(String),
    DivisionByZero,
    /// `m[k]` with `k` absent; the key.
    NoSuchKey(String),
    /// A conversion whose argument is out of the target type's range.
    ConversionOutOfRange(String),
    /// The environment does not match the scope (a slot missing or of the wrong type).
    Internal(String),
}

impl fmt::Display for EvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EvalError::Overflow(message) => f.write_str(message),
            EvalError::DivisionByZero => f.write_str("division by zero"),
            EvalError::NoSuchKey(key) => write!(f, "no such key: {key:?}"),
            EvalError::ConversionOutOfRange(message) => {
                write!(f, "conversion out of range: {message}")
            }
            EvalError::Internal(message) => write!(f, "internal error: {message}"),
        }
    }
}

impl std::error::Error for EvalError {}

/// Bounds on an expression's size, checked at compile time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The most syntax nodes an expression may have.
    pub max_nodes: usize,
    /// The deepest nesting an expression may have.
    pub max_depth: u16,
    /// The longest source, in bytes.
    pub max_source_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_nodes: 200,
            max_depth: 32,
            max_source_len: 2000,
        }
    }
}

/// A compiled expression.
#[derive(Clone, Debug)]
pub struct Expr {
    root: Node,
    ty: Type,
    slots: Vec<Slot>,
}

impl Expr {
    /// Parses and type-checks `source` against `scope`; the result type must equal `expected`.
    pub fn compile(
        source: &str,
        scope: &Scope,
        expected: &Type,
        limits: &Limits,
    ) -> Result<Expr, CompileError> {
        if source.len() > limits.max_source_len {
            return Err(CompileError {
                offset: limits.max_source_len,
                message: format!(
                    "expression is {} bytes long, more than the limit of {}",
                    source.len(),
                    limits.max_source_len
                ),
            });
        }
        let scan = scan(source);
        if scan.nesting > usize::from(limits.max_depth) {
            return Err(CompileError {
                offset: scan.deepest,
                message: format!(
                    "expression is nested deeper than {} levels",
                    limits.max_depth
                ),
            });
        }
        if scan.tokens > limits.max_nodes.saturating_mul(4) {
            return Err(CompileError {
                offset: 0,
                message: format!("expression has more than {} nodes", limits.max_nodes),
            });
        }
        // The parser recurses deeply (about 200 KiB of stack per nesting level in debug
        // builds): parse and compile on a thread of our own whose stack is sized from the
        // scan, joined before returning.
        let stack = PARSE_STACK_BASE.saturating_add(
            scan.tokens
                .saturating_add(scan.nesting)
                .saturating_mul(PARSE_STACK_PER_TOKEN),
        );
        std::thread::scope(|threads| {
            let worker = std::thread::Builder::new()
                .name("keel-cel-compile".to_string())
                .stack_size(stack)
                .spawn_scoped(threads, || compile_here(source, scope, expected, limits))
                .map_err(|e| CompileError {
                    offset: 0,
                    message: format!("cannot start the expression compiler: {e}"),
                })?;
            worker.join().unwrap_or_else(|_| {
                Err(CompileError {
                    offset: 0,
                    message: "the expression compiler failed".to_string(),
                })
            })
        })
    }

    /// The expression's type.
    pub fn result_type(&self) -> &Type {
        &self.ty
    }

    /// Evaluates with `env[slot]` the value of each declared slot. A slot missing from `env`
    /// or holding a value of another type than declared is an [`EvalError::Internal`].
    pub fn eval(&self, env: &[Value]) -> Result<Value, EvalError> {
        let cx = Ctx { env, key: None };
        let value = self.root.eval(&cx)?;
        if value.has_type(&self.ty) {
            Ok(value)
        } else {
            Err(EvalError::Internal(format!(
                "expression of type {} evaluated to a {}",
                self.ty,
                value.kind_name()
            )))
        }
    }

    /// Evaluates an expression of type `bool`.
    pub fn eval_bool(&self, env: &[Value]) -> Result<bool, EvalError> {
        let cx = Ctx { env, key: None };
        self.root.bool(&cx)
    }

    /// Every slot the expression reads, sorted and deduplicated.
    pub fn slots(&self) -> Vec<Slot> {
        self.slots.clone()
    }
}

/// Parses and compiles on the current thread (see [`Expr::compile`]).
fn compile_here(
    source: &str,
    scope: &Scope,
    expected: &Type,
    limits: &Limits,
) -> Result<Expr, CompileError> {
    let (ast, info) = Parser::new()
        .max_recursion_depth(limits.max_depth)
        .parse_with_source_info(source)
        .map_err(|errors| parse_error(source, &errors))?;
    let mut compiler = Compiler {
        source,
        scope,
        info: &info,
        limits,
        nodes: 0,
        iter_var: None,
        slots: BTreeSet::new(),
    };
    let typed = compiler.compile(&ast, 1)?;
    if &typed.ty != expected {
        return Err(compiler.error(&ast, format!("expected {expected}, found {}", typed.ty)));
    }
    Ok(Expr {
        root: typed.node,
        ty: typed.ty,
        slots: compiler.slots.into_iter().collect(),
    })
}

/// Stack of the compiling thread: a base, plus a share per token and nesting level.
const PARSE_STACK_BASE: usize = 8 << 20;
const PARSE_STACK_PER_TOKEN: usize = 256 << 10;

/// What a lexical scan of the source finds, before the parser sees it.
struct Scan {
    /// Tokens, roughly: a run of letters and digits, a string literal or a punctuation mark.
    tokens: usize,
    /// The deepest nesting of brackets, and of `?` within a bracket.
    nesting: usize,
    /// Where the deepest nesting starts (a byte offset).
    deepest: usize,
}

fn scan(source: &str) -> Scan {
    let bytes = source.as_bytes();
    let mut scan = Scan {
        tokens: 0,
        nesting: 0,
        deepest: 0,
    };
    // The number of `?` at each open bracket level, the current level last.
    let mut levels: Vec<usize> = vec![0];
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        scan.tokens += 1;
        if c == b'\'' || c == b'"' {
            let raw = i > 0 && matches!(bytes[i - 1], b'r' | b'R');
            let triple = bytes
                .get(i..i + 3)
                .is_some_and(|t| t.iter().all(|b| *b == c));
            i += if triple { 3 } else { 1 };
            while i < bytes.len() {
                if bytes[i] == b'\\' && !raw {
                    i += 2;
                } else if bytes[i] == c
                    && (!triple
                        || bytes
                            .get(i..i + 3)
                            .is_some_and(|t| t.iter().all(|b| *b == c)))
                {
                    i += if triple { 3 } else { 1 };
                    break;
                } else {
                    i += 1;
                }
            }
            continue;
        }
        if c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80 {
            while i < bytes.len()
                && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] >= 0x80)
            {
                i += 1;
            }
            continue;
        }
        match c {
            b'(' | b'[' | b'{' => {
                levels.push(0);
            }
            b')' | b']' | b'}' if levels.len() > 1 => {
                levels.pop();
            }
            b'?' => {
                if let Some(last) = levels.last_mut() {
                    *last += 1;
                }
            }
            _ => {}
        }
        let depth = levels.len() - 1 + levels.iter().sum::<usize>();
        if depth > scan.nesting {
            scan.nesting = depth;
            scan.deepest = i;
        }
        i += 1;
    }
    scan
}

fn parse_error(source: &str, errors: &cel::parser::ParseErrors) -> CompileError {
    let Some(first) = errors.errors.first() else {
        return CompileError {
            offset: 0,
            message: "syntax error".to_string(),
        };
    };
    // `pos` is (line, column), both 1-based, the column counted in bytes.
    let (line, column) = first.pos;
    let mut offset = 0;
    if line >= 1 {
        let line_index = usize::try_from(line - 1).unwrap_or(0);
        let line_start: usize = source
            .split_inclusive('\n')
            .take(line_index)
            .map(str::len)
            .sum();
        let column = usize::try_from(column).unwrap_or(0);
        offset = line_start.saturating_add(column.saturating_sub(1));
    }
    CompileError {
        offset: offset.min(source.len()),
        message: format!("syntax error: {}", first.msg),
    }
}

// ------------------------------------------------------------------------------------------
// The compiled tree.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bin {
    AddInt,
    SubInt,
    MulInt,
    DivInt,
    RemInt,
    AddUint,
    SubUint,
    MulUint,
    DivUint,
    RemUint,
    Concat,
    AddTsDur,
    AddDurTs,
    SubTsDur,
    SubTsTs,
    AddDur,
    SubDur,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    fn holds(self, ordering: Ordering) -> bool {
        match self {
            CmpOp::Eq => ordering == Ordering::Equal,
            CmpOp::Ne => ordering != Ordering::Equal,
            CmpOp::Lt => ordering == Ordering::Less,
            CmpOp::Le => ordering != Ordering::Greater,
            CmpOp::Gt => ordering == Ordering::Greater,
            CmpOp::Ge => ordering != Ordering::Less,
        }
    }

    fn is_equality(self) -> bool {
        matches!(self, CmpOp::Eq | CmpOp::Ne)
    }
}

/// How the operands of a comparison are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CmpMode {
    /// Two values of one type.
    Same,
    /// Two strings (borrowed, no allocation, comprehension keys included).
    Str,
    /// `int` against `uint`.
    IntUint,
    /// `uint` against `int`.
    UintInt,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StrFn {
    StartsWith,
    EndsWith,
    Contains,
}

#[derive(Clone, Debug)]
enum Node {
    Const(Value),
    Slot(usize),
    /// The key of the enclosing comprehension.
    Key,
    Not(Box<Node>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Cond(Box<Node>, Box<Node>, Box<Node>),
    /// A binary arithmetic operation; the text of the expression for error messages.
    Bin(Bin, Box<Node>, Box<Node>, Box<str>),
    NegInt(Box<Node>, Box<str>),
    NegDur(Box<Node>, Box<str>),
    Cmp(CmpOp, CmpMode, Box<Node>, Box<Node>),
    MapLit(Vec<(String, Node)>),
    Index(Box<Node>, Box<Node>),
    In(Box<Node>, Box<Node>),
    SizeMap(Box<Node>),
    SizeStr(Box<Node>),
    With(Box<Node>, Box<Node>, Box<Node>),
    Without(Box<Node>, Box<Node>),
    SumInt(Box<Node>, Box<str>),
    SumUint(Box<Node>, Box<str>),
    Str(StrFn, Box<Node>, Box<Node>),
    IntOfUint(Box<Node>),
    IntOfTimestamp(Box<Node>),
    UintOfInt(Box<Node>),
    ToString(Box<Node>),
    All(Box<Node>, Box<Node>),
    Exists(Box<Node>, Box<Node>),
}

/// The evaluation context: the slots, and the key of the enclosing comprehension.
struct Ctx<'a> {
    env: &'a [Value],
    key: Option<&'a str>,
}

fn wrong_type(expected: &str, found: &Value) -> EvalError {
    EvalError::Internal(format!(
        "expected a {expected}, found a {}",
        found.kind_name()
    ))
}

fn no_key() -> EvalError {
    EvalError::Internal("comprehension key read outside a comprehension".to_string())
}

fn size_of(len: usize) -> Result<Value, EvalError> {
    i64::try_from(len)
        .map(Value::Int)
        .map_err(|_| EvalError::Overflow("size overflows int".to_string()))
}

fn check_timestamp(ts: i64, text: &str) -> Result<Value, EvalError> {
    if (MIN_TIMESTAMP..=MAX_TIMESTAMP).contains(&ts) {
        Ok(Value::Timestamp(ts))
    } else {
        Err(EvalError::Overflow(format!(
            "timestamp out of range in `{text}`"
        )))
    }
}

impl Node {
    fn eval<'a>(&'a self, cx: &Ctx<'a>) -> Result<Value, EvalError> {
        Ok(match self {
            Node::Const(value) => value.clone(),
            Node::Slot(slot) => cx
                .env
                .get(*slot)
                .cloned()
                .ok_or_else(|| EvalError::Internal(format!("slot {slot} missing")))?,
            Node::Key => Value::String(cx.key.ok_or_else(no_key)?.to_string()),
            Node::Not(x) => Value::Bool(!x.bool(cx)?),
            Node::And(..) | Node::Or(..) | Node::Cmp(..) | Node::In(..) | Node::Str(..) => {
                Value::Bool(self.bool(cx)?)
            }
            Node::All(..) | Node::Exists(..) => Value::Bool(self.bool(cx)?),
            Node::Cond(c, a, b) => {
                if c.bool(cx)? {
                    a.eval(cx)?
                } else {
                    b.eval(cx)?
                }
            }
            Node::Bin(op, a, b, text) => return bin(*op, a, b, text, cx),
            Node::NegInt(x, text) => Value::Int(
                x.int(cx)?
                    .checked_neg()
                    .ok_or_else(|| EvalError::Overflow(format!("int overflow in `{text}`")))?,
            ),
            Node::NegDur(x, text) => Value::Duration(
                x.duration(cx)?
                    .checked_neg()
                    .ok_or_else(|| EvalError::Overflow(format!("duration overflow in `{text}`")))?,
            ),
            Node::MapLit(entries) => {
                let mut map = BTreeMap::new();
                for (key, value) in entries {
                    map.insert(key.clone(), value.eval(cx)?);
                }
                Value::Map(map)
            }
            Node::Index(m, k) => {
                let map = m.map(cx)?;
                let key = k.str(cx)?;
                match map.get(key.as_ref()) {
                    Some(value) => value.clone(),
                    None => return Err(EvalError::NoSuchKey(key.into_owned())),
                }
            }
            Node::SizeMap(m) => size_of(m.map(cx)?.len())?,
            Node::SizeStr(s) => size_of(s.str(cx)?.chars().count())?,
            Node::With(m, k, v) => {
                let mut map = m.map(cx)?.into_owned();
                let key = k.str(cx)?.into_owned();
                let value = v.eval(cx)?;
                map.insert(key, value);
                Value::Map(map)
            }
            Node::Without(m, k) => {
                let map = m.map(cx)?;
                let key = k.str(cx)?;
                if map.contains_key(key.as_ref()) {
                    let mut map = map.into_owned();
                    map.remove(key.as_ref());
                    Value::Map(map)
                } else {
                    Value::Map(map.into_owned())
                }
            }
            Node::SumInt(m, text) => {
                let mut total: i64 = 0;
                for value in m.map(cx)?.values() {
                    let Value::Int(i) = value else {
                        return Err(wrong_type("int", value));
                    };
                    total = total
                        .checked_add(*i)
                        .ok_or_else(|| EvalError::Overflow(format!("int overflow in `{text}`")))?;
                }
                Value::Int(total)
            }
            Node::SumUint(m, text) => {
                let mut total: u64 = 0;
                for value in m.map(cx)?.values() {
                    let Value::Uint(u) = value else {
                        return Err(wrong_type("uint", value));
                    };
                    total = total
                        .checked_add(*u)
                        .ok_or_else(|| EvalError::Overflow(format!("uint overflow in `{text}`")))?;
                }
                Value::Uint(total)
            }
            Node::IntOfUint(x) => {
                let u = x.uint(cx)?;
                Value::Int(i64::try_from(u).map_err(|_| {
                    EvalError::ConversionOutOfRange(format!("int({u}u) is beyond int's range"))
                })?)
            }
            Node::IntOfTimestamp(x) => Value::Int(x.timestamp(cx)?.div_euclid(MICROS_PER_SECOND)),
            Node::UintOfInt(x) => {
                let i = x.int(cx)?;
                Value::Uint(u64::try_from(i).map_err(|_| {
                    EvalError::ConversionOutOfRange(format!("uint({i}) is negative"))
                })?)
            }
            Node::ToString(x) => Value::String(match x.eval(cx)? {
                Value::Int(i) => i.to_string(),
                Value::Uint(u) => u.to_string(),
                Value::Bool(b) => b.to_string(),
                Value::String(s) => s,
                Value::Timestamp(ts) => format_timestamp(ts).ok_or_else(|| {
                    EvalError::ConversionOutOfRange(format!(
                        "timestamp {ts}µs is beyond years 0001 to 9999"
                    ))
                })?,
                Value::Duration(d) => format_duration(d),
                other @ Value::Map(_) => return Err(wrong_type("scalar", &other)),
            }),
        })
    }

    fn bool<'a>(&'a self, cx: &Ctx<'a>) -> Result<bool, EvalError> {
        match self {
            Node::Not(x) => Ok(!x.bool(cx)?),
            Node::And(a, b) => Ok(a.bool(cx)? && b.bool(cx)?),
            Node::Or(a, b) => Ok(a.bool(cx)? || b.bool(cx)?),
            Node::Cmp(op, mode, a, b) => compare(*op, *mode, a, b, cx),
            Node::In(k, m) => {
                let key = k.str(cx)?;
                Ok(m.map(cx)?.contains_key(key.as_ref()))
            }
            Node::Str(f, s, x) => {
                let s = s.str(cx)?;
                let x = x.str(cx)?;
                Ok(match f {
                    StrFn::StartsWith => s.starts_with(x.as_ref()),
                    StrFn::EndsWith => s.ends_with(x.as_ref()),
                    StrFn::Contains => s.contains(x.as_ref()),
                })
            }
            Node::All(m, pred) => {
                let map = m.map(cx)?;
                for key in map.keys() {
                    let inner = Ctx {
                        env: cx.env,
                        key: Some(key.as_str()),
                    };
                    if !pred.bool(&inner)? {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            Node::Exists(m, pred) => {
                let map = m.map(cx)?;
                for key in map.keys() {
                    let inner = Ctx {
                        env: cx.env,
                        key: Some(key.as_str()),
                    };
                    if pred.bool(&inner)? {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
            Node::Cond(c, a, b) => {
                if c.bool(cx)? {
                    a.bool(cx)
                } else {
                    b.bool(cx)
                }
            }
            Node::Slot(slot) => match cx.env.get(*slot) {
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => Err(wrong_type("bool", other)),
                None => Err(EvalError::Internal(format!("slot {slot} missing"))),
            },
            other => match other.eval(cx)? {
                Value::Bool(b) => Ok(b),
                value => Err(wrong_type("bool", &value)),
            },
        }
    }

    fn int<'a>(&'a self, cx: &Ctx<'a>) -> Result<i64, EvalError> {
        match self.eval(cx)? {
            Value::Int(i) => Ok(i),
            other => Err(wrong_type("int", &other)),
        }
    }

    fn uint<'a>(&'a self, cx: &Ctx<'a>) -> Result<u64, EvalError> {
        match self.eval(cx)? {
            Value::Uint(u) => Ok(u),
            other => Err(wrong_type("uint", &other)),
        }
    }

    fn timestamp<'a>(&'a self, cx: &Ctx<'a>) -> Result<i64, EvalError> {
        match self.eval(cx)? {
            Value::Timestamp(t) => Ok(t),
            other => Err(wrong_type("timestamp", &other)),
        }
    }

    fn duration<'a>(&'a self, cx: &Ctx<'a>) -> Result<i64, EvalError> {
        match self.eval(cx)? {
            Value::Duration(d) => Ok(d),
            other => Err(wrong_type("duration", &other)),
        }
    }

    /// A string, borrowed when it is a slot, a constant or a comprehension key.
    fn str<'a>(&'a self, cx: &Ctx<'a>) -> Result<Cow<'a, str>, EvalError> {
        match self {
            Node::Key => cx.key.map(Cow::Borrowed).ok_or_else(no_key),
            Node::Const(Value::String(s)) => Ok(Cow::Borrowed(s)),
            Node::Slot(slot) => match cx.env.get(*slot) {
                Some(Value::String(s)) => Ok(Cow::Borrowed(s)),
                Some(other) => Err(wrong_type("string", other)),
                None => Err(EvalError::Internal(format!("slot {slot} missing"))),
            },
            other => match other.eval(cx)? {
                Value::String(s) => Ok(Cow::Owned(s)),
                value => Err(wrong_type("string", &value)),
            },
        }
    }

    /// A map, borrowed when it is a slot or a constant.
    fn map<'a>(&'a self, cx: &Ctx<'a>) -> Result<Cow<'a, BTreeMap<String, Value>>, EvalError> {
        match self {
            Node::Const(Value::Map(m)) => Ok(Cow::Borrowed(m)),
            Node::Slot(slot) => match cx.env.get(*slot) {
                Some(Value::Map(m)) => Ok(Cow::Borrowed(m)),
                Some(other) => Err(wrong_type("map", other)),
                None => Err(EvalError::Internal(format!("slot {slot} missing"))),
            },
            other => match other.eval(cx)? {
                Value::Map(m) => Ok(Cow::Owned(m)),
                value => Err(wrong_type("map", &value)),
            },
        }
    }

    /// Any value, borrowed when it is a slot or a constant.
    fn value<'a>(&'a self, cx: &Ctx<'a>) -> Result<Cow<'a, Value>, EvalError> {
        match self {
            Node::Const(v) => Ok(Cow::Borrowed(v)),
            Node::Slot(slot) => cx
                .env
                .get(*slot)
                .map(Cow::Borrowed)
                .ok_or_else(|| EvalError::Internal(format!("slot {slot} missing"))),
            other => other.eval(cx).map(Cow::Owned),
        }
    }
}

fn bin<'a>(
    op: Bin,
    a: &'a Node,
    b: &'a Node,
    text: &str,
    cx: &Ctx<'a>,
) -> Result<Value, EvalError> {
    let int_overflow = || EvalError::Overflow(format!("int overflow in `{text}`"));
    let uint_overflow = || EvalError::Overflow(format!("uint overflow in `{text}`"));
    let duration_overflow = || EvalError::Overflow(format!("duration overflow in `{text}`"));
    let timestamp_overflow = || EvalError::Overflow(format!("timestamp out of range in `{text}`"));
    Ok(match op {
        Bin::AddInt | Bin::SubInt | Bin::MulInt | Bin::DivInt | Bin::RemInt => {
            let x = a.int(cx)?;
            let y = b.int(cx)?;
            if matches!(op, Bin::DivInt | Bin::RemInt) && y == 0 {
                return Err(EvalError::DivisionByZero);
            }
            let result = match op {
                Bin::AddInt => x.checked_add(y),
                Bin::SubInt => x.checked_sub(y),
                Bin::MulInt => x.checked_mul(y),
                Bin::DivInt => x.checked_div(y),
                _ => x.checked_rem(y),
            };
            Value::Int(result.ok_or_else(int_overflow)?)
        }
        Bin::AddUint | Bin::SubUint | Bin::MulUint | Bin::DivUint | Bin::RemUint => {
            let x = a.uint(cx)?;
            let y = b.uint(cx)?;
            if matches!(op, Bin::DivUint | Bin::RemUint) && y == 0 {
                return Err(EvalError::DivisionByZero);
            }
            let result = match op {
                Bin::AddUint => x.checked_add(y),
                Bin::SubUint => x.checked_sub(y),
                Bin::MulUint => x.checked_mul(y),
                Bin::DivUint => x.checked_div(y),
                _ => x.checked_rem(y),
            };
            Value::Uint(result.ok_or_else(uint_overflow)?)
        }
        Bin::Concat => {
            let x = a.str(cx)?;
            let y = b.str(cx)?;
            let len = x.len().saturating_add(y.len());
            if len > MAX_STRING_LEN {
                return Err(EvalError::Overflow(format!(
                    "string of {len} bytes, more than {MAX_STRING_LEN}, in `{text}`"
                )));
            }
            let mut s = String::with_capacity(len);
            s.push_str(&x);
            s.push_str(&y);
            Value::String(s)
        }
        Bin::AddTsDur => {
            let t = a.timestamp(cx)?;
            let d = b.duration(cx)?;
            check_timestamp(t.checked_add(d).ok_or_else(timestamp_overflow)?, text)?
        }
        Bin::AddDurTs => {
            let d = a.duration(cx)?;
            let t = b.timestamp(cx)?;
            check_timestamp(t.checked_add(d).ok_or_else(timestamp_overflow)?, text)?
        }
        Bin::SubTsDur => {
            let t = a.timestamp(cx)?;
            let d = b.duration(cx)?;
            check_timestamp(t.checked_sub(d).ok_or_else(timestamp_overflow)?, text)?
        }
        Bin::SubTsTs => {
            let x = a.timestamp(cx)?;
            let y = b.timestamp(cx)?;
            Value::Duration(x.checked_sub(y).ok_or_else(duration_overflow)?)
        }
        Bin::AddDur => {
            let x = a.duration(cx)?;
            let y = b.duration(cx)?;
            Value::Duration(x.checked_add(y).ok_or_else(duration_overflow)?)
        }
        Bin::SubDur => {
            let x = a.duration(cx)?;
            let y = b.duration(cx)?;
            Value::Duration(x.checked_sub(y).ok_or_else(duration_overflow)?)
        }
    })
}

fn int_cmp_uint(i: i64, u: u64) -> Ordering {
    match u64::try_from(i) {
        Ok(i) => i.cmp(&u),
        Err(_) => Ordering::Less,
    }
}

fn compare<'a>(
    op: CmpOp,
    mode: CmpMode,
    a: &'a Node,
    b: &'a Node,
    cx: &Ctx<'a>,
) -> Result<bool, EvalError> {
    let ordering = match mode {
        CmpMode::IntUint => int_cmp_uint(a.int(cx)?, b.uint(cx)?),
        CmpMode::UintInt => int_cmp_uint(b.int(cx)?, a.uint(cx)?).reverse(),
        CmpMode::Str => a.str(cx)?.as_ref().cmp(b.str(cx)?.as_ref()),
        CmpMode::Same => {
            let x = a.value(cx)?;
            let y = b.value(cx)?;
            match (x.as_ref(), y.as_ref()) {
                (Value::Int(x), Value::Int(y)) => x.cmp(y),
                (Value::Uint(x), Value::Uint(y)) => x.cmp(y),
                (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
                (Value::String(x), Value::String(y)) => x.cmp(y),
                (Value::Timestamp(x), Value::Timestamp(y)) => x.cmp(y),
                (Value::Duration(x), Value::Duration(y)) => x.cmp(y),
                (Value::Map(x), Value::Map(y)) if op.is_equality() => {
                    if x == y {
                        Ordering::Equal
                    } else {
                        Ordering::Less
                    }
                }
                (x, y) => {
                    return Err(EvalError::Internal(format!(
                        "cannot compare a {} with a {}",
                        x.kind_name(),
                        y.kind_name()
                    )));
                }
            }
        }
    };
    Ok(op.holds(ordering))
}

// ------------------------------------------------------------------------------------------
// Time formatting and parsing.

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian date of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (if month <= 2 { y + 1 } else { y }, month, day)
}

/// Fractional digits of `micros` (0..1_000_000), without trailing zeros; empty when zero.
fn fraction(micros: i64) -> String {
    if micros == 0 {
        return String::new();
    }
    let digits = format!("{micros:06}");
    format!(".{}", digits.trim_end_matches('0'))
}

/// RFC 3339 in UTC, `None` beyond CEL's range (years 0001 to 9999).
pub fn format_timestamp(ts: i64) -> Option<String> {
    if !(MIN_TIMESTAMP..=MAX_TIMESTAMP).contains(&ts) {
        return None;
    }
    let days = ts.div_euclid(MICROS_PER_DAY);
    let in_day = ts.rem_euclid(MICROS_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    let seconds = in_day / MICROS_PER_SECOND;
    let micros = in_day % MICROS_PER_SECOND;
    Some(format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}{}Z",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60,
        fraction(micros)
    ))
}

/// CEL's form of a duration: seconds with up to six fractional digits, e.g. `90s`, `1.5s`.
pub fn format_duration(d: i64) -> String {
    let sign = if d < 0 { "-" } else { "" };
    let abs = d.unsigned_abs();
    let micros_per_second = MICROS_PER_SECOND.unsigned_abs();
    let seconds = abs / micros_per_second;
    let micros = abs % micros_per_second;
    let frac = i64::try_from(micros).map_or_else(|_| String::new(), fraction);
    format!("{sign}{seconds}{frac}s")
}

/// Parses a CEL duration: an optional sign, then decimal numbers each followed by a unit among
/// `h`, `m`, `s`, `ms`, `us` (`µs`), `ns`; `0` alone is allowed. Returns microseconds.
pub fn parse_duration(text: &str) -> Result<i64, String> {
    let bad = |why: &str| format!("malformed duration {text:?}: {why}");
    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err(bad("empty"));
    }
    let mut total_ns: i128 = 0;
    while !rest.is_empty() {
        let int_end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let int_part = &rest[..int_end];
        rest = &rest[int_end..];
        let mut frac_part = "";
        if let Some(after_dot) = rest.strip_prefix('.') {
            let frac_end = after_dot
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(after_dot.len());
            frac_part = &after_dot[..frac_end];
            rest = &after_dot[frac_end..];
        }
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(bad("expected a number"));
        }
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_end];
        rest = &rest[unit_end..];
        let unit_ns: i128 = match unit {
            "h" => 3_600_000_000_000,
            "m" => 60_000_000_000,
            "s" => 1_000_000_000,
            "ms" => 1_000_000,
            "us" | "µs" | "μs" => 1_000,
            "ns" => 1,
            "" => return Err(bad("a number without a unit (h, m, s, ms, us, ns)")),
            other => {
                return Err(bad(&format!(
                    "unknown unit `{other}` (h, m, s, ms, us, ns)"
                )));
            }
        };
        if int_part.len() > 20 || frac_part.len() > 18 {
            return Err(bad("too many digits"));
        }
        let whole: i128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| bad("invalid number"))?
        };
        let mut part = whole.checked_mul(unit_ns).ok_or_else(|| bad("too large"))?;
        if !frac_part.is_empty() {
            let numerator: i128 = frac_part.parse().map_err(|_| bad("invalid number"))?;
            let scale = 10_i128.pow(u32::try_from(frac_part.len()).unwrap_or(18));
            let scaled = numerator
                .checked_mul(unit_ns)
                .ok_or_else(|| bad("too large"))?;
            if scaled % scale != 0 {
                return Err(bad("finer than a nanosecond"));
            }
            part = part
                .checked_add(scaled / scale)
                .ok_or_else(|| bad("too large"))?;
        }
        total_ns = total_ns.checked_add(part).ok_or_else(|| bad("too large"))?;
    }
    if total_ns % 1_000 != 0 {
        return Err(bad("durations have microsecond precision"));
    }
    let micros = total_ns / 1_000;
    let micros = if negative { -micros } else { micros };
    i64::try_from(micros).map_err(|_| bad("too large"))
}

/// Parses an RFC 3339 timestamp (`YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`). Returns
/// microseconds since the epoch.
pub fn parse_timestamp(text: &str) -> Result<i64, String> {
    let bad = |why: &str| {
        format!("malformed timestamp {text:?}: {why} (expected e.g. \"2026-01-02T03:04:05Z\")")
    };
    let b = text.as_bytes();
    let num = |from: usize, to: usize| -> Option<i64> {
        let digits = b.get(from..to)?;
        if digits.iter().all(u8::is_ascii_digit) {
            Some(
                digits
                    .iter()
                    .fold(0_i64, |n, d| n * 10 + i64::from(d - b'0')),
            )
        } else {
            None
        }
    };
    let sep = |at: usize, expected: &[u8]| b.get(at).is_some_and(|c| expected.contains(c));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt") && sep(13, b":") && sep(16, b":")) {
        return Err(bad("wrong layout"));
    }
    let (Some(year), Some(month), Some(day), Some(hour), Some(minute), Some(second)) = (
        num(0, 4),
        num(5, 7),
        num(8, 10),
        num(11, 13),
        num(14, 16),
        num(17, 19),
    ) else {
        return Err(bad("wrong layout"));
    };
    if year < 1 {
        return Err(bad("year 0000"));
    }
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return Err(bad("month out of range")),
    };
    if !(1..=month_days).contains(&day) {
        return Err(bad("day out of range"));
    }
    if hour > 23 || minute > 59 || second > 59 {
        return Err(bad("time of day out of range"));
    }
    let mut at = 19;
    let mut micros = 0;
    if sep(at, b".") {
        let start = at + 1;
        let mut end = start;
        while b.get(end).is_some_and(u8::is_ascii_digit) {
            end += 1;
        }
        if end == start || end - start > 9 {
            return Err(bad("fraction of 1 to 9 digits expected"));
        }
        for (i, digit) in b[start..end].iter().enumerate() {
            let value = i64::from(digit - b'0');
            if i < 6 {
                micros += value * 10_i64.pow(5 - u32::try_from(i).unwrap_or(5));
            } else if value != 0 {
                return Err(bad("timestamps have microsecond precision"));
            }
        }
        at = end;
    }
    let offset_minutes = match b.get(at) {
        Some(b'Z' | b'z') if at + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if at + 6 == b.len() && sep(at + 3, b":") => {
            let (Some(h), Some(m)) = (num(at + 1, at + 3), num(at + 4, at + 6)) else {
                return Err(bad("malformed offset"));
            };
            if h > 23 || m > 59 {
                return Err(bad("offset out of range"));
            }
            let minutes = h * 60 + m;
            if *sign == b'-' { -minutes } else { minutes }
        }
        _ => return Err(bad("expected `Z` or an offset like `+01:00` at the end")),
    };
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second
        - offset_minutes * 60;
    let ts = seconds * MICROS_PER_SECOND + micros;
    if (MIN_TIMESTAMP..=MAX_TIMESTAMP).contains(&ts) {
        Ok(ts)
    } else {
        Err(bad("beyond years 0001 to 9999"))
    }
}

// ------------------------------------------------------------------------------------------
// The compiler.

struct Typed {
    node: Node,
    ty: Type,
}

impl Typed {
    fn new(node: Node, ty: Type) -> Self {
        Self { node, ty }
    }
}

struct Compiler<'a> {
    source: &'a str,
    scope: &'a Scope,
    info: &'a SourceInfo,
    limits: &'a Limits,
    nodes: usize,
    /// The variable of the enclosing comprehension.
    iter_var: Option<String>,
    slots: BTreeSet<Slot>,
}

type Compiled = Result<Typed, CompileError>;

fn operator_symbol(name: &str) -> Option<&'static str> {
    Some(match name {
        operators::ADD => "+",
        operators::SUBSTRACT => "-",
        operators::MULTIPLY => "*",
        operators::DIVIDE => "/",
        operators::MODULO => "%",
        operators::EQUALS => "==",
        operators::NOT_EQUALS => "!=",
        operators::LESS => "<",
        operators::LESS_EQUALS => "<=",
        operators::GREATER => ">",
        operators::GREATER_EQUALS => ">=",
        operators::LOGICAL_AND => "&&",
        operators::LOGICAL_OR => "||",
        operators::IN => "in",
        _ => return None,
    })
}

/// The expression written back as source, for error messages (bounded in length).
fn render(e: &IdedExpr) -> String {
    let mut out = String::new();
    render_into(e, &mut out, 0, false);
    if out.len() > 120 {
        let mut cut = 117;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

fn render_into(e: &IdedExpr, out: &mut String, depth: usize, nested: bool) {
    if depth > 12 || out.len() > 200 {
        out.push('…');
        return;
    }
    match &e.expr {
        Ast::Literal(LiteralValue::Int(i)) => {
            let _ = write!(out, "{}", i.inner());
        }
        Ast::Literal(LiteralValue::UInt(u)) => {
            let _ = write!(out, "{}u", u.inner());
        }
        Ast::Literal(LiteralValue::Boolean(b)) => {
            let _ = write!(out, "{}", b.inner());
        }
        Ast::Literal(LiteralValue::String(s)) => {
            let _ = write!(out, "{:?}", s.inner());
        }
        Ast::Ident(name) => out.push_str(name),
        Ast::Select(select) => {
            render_into(&select.operand, out, depth + 1, true);
            out.push('.');
            out.push_str(&select.field);
        }
        Ast::Call(call) => {
            if let (Some(symbol), [a, b], None) = (
                operator_symbol(&call.func_name),
                call.args.as_slice(),
                &call.target,
            ) {
                if nested {
                    out.push('(');
                }
                render_into(a, out, depth + 1, true);
                let _ = write!(out, " {symbol} ");
                render_into(b, out, depth + 1, true);
                if nested {
                    out.push(')');
                }
                return;
            }
            match (call.func_name.as_str(), call.args.as_slice()) {
                (operators::NEGATE, [x]) => {
                    out.push('-');
                    render_into(x, out, depth + 1, true);
                }
                (operators::LOGICAL_NOT, [x]) => {
                    out.push('!');
                    render_into(x, out, depth + 1, true);
                }
                (operators::INDEX, [m, k]) => {
                    render_into(m, out, depth + 1, true);
                    out.push('[');
                    render_into(k, out, depth + 1, false);
                    out.push(']');
                }
                (operators::CONDITIONAL, [c, a, b]) => {
                    if nested {
                        out.push('(');
                    }
                    render_into(c, out, depth + 1, true);
                    out.push_str(" ? ");
                    render_into(a, out, depth + 1, true);
                    out.push_str(" : ");
                    render_into(b, out, depth + 1, true);
                    if nested {
                        out.push(')');
                    }
                }
                (name, args) => {
                    if let Some(target) = &call.target {
                        render_into(target, out, depth + 1, true);
                        out.push('.');
                    }
                    out.push_str(name);
                    out.push('(');
                    for (i, arg) in args.iter().enumerate() {
                        if i > 0 {
                            out.push_str(", ");
                        }
                        render_into(arg, out, depth + 1, false);
                    }
                    out.push(')');
                }
            }
        }
        _ => out.push('…'),
    }
}

impl Compiler<'_> {
    fn error(&self, e: &IdedExpr, message: impl Into<String>) -> CompileError {
        // The parser's offsets are byte offsets.
        let offset = self.info.offset_for(e.id).map_or(0, |(start, _)| {
            usize::try_from(start).map_or(0, |start| start.min(self.source.len()))
        });
        CompileError {
            offset,
            message: message.into(),
        }
    }

    fn compile(&mut self, e: &IdedExpr, depth: u16) -> Compiled {
        self.nodes += 1;
        if self.nodes > self.limits.max_nodes {
            return Err(self.error(
                e,
                format!("expression has more than {} nodes", self.limits.max_nodes),
            ));
        }
        if depth > self.limits.max_depth {
            return Err(self.error(
                e,
                format!(
                    "expression is nested deeper than {} levels",
                    self.limits.max_depth
                ),
            ));
        }
        match &e.expr {
            Ast::Literal(literal) => self.literal(e, literal),
            Ast::Ident(name) => self.ident(e, name),
            Ast::Select(select) => self.select(e, select, depth),
            Ast::Call(call) => self.call(e, call, depth),
            Ast::Map(map) => self.map_literal(e, &map.entries, depth),
            Ast::List(_) => Err(self.error(e, "lists are not supported")),
            Ast::Comprehension(comprehension) => self.comprehension(e, comprehension, depth),
            Ast::Struct(_) => Err(self.error(e, "message construction is not supported")),
            Ast::Unspecified => Err(self.error(e, "unsupported expression")),
        }
    }

    /// Compiles `e` and requires its type to be `ty`.
    fn expect(
        &mut self,
        e: &IdedExpr,
        depth: u16,
        ty: &Type,
        what: &str,
    ) -> Result<Node, CompileError> {
        let typed = self.compile(e, depth)?;
        if &typed.ty == ty {
            Ok(typed.node)
        } else {
            Err(self.error(e, format!("{what} must be {ty}, found {}", typed.ty)))
        }
    }

    fn literal(&mut self, e: &IdedExpr, literal: &LiteralValue) -> Compiled {
        Ok(match literal {
            LiteralValue::Int(i) => Typed::new(Node::Const(Value::Int(*i.inner())), Type::Int),
            LiteralValue::UInt(u) => Typed::new(Node::Const(Value::Uint(*u.inner())), Type::Uint),
            LiteralValue::Boolean(b) => {
                Typed::new(Node::Const(Value::Bool(*b.inner())), Type::Bool)
            }
            LiteralValue::String(s) => Typed::new(
                Node::Const(Value::String(s.inner().to_string())),
                Type::String,
            ),
            LiteralValue::Double(_) => {
                return Err(self.error(e, "double literals are not supported"));
            }
            LiteralValue::Bytes(_) => {
                return Err(self.error(e, "bytes literals are not supported"));
            }
            LiteralValue::Null => return Err(self.error(e, "null is not supported")),
        })
    }

    fn ident(&mut self, e: &IdedExpr, name: &str) -> Compiled {
        if self.iter_var.as_deref() == Some(name) {
            return Ok(Typed::new(Node::Key, Type::String));
        }
        if let Some((slot, ty)) = self.scope.vars.get(name) {
            self.slots.insert(*slot);
            return Ok(Typed::new(Node::Slot(slot.0), ty.clone()));
        }
        if let Some(fields) = self.scope.objects.get(name) {
            let example = fields
                .keys()
                .next()
                .map(|field| format!(", e.g. `{name}.{field}`"))
                .unwrap_or_default();
            return Err(self.error(
                e,
                format!("`{name}` is an object, not a value: use one of its fields{example}"),
            ));
        }
        Err(self.error(e, format!("unknown name `{name}`")))
    }

    fn select(&mut self, e: &IdedExpr, select: &SelectExpr, depth: u16) -> Compiled {
        if select.test {
            return Err(self.error(
                e,
                "has() is not supported: use `\"key\" in map` for a map's keys",
            ));
        }
        if let Ast::Ident(object) = &select.operand.expr
            && self.iter_var.as_deref() != Some(object.as_str())
            && let Some(fields) = self.scope.objects.get(object)
        {
            self.nodes += 1;
            let Some((slot, ty)) = fields.get(&select.field) else {
                return Err(self.error(e, format!("`{object}` has no field `{}`", select.field)));
            };
            self.slots.insert(*slot);
            return Ok(Typed::new(Node::Slot(slot.0), ty.clone()));
        }
        let operand = self.compile(&select.operand, depth + 1)?;
        match operand.ty {
            Type::Map(value) => Ok(Typed::new(
                Node::Index(
                    Box::new(operand.node),
                    Box::new(Node::Const(Value::String(select.field.clone()))),
                ),
                *value,
            )),
            other => Err(self.error(
                e,
                format!(
                    "no field `{}` on a value of type {other}: only objects and maps have fields",
                    select.field
                ),
            )),
        }
    }

    fn map_literal(
        &mut self,
        e: &IdedExpr,
        entries: &[cel::common::ast::IdedEntryExpr],
        depth: u16,
    ) -> Compiled {
        if entries.is_empty() {
            return Err(self.error(
                e,
                "the empty map literal `{}` is not supported (its type is unknown): use a map's \
                 current value and `.without(key)`",
            ));
        }
        let mut compiled: Vec<(String, Node)> = Vec::with_capacity(entries.len());
        let mut value_type: Option<Type> = None;
        for entry in entries {
            let EntryExpr::MapEntry(entry) = &entry.expr else {
                return Err(self.error(e, "message fields are not supported"));
            };
            if entry.optional {
                return Err(self.error(&entry.key, "optional map entries are not supported"));
            }
            self.nodes += 1;
            let Ast::Literal(LiteralValue::String(key)) = &entry.key.expr else {
                return Err(self.error(
                    &entry.key,
                    "map literal keys must be string literals (use `.with(key, value)` for \
                     computed keys)",
                ));
            };
            let key = key.inner().to_string();
            if compiled.iter().any(|(k, _)| *k == key) {
                return Err(self.error(&entry.key, format!("duplicate map key {key:?}")));
            }
            let value = self.compile(&entry.value, depth + 1)?;
            if value.ty.is_map() {
                return Err(
                    self.error(&entry.value, "maps do not nest: map values must be scalars")
                );
            }
            match &value_type {
                Some(ty) if *ty != value.ty => {
                    return Err(self.error(
                        &entry.value,
                        format!(
                            "map literal values must have one type: found {ty} and {}",
                            value.ty
                        ),
                    ));
                }
                Some(_) => {}
                None => value_type = Some(value.ty.clone()),
            }
            compiled.push((key, value.node));
        }
        let ty = value_type.unwrap_or(Type::Int);
        Ok(Typed::new(Node::MapLit(compiled), Type::Map(Box::new(ty))))
    }

    fn comprehension(&mut self, e: &IdedExpr, c: &ComprehensionExpr, depth: u16) -> Compiled {
        let (is_all, predicate) = match (&c.accu_init.expr, &c.loop_step.expr) {
            (Ast::Literal(LiteralValue::Boolean(init)), Ast::Call(step))
                if step.args.len() == 2
                    && matches!(&step.args[0].expr, Ast::Ident(accu) if *accu == c.accu_var)
                    && matches!(&c.result.expr, Ast::Ident(r) if *r == c.accu_var) =>
            {
                match (*init.inner(), step.func_name.as_str()) {
                    (true, operators::LOGICAL_AND) => (true, &step.args[1]),
                    (false, operators::LOGICAL_OR) => (false, &step.args[1]),
                    _ => return Err(self.error(e, "unsupported comprehension")),
                }
            }
            (Ast::Literal(LiteralValue::Int(_)), _) => {
                return Err(self.error(e, "the `exists_one` macro is not supported"));
            }
            (Ast::List(_), _) => {
                return Err(self.error(
                    e,
                    "the `map` and `filter` macros are not supported (lists are not supported)",
                ));
            }
            _ => return Err(self.error(e, "unsupported comprehension")),
        };
        let name = if is_all { "all" } else { "exists" };
        if c.iter_var2.is_some() {
            return Err(self.error(e, format!("`{name}` with two variables is not supported")));
        }
        if self.iter_var.is_some() {
            return Err(self.error(
                e,
                format!(
                    "`{name}` inside another `all`/`exists` is not supported (nested comprehensions \
                     are too costly)"
                ),
            ));
        }
        let var = c.iter_var.as_str();
        if self.scope.vars.contains_key(var) || self.scope.objects.contains_key(var) {
            return Err(self.error(
                e,
                format!("the variable `{var}` of `{name}` hides a declared name: rename it"),
            ));
        }
        let range = self.compile(&c.iter_range, depth + 1)?;
        if !range.ty.is_map() {
            return Err(self.error(
                &c.iter_range,
                format!("`{name}` needs a map, found {}", range.ty),
            ));
        }
        self.iter_var = Some(var.to_string());
        let predicate = self.expect(
            predicate,
            depth + 1,
            &Type::Bool,
            &format!("the predicate of `{name}`"),
        );
        self.iter_var = None;
        let predicate = predicate?;
        let node = if is_all {
            Node::All(Box::new(range.node), Box::new(predicate))
        } else {
            Node::Exists(Box::new(range.node), Box::new(predicate))
        };
        Ok(Typed::new(node, Type::Bool))
    }

    fn call(&mut self, e: &IdedExpr, call: &CallExpr, depth: u16) -> Compiled {
        let name = call.func_name.as_str();
        let args = call.args.as_slice();
        let d = depth + 1;
        if let Some(target) = &call.target {
            return self.method(e, name, target, args, d);
        }
        match (name, args) {
            (operators::CONDITIONAL, [c, a, b]) => {
                let c = self.expect(c, d, &Type::Bool, "the condition of `?:`")?;
                let a = self.compile(a, d)?;
                let b = self.compile(b, d)?;
                if a.ty != b.ty {
                    return Err(self.error(
                        e,
                        format!(
                            "the branches of `?:` have different types: {} and {}",
                            a.ty, b.ty
                        ),
                    ));
                }
                Ok(Typed::new(
                    Node::Cond(Box::new(c), Box::new(a.node), Box::new(b.node)),
                    a.ty,
                ))
            }
            (operators::LOGICAL_AND | operators::LOGICAL_OR, [a, b]) => {
                let symbol = if name == operators::LOGICAL_AND {
                    "&&"
                } else {
                    "||"
                };
                let what = format!("an operand of `{symbol}`");
                let a = Box::new(self.expect(a, d, &Type::Bool, &what)?);
                let b = Box::new(self.expect(b, d, &Type::Bool, &what)?);
                let node = if name == operators::LOGICAL_AND {
                    Node::And(a, b)
                } else {
                    Node::Or(a, b)
                };
                Ok(Typed::new(node, Type::Bool))
            }
            (operators::LOGICAL_NOT, [x]) => {
                let x = self.expect(x, d, &Type::Bool, "the operand of `!`")?;
                Ok(Typed::new(Node::Not(Box::new(x)), Type::Bool))
            }
            (operators::NEGATE, [x]) => {
                let operand = self.compile(x, d)?;
                let text: Box<str> = render(e).into();
                match operand.ty {
                    Type::Int => Ok(Typed::new(
                        Node::NegInt(Box::new(operand.node), text),
                        Type::Int,
                    )),
                    Type::Duration => Ok(Typed::new(
                        Node::NegDur(Box::new(operand.node), text),
                        Type::Duration,
                    )),
                    other => Err(self.error(e, format!("no unary `-` for {other}"))),
                }
            }
            (
                operators::ADD
                | operators::SUBSTRACT
                | operators::MULTIPLY
                | operators::DIVIDE
                | operators::MODULO,
                [a, b],
            ) => self.arithmetic(e, name, a, b, d),
            (
                operators::EQUALS
                | operators::NOT_EQUALS
                | operators::LESS
                | operators::LESS_EQUALS
                | operators::GREATER
                | operators::GREATER_EQUALS,
                [a, b],
            ) => self.comparison(e, name, a, b, d),
            (operators::INDEX, [m, k]) => {
                let map = self.compile(m, d)?;
                let Type::Map(value) = map.ty else {
                    return Err(
                        self.error(e, format!("indexing `[]` needs a map, found {}", map.ty))
                    );
                };
                let key = self.expect(k, d, &Type::String, "a map key")?;
                Ok(Typed::new(
                    Node::Index(Box::new(map.node), Box::new(key)),
                    *value,
                ))
            }
            (operators::IN, [k, m]) => {
                let key = self.expect(k, d, &Type::String, "the left operand of `in`")?;
                let map = self.compile(m, d)?;
                if !map.ty.is_map() {
                    return Err(self.error(
                        e,
                        format!("`in` needs a map on its right, found {}", map.ty),
                    ));
                }
                Ok(Typed::new(
                    Node::In(Box::new(key), Box::new(map.node)),
                    Type::Bool,
                ))
            }
            ("size", [x]) => self.size(e, x, d),
            ("sum", [m]) => {
                let map = self.compile(m, d)?;
                let text: Box<str> = render(e).into();
                match map.ty {
                    Type::Map(value) if *value == Type::Int => Ok(Typed::new(
                        Node::SumInt(Box::new(map.node), text),
                        Type::Int,
                    )),
                    Type::Map(value) if *value == Type::Uint => Ok(Typed::new(
                        Node::SumUint(Box::new(map.node), text),
                        Type::Uint,
                    )),
                    other => Err(self.error(
                        e,
                        format!(
                            "sum() needs a map(string, int) or map(string, uint), found {other}"
                        ),
                    )),
                }
            }
            ("int", [x]) => {
                let x = self.compile(x, d)?;
                match x.ty {
                    Type::Int => Ok(x),
                    Type::Uint => Ok(Typed::new(Node::IntOfUint(Box::new(x.node)), Type::Int)),
                    Type::Timestamp => Ok(Typed::new(
                        Node::IntOfTimestamp(Box::new(x.node)),
                        Type::Int,
                    )),
                    other => Err(self.error(e, format!("no int() conversion from {other}"))),
                }
            }
            ("uint", [x]) => {
                let x = self.compile(x, d)?;
                match x.ty {
                    Type::Uint => Ok(x),
                    Type::Int => Ok(Typed::new(Node::UintOfInt(Box::new(x.node)), Type::Uint)),
                    other => Err(self.error(e, format!("no uint() conversion from {other}"))),
                }
            }
            ("string", [x]) => {
                let x = self.compile(x, d)?;
                match x.ty {
                    Type::String => Ok(x),
                    Type::Map(_) => {
                        Err(self.error(e, format!("no string() conversion from {}", x.ty)))
                    }
                    _ => Ok(Typed::new(Node::ToString(Box::new(x.node)), Type::String)),
                }
            }
            ("duration" | "timestamp", [x]) => {
                self.nodes += 1;
                let Ast::Literal(LiteralValue::String(text)) = &x.expr else {
                    return Err(self.error(
                        e,
                        format!(
                            "{name}() takes a string literal, e.g. {name}({:?})",
                            if name == "duration" {
                                "15m"
                            } else {
                                "2026-01-02T03:04:05Z"
                            }
                        ),
                    ));
                };
                if name == "duration" {
                    let micros = parse_duration(text.inner()).map_err(|m| self.error(x, m))?;
                    Ok(Typed::new(
                        Node::Const(Value::Duration(micros)),
                        Type::Duration,
                    ))
                } else {
                    let micros = parse_timestamp(text.inner()).map_err(|m| self.error(x, m))?;
                    Ok(Typed::new(
                        Node::Const(Value::Timestamp(micros)),
                        Type::Timestamp,
                    ))
                }
            }
            ("size" | "sum" | "int" | "uint" | "string" | "duration" | "timestamp", _) => Err(self
                .error(
                    e,
                    format!("{name}() takes one argument, found {}", args.len()),
                )),
            _ => Err(self.unsupported(e, name)),
        }
    }

    fn unsupported(&self, e: &IdedExpr, name: &str) -> CompileError {
        let message = match name {
            operators::OPT_INDEX | operators::OPT_SELECT => {
                "optional syntax is not supported".to_string()
            }
            _ => match operator_symbol(name) {
                Some(symbol) => format!("unsupported use of `{symbol}`"),
                None => format!("unsupported function `{name}`"),
            },
        };
        self.error(e, message)
    }

    fn method(
        &mut self,
        e: &IdedExpr,
        name: &str,
        target: &IdedExpr,
        args: &[IdedExpr],
        d: u16,
    ) -> Compiled {
        match (name, args) {
            ("size", []) => self.size(e, target, d),
            ("with", [k, v]) => {
                let map = self.compile(target, d)?;
                let Type::Map(value) = &map.ty else {
                    return Err(self.error(e, format!("with() needs a map, found {}", map.ty)));
                };
                let key = self.expect(k, d, &Type::String, "the key of with()")?;
                let value = self.expect(v, d, value, "the value of with()")?;
                Ok(Typed::new(
                    Node::With(Box::new(map.node), Box::new(key), Box::new(value)),
                    map.ty,
                ))
            }
            ("without", [k]) => {
                let map = self.compile(target, d)?;
                if !map.ty.is_map() {
                    return Err(self.error(e, format!("without() needs a map, found {}", map.ty)));
                }
                let key = self.expect(k, d, &Type::String, "the key of without()")?;
                Ok(Typed::new(
                    Node::Without(Box::new(map.node), Box::new(key)),
                    map.ty,
                ))
            }
            ("startsWith" | "endsWith" | "contains", [x]) => {
                let f = match name {
                    "startsWith" => StrFn::StartsWith,
                    "endsWith" => StrFn::EndsWith,
                    _ => StrFn::Contains,
                };
                let s = self.expect(
                    target,
                    d,
                    &Type::String,
                    &format!("the receiver of {name}()"),
                )?;
                let x = self.expect(x, d, &Type::String, &format!("the argument of {name}()"))?;
                Ok(Typed::new(
                    Node::Str(f, Box::new(s), Box::new(x)),
                    Type::Bool,
                ))
            }
            ("size" | "with" | "without" | "startsWith" | "endsWith" | "contains", _) => {
                Err(self.error(e, format!("wrong number of arguments to {name}()")))
            }
            ("map" | "filter" | "exists_one" | "existsOne", _) => {
                Err(self.error(e, format!("the `{name}` macro is not supported")))
            }
            _ => Err(self.unsupported(e, name)),
        }
    }

    fn size(&mut self, e: &IdedExpr, x: &IdedExpr, d: u16) -> Compiled {
        let x = self.compile(x, d)?;
        match x.ty {
            Type::String => Ok(Typed::new(Node::SizeStr(Box::new(x.node)), Type::Int)),
            Type::Map(_) => Ok(Typed::new(Node::SizeMap(Box::new(x.node)), Type::Int)),
            other => Err(self.error(e, format!("no size() for {other}"))),
        }
    }

    fn arithmetic(
        &mut self,
        e: &IdedExpr,
        name: &str,
        a: &IdedExpr,
        b: &IdedExpr,
        d: u16,
    ) -> Compiled {
        let symbol = operator_symbol(name).unwrap_or(name);
        let a = self.compile(a, d)?;
        let b = self.compile(b, d)?;
        let (op, ty) = match (name, &a.ty, &b.ty) {
            (operators::ADD, Type::Int, Type::Int) => (Bin::AddInt, Type::Int),
            (operators::SUBSTRACT, Type::Int, Type::Int) => (Bin::SubInt, Type::Int),
            (operators::MULTIPLY, Type::Int, Type::Int) => (Bin::MulInt, Type::Int),
            (operators::DIVIDE, Type::Int, Type::Int) => (Bin::DivInt, Type::Int),
            (operators::MODULO, Type::Int, Type::Int) => (Bin::RemInt, Type::Int),
            (operators::ADD, Type::Uint, Type::Uint) => (Bin::AddUint, Type::Uint),
            (operators::SUBSTRACT, Type::Uint, Type::Uint) => (Bin::SubUint, Type::Uint),
            (operators::MULTIPLY, Type::Uint, Type::Uint) => (Bin::MulUint, Type::Uint),
            (operators::DIVIDE, Type::Uint, Type::Uint) => (Bin::DivUint, Type::Uint),
            (operators::MODULO, Type::Uint, Type::Uint) => (Bin::RemUint, Type::Uint),
            (operators::ADD, Type::String, Type::String) => (Bin::Concat, Type::String),
            (operators::ADD, Type::Timestamp, Type::Duration) => (Bin::AddTsDur, Type::Timestamp),
            (operators::ADD, Type::Duration, Type::Timestamp) => (Bin::AddDurTs, Type::Timestamp),
            (operators::SUBSTRACT, Type::Timestamp, Type::Duration) => {
                (Bin::SubTsDur, Type::Timestamp)
            }
            (operators::SUBSTRACT, Type::Timestamp, Type::Timestamp) => {
                (Bin::SubTsTs, Type::Duration)
            }
            (operators::ADD, Type::Duration, Type::Duration) => (Bin::AddDur, Type::Duration),
            (operators::SUBSTRACT, Type::Duration, Type::Duration) => (Bin::SubDur, Type::Duration),
            (_, Type::Int, Type::Uint) | (_, Type::Uint, Type::Int) => {
                return Err(self.error(
                    e,
                    format!(
                        "no `{symbol}` for {} and {}; convert with int() or uint()",
                        a.ty, b.ty
                    ),
                ));
            }
            _ => {
                return Err(self.error(e, format!("no `{symbol}` for {} and {}", a.ty, b.ty)));
            }
        };
        Ok(Typed::new(
            Node::Bin(op, Box::new(a.node), Box::new(b.node), render(e).into()),
            ty,
        ))
    }

    fn comparison(
        &mut self,
        e: &IdedExpr,
        name: &str,
        a: &IdedExpr,
        b: &IdedExpr,
        d: u16,
    ) -> Compiled {
        let symbol = operator_symbol(name).unwrap_or(name);
        let op = match name {
            operators::EQUALS => CmpOp::Eq,
            operators::NOT_EQUALS => CmpOp::Ne,
            operators::LESS => CmpOp::Lt,
            operators::LESS_EQUALS => CmpOp::Le,
            operators::GREATER => CmpOp::Gt,
            _ => CmpOp::Ge,
        };
        let a = self.compile(a, d)?;
        let b = self.compile(b, d)?;
        let mode = match (&a.ty, &b.ty) {
            (Type::Int, Type::Uint) => CmpMode::IntUint,
            (Type::Uint, Type::Int) => CmpMode::UintInt,
            (Type::String, Type::String) => CmpMode::Str,
            (Type::Map(_), Type::Map(_)) if !op.is_equality() => {
                return Err(self.error(e, format!("no `{symbol}` for maps")));
            }
            (x, y) if x == y => CmpMode::Same,
            (x, y) => {
                return Err(self.error(e, format!("no `{symbol}` for {x} and {y}")));
            }
        };
        Ok(Typed::new(
            Node::Cmp(op, mode, Box::new(a.node), Box::new(b.node)),
            Type::Bool,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope() -> (Scope, Vec<Value>) {
        let mut scope = Scope::new();
        let mut env = Vec::new();
        let add = |slot: Result<Slot, String>, value: Value, env: &mut Vec<Value>| {
            match slot {
                Ok(slot) => assert_eq!(slot.0, env.len()),
                Err(e) => panic!("{e}"),
            }
            env.push(value);
        };
        add(
            scope.var("now", Type::Timestamp),
            Value::Timestamp(1_700_000_000_000_000),
            &mut env,
        );
        add(scope.var("i", Type::Int), Value::Int(7), &mut env);
        add(scope.var("u", Type::Uint), Value::Uint(7), &mut env);
        add(
            scope.var("s", Type::String),
            Value::String("héllo".into()),
            &mut env,
        );
        add(scope.var("b", Type::Bool), Value::Bool(true), &mut env);
        add(
            scope.var("d", Type::Duration),
            Value::Duration(90_000_000),
            &mut env,
        );
        let mut seats = BTreeMap::new();
        seats.insert("1A".to_string(), Value::Int(3));
        seats.insert("1B".to_string(), Value::Int(4));
        add(
            scope.var("m", Type::Map(Box::new(Type::Int))),
            Value::Map(seats),
            &mut env,
        );
        add(
            scope.var("um", Type::Map(Box::new(Type::Uint))),
            Value::Map(BTreeMap::new()),
            &mut env,
        );
        add(
            scope.field("params", "amount", Type::Int),
            Value::Int(50),
            &mut env,
        );
        add(
            scope.field("params", "who", Type::String),
            Value::String("1A".into()),
            &mut env,
        );
        add(
            scope.field("account", "balance", Type::Uint),
            Value::Uint(30),
            &mut env,
        );
        add(
            scope.field("account", "overdraft", Type::Uint),
            Value::Uint(25),
            &mut env,
        );
        add(scope.var("big", Type::Int), Value::Int(i64::MAX), &mut env);
        add(
            scope.var("small", Type::Int),
            Value::Int(i64::MIN),
            &mut env,
        );
        add(
            scope.var("ubig", Type::Uint),
            Value::Uint(u64::MAX),
            &mut env,
        );
        (scope, env)
    }

    fn compile(src: &str, ty: &Type) -> Result<Expr, CompileError> {
        let (scope, _) = scope();
        Expr::compile(src, &scope, ty, &Limits::default())
    }

    fn eval(src: &str) -> Value {
        let (scope, env) = scope();
        // Compile against the type the expression has, found by a first attempt as int.
        let ty = match Expr::compile(src, &scope, &Type::Int, &Limits::default()) {
            Ok(_) => Type::Int,
            Err(e) => match e.message.strip_prefix("expected int, found ") {
                Some(found) => parse_type(found),
                None => panic!("`{src}` does not compile: {e}"),
            },
        };
        match Expr::compile(src, &scope, &ty, &Limits::default()).map(|x| x.eval(&env)) {
            Ok(Ok(value)) => value,
            Ok(Err(e)) => panic!("`{src}` fails: {e}"),
            Err(e) => panic!("`{src}` does not compile: {e}"),
        }
    }

    fn parse_type(name: &str) -> Type {
        match name {
            "int" => Type::Int,
            "uint" => Type::Uint,
            "bool" => Type::Bool,
            "string" => Type::String,
            "timestamp" => Type::Timestamp,
            "duration" => Type::Duration,
            other => match other
                .strip_prefix("map(string, ")
                .and_then(|rest| rest.strip_suffix(')'))
            {
                Some(value) => Type::Map(Box::new(parse_type(value))),
                None => panic!("unknown type {other}"),
            },
        }
    }

    fn fails(src: &str) -> EvalError {
        let (scope, env) = scope();
        let ty = match Expr::compile(src, &scope, &Type::Int, &Limits::default()) {
            Ok(_) => Type::Int,
            Err(e) => match e.message.strip_prefix("expected int, found ") {
                Some(found) => parse_type(found),
                None => panic!("`{src}` does not compile: {e}"),
            },
        };
        match Expr::compile(src, &scope, &ty, &Limits::default()).map(|x| x.eval(&env)) {
            Ok(Ok(value)) => panic!("`{src}` evaluates to {value:?}"),
            Ok(Err(e)) => e,
            Err(e) => panic!("`{src}` does not compile: {e}"),
        }
    }

    fn refused(src: &str) -> CompileError {
        let (scope, _) = scope();
        let mut last = None;
        for ty in [Type::Int, Type::Bool] {
            match Expr::compile(src, &scope, &ty, &Limits::default()) {
                Ok(_) => panic!("`{src}` compiles"),
                Err(e) if e.message.starts_with("expected ") => {}
                Err(e) => return e,
            }
            last = Some(ty);
        }
        panic!("`{src}` is only refused for its type ({last:?})")
    }

    fn t(src: &str) -> bool {
        match eval(src) {
            Value::Bool(b) => b,
            other => panic!("`{src}` is {other:?}"),
        }
    }

    fn overflow(src: &str) {
        match fails(src) {
            EvalError::Overflow(_) => {}
            other => panic!("`{src}`: expected overflow, got {other:?}"),
        }
    }

    #[test]
    fn literals_and_names() {
        assert_eq!(eval("5"), Value::Int(5));
        assert_eq!(eval("-3"), Value::Int(-3));
        assert_eq!(eval("5u"), Value::Uint(5));
        assert_eq!(eval("true"), Value::Bool(true));
        assert_eq!(eval("'a\\n'"), Value::String("a\n".into()));
        assert_eq!(eval("-9223372036854775808"), Value::Int(i64::MIN));
        assert_eq!(eval("i"), Value::Int(7));
        assert_eq!(eval("params.amount"), Value::Int(50));
        assert_eq!(eval("params.who"), Value::String("1A".into()));
        assert_eq!(eval("now"), Value::Timestamp(1_700_000_000_000_000));
        assert_eq!(eval("m['1A']"), Value::Int(3));
        // Field selection on a map value is indexing.
        assert_eq!(eval("m.with('x', 9).x"), Value::Int(9));
        assert_eq!(fails("m.x"), EvalError::NoSuchKey("x".into()));
    }

    #[test]
    fn int_arithmetic() {
        assert_eq!(eval("i + 3"), Value::Int(10));
        assert_eq!(eval("i - 10"), Value::Int(-3));
        assert_eq!(eval("i * -2"), Value::Int(-14));
        assert_eq!(eval("i / 2"), Value::Int(3));
        assert_eq!(eval("-i / 2"), Value::Int(-3));
        assert_eq!(eval("i % 3"), Value::Int(1));
        assert_eq!(eval("-i % 3"), Value::Int(-1));
        assert_eq!(eval("-i"), Value::Int(-7));
        assert_eq!(eval("--i"), Value::Int(7));
        assert_eq!(eval("1 + 2 * 3"), Value::Int(7));
        assert_eq!(eval("(1 + 2) * 3"), Value::Int(9));
    }

    #[test]
    fn uint_arithmetic() {
        assert_eq!(eval("u + 3u"), Value::Uint(10));
        assert_eq!(eval("u - 7u"), Value::Uint(0));
        assert_eq!(eval("u * 2u"), Value::Uint(14));
        assert_eq!(eval("u / 2u"), Value::Uint(3));
        assert_eq!(eval("u % 4u"), Value::Uint(3));
        assert!(refused("-u").message.contains("no unary `-` for uint"));
    }

    #[test]
    fn checked_overflow() {
        overflow("big + 1");
        overflow("small - 1");
        overflow("big * 2");
        overflow("small / -1");
        overflow("small % -1");
        overflow("-small");
        overflow("ubig + 1u");
        overflow("0u - 1u");
        overflow("ubig * 2u");
        assert_eq!(eval("big + 0"), Value::Int(i64::MAX));
        assert_eq!(eval("small + 1"), Value::Int(i64::MIN + 1));
        assert_eq!(eval("-big"), Value::Int(-i64::MAX));
        match fails("big + 1") {
            EvalError::Overflow(m) => assert_eq!(m, "int overflow in `big + 1`"),
            other => panic!("{other:?}"),
        }
        match fails("(i + big) * 2") {
            EvalError::Overflow(m) => assert_eq!(m, "int overflow in `i + big`"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn division_by_zero() {
        assert_eq!(fails("i / 0"), EvalError::DivisionByZero);
        assert_eq!(fails("i % (i - 7)"), EvalError::DivisionByZero);
        assert_eq!(fails("u / 0u"), EvalError::DivisionByZero);
        assert_eq!(fails("u % 0u"), EvalError::DivisionByZero);
        assert_eq!(fails("small / 0"), EvalError::DivisionByZero);
    }

    #[test]
    fn int_uint_mixing_refused() {
        let e = refused("i + u");
        assert_eq!(
            e.message,
            "no `+` for int and uint; convert with int() or uint()"
        );
        assert_eq!(e.offset, 2);
        let e = refused("u * 2");
        assert_eq!(
            e.message,
            "no `*` for uint and int; convert with int() or uint()"
        );
        assert_eq!(eval("i + int(u)"), Value::Int(14));
        assert_eq!(eval("uint(i) + u"), Value::Uint(14));
    }

    #[test]
    fn names_refused() {
        let e = refused("x + 1");
        assert_eq!(e.message, "unknown name `x`");
        assert_eq!(e.offset, 0);
        let e = refused("1 + params.amout");
        assert_eq!(e.message, "`params` has no field `amout`");
        let e = refused("params + 1");
        assert!(
            e.message.starts_with("`params` is an object, not a value"),
            "{e}"
        );
        let e = refused("i.x");
        assert!(
            e.message.contains("no field `x` on a value of type int"),
            "{e}"
        );
    }

    #[test]
    fn result_type() {
        let e = match compile("i + 1", &Type::Bool) {
            Err(e) => e,
            Ok(_) => panic!("compiles"),
        };
        assert_eq!(e.message, "expected bool, found int");
        match compile("m", &Type::Map(Box::new(Type::Int))) {
            Ok(x) => assert_eq!(x.result_type(), &Type::Map(Box::new(Type::Int))),
            Err(e) => panic!("{e}"),
        }
        match compile("m", &Type::Map(Box::new(Type::Uint))) {
            Err(e) => assert_eq!(
                e.message,
                "expected map(string, uint), found map(string, int)"
            ),
            Ok(_) => panic!("compiles"),
        }
    }

    #[test]
    fn comparisons() {
        assert!(t("i == 7"));
        assert!(t("i != 8"));
        assert!(t("i < 8 && i <= 7 && i > 6 && i >= 7"));
        assert!(!t("i < 7"));
        assert!(t("u == 7u && u < 8u"));
        assert!(t("s == 'héllo' && s < 'i' && s > 'h'"));
        assert!(t("false < true"));
        assert!(t("d > duration('1m') && d == duration('90s')"));
        assert!(t("now > timestamp('2023-01-01T00:00:00Z')"));
        assert!(t("m == {'1A': 3, '1B': 4}"));
        assert!(t("m != {'1A': 3}"));
        assert!(refused("m < m").message.contains("no `<` for maps"));
        assert!(
            refused("i == 's'")
                .message
                .contains("no `==` for int and string")
        );
        // int against uint, exactly.
        assert!(t("i == u"));
        assert!(t("u == i"));
        assert!(t("-1 < 0u"));
        assert!(t("0u > -1"));
        assert!(t("ubig > big"));
        assert!(t("big < ubig"));
        assert!(t("small < 0u"));
        assert!(!t("-1 == ubig"));
        assert!(t("9223372036854775807 == 9223372036854775807u"));
        assert!(t(
            "params.amount <= int(account.balance) + int(account.overdraft)"
        ));
        assert!(!t(
            "params.amount > int(account.balance) + int(account.overdraft)"
        ));
    }

    #[test]
    fn logic() {
        assert!(t("true && true"));
        assert!(!t("true && false"));
        assert!(t("false || true"));
        assert!(!t("!b"));
        assert!(t("!!b"));
        assert!(!t("false && (1 / 0 == 1)"));
        assert!(t("true || (1 / 0 == 1)"));
        assert_eq!(fails("(1 / 0 == 1) && false"), EvalError::DivisionByZero);
        assert_eq!(eval("b ? 1 : 2"), Value::Int(1));
        assert_eq!(eval("!b ? 1 : 2"), Value::Int(2));
        assert_eq!(eval("b ? 1 : 1 / 0"), Value::Int(1));
        assert!(
            refused("b ? 1 : 's'")
                .message
                .contains("branches of `?:` have different types: int and string")
        );
        assert!(
            refused("1 && true")
                .message
                .contains("must be bool, found int")
        );
        assert!(refused("i ? 1 : 2").message.contains("must be bool"));
    }

    #[test]
    fn strings() {
        assert_eq!(eval("s + '!'"), Value::String("héllo!".into()));
        assert_eq!(eval("size(s)"), Value::Int(5));
        assert_eq!(eval("s.size()"), Value::Int(5));
        assert!(t(
            "s.startsWith('hé') && s.endsWith('lo') && s.contains('ll')"
        ));
        assert!(!t(
            "s.startsWith('x') || s.endsWith('x') || s.contains('x')"
        ));
        assert_eq!(
            eval("string(i) + string(u) + string(b)"),
            Value::String("77true".into())
        );
        assert_eq!(eval("string(-5)"), Value::String("-5".into()));
    }

    #[test]
    fn concat_bounded() {
        let (mut scope, mut env) = scope();
        let slot = match scope.var("long", Type::String) {
            Ok(slot) => slot,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(slot.0, env.len());
        env.push(Value::String("x".repeat(MAX_STRING_LEN / 2 + 1)));
        let expr = match Expr::compile("long + long", &scope, &Type::String, &Limits::default()) {
            Ok(x) => x,
            Err(e) => panic!("{e}"),
        };
        assert!(matches!(expr.eval(&env), Err(EvalError::Overflow(_))));
        let expr = match Expr::compile("long + 'x'", &scope, &Type::String, &Limits::default()) {
            Ok(x) => x,
            Err(e) => panic!("{e}"),
        };
        assert!(
            matches!(expr.eval(&env), Ok(Value::String(s)) if s.len() == MAX_STRING_LEN / 2 + 2)
        );
    }

    #[test]
    fn maps() {
        assert_eq!(eval("m['1A']"), Value::Int(3));
        assert_eq!(eval("m[params.who]"), Value::Int(3));
        assert_eq!(eval("m.size()"), Value::Int(2));
        assert_eq!(eval("size(m)"), Value::Int(2));
        assert_eq!(fails("m['9Z']"), EvalError::NoSuchKey("9Z".into()));
        assert!(t("'1A' in m && !('2A' in m) && params.who in m"));
        assert_eq!(eval("sum(m)"), Value::Int(7));
        assert_eq!(eval("sum(um)"), Value::Uint(0));
        assert_eq!(eval("sum(m.with('2A', 5))"), Value::Int(12));
        assert_eq!(eval("sum(m.with('1A', 5))"), Value::Int(9));
        assert_eq!(eval("size(m.without('1A'))"), Value::Int(1));
        assert_eq!(eval("size(m.without('zz'))"), Value::Int(2));
        assert!(t("!('1A' in m.without('1A'))"));
        assert_eq!(eval("{'a': 1, 'b': 2}['b']"), Value::Int(2));
        assert_eq!(eval("sum(um.with('a', 2u).with('b', 3u))"), Value::Uint(5));
        let mut expected = BTreeMap::new();
        expected.insert("1A".to_string(), Value::Int(3));
        expected.insert("1B".to_string(), Value::Int(4));
        expected.insert("x".to_string(), Value::Int(7));
        assert_eq!(eval("m.with('x', i)"), Value::Map(expected));
        assert!(
            refused("m.with('x', 'y')")
                .message
                .contains("must be int, found string")
        );
        assert!(refused("{}").message.contains("empty map literal"));
        assert!(
            refused("{'a': 1, 'a': 2}")
                .message
                .contains("duplicate map key")
        );
        assert!(refused("{'a': 1, 'b': 'x'}").message.contains("one type"));
        assert!(refused("{s: 1}").message.contains("string literals"));
        assert!(refused("m[1]").message.contains("must be string"));
        assert!(refused("sum({'a': true})").message.contains("sum() needs"));
        assert!(
            refused("has(m.x)")
                .message
                .contains("has() is not supported")
        );
    }

    #[test]
    fn sum_overflow() {
        overflow("sum(m.with('x', big))");
        overflow("sum(um.with('a', ubig).with('b', 1u))");
        assert_eq!(eval("sum(m.with('x', small))"), Value::Int(i64::MIN + 7));
    }

    #[test]
    fn comprehensions() {
        assert!(t("m.all(k, m[k] > 2)"));
        assert!(!t("m.all(k, m[k] > 3)"));
        assert!(t("m.exists(k, m[k] == 4)"));
        assert!(!t("m.exists(k, k == '2A')"));
        assert!(t("m.exists(k, k.startsWith('1'))"));
        assert!(t("um.all(k, false)"));
        assert!(!t("um.exists(k, true)"));
        // Short-circuit in key order: 1A decides before 1B divides by zero.
        assert!(!t("m.all(k, k == '1B' ? 1 / 0 == 0 : false)"));
        assert!(t("m.all(k, m[k] > 0) && m.exists(j, j == '1A')"));
        let e = refused("m.all(k, m.exists(j, j == k))");
        assert!(e.message.contains("inside another"), "{e}");
        assert!(
            refused("m.exists_one(k, true)")
                .message
                .contains("exists_one")
        );
        assert!(refused("m.map(k, 1)").message.contains("`map`"));
        assert!(refused("m.filter(k, true)").message.contains("`filter`"));
        assert!(
            refused("m.all(i, true)")
                .message
                .contains("hides a declared name")
        );
        assert!(refused("i.all(k, true)").message.contains("needs a map"));
        assert!(refused("m.all(k, 1)").message.contains("must be bool"));
        assert!(
            refused("k == 'a' && m.all(k, true)")
                .message
                .contains("unknown name `k`")
        );
    }

    #[test]
    fn unsupported() {
        assert_eq!(
            refused("s.matches('a')").message,
            "unsupported function `matches`"
        );
        assert_eq!(refused("foo(1)").message, "unsupported function `foo`");
        assert_eq!(
            refused("1.5 > 1").message,
            "double literals are not supported"
        );
        assert_eq!(
            refused("b'x' == b'x'").message,
            "bytes literals are not supported"
        );
        assert_eq!(refused("[1, 2] == [1]").message, "lists are not supported");
        assert_eq!(refused("null == null").message, "null is not supported");
        assert!(
            refused("int('5')")
                .message
                .contains("no int() conversion from string")
        );
        assert!(refused("uint(b)").message.contains("no uint() conversion"));
        assert!(refused("size(i)").message.contains("no size() for int"));
        assert!(refused("i +").message.starts_with("syntax error"));
    }

    #[test]
    fn limits() {
        let (scope, _) = scope();
        let long = format!("i == {}", "1 + ".repeat(600) + "1");
        let e = match Expr::compile(&long, &scope, &Type::Bool, &Limits::default()) {
            Err(e) => e,
            Ok(_) => panic!("compiles"),
        };
        assert!(e.message.contains("more than the limit of 2000"), "{e}");
        let many = format!("i == {}", vec!["1"; 150].join(" + "));
        let limits = Limits {
            max_depth: 1000,
            ..Limits::default()
        };
        let e = match Expr::compile(&many, &scope, &Type::Bool, &limits) {
            Err(e) => e,
            Ok(_) => panic!("compiles"),
        };
        assert!(e.message.contains("more than 200 nodes"), "{e}");
        let deep = format!("{}1{}", "(".repeat(40), ")".repeat(40));
        let deep = format!("i == {}", deep.replace('(', "-(").replace("-(1", "(1"));
        let e = match Expr::compile(&deep, &scope, &Type::Bool, &Limits::default()) {
            Err(e) => e,
            Ok(_) => panic!("compiles"),
        };
        assert!(
            e.message.contains("deeper than 32") || e.message.contains("Recursion limit"),
            "{e}"
        );
        let chain = format!("i == {}", vec!["1"; 40].join(" + "));
        let e = match Expr::compile(&chain, &scope, &Type::Bool, &Limits::default()) {
            Err(e) => e,
            Ok(_) => panic!("compiles"),
        };
        assert!(e.message.contains("deeper than 32"), "{e}");
        // Deep but within the limits: the parser's recursion must not overflow the stack of
        // a test thread (2 MiB).
        let nested = format!("i == {}1{}", "(".repeat(30), ")".repeat(30));
        assert!(Expr::compile(&nested, &scope, &Type::Bool, &Limits::default()).is_ok());
        let calls = format!("i == {}i{}", "int(".repeat(25), ")".repeat(25));
        assert!(Expr::compile(&calls, &scope, &Type::Bool, &Limits::default()).is_ok());
        let e = match Expr::compile(
            &format!("i == {}1{}", "(".repeat(33), ")".repeat(33)),
            &scope,
            &Type::Bool,
            &Limits::default(),
        ) {
            Err(e) => e,
            Ok(_) => panic!("compiles"),
        };
        assert_eq!(e.message, "expression is nested deeper than 32 levels");
        // Within the limits.
        let ok = format!("i == {}", vec!["1"; 20].join(" + "));
        assert!(Expr::compile(&ok, &scope, &Type::Bool, &Limits::default()).is_ok());
    }

    #[test]
    fn timestamps_and_durations() {
        assert_eq!(
            eval("string(timestamp('1970-01-01T00:00:00Z'))"),
            Value::String("1970-01-01T00:00:00Z".into())
        );
        assert_eq!(format_timestamp(0).as_deref(), Some("1970-01-01T00:00:00Z"));
        assert_eq!(
            format_timestamp(1_700_000_000_123_456).as_deref(),
            Some("2023-11-14T22:13:20.123456Z")
        );
        assert_eq!(
            format_timestamp(-1).as_deref(),
            Some("1969-12-31T23:59:59.999999Z")
        );
        assert_eq!(
            format_timestamp(951_782_400_000_000).as_deref(),
            Some("2000-02-29T00:00:00Z")
        );
        assert_eq!(
            format_timestamp(MIN_TIMESTAMP).as_deref(),
            Some("0001-01-01T00:00:00Z")
        );
        assert_eq!(
            format_timestamp(MAX_TIMESTAMP).as_deref(),
            Some("9999-12-31T23:59:59.999999Z")
        );
        assert_eq!(format_timestamp(MAX_TIMESTAMP + 1), None);
        assert_eq!(
            format_timestamp(1_500_000).as_deref(),
            Some("1970-01-01T00:00:01.5Z")
        );
        assert_eq!(
            eval("string(now)"),
            Value::String("2023-11-14T22:13:20Z".into())
        );
        assert_eq!(eval("int(now)"), Value::Int(1_700_000_000));
        assert_eq!(
            eval("int(timestamp('1969-12-31T23:59:59.5Z'))"),
            Value::Int(-1)
        );
        assert_eq!(
            parse_timestamp("2023-11-14T22:13:20.123456Z"),
            Ok(1_700_000_000_123_456)
        );
        assert_eq!(
            parse_timestamp("2023-11-14T23:13:20.1234560+01:00"),
            Ok(1_700_000_000_123_456)
        );
        assert_eq!(
            parse_timestamp("2023-11-14t21:13:20-01:00"),
            Ok(1_700_000_000_000_000)
        );
        assert_eq!(parse_timestamp("0001-01-01T00:00:00Z"), Ok(MIN_TIMESTAMP));
        for bad in [
            "2023-11-14",
            "2023-11-14T22:13:20",
            "2023-13-14T22:13:20Z",
            "2023-02-29T22:13:20Z",
            "2023-11-14T24:00:00Z",
            "2023-11-14T22:13:20.Z",
            "2023-11-14T22:13:20.1234567Z",
            "2023-11-14T22:13:20Zx",
            "2023-11-14T22:13:20+1:00",
            "0000-01-01T00:00:00Z",
            "+023-11-14T22:13:20Z",
            "2023-11-14T22:13:2éZ",
        ] {
            assert!(parse_timestamp(bad).is_err(), "{bad}");
        }
        assert!(parse_timestamp("2024-02-29T00:00:00Z").is_ok());
        let e = refused("now > timestamp('2023-11-14')");
        assert!(e.message.starts_with("malformed timestamp"), "{e}");
        assert_eq!(e.offset, 16);
        assert!(
            refused("now > timestamp(s)")
                .message
                .contains("string literal")
        );

        assert_eq!(parse_duration("0"), Ok(0));
        assert_eq!(parse_duration("90s"), Ok(90_000_000));
        assert_eq!(parse_duration("1.5s"), Ok(1_500_000));
        assert_eq!(parse_duration("1h30m"), Ok(5_400_000_000));
        assert_eq!(parse_duration("-15m"), Ok(-900_000_000));
        assert_eq!(parse_duration("2ms3us"), Ok(2_003));
        assert_eq!(parse_duration("1000ns"), Ok(1));
        assert_eq!(parse_duration(".5h"), Ok(1_800_000_000));
        assert_eq!(parse_duration("1µs"), Ok(1));
        for bad in [
            "",
            "-",
            "15",
            "15x",
            "1.5",
            "h",
            "1ns",
            "1.0000001s",
            "99999999999999999999h",
            "1s-1s",
            "1..5s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert!(
            refused("d > duration('15')")
                .message
                .starts_with("malformed duration")
        );
        assert!(
            refused("d > duration(s)")
                .message
                .contains("string literal")
        );

        assert_eq!(format_duration(90_000_000), "90s");
        assert_eq!(format_duration(1_500_000), "1.5s");
        assert_eq!(format_duration(-1), "-0.000001s");
        assert_eq!(format_duration(0), "0s");
        assert_eq!(format_duration(i64::MIN), "-9223372036854.775808s");
        assert_eq!(eval("string(d)"), Value::String("90s".into()));

        // Arithmetic.
        assert_eq!(eval("now + d"), Value::Timestamp(1_700_000_090_000_000));
        assert_eq!(eval("d + now"), Value::Timestamp(1_700_000_090_000_000));
        assert_eq!(eval("now - d"), Value::Timestamp(1_699_999_910_000_000));
        assert_eq!(eval("(now + d) - now"), Value::Duration(90_000_000));
        assert_eq!(eval("d + duration('30s')"), Value::Duration(120_000_000));
        assert_eq!(eval("d - duration('100s')"), Value::Duration(-10_000_000));
        assert_eq!(eval("-d"), Value::Duration(-90_000_000));
        assert!(t(
            "now - timestamp('2023-11-14T22:13:19Z') == duration('1s')"
        ));
        overflow("timestamp('9999-12-31T23:59:59Z') + duration('1s')");
        overflow("timestamp('0001-01-01T00:00:00Z') - duration('1us')");
        overflow(
            "timestamp('9999-12-31T23:59:59Z') - timestamp('0001-01-01T00:00:00Z') + duration('2562047788h') + duration('2562047788h')",
        );
        assert!(
            refused("now + now")
                .message
                .contains("no `+` for timestamp and timestamp")
        );
        assert!(
            refused("d * 2")
                .message
                .contains("no `*` for duration and int")
        );
    }

    #[test]
    fn conversions() {
        assert_eq!(eval("int(u)"), Value::Int(7));
        assert_eq!(eval("int(i)"), Value::Int(7));
        assert_eq!(eval("int(9223372036854775807u)"), Value::Int(i64::MAX));
        assert!(matches!(
            fails("int(ubig)"),
            EvalError::ConversionOutOfRange(_)
        ));
        assert!(matches!(
            fails("int(9223372036854775808u)"),
            EvalError::ConversionOutOfRange(_)
        ));
        assert_eq!(eval("uint(i)"), Value::Uint(7));
        assert_eq!(eval("uint(big)"), Value::Uint(i64::MAX.unsigned_abs()));
        assert_eq!(eval("uint(0)"), Value::Uint(0));
        assert!(matches!(
            fails("uint(-1)"),
            EvalError::ConversionOutOfRange(_)
        ));
        assert!(matches!(
            fails("uint(small)"),
            EvalError::ConversionOutOfRange(_)
        ));
        assert_eq!(eval("string(ubig)"), Value::String(u64::MAX.to_string()));
        assert_eq!(eval("string(small)"), Value::String(i64::MIN.to_string()));
        assert_eq!(eval("string(s)"), Value::String("héllo".into()));
    }

    #[test]
    fn scope_rules() {
        let mut scope = Scope::new();
        assert!(scope.is_empty());
        assert_eq!(scope.var("a", Type::Int), Ok(Slot(0)));
        assert_eq!(scope.field("o", "x", Type::Int), Ok(Slot(1)));
        assert_eq!(scope.field("o", "y", Type::Bool), Ok(Slot(2)));
        assert_eq!(scope.len(), 3);
        assert!(scope.var("a", Type::Int).is_err_and(|e| e.contains("`a`")));
        assert!(scope.var("o", Type::Int).is_err_and(|e| e.contains("`o`")));
        assert!(
            scope
                .field("a", "x", Type::Int)
                .is_err_and(|e| e.contains("`a`"))
        );
        assert!(
            scope
                .field("o", "x", Type::Int)
                .is_err_and(|e| e.contains("`o.x`"))
        );
        assert!(scope.var("1x", Type::Int).is_err());
        assert!(
            scope
                .var("n", Type::Map(Box::new(Type::Map(Box::new(Type::Int)))))
                .is_err()
        );
        assert_eq!(scope.len(), 3);
        assert_eq!(scope.slot_type(Slot(2)), Some(&Type::Bool));
    }

    #[test]
    fn slots_and_env_errors() {
        let (scope, env) = scope();
        let expr = match Expr::compile(
            "params.amount <= int(account.balance) + int(account.overdraft) && i == i",
            &scope,
            &Type::Bool,
            &Limits::default(),
        ) {
            Ok(x) => x,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(expr.slots(), vec![Slot(1), Slot(8), Slot(10), Slot(11)]);
        assert_eq!(expr.eval_bool(&env), Ok(true));
        let mut wrong = env.clone();
        wrong[10] = Value::String("x".into());
        assert!(matches!(
            expr.eval_bool(&wrong),
            Err(EvalError::Internal(_))
        ));
        assert!(matches!(
            expr.eval_bool(&env[..3]),
            Err(EvalError::Internal(_))
        ));
        let expr = match Expr::compile(
            "m.all(k, m[k] > i)",
            &scope,
            &Type::Bool,
            &Limits::default(),
        ) {
            Ok(x) => x,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(expr.slots(), vec![Slot(1), Slot(6)]);
        let expr = match Expr::compile("s", &scope, &Type::String, &Limits::default()) {
            Ok(x) => x,
            Err(e) => panic!("{e}"),
        };
        let mut wrong = env.clone();
        wrong[3] = Value::Int(1);
        assert!(matches!(expr.eval(&wrong), Err(EvalError::Internal(_))));
    }

    #[test]
    fn types_and_values() {
        assert_eq!(Type::Map(Box::new(Type::Int)).name(), "map(string, int)");
        assert_eq!(Type::Timestamp.name(), "timestamp");
        assert_eq!(Type::Uint.name(), "uint");
        for ty in [
            Type::Int,
            Type::Uint,
            Type::Bool,
            Type::String,
            Type::Timestamp,
            Type::Duration,
            Type::Map(Box::new(Type::Int)),
        ] {
            assert_eq!(Value::default_of(&ty).type_of(), ty);
        }
        let mut map = BTreeMap::new();
        map.insert("a".to_string(), Value::Bool(true));
        assert_eq!(Value::Map(map).type_of(), Type::Map(Box::new(Type::Bool)));
    }

    #[test]
    fn offsets() {
        let e = refused("i + é + 1");
        assert!(e.message.starts_with("syntax error"), "{e}");
        assert_eq!(e.offset, 4, "{e}");
        let e = refused("'é' + é");
        assert_eq!(e.offset, 6, "{e}");
        let e = refused("'é' + x");
        assert_eq!(e.message, "unknown name `x`");
        assert_eq!(e.offset, 7, "{e}");
        let e = refused("'é' + i");
        assert_eq!(e.offset, 5, "{e}");
        let e = refused("1 +\n  unknown");
        assert_eq!(e.offset, 6);
        let e = refused("1 +\n  é");
        assert!(e.message.starts_with("syntax error"), "{e}");
        assert_eq!(e.offset, 6);
    }

    proptest::proptest! {
        #[test]
        fn add_int_matches_checked_add(x: i64, y: i64) {
            let mut scope = Scope::new();
            let (Ok(_), Ok(_)) = (scope.var("x", Type::Int), scope.var("y", Type::Int)) else {
                panic!("scope");
            };
            let env = [Value::Int(x), Value::Int(y)];
            for (src, expected) in [
                ("x + y", x.checked_add(y)),
                ("x - y", x.checked_sub(y)),
                ("x * y", x.checked_mul(y)),
            ] {
                let Ok(expr) = Expr::compile(src, &scope, &Type::Int, &Limits::default()) else {
                    panic!("compile");
                };
                match (expr.eval(&env), expected) {
                    (Ok(Value::Int(got)), Some(want)) => proptest::prop_assert_eq!(got, want),
                    (Err(EvalError::Overflow(_)), None) => {}
                    (got, want) => panic!("{src}: {got:?} vs {want:?}"),
                }
            }
        }

        #[test]
        fn int_uint_comparison_is_exact(x: i64, y: u64) {
            let mut scope = Scope::new();
            let (Ok(_), Ok(_)) = (scope.var("x", Type::Int), scope.var("y", Type::Uint)) else {
                panic!("scope");
            };
            let env = [Value::Int(x), Value::Uint(y)];
            let Ok(expr) = Expr::compile("x < y", &scope, &Type::Bool, &Limits::default()) else {
                panic!("compile");
            };
            proptest::prop_assert_eq!(expr.eval_bool(&env), Ok(i128::from(x) < i128::from(y)));
        }

        #[test]
        fn timestamp_round_trip(ts in MIN_TIMESTAMP..=MAX_TIMESTAMP) {
            let Some(text) = format_timestamp(ts) else { panic!("format") };
            proptest::prop_assert_eq!(parse_timestamp(&text), Ok(ts));
        }

        #[test]
        fn duration_round_trip(d: i64) {
            let text = format_duration(d);
            proptest::prop_assert_eq!(parse_duration(&text), Ok(d));
        }
    }
}
