//! Unit tests of `template` (kept apart so the module reads as one room).

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
        .to_string()
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

fn ctx(v: serde_json::Value) -> Value {
    Value::from_serialize(v)
}

#[test]
fn runaway_templates_are_stopped_with_a_clear_error() {
    let mut e = Engine::new();
    let long = "x".repeat(10_000);
    let c = ctx(serde_json::json!({ "s": long }));
    // 10^8 iterations: stopped by fuel, in about a second at most.
    let loops = e
        .template("{% for a in s %}{% for b in s %}{{ '' }}{% endfor %}{% endfor %}")
        .unwrap();
    let started = std::time::Instant::now();
    let err = e.render(&loops, &c).unwrap_err().to_string();
    assert!(
        err.contains("instructions") && err.contains("template limit"),
        "{err}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    // A chain of `replace` multiplying the length (8 GB unchecked).
    let chain = e
        .template("{{ s | replace('x', s) | replace('x', s) | replace('x', s) }}")
        .unwrap();
    let err = e.render(&chain, &c).unwrap_err().to_string();
    assert!(
        err.contains("replace") && err.contains("template limit"),
        "{err}"
    );
    for t in [
        "{{ range(100000) | join(s) }}",
        "{{ s | center(2000000000) }}",
        "{{ s | indent(2000000000) }}",
        "{{ 1 | tojson(indent=10000000000) }}",
        "{{ 1 | tojson(10000000000) }}",
        "{{ '%10000000000s' | format(1) }}",
    ] {
        let t = e.template(t).unwrap();
        let err = e.render(&t, &c).unwrap_err().to_string();
        assert!(err.contains("template limit"), "{err}");
    }
    // Output past the cap, in a loop that fits the fuel.
    let big = e
        .template("{% for i in range(2000) %}{{ s }}{% endfor %}")
        .unwrap();
    let err = e.render(&big, &c).unwrap_err().to_string();
    assert!(err.contains("longer than"), "{err}");
    // A condition is a render too.
    let cond = e
        .condition("(s | replace('x', s) | replace('x', s)) != ''")
        .unwrap();
    assert!(e
        .test(&cond, &c)
        .unwrap_err()
        .to_string()
        .contains("template limit"));
    // Unbounded recursion: macros (which capture their output beyond
    // the output cap) are refused at load.
    assert!(e
        .template("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}")
        .is_err());
    // Ordinary templates and ordinary filters still work.
    let ok = e
            .template("{{ 'a-b' | replace('-', '+') }} {{ [1, 2] | join(',') }} [{{ 'x' | center(3) }}] {{ 'a\nb' | indent(2) }} {{ [1] | tojson(indent=1) }} {{ '%3s|%s' | format(1, 'b') }}")
            .unwrap();
    assert_eq!(
        e.render(&ok, &c).unwrap(),
        "a+b 1,2 [ x ] a\n  b [\n 1\n]   1|b"
    );
}

#[test]
fn output_captured_beyond_the_cap_is_refused_at_load() {
    // Each of these renders its body into minijinja's own buffer, which
    // the output cap does not reach: a loop inside built gigabytes.
    for (t, kind) in [
            ("{% set s %}{% for i in range(1000) %}{{ 'x' * 10000000 }}{% endfor %}{% endset %}{{ s | length }}", "{% set %}"),
            ("{% filter upper %}{% for i in range(1000) %}{{ 'x' * 10000000 }}{% endfor %}{% endfilter %}", "{% filter %}"),
            ("{% macro f() %}{% for i in range(1000) %}{{ 'x' * 10000000 }}{% endfor %}{% endmacro %}{{ f() | length }}", "{% macro %}"),
            ("{% macro f() %}{{ caller() }}{% endmacro %}{% call f() %}x{% endcall %}", "{% macro %}"),
        ] {
            let err = check_template(t).unwrap_err().to_string();
            assert!(err.contains(kind) && err.contains("template limit"), "{t}: {err}");
            assert!(Engine::new().template(t).is_err(), "{t}");
        }
    // An inline `set` is no capture.
    check_template("{% set s = 'ab' %}{{ s }}").unwrap();
}

#[test]
fn concatenation_and_repetition_are_bounded_while_they_build() {
    let mut e = Engine::new();
    let c = ctx(serde_json::json!({ "cik": "320193", "a": "x", "b": "y", "l": [1, 2] }));
    let doubling = |op: &str, n: usize| {
        let mut t = "{% set s = 'x' * 10000000 %}".to_string();
        for _ in 0..n {
            t.push_str(&format!("{{% set s = s {op} s %}}"));
        }
        t + "{{ s | length }}"
    };
    for t in [
            doubling("~", 8),
            doubling("+", 8),
            "{% set ns = namespace(s='x' * 1000000) %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}".to_string(),
            "{{ ('x' * 99000000) | length }}".to_string(),
            // Constants: folded while compiling, unless bounded.
            "{{ ((('x' * 99999999) ~ ('x' * 99999999)) ~ (('x' * 99999999) ~ ('x' * 99999999))) ~ ((('x' * 99999999) ~ ('x' * 99999999)) ~ (('x' * 99999999) ~ ('x' * 99999999))) }}".to_string(),
        ] {
            let started = std::time::Instant::now();
            check_template(&t).unwrap();
            let tpl = e.template(&t).unwrap();
            let err = e.render(&tpl, &c).unwrap_err().to_string();
            assert!(err.contains("template limit"), "{t}: {err}");
            assert!(
                started.elapsed() < std::time::Duration::from_millis(900),
                "{t}: {:?}",
                started.elapsed()
            );
        }
    // Ordinary uses are unchanged.
    for (t, want) in [
        ("{{ ('0000000000' ~ cik)[-10:] }}", "0000320193"),
        ("{{ a ~ b ~ a }}", "xyx"),
        ("{{ a ~ b | upper }}", "xY"),
        ("{{ 1 + 2 * 3 }}", "7"),
        ("{{ (l + [3]) | join(',') }}", "1,2,3"),
        ("{{ 'ab' * 2 }}", "abab"),
        ("{% if (a ~ b) == 'xy' %}yes{% endif %}", "yes"),
        ("{% for x in l + l %}{{ x }}{% endfor %}", "1212"),
    ] {
        let tpl = e.template(t).unwrap();
        assert_eq!(e.render(&tpl, &c).unwrap(), want, "{t}");
    }
    let cond = e.condition("a ~ b == 'xy'").unwrap();
    assert!(e.test(&cond, &c).unwrap());
    let v = e
        .value_template(&serde_json::json!({ "n": "{{ 2 * 21 }}", "s": "{{ a ~ b }}" }))
        .unwrap();
    assert_eq!(
        e.render_value(&v, &c).unwrap(),
        serde_json::json!({ "n": 42, "s": "xy" })
    );
}

#[test]
fn heavy_renders_on_a_runtime_do_not_starve_it() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut e = Engine::new();
        let t = e
            .template("{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}")
            .unwrap();
        let e = std::sync::Arc::new(e);
        let c = ctx(serde_json::json!({ "s": "x".repeat(10_000) }));
        let render = tokio::spawn({
            let e = e.clone();
            async move { e.render(&t, &c) }
        });
        // With the only worker rendering, this timer still fires: the
        // render moved off the worker.
        let ticks = tokio::spawn(async {
            let mut n = 0;
            for _ in 0..5 {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                n += 1;
            }
            n
        });
        assert_eq!(ticks.await.unwrap(), 5);
        assert!(render.await.unwrap().is_err());
    });
}

