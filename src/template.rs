//! The one template language of connectors (Jinja-style, by minijinja):
//! URLs, query values, headers, bodies, ids, cursors and `when` conditions.
//!
//! Templates are checked for syntax when the config is read (see
//! [`check_template`]) and compiled once into an [`Engine`] per connector, so
//! the poll loop only renders.

use std::cell::Cell;
use std::collections::BTreeSet;

use minijinja::machinery::ast;
use minijinja::value::{Kwargs, Rest};
use minijinja::{Environment, Error, ErrorKind, State, UndefinedBehavior, Value};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Compiled templates of one connector.
///
/// Why one environment per connector: template names are private to the
/// connector, and a reload swaps whole connectors, so nothing is shared
/// across them.
#[derive(Clone)]
pub struct Engine {
    /// Every template, with [`FUEL`]: where a render that outgrew
    /// [`INLINE_FUEL`] runs again, off the async workers.
    env: Environment<'static>,
    /// The same templates with [`INLINE_FUEL`]: every render runs here
    /// first, on the calling thread. Handing every render to another
    /// thread (`block_in_place`) cost the 50-balance bank example a third
    /// of its CPU in thread switches; a template that needs more than a
    /// fraction of a millisecond is the exception worth moving.
    inline: Environment<'static>,
    next: usize,
}

/// Instructions a render may run on the async worker that asked for it
/// (well under a millisecond); past them, it runs again with [`FUEL`] off
/// the workers. The repository's templates need a few hundred.
pub const INLINE_FUEL: u64 = 20_000;

/// Instructions one render may run. Templates are written by connector
/// authors, not trusted: a loop nested over a 10,000-character string is
/// 10^8 instructions and would hold a thread for minutes. Every template of
/// the repository's connectors needs a few hundred at most; this bound is
/// about 1.5 s of one core in a debug build (measured), less in release.
pub const FUEL: u64 = 10_000_000;
/// Bytes a render may write, and the longest string the growing filters
/// (`replace`, `join`, `center`, `indent`, `format`) may build: above the default
/// `max_response_bytes` (10 MiB), so `{{ item | tojson }}` of a whole page
/// still renders, and far below what would threaten the process.
pub const MAX_OUTPUT: usize = 16 * 1024 * 1024;
/// Nesting of macro calls and data: deep enough for any real template,
/// shallow enough that no render can exhaust a thread's stack.
const RECURSION_LIMIT: usize = 64;

/// A handle to a compiled template of an [`Engine`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tpl(String);

/// A JSON value whose strings are templates: `request.json` bodies and
/// `emit[].data`. A string that is exactly one `{{ expression }}` yields the
/// expression's own value (a number stays a number, an object stays an
/// object); any other string renders to text.
#[derive(Clone, Debug, PartialEq)]
pub enum ValueTpl {
    /// No template inside: used as is.
    Literal(serde_json::Value),
    /// A string with template syntax, rendered to text.
    Text(Tpl),
    /// `{{ expr }}` alone: rendered through `tojson`, parsed back.
    Native(Tpl),
    Array(Vec<ValueTpl>),
    Object(Vec<(String, ValueTpl)>),
}

/// True when a string holds template syntax.
fn is_template(s: &str) -> bool {
    s.contains("{{") || s.contains("{%")
}

/// The expression of a string that is exactly one `{{ expr }}`.
fn lone_expression(s: &str) -> Option<&str> {
    let inner = s.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    (!inner.contains("{{") && !inner.contains("}}") && !inner.contains("{%")).then_some(inner)
}

/// Top-level variables every string of a value template reads.
pub fn variables_of_value(v: &serde_json::Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    walk_strings(v, &mut |s| out.extend(variables_of_template(s)));
    out
}

/// Why a template was refused at load or failed to render. The messages
/// are what config errors and `last_error` say.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// minijinja refused it (syntax, an undefined filter, a render error):
    /// its message, one line (see [`describe`]).
    #[error("{0}")]
    Engine(String),
    /// A construct whose captured output the size cap cannot bound.
    #[error("{0} is not allowed: what it captures is outside the {cap} MiB output cap (template limit); use `{{% set x = … %}}`", cap = MAX_OUTPUT / (1024 * 1024))]
    Capture(&'static str),
    /// A growing operator the rewrite could not wrap in the bound.
    #[error("pollhook cannot bound the `~`, `*` or `+` of this template (template limit)")]
    Unbounded,
    /// A string of a value template was refused.
    #[error("invalid template `{text}`: {error}")]
    InValue {
        text: String,
        error: Box<TemplateError>,
    },
    /// The render ran out of its instruction budget.
    #[error("the template ran more than {FUEL} instructions and was stopped (template limit)")]
    OutOfFuel,
    /// A value template's lone expression rendered text that is not JSON.
    #[error("cannot read back `{text}`: {error}")]
    ReadBack { text: String, error: String },
}

impl From<&minijinja::Error> for TemplateError {
    fn from(e: &minijinja::Error) -> Self {
        TemplateError::Engine(describe(e))
    }
}

