//! The one template language of connectors (Jinja-style, by minijinja):
//! URLs, query values, headers, bodies, ids, cursors and `when` conditions.
//!
//! Templates are checked for syntax when the config is read (see
//! [`check_template`]) and compiled once into an [`Engine`] per connector, so
//! the poll loop only renders.

use std::collections::BTreeSet;

use minijinja::{Environment, UndefinedBehavior, Value};

/// Compiled templates of one connector.
///
/// Why one environment per connector: template names are private to the
/// connector, and a reload swaps whole connectors, so nothing is shared
/// across them.
pub struct Engine {
    env: Environment<'static>,
    next: usize,
}

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

/// Checks the syntax of every string of a value template.
pub fn check_value(v: &serde_json::Value) -> Result<(), String> {
    let mut err = None;
    walk_strings(v, &mut |s| {
        if err.is_none() {
            if let Err(e) = check_template(s) {
                err = Some(format!("invalid template `{s}`: {e}"));
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
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    // No auto-escaping: these are URLs, JSON and headers, not HTML.
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.set_keep_trailing_newline(true);
    env
}

/// The template a condition compiles to: rendering it yields `1` exactly when
/// the expression is truthy, so a condition is compiled once like any template.
fn condition_source(expr: &str) -> String {
    format!("{{% if ({expr}) %}}1{{% endif %}}")
}

/// Checks a template's syntax; the error says what is wrong.
pub fn check_template(source: &str) -> Result<(), String> {
    environment()
        .template_from_str(source)
        .map(|_| ())
        .map_err(|e| describe(&e))
}

/// Checks a condition's syntax.
pub fn check_condition(expr: &str) -> Result<(), String> {
    environment()
        .compile_expression(expr)
        .map(|_| ())
        .map_err(|e| describe(&e))
}

/// Top-level variables a template reads, to catch typos at load time.
pub fn variables_of_template(source: &str) -> BTreeSet<String> {
    environment()
        .template_from_str(source)
        .map(|t| t.undeclared_variables(false).into_iter().collect())
        .unwrap_or_default()
}

/// Top-level variables a condition reads.
pub fn variables_of_condition(expr: &str) -> BTreeSet<String> {
    environment()
        .compile_expression(expr)
        .map(|t| t.undeclared_variables(false).into_iter().collect())
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

impl Engine {
    pub fn new() -> Self {
        Engine {
            env: environment(),
            next: 0,
        }
    }

    fn add(&mut self, source: String) -> Result<String, String> {
        let name = format!("t{}", self.next);
        self.next += 1;
        self.env
            .add_template_owned(name.clone(), source)
            .map_err(|e| describe(&e))?;
        Ok(name)
    }

    /// Compiles a template (already syntax-checked at load).
    pub fn template(&mut self, source: &str) -> Result<Tpl, String> {
        self.add(source.to_string()).map(Tpl)
    }

    /// Compiles a `when` condition.
    pub fn condition(&mut self, expr: &str) -> Result<Cond, String> {
        self.add(condition_source(expr)).map(Cond)
    }

    /// Renders a template with `ctx`.
    pub fn render(&self, tpl: &Tpl, ctx: &Value) -> Result<String, String> {
        let t = self.env.get_template(&tpl.0).map_err(|e| describe(&e))?;
        t.render(ctx).map_err(|e| describe(&e))
    }

    /// Compiles a value template (see [`ValueTpl`]).
    pub fn value_template(&mut self, v: &serde_json::Value) -> Result<ValueTpl, String> {
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
                    .collect::<Result<_, String>>()?,
            ),
            other => ValueTpl::Literal(other.clone()),
        })
    }

    /// Renders a value template with `ctx`.
    pub fn render_value(&self, t: &ValueTpl, ctx: &Value) -> Result<serde_json::Value, String> {
        Ok(match t {
            ValueTpl::Literal(v) => v.clone(),
            ValueTpl::Text(t) => serde_json::Value::String(self.render(t, ctx)?),
            ValueTpl::Native(t) => {
                let text = self.render(t, ctx)?;
                serde_json::from_str(&text)
                    .map_err(|e| format!("cannot read back `{text}`: {e}"))?
            }
            ValueTpl::Array(a) => serde_json::Value::Array(
                a.iter()
                    .map(|x| self.render_value(x, ctx))
                    .collect::<Result<_, _>>()?,
            ),
            ValueTpl::Object(o) => serde_json::Value::Object(
                o.iter()
                    .map(|(k, x)| Ok((k.clone(), self.render_value(x, ctx)?)))
                    .collect::<Result<_, String>>()?,
            ),
        })
    }

    /// Evaluates a condition with `ctx`.
    pub fn test(&self, cond: &Cond, ctx: &Value) -> Result<bool, String> {
        let t = self.env.get_template(&cond.0).map_err(|e| describe(&e))?;
        Ok(t.render(ctx).map_err(|e| describe(&e))? == "1")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_tests() {
        let mut e = Engine::new();
        let url = e.template("{{ base }}/a/{{ acc }}").unwrap();
        let ctx = Value::from_serialize(serde_json::json!({"base": "http://x", "acc": "acc-1"}));
        assert_eq!(e.render(&url, &ctx).unwrap(), "http://x/a/acc-1");

        let c = e
            .condition("current.available < low and previous.available >= low")
            .unwrap();
        let yes = Value::from_serialize(serde_json::json!({
            "low": 100, "previous": {"available": 120.5}, "current": {"available": 99}
        }));
        let no = Value::from_serialize(serde_json::json!({
            "low": 100, "previous": {"available": 90}, "current": {"available": 80}
        }));
        assert!(e.test(&c, &yes).unwrap());
        assert!(!e.test(&c, &no).unwrap());
    }

    #[test]
    fn value_templates_keep_native_types() {
        let mut e = Engine::new();
        let src = serde_json::json!({
            "method": "search",
            "params": {"since": "{{ cursor }}", "limit": "{{ n }}", "item": "{{ item }}", "label": "n={{ n }}"},
            "fixed": [1, true, null]
        });
        check_value(&src).unwrap();
        let vars = variables_of_value(&src);
        assert_eq!(
            vars.into_iter().collect::<Vec<_>>(),
            ["cursor", "item", "n"]
        );
        let t = e.value_template(&src).unwrap();
        let ctx =
            Value::from_serialize(serde_json::json!({"cursor": "c1", "n": 50, "item": {"a": [1]}}));
        assert_eq!(
            e.render_value(&t, &ctx).unwrap(),
            serde_json::json!({
                "method": "search",
                "params": {"since": "c1", "limit": 50, "item": {"a": [1]}, "label": "n=50"},
                "fixed": [1, true, null]
            })
        );
        assert!(e
            .render_value(&t, &Value::from_serialize(serde_json::json!({})))
            .is_err());
    }

    #[test]
    fn undefined_variables_are_errors_but_default_works() {
        let mut e = Engine::new();
        let t = e.template("{{ nope }}").unwrap();
        assert!(e
            .render(&t, &Value::from(()))
            .unwrap_err()
            .contains("undefined"));
        let d = e.template("{{ cursor | default('') }}").unwrap();
        assert_eq!(
            e.render(&d, &Value::from_serialize(serde_json::json!({})))
                .unwrap(),
            ""
        );
    }

    #[test]
    fn syntax_errors_and_variables_are_reported_at_load() {
        assert!(check_template("{{ a ").is_err());
        assert!(check_condition("a <").is_err());
        let vars = variables_of_template("{{ base_url }}/{{ item.id }}");
        assert!(vars.contains("base_url") && vars.contains("item"));
    }
}