#[test]
fn url_encoding_keeps_exactly_the_harmless_ascii_bytes() {
    for b in 0u8..128 {
        let c = (b as char).to_string();
        let kept = b.is_ascii_alphanumeric() || b"-._~:@!$'()*,".contains(&b);
        let encoded = format!("%{b:02X}");
        let want = if kept { &c } else { &encoded };
        assert_eq!(&url_encode(&c, false), want, "byte {b}");
        let want = if kept || b == b'/' { &c } else { &encoded };
        assert_eq!(&url_encode(&c, true), want, "byte {b} (path)");
    }
    assert_eq!(url_encode("é/ü", true), "%C3%A9/%C3%BC");
}

#[test]
fn url_values_stay_in_their_segment_unless_they_begin_the_url() {
    let mut e = Engine::new();
    let url = e
        .template("{{ base_url }}/accounts/{{ acct }}/balance?since={{ since }}")
        .unwrap();
    let c = ctx(serde_json::json!({
        "base_url": "http://bank:8080/v2?x=1",
        "acct": "../../admin/delete?all=1#",
        "since": "2026-01-01T00:00:00+01:00&limit=1",
    }));
    assert_eq!(
            e.render_url(&url, &c).unwrap(),
            "http://bank:8080/v2?x=1/accounts/..%2F..%2Fadmin%2Fdelete%3Fall%3D1%23/balance?since=2026-01-01T00:00:00%2B01:00%26limit%3D1"
        );
    // The same template outside URLs, and opting out, write the text.
    assert!(e
        .render(&url, &c)
        .unwrap()
        .contains("/accounts/../../admin"));
    let raw = e
        .template("{{ base_url }}/{{ path | raw }}/{{ repo | path }}")
        .unwrap();
    let c = ctx(serde_json::json!({
        "base_url": "http://h", "path": "a/b?c", "repo": "owner/na me"
    }));
    assert_eq!(
        e.render_url(&raw, &c).unwrap(),
        "http://h/a/b?c/owner/na%20me"
    );
    // Leading blanks are not a start; `.`/`..` cannot be a segment.
    let lead = e.template("  {{ base_url }}/{{ acct }}").unwrap();
    let dots = ctx(serde_json::json!({ "base_url": "http://h", "acct": ".." }));
    assert!(e
        .render_url(&lead, &dots)
        .unwrap_err()
        .to_string()
        .contains("`..`"));
    let c = ctx(serde_json::json!({ "base_url": "http://h", "repo": "a/../b" }));
    let p = e.template("{{ base_url }}/{{ repo | path }}").unwrap();
    assert!(e.render_url(&p, &c).is_err());
}