/// Checks the syntax of every string of a value template.
pub fn check_value(v: &serde_json::Value) -> Result<(), TemplateError> {
    let mut err = None;
    walk_strings(v, &mut |s| {
        if err.is_none() {
            if let Err(e) = check_template(s) {
                err = Some(TemplateError::InValue {
                    text: s.to_string(),
                    error: Box::new(e),
                });
            }
        }
    });
    err.map_or(Ok(()), Err)
}

fn walk_strings(v: &serde_json::Value, f: &mut dyn FnMut(&str)) {
    match v {
        serde_json::Value::String(s) => f(s),
        serde_json::Value::Array(a) => a.iter().for_each(|x| walk_strings(x, f)),
        serde_json::Value::Object(o) => o.values().for_each(|x| walk_strings(x, f)),
        _ => {}
    }
}

/// A handle to a compiled condition (`when`) of an [`Engine`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond(String);

impl Default for Engine {
    fn default() -> Self {
        Self::new()
    }
}

/// The environment every template is checked and rendered with.
///
/// Strict undefined: a typo such as `{{ acount }}` is an error, not an empty
/// string in a URL; `default(...)` and `is defined` still work.
///
/// Bounded, because connector files come from anyone: fuel bounds the
/// instructions of one render, a recursion limit its depth, and the
/// filters that multiply a string's length check the length first (an
/// unchecked `replace` chain allocated 8 GB and aborted the process).
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    // No auto-escaping: these are URLs, JSON and headers, not HTML. URL
    // templates escape through the formatter instead (see `url_formatter`).
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.set_keep_trailing_newline(true);
    env.set_fuel(Some(FUEL));
    env.set_recursion_limit(RECURSION_LIMIT);
    env.set_formatter(url_formatter);
    env.add_filter("replace", replace_checked);
    env.add_filter("join", join_checked);
    env.add_filter("center", center_checked);
    env.add_filter("indent", indent_checked);
    env.add_filter("tojson", tojson_checked);
    env.add_filter("format", format_checked);
    // `| raw`: this value is URL text already (see `url_formatter`).
    env.add_filter("raw", |v: Value| Value::from_safe_string(v.to_string()));
    env.add_filter("path", path_filter);
    env.add_filter(BOUND_FILTER, bounded_value);
    env.add_function("uuid", uuid_function);
    env
}

/// The functions a template may call, which are not variables to check
/// against a connector's params (see [`variables_of_template`]).
const FUNCTIONS: &[&str] = &["uuid"];

/// `uuid()`: a random (version 4) UUID, for request ids and idempotency
/// keys that an API wants fresh per request. Random, so never for what
/// must come out the same twice (event ids are derived, see `event.rs`);
/// a render that runs out of its inline fuel and runs again draws a new
/// one, which is still just a fresh random id.
fn uuid_function() -> String {
    uuid_v4(rand::random())
}

/// RFC 9562 §5.4: 122 random bits with the version (4) and the variant
/// (`10`) set, in the 8-4-4-4-12 hex form.
fn uuid_v4(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Undeclared names minus the template functions.
fn without_functions(names: std::collections::HashSet<String>) -> BTreeSet<String> {
    names
        .into_iter()
        .filter(|n| !FUNCTIONS.contains(&n.as_str()))
        .collect()
}

/// What a template may read that differs between two renders of the same
/// instance with the same state: the time, a fresh UUID, and `debug()`,
/// which prints the whole context (the time with it).
const UNSTEADY: &[&str] = &["now", "uuid", "debug"];

/// The filter every `~`, `*` and `+` of a template passes its result
/// through (see [`bounded_source`]); not a name a template can write by
/// accident.
const BOUND_FILTER: &str = "__pollhook_bounded";

/// Refuses a string (or sized list) longer than [`MAX_OUTPUT`].
fn bounded_value(v: Value) -> Result<Value, Error> {
    let size = match v.as_str() {
        Some(s) => Some(s.len()),
        None => v.len(),
    };
    if size.is_some_and(|n| n > MAX_OUTPUT) {
        return Err(too_long("`~`, `*` or `+`"));
    }
    Ok(v)
}

/// The instructions of `t`'s root and blocks.
fn instructions_of<'a>(
    t: &'a minijinja::Template<'a, 'a>,
) -> impl Iterator<Item = &'a minijinja::machinery::Instructions<'a>> {
    let c = minijinja::machinery::get_compiled_template(t);
    std::iter::once(&c.instructions).chain(c.blocks.values())
}

fn grows(i: Option<&minijinja::machinery::Instruction<'_>>) -> bool {
    use minijinja::machinery::Instruction;
    matches!(
        i,
        Some(Instruction::StringConcat | Instruction::Mul | Instruction::Add)
    )
}

/// The spans (byte ranges) of every `~`, `*` and `+` expression of a
/// template and of their operands.
#[derive(Default)]
struct Growing {
    /// (expression, left operand, right operand).
    ops: Vec<[(usize, usize); 3]>,
    /// The statements that capture output (`{% set %}…{% endset %}`,
    /// `{% filter %}`, macros, `{% call %}`): minijinja renders their body
    /// into a buffer of its own, past the output cap, so a loop inside one
    /// could still build gigabytes; such a template is refused.
    captures: Vec<&'static str>,
}

