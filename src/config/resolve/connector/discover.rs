//! `discover:`, resolved as a listing connector of its own (see
//! [`Discover`]).

use serde_saphyr::Spanned;

use super::{resolve_connector, Cx};
use crate::config::raw::{RawConnector, RawDiscover, RawEmit};
use crate::connector::spec::{DetectMode, Discover};
use crate::schedule::Schedule;
use crate::template;

/// The listing connector and the instances' param templates; `None` when
/// the listing does not resolve (its errors are reported under `discover.`).
pub(super) fn resolve_discover(
    cx: &mut Cx,
    raw: &RawConnector,
    d: &RawDiscover,
    name: &str,
) -> Option<Discover> {
    let lister_raw = lister_of(raw, d, name);
    let mut lister = match resolve_connector(cx.diag.file, cx.diag.text, &lister_raw, Some(name)) {
        Ok(c) => c,
        Err(e) => {
            cx.diag.extend_under("discover.", e);
            return None;
        }
    };
    let mut with = Vec::new();
    for (k, t) in &d.with {
        let field = format!("discover.with.{k}");
        if !cx.params.contains(k) {
            let declared = cx.params.iter().cloned().collect::<Vec<_>>().join(", ");
            cx.diag.at_span(
                t,
                &field,
                format!("no param `{k}` is declared; declared: {declared}"),
            );
            continue;
        }
        cx.check_vars(
            &template::variables_of_template(&t.value.0),
            &["item", "now"],
            t,
            &field,
        );
        // Compiled into the lister's engine: rendered over its items.
        match lister.engine.template(&t.value.0) {
            Ok(tpl) => with.push((k.clone(), tpl)),
            Err(e) => cx.diag.at_span(t, &field, e.to_string()),
        }
    }
    Some(Discover {
        lister: Box::new(lister),
        with,
        schedule: d
            .schedule
            .as_ref()
            .map(|s| s.0.clone())
            .unwrap_or_else(|| Schedule::parse("every 10m").expect("valid")),
    })
}

/// The `discover:` block as a connector: `detect: new` over its `items`,
/// whose `id` is the instance name, with the connector's params and quota.
fn lister_of(raw: &RawConnector, d: &RawDiscover, name: &str) -> RawConnector {
    RawConnector {
        name: Some(Spanned {
            value: format!("{name}/discover"),
            referenced: d.name.referenced,
            defined: d.name.defined,
        }),
        description: None,
        params: raw.params.clone(),
        schedule: None,
        rate_limit: raw.rate_limit,
        // A listing's schedule is the discovery's own.
        poll_hints: Some(false),
        request: d.request.clone(),
        discover: None,
        response: d.response.clone(),
        paginate: d.paginate.clone(),
        items: Some(d.items.clone()),
        columnar: None,
        id: Some(d.name.clone()),
        version: None,
        watch: None,
        watch_key: None,
        watch_value: None,
        cursor: None,
        detect: Spanned {
            value: DetectMode::New,
            referenced: d.items.referenced,
            defined: d.items.defined,
        },
        baseline: None,
        seen_limit: None,
        seen_ttl: None,
        emit: vec![RawEmit {
            kind: Spanned {
                value: "discovered".into(),
                referenced: d.name.referenced,
                defined: d.name.defined,
            },
            when: None,
            data: None,
        }],
    }
}