#[test]
fn a_template_reading_the_time_or_a_uuid_is_not_steady() {
    let mut e = Engine::new();
    let steady = e
        .template("{{ base }}/a/{{ acc | upper }}?c={{ cursor }}&k={{ nowhere }}")
        .unwrap();
    assert!(e.is_steady(&steady), "`nowhere` is not `now`");
    for unsteady in [
        "{{ base }}?since={{ now }}",
        "{% if cursor %}{{ cursor }}{% else %}{{ now[:10] }}{% endif %}",
        "{% for x in range(2) %}{{ now }}{% endfor %}",
        "{% set t = now %}{{ t }}",
        "{{ uuid() }}",
        "{{ debug() }}",
        "{# now #}{{ base }}",
    ] {
        let t = e.template(unsteady).unwrap();
        assert!(!e.is_steady(&t), "{unsteady}");
    }
    let body = e
        .value_template(&serde_json::json!({"q": {"id": "{{ acc }}", "n": [1, "{{ cursor }}"]}}))
        .unwrap();
    assert!(e.is_steady_value(&body));
    let stamped = e
        .value_template(&serde_json::json!({"q": {"id": "{{ acc }}", "n": [1, "at {{ now }}"]}}))
        .unwrap();
    assert!(!e.is_steady_value(&stamped));
    assert!(e.is_steady_value(&ValueTpl::Literal(serde_json::json!(1))));
}