impl Growing {
    fn stmts(&mut self, stmts: &[ast::Stmt<'_>]) {
        stmts.iter().for_each(|s| self.stmt(s));
    }

    fn stmt(&mut self, s: &ast::Stmt<'_>) {
        use ast::Stmt as S;
        match s {
            S::Template(t) => self.stmts(&t.children),
            S::EmitExpr(e) => self.expr(&e.expr),
            S::EmitRaw(_) => {}
            S::ForLoop(f) => {
                self.expr(&f.target);
                self.expr(&f.iter);
                self.opt(&f.filter_expr);
                self.stmts(&f.body);
                self.stmts(&f.else_body);
            }
            S::IfCond(i) => {
                self.expr(&i.expr);
                self.stmts(&i.true_body);
                self.stmts(&i.false_body);
            }
            S::WithBlock(w) => {
                for (a, b) in &w.assignments {
                    self.expr(a);
                    self.expr(b);
                }
                self.stmts(&w.body);
            }
            S::Set(x) => {
                self.expr(&x.target);
                self.expr(&x.expr);
            }
            S::SetBlock(x) => {
                self.captures.push("`{% set %}…{% endset %}`");
                self.expr(&x.target);
                self.opt(&x.filter);
                self.stmts(&x.body);
            }
            S::AutoEscape(a) => {
                self.expr(&a.enabled);
                self.stmts(&a.body);
            }
            S::FilterBlock(f) => {
                self.captures.push("`{% filter %}`");
                self.expr(&f.filter);
                self.stmts(&f.body);
            }
            S::Block(b) => self.stmts(&b.body),
            S::Import(i) => {
                self.expr(&i.expr);
                self.expr(&i.name);
            }
            S::FromImport(i) => {
                self.expr(&i.expr);
                for (a, b) in &i.names {
                    self.expr(a);
                    self.opt(b);
                }
            }
            S::Extends(e) => self.expr(&e.name),
            S::Include(i) => self.expr(&i.name),
            S::Macro(m) => {
                self.captures.push("`{% macro %}`");
                self.macro_decl(m)
            }
            S::CallBlock(c) => {
                self.captures.push("`{% call %}`");
                self.call(&c.call);
                self.macro_decl(&c.macro_decl);
            }
            S::Do(d) => self.call(&d.call),
        }
    }

    fn macro_decl(&mut self, m: &ast::Macro<'_>) {
        m.args.iter().for_each(|e| self.expr(e));
        m.defaults.iter().for_each(|e| self.expr(e));
        self.stmts(&m.body);
    }

    fn call(&mut self, c: &ast::Call<'_>) {
        self.expr(&c.expr);
        self.args(&c.args);
    }

    fn args(&mut self, args: &[ast::CallArg<'_>]) {
        for a in args {
            match a {
                ast::CallArg::Pos(e)
                | ast::CallArg::Kwarg(_, e)
                | ast::CallArg::PosSplat(e)
                | ast::CallArg::KwargSplat(e) => self.expr(e),
            }
        }
    }

    fn opt(&mut self, e: &Option<ast::Expr<'_>>) {
        if let Some(e) = e {
            self.expr(e);
        }
    }

    fn expr(&mut self, e: &ast::Expr<'_>) {
        use ast::Expr as E;
        let range =
            |sp: minijinja::machinery::Span| (sp.start_offset as usize, sp.end_offset as usize);
        match e {
            E::Var(_) | E::Const(_) => {}
            E::Slice(x) => {
                self.expr(&x.expr);
                self.opt(&x.start);
                self.opt(&x.stop);
                self.opt(&x.step);
            }
            E::UnaryOp(x) => self.expr(&x.expr),
            E::BinOp(x) => {
                if matches!(
                    x.op,
                    ast::BinOpKind::Concat | ast::BinOpKind::Mul | ast::BinOpKind::Add
                ) {
                    let (left, right) = (extent(&x.left), extent(&x.right));
                    let own = range(x.span());
                    let whole = (own.0.min(left.0), own.1.max(right.1));
                    self.ops.push([whole, left, right]);
                }
                self.expr(&x.left);
                self.expr(&x.right);
            }
            E::Compare(x) => {
                self.expr(&x.expr);
                x.ops.iter().for_each(|o| self.expr(&o.expr));
            }
            E::IfExpr(x) => {
                self.expr(&x.test_expr);
                self.expr(&x.true_expr);
                self.opt(&x.false_expr);
            }
            E::Filter(x) => {
                self.opt(&x.expr);
                self.args(&x.args);
            }
            E::Test(x) => {
                self.expr(&x.expr);
                self.args(&x.args);
            }
            E::GetAttr(x) => self.expr(&x.expr),
            E::GetItem(x) => {
                self.expr(&x.expr);
                self.expr(&x.subscript_expr);
            }
            E::Call(x) => self.call(x),
            E::List(x) => x.items.iter().for_each(|e| self.expr(e)),
            E::Map(x) => {
                x.keys.iter().for_each(|e| self.expr(e));
                x.values.iter().for_each(|e| self.expr(e));
            }
        }
    }
}

/// The bytes an expression covers: its span and every child's. A postfix
/// node's own span starts at its operator (`| upper` of `b | upper`), not
/// at the expression it applies to.
fn extent(e: &ast::Expr<'_>) -> (usize, usize) {
    use ast::Expr as E;
    let sp = e.span();
    let mut r = (sp.start_offset as usize, sp.end_offset as usize);
    let mut add = |c: &ast::Expr<'_>| {
        let x = extent(c);
        r = (r.0.min(x.0), r.1.max(x.1));
    };
    let args = |args: &[ast::CallArg<'_>], add: &mut dyn FnMut(&ast::Expr<'_>)| {
        for a in args {
            match a {
                ast::CallArg::Pos(e)
                | ast::CallArg::Kwarg(_, e)
                | ast::CallArg::PosSplat(e)
                | ast::CallArg::KwargSplat(e) => add(e),
            }
        }
    };
    match e {
        E::Var(_) | E::Const(_) => {}
        E::Slice(x) => {
            add(&x.expr);
            [&x.start, &x.stop, &x.step]
                .into_iter()
                .flatten()
                .for_each(&mut add);
        }
        E::UnaryOp(x) => add(&x.expr),
        E::BinOp(x) => {
            add(&x.left);
            add(&x.right);
        }
        E::Compare(x) => {
            add(&x.expr);
            x.ops.iter().for_each(|o| add(&o.expr));
        }
        E::IfExpr(x) => {
            add(&x.test_expr);
            add(&x.true_expr);
            x.false_expr.iter().for_each(&mut add);
        }
        E::Filter(x) => {
            x.expr.iter().for_each(&mut add);
            args(&x.args, &mut add);
        }
        E::Test(x) => {
            add(&x.expr);
            args(&x.args, &mut add);
        }
        E::GetAttr(x) => add(&x.expr),
        E::GetItem(x) => {
            add(&x.expr);
            add(&x.subscript_expr);
        }
        E::Call(x) => {
            add(&x.expr);
            args(&x.args, &mut add);
        }
        E::List(x) => x.items.iter().for_each(&mut add),
        E::Map(x) => {
            x.keys.iter().for_each(&mut add);
            x.values.iter().for_each(&mut add);
        }
    }
    r
}

/// `source` with every `~`, `*` and `+` bounded: its operands and its
/// result pass through [`BOUND_FILTER`], so `a ~ b` becomes
/// `((((a) | f) ~ ((b) | f)) | f)`.
///
/// Why: minijinja has no hook on its operators, and fuel counts
/// instructions, not bytes: `s ~ s` repeated, or doubled in a loop through
/// a `namespace`, is one instruction per doubling and built 2 GB in 13 s;
/// and an operation on constants is folded while the template compiles,
/// so nested ones would build the same at load. Checked after each
/// operation, no string outgrows twice the cap (or minijinja's own 100 MB
/// limit of one `*`) before the render fails, and the filter on the
/// operands keeps every such operation from being folded. The expressions
/// are found in the template's syntax tree (minijinja's
/// `unstable_machinery`; every node carries its byte span), and the
/// rewrite is compiled again to check that every operator instruction is
/// followed by the filter: a template that escaped the rewrite is refused.
fn bounded_source(source: &str) -> Result<String, TemplateError> {
    let ast = match minijinja::machinery::parse(
        source,
        "<template>",
        Default::default(),
        Default::default(),
    ) {
        Ok(ast) => ast,
        Err(e) => return Err((&e).into()),
    };
    let mut found = Growing::default();
    found.stmt(&ast);
    if let Some(kind) = found.captures.first() {
        return Err(TemplateError::Capture(kind));
    }
    if found.ops.is_empty() {
        return Ok(source.to_string());
    }
    let out = wrap(source, &found)?;
    // Every operator of the rewrite is bounded, or the template is refused.
    let env = environment();
    let t = env
        .template_from_str(&out)
        .map_err(|e| TemplateError::from(&e))?;
    let checked = instructions_of(&t).all(|instrs| {
        (0..instrs.len() as u32).all(|idx| {
            !grows(instrs.get(idx))
                || matches!(
                    instrs.get(idx + 1),
                    Some(minijinja::machinery::Instruction::ApplyFilter(name, ..)) if *name == BOUND_FILTER
                )
        })
    });
    if checked {
        Ok(out)
    } else {
        Err(TemplateError::Unbounded)
    }
}

/// [`bounded_source`] for a lone expression (a `when` condition), for the
/// load-time checks (its render goes through [`bounded_source`]).
fn bounded_expr(expr: &str) -> Result<String, TemplateError> {
    let ast = minijinja::machinery::parse_expr(expr).map_err(|e| TemplateError::from(&e))?;
    let mut found = Growing::default();
    found.expr(&ast);
    wrap(expr, &found)
}

/// `source` with each span of `found` wrapped in `((…) | f)`.
fn wrap(source: &str, found: &Growing) -> Result<String, TemplateError> {
    let mut spans: Vec<(usize, usize)> = found.ops.iter().flatten().copied().collect();
    spans.sort();
    spans.dedup();
    // Insertions: at the same offset, closings before openings; inner
    // closings first, outer openings first.
    let close = format!(") | {BOUND_FILTER})");
    let mut edits: Vec<(usize, u8, usize, &str)> = Vec::new();
    for &(start, end) in &spans {
        edits.push((start, 1, usize::MAX - end, "(("));
        edits.push((end, 0, usize::MAX - start, close.as_str()));
    }
    edits.sort();
    let mut out = String::with_capacity(source.len() + edits.len() * 24);
    let mut at = 0;
    for (offset, _, _, text) in edits {
        let Some(piece) = source.get(at..offset) else {
            return Err(TemplateError::Unbounded);
        };
        out.push_str(piece);
        out.push_str(text);
        at = offset;
    }
    out.push_str(&source[at..]);
    Ok(out)
}

fn too_long(what: &str) -> Error {
    Error::new(
        ErrorKind::InvalidOperation,
        format!("{what} would build a string longer than {MAX_OUTPUT} bytes (template limit)"),
    )
}

fn replace_checked(v: String, from: String, to: String) -> Result<String, Error> {
    if !from.is_empty() && to.len() > from.len() {
        let grows = (to.len() - from.len()).saturating_mul(v.matches(from.as_str()).count());
        if v.len().saturating_add(grows) > MAX_OUTPUT {
            return Err(too_long("replace"));
        }
    } else if from.is_empty()
        && v.len().saturating_add(1).saturating_mul(to.len().max(1)) > MAX_OUTPUT
    {
        return Err(too_long("replace"));
    }
    Ok(v.replace(from.as_str(), &to))
}

fn join_checked(v: Value, joiner: Option<String>, rest: Rest<Value>) -> Result<String, Error> {
    if !rest.is_empty() {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "join takes a separator",
        ));
    }
    let joiner = joiner.unwrap_or_default();
    if v.is_undefined() || v.is_none() {
        return Ok(String::new());
    }
    if let Some(s) = v.as_str() {
        let n = s.chars().count();
        if s.len().saturating_add(joiner.len().saturating_mul(n)) > MAX_OUTPUT {
            return Err(too_long("join"));
        }
    }
    let mut out = String::new();
    for (i, item) in v.try_iter()?.enumerate() {
        if i > 0 {
            out.push_str(&joiner);
        }
        use std::fmt::Write;
        let _ = write!(out, "{item}");
        if out.len() > MAX_OUTPUT {
            return Err(too_long("join"));
        }
    }
    Ok(out)
}

fn center_checked(v: String, width: Option<usize>) -> Result<String, Error> {
    let width = width.unwrap_or(80);
    if width > MAX_OUTPUT {
        return Err(too_long("center"));
    }
    let len = v.chars().count();
    if len >= width {
        return Ok(v);
    }
    let left = (width - len) / 2;
    Ok(format!(
        "{}{v}{}",
        " ".repeat(left),
        " ".repeat(width - len - left)
    ))
}

fn indent_checked(
    v: String,
    width: Value,
    first: Option<bool>,
    blank: Option<bool>,
) -> Result<String, Error> {
    let pad = match width.as_str() {
        Some(s) => s.to_string(),
        None => " ".repeat(
            width
                .as_usize()
                .filter(|w| *w <= MAX_OUTPUT)
                .ok_or_else(|| too_long("indent"))?,
        ),
    };
    let lines = v.lines().count().max(1);
    if v.len().saturating_add(pad.len().saturating_mul(lines)) > MAX_OUTPUT {
        return Err(too_long("indent"));
    }
    let (first, blank) = (first.unwrap_or(false), blank.unwrap_or(false));
    let mut out = String::new();
    for (i, line) in v.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        if (i > 0 || first) && (blank || !line.trim().is_empty()) {
            out.push_str(&pad);
        }
        out.push_str(line);
    }
    Ok(out)
}

/// Deeper JSON indentation than this is no formatting anyone needs, and
/// minijinja builds the indentation string from the number as given (an
/// `indent=10**10` would abort the process).
const MAX_JSON_INDENT: usize = 64;

fn tojson_checked(value: &Value, indent: Option<Value>, args: Kwargs) -> Result<Value, Error> {
    let width = match &indent {
        Some(w) => Some(w.clone()),
        None => args.peek::<Option<Value>>("indent")?,
    };
    if width
        .and_then(|w| w.as_usize())
        .is_some_and(|w| w > MAX_JSON_INDENT)
    {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson indent above {MAX_JSON_INDENT} (template limit)"),
        ));
    }
    minijinja::filters::tojson(value, indent, args)
}

/// `format` pads to the widths its format string gives, building the
/// padding whole: a width or precision of seven digits or more is refused
/// (`'%10000000000s' | format(1)` would abort the process).
fn format_checked(state: &State, fmt: &Value, args: Rest<Value>) -> Result<Value, Error> {
    if let Some(f) = fmt.as_str() {
        let longest = f
            .split(|c: char| !c.is_ascii_digit())
            .map(str::len)
            .max()
            .unwrap_or(0);
        if longest > 6 {
            return Err(too_long("format"));
        }
    }
    minijinja::filters::format(state, fmt, args)
}

/// Where the text being rendered on this thread stands, when it is a URL
/// (`None` otherwise): whether anything but blanks was written yet, and
/// whether the query (or fragment) began.
#[derive(Clone, Copy, Debug, Default)]
struct UrlPos {
    started: bool,
    query: bool,
}

thread_local! {
    /// Set for the length of one URL render by [`Engine::render_url`]; the
    /// formatter reads it. A render never leaves its thread, so a
    /// thread-local is exactly the render's own state.
    static URL_POS: Cell<Option<UrlPos>> = const { Cell::new(None) };
}

/// Bytes of a value percent-encoded in a URL: all but ASCII letters and
/// digits, RFC 3986's other unreserved characters and the sub-delimiters
/// that mean nothing in a path segment or a query value. So `/ ? # & = + %`,
/// spaces, controls and every non-ASCII byte are encoded, and a value
/// cannot leave its path segment or its query value
/// (`../../admin/delete?all=1#` stays one segment).
const URL_ENCODED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b':')
    .remove(b'@')
    .remove(b'!')
    .remove(b'$')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')')
    .remove(b'*')
    .remove(b',');

/// The same, keeping `/` (`| path`).
const URL_ENCODED_PATH: &AsciiSet = &URL_ENCODED.remove(b'/');

fn url_encode(text: &str, slash: bool) -> String {
    let set = if slash { URL_ENCODED_PATH } else { URL_ENCODED };
    utf8_percent_encode(text, set).to_string()
}

/// A path segment made only of dots is `.` or `..` to every URL parser,
/// encoded or not (`%2E%2E` included): no encoding keeps it in place.
fn dot_segment_error(text: &str) -> Error {
    Error::new(
        ErrorKind::InvalidOperation,
        format!(
            "`{text}` cannot go into a URL path: `.` and `..` segments move the request elsewhere"
        ),
    )
}

fn is_dot_segment(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b == b'.') && s.len() <= 2
}

/// How `{{ value }}` is written. Outside URL templates: as text (what
/// minijinja does without auto-escaping). In a URL template, a value after
/// the start is percent-encoded as one path segment or query value (see
/// [`URL_ENCODED`]); a value that begins the URL (`{{ base_url }}/…`) is a
/// whole URL by design and stays as it is, and so does a value marked
/// `| raw` (or `| safe`) by a connector that means it.
fn url_formatter(out: &mut minijinja::Output, state: &State, value: &Value) -> Result<(), Error> {
    let Some(pos) = URL_POS.with(Cell::get) else {
        return minijinja::escape_formatter(out, state, value);
    };
    if !pos.started || value.is_safe() || value.is_undefined() {
        return minijinja::escape_formatter(out, state, value);
    }
    let text = value.to_string();
    if !pos.query && is_dot_segment(&text) {
        return Err(dot_segment_error(&text));
    }
    out.write_str(&url_encode(&text, false))
        .map_err(|_| Error::new(ErrorKind::WriteFailure, "cannot write the URL"))
}

/// `| path`: a value that is several path segments (`owner/repo`): `/`
/// stays, everything else is encoded as by default, and `.`/`..`
/// segments are refused.
fn path_filter(v: Value) -> Result<Value, Error> {
    let text = v.to_string();
    if text.split('/').any(is_dot_segment) {
        return Err(dot_segment_error(&text));
    }
    Ok(Value::from_safe_string(url_encode(&text, true)))
}

/// The writer of every render: refuses to grow past [`MAX_OUTPUT`], and
/// follows the position in a URL for [`url_formatter`].
struct Sink {
    buf: Vec<u8>,
    over: bool,
}

impl std::io::Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > MAX_OUTPUT {
            self.over = true;
            return Err(std::io::Error::other("template output limit"));
        }
        self.buf.extend_from_slice(b);
        URL_POS.with(|c| {
            if let Some(mut p) = c.get() {
                p.started |= b.iter().any(|c| !c.is_ascii_whitespace());
                p.query |= b.iter().any(|c| matches!(c, b'?' | b'#'));
                c.set(Some(p));
            }
        });
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The template a condition compiles to: rendering it yields `1` exactly when
/// the expression is truthy, so a condition is compiled once like any template.
fn condition_source(expr: &str) -> String {
    format!("{{% if ({expr}) %}}1{{% endif %}}")
}

/// Checks a template's syntax; the error says what is wrong.
/// Every check compiles the bounded rewrite (see [`bounded_source`]), never
/// the text as written, whose constant operations would be folded while it
/// compiles.
pub fn check_template(source: &str) -> Result<(), TemplateError> {
    let source = bounded_source(source)?;
    environment()
        .template_from_str(&source)
        .map(|_| ())
        .map_err(|e| TemplateError::from(&e))
}

/// Checks a condition's syntax.
pub fn check_condition(expr: &str) -> Result<(), TemplateError> {
    let expr = bounded_expr(expr)?;
    environment()
        .compile_expression(&expr)
        .map(|_| ())
        .map_err(|e| TemplateError::from(&e))
}

/// Top-level variables a template reads, to catch typos at load time.
pub fn variables_of_template(source: &str) -> BTreeSet<String> {
    let Ok(source) = bounded_source(source) else {
        return BTreeSet::new();
    };
    environment()
        .template_from_str(&source)
        .map(|t| without_functions(t.undeclared_variables(false)))
        .unwrap_or_default()
}

/// Top-level variables a condition reads.
pub fn variables_of_condition(expr: &str) -> BTreeSet<String> {
    let Ok(expr) = bounded_expr(expr) else {
        return BTreeSet::new();
    };
    environment()
        .compile_expression(&expr)
        .map(|t| without_functions(t.undeclared_variables(false)))
        .unwrap_or_default()
}

/// A minijinja error as one line, with its cause and without the template name.
pub fn describe(e: &minijinja::Error) -> String {
    let mut out = e.kind().to_string();
    if let Some(detail) = e.detail() {
        out.push_str(": ");
        out.push_str(detail);
    }
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

/// Renders template `name` of `env` into a bounded [`Sink`], as a URL when
/// `url` says so.
fn render_with(
    env: &Environment<'static>,
    name: &str,
    ctx: &Value,
    url: bool,
) -> Result<String, Error> {
    let t = env.get_template(name)?;
    let mut sink = Sink {
        buf: Vec::new(),
        over: false,
    };
    URL_POS.with(|c| c.set(url.then(UrlPos::default)));
    let result = t.render_captured_to(ctx, &mut sink).map(|_| ());
    URL_POS.with(|c| c.set(None));
    match result {
        Ok(_) => String::from_utf8(sink.buf).map_err(|_| {
            Error::new(
                ErrorKind::InvalidOperation,
                "the template wrote invalid UTF-8",
            )
        }),
        Err(_) if sink.over => Err(too_long("the template's output")),
        Err(e) => Err(e),
    }
}

impl Engine {
    pub fn new() -> Self {
        let mut inline = environment();
        inline.set_fuel(Some(INLINE_FUEL));
        Engine {
            env: environment(),
            inline,
            next: 0,
        }
    }

    fn add(&mut self, source: String) -> Result<String, TemplateError> {
        let source = bounded_source(&source)?;
        let name = format!("t{}", self.next);
        self.next += 1;
        self.env
            .add_template_owned(name.clone(), source.clone())
            .map_err(|e| TemplateError::from(&e))?;
        self.inline
            .add_template_owned(name.clone(), source)
            .map_err(|e| TemplateError::from(&e))?;
        Ok(name)
    }

    /// Compiles a template (already syntax-checked at load).
    pub fn template(&mut self, source: &str) -> Result<Tpl, TemplateError> {
        self.add(source.to_string()).map(Tpl)
    }

    /// Compiles a `when` condition.
    pub fn condition(&mut self, expr: &str) -> Result<Cond, TemplateError> {
        self.add(condition_source(expr)).map(Cond)
    }

    /// Renders a template with `ctx`.
    ///
    /// The rendering methods give a [`TemplateError`]; where it becomes
    /// the `detail` of the poll's error (`connector::fetch::PollError`),
    /// its message is the text.
    pub fn render(&self, tpl: &Tpl, ctx: &Value) -> Result<String, TemplateError> {
        self.run(&tpl.0, ctx, false)
    }

    /// Renders a URL template with `ctx`: values after the start are
    /// percent-encoded (see `url_formatter`), so a param or a discovered
    /// value cannot redirect the request to another path.
    pub fn render_url(&self, tpl: &Tpl, ctx: &Value) -> Result<String, TemplateError> {
        self.run(&tpl.0, ctx, true)
    }

    /// One bounded render: on the calling thread with [`INLINE_FUEL`], and
    /// when that runs out, again with [`FUEL`] under `block_in_place` (on a
    /// worker of a multi-threaded runtime: the daemon, `pollhook test`):
    /// fuel bounds the instructions, not what one instruction costs
    /// (`'x' * 10**8` is one), so a hostile template can still take a
    /// while; meanwhile the worker's other tasks (other instances,
    /// `/healthz`, the signal handler) move to another thread instead of
    /// waiting behind it.
    ///
    /// Templates are pure, so the inline attempt that ran out of its small
    /// fuel changes nothing and the second render gives the same output.
    fn run(&self, name: &str, ctx: &Value, url: bool) -> Result<String, TemplateError> {
        match render_with(&self.inline, name, ctx, url) {
            Err(e) if e.kind() == ErrorKind::OutOfFuel => {}
            done => return done.map_err(|e| explain(&e)),
        }
        let render = || render_with(&self.env, name, ctx, url);
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let result = if multi_thread {
            tokio::task::block_in_place(render)
        } else {
            render()
        };
        result.map_err(|e| explain(&e))
    }

    /// Compiles a value template (see [`ValueTpl`]).
    pub fn value_template(&mut self, v: &serde_json::Value) -> Result<ValueTpl, TemplateError> {
        Ok(match v {
            serde_json::Value::String(s) if is_template(s) => match lone_expression(s) {
                Some(expr) => {
                    ValueTpl::Native(self.template(&format!("{{{{ ({expr}) | tojson }}}}"))?)
                }
                None => ValueTpl::Text(self.template(s)?),
            },
            serde_json::Value::Array(a) => ValueTpl::Array(
                a.iter()
                    .map(|x| self.value_template(x))
                    .collect::<Result<_, _>>()?,
            ),
            serde_json::Value::Object(o) => ValueTpl::Object(
                o.iter()
                    .map(|(k, x)| Ok((k.clone(), self.value_template(x)?)))
                    .collect::<Result<_, TemplateError>>()?,
            ),
            other => ValueTpl::Literal(other.clone()),
        })
    }

    /// Renders a value template with `ctx`.
    pub fn render_value(
        &self,
        t: &ValueTpl,
        ctx: &Value,
    ) -> Result<serde_json::Value, TemplateError> {
        Ok(match t {
            ValueTpl::Literal(v) => v.clone(),
            ValueTpl::Text(t) => serde_json::Value::String(self.run(&t.0, ctx, false)?),
            ValueTpl::Native(t) => {
                let text = self.run(&t.0, ctx, false)?;
                serde_json::from_str(&text).map_err(|e| TemplateError::ReadBack {
                    error: e.to_string(),
                    text,
                })?
            }
            ValueTpl::Array(a) => serde_json::Value::Array(
                a.iter()
                    .map(|x| self.render_value(x, ctx))
                    .collect::<Result<_, _>>()?,
            ),
            ValueTpl::Object(o) => serde_json::Value::Object(
                o.iter()
                    .map(|(k, x)| Ok((k.clone(), self.render_value(x, ctx)?)))
                    .collect::<Result<_, TemplateError>>()?,
            ),
        })
    }

    /// Whether `tpl` renders the same text every time its variables other
    /// than `now` hold the same values: it reads neither `now` nor
    /// `uuid()` (every other function and filter is pure). What lets a
    /// poll task send its last request again without rendering it (see
    /// `connector::fetch::Memo`).
    ///
    /// Decided by the words of the template's text, not by minijinja's
    /// analysis of the variables it reads (`undeclared_variables`), which
    /// missed `now` in an `{% else %}` branch: a word anywhere (a string,
    /// a comment) only makes the request be made afresh at every poll,
    /// while a miss would send a stale time.
    pub fn is_steady(&self, tpl: &Tpl) -> bool {
        self.env.get_template(&tpl.0).is_ok_and(|t| {
            !t.source()
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .any(|word| UNSTEADY.contains(&word))
        })
    }

    /// [`Engine::is_steady`] for every template of a value template.
    pub fn is_steady_value(&self, t: &ValueTpl) -> bool {
        match t {
            ValueTpl::Literal(_) => true,
            ValueTpl::Text(t) | ValueTpl::Native(t) => self.is_steady(t),
            ValueTpl::Array(a) => a.iter().all(|x| self.is_steady_value(x)),
            ValueTpl::Object(o) => o.iter().all(|(_, x)| self.is_steady_value(x)),
        }
    }

    /// Evaluates a condition with `ctx`.
    pub fn test(&self, cond: &Cond, ctx: &Value) -> Result<bool, TemplateError> {
        Ok(self.run(&cond.0, ctx, false)? == "1")
    }
}

/// A render's error: running out of fuel is the template's limit, anything
/// else minijinja's message.
fn explain(e: &Error) -> TemplateError {
    match e.kind() {
        ErrorKind::OutOfFuel => TemplateError::OutOfFuel,
        _ => TemplateError::from(e),
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod uuid_tests {
    use super::*;

    #[test]
    fn uuid_v4_sets_version_and_variant_and_keeps_the_rest() {
        assert_eq!(uuid_v4([0; 16]), "00000000-0000-4000-8000-000000000000");
        assert_eq!(uuid_v4([0xff; 16]), "ffffffff-ffff-4fff-bfff-ffffffffffff");
    }

    #[test]
    fn uuid_renders_fresh_ids_and_is_no_variable_to_declare() {
        let mut e = Engine::new();
        let t = e.template("{{ uuid() }}").unwrap();
        let ctx = Value::from_serialize(serde_json::json!({}));
        let (a, b) = (e.render(&t, &ctx).unwrap(), e.render(&t, &ctx).unwrap());
        assert_ne!(a, b);
        for id in [&a, &b] {
            let parts: Vec<usize> = id.split('-').map(str::len).collect();
            assert_eq!(parts, [8, 4, 4, 4, 12], "{id}");
            assert_eq!(&id[14..15], "4", "{id}");
            assert!("89ab".contains(&id[19..20]), "{id}");
        }
        assert!(variables_of_template("{{ uuid() }}-{{ acct }}")
            .into_iter()
            .eq(["acct".to_string()]));
        assert!(variables_of_condition("uuid() != acct")
            .into_iter()
            .eq(["acct".to_string()]));
    }
}
