use serde_json::json;

use super::*;
use crate::connector::curl::parse_curl;

fn paging(headers: &[(&str, &str)], body: Value, query: &[(&str, &str)]) -> Option<Paging> {
    let h: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let q: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    guess_paging(&h, &body, &q)
}

#[test]
fn link_header_paging() {
    let p = paging(
        &[(
            "Link",
            "<https://x/i?page=2>; rel=\"next\", <https://x/i?page=9>; rel=\"last\"",
        )],
        json!([{"id": 1}]),
        &[],
    )
    .unwrap();
    assert_eq!(p.yaml, "{ link_header: true, max_pages: 20 }");
    // A Link header without `next` is no paging.
    assert_eq!(
        paging(
            &[("link", "<https://x/i?page=1>; rel=\"prev\"")],
            json!([{"id": 1}]),
            &[]
        ),
        None
    );
}

#[test]
fn next_url_paging_top_level_nested_and_hal() {
    let p = paging(
        &[],
        json!({"results": [], "next": "https://x/?page=2"}),
        &[],
    )
    .unwrap();
    assert_eq!(p.yaml, "{ next_url: \"$.next\", max_pages: 20 }");
    // The last page of a DRF-style API: `next: null` is still the style.
    let p = paging(&[], json!({"results": [], "next": null}), &[]).unwrap();
    assert_eq!(p.yaml, "{ next_url: \"$.next\", max_pages: 20 }");
    let p = paging(&[], json!({"data": [], "links": {"next": "/a?p=2"}}), &[]).unwrap();
    assert_eq!(p.yaml, "{ next_url: \"$.links.next\", max_pages: 20 }");
    let p = paging(
        &[],
        json!({"data": [], "_links": {"next": {"href": "/a?p=2"}}}),
        &[],
    )
    .unwrap();
    assert_eq!(
        p.yaml,
        "{ next_url: \"$._links.next.href\", max_pages: 20 }"
    );
    let p = paging(
        &[],
        json!({"items": [], "next_page_url": "https://x/2"}),
        &[],
    )
    .unwrap();
    assert_eq!(p.yaml, "{ next_url: \"$.next_page_url\", max_pages: 20 }");
}

#[test]
fn cursor_paging_names_the_param() {
    let p = paging(&[], json!({"data": [{"id": 1}], "next_cursor": "abc"}), &[]).unwrap();
    assert_eq!(
        p.yaml,
        "{ cursor_from: \"$.next_cursor\", param: \"cursor\", max_pages: 20 }"
    );
    assert_eq!(p.pager_params, ["cursor"]);
    let p = paging(
        &[],
        json!({"items": [], "nextPageToken": "t"}),
        &[("pageSize", "10")],
    )
    .unwrap();
    assert!(p.yaml.contains("param: \"pageToken\""), "{}", p.yaml);
    // Slack-style: nested, and the request already says which param.
    let p = paging(
        &[],
        json!({"members": [], "response_metadata": {"next_cursor": "dXNlcg=="}}),
        &[("after", "x")],
    )
    .unwrap();
    assert_eq!(
        p.yaml,
        "{ cursor_from: \"$.response_metadata.next_cursor\", param: \"after\", max_pages: 20 }"
    );
}

#[test]
fn page_number_paging_from_the_query_or_the_body() {
    let p = paging(
        &[],
        json!([{"id": 1}]),
        &[("page", "1"), ("per_page", "50")],
    )
    .unwrap();
    assert_eq!(
        p.yaml,
        "{ page: { param: \"page\", size_param: \"per_page\", size: 50 }, max_pages: 20 }"
    );
    assert_eq!(p.pager_params, ["page", "per_page"]);
    let p = paging(&[], json!([{"id": 1}]), &[("page", "0")]).unwrap();
    assert!(p.yaml.contains("start: 0"), "{}", p.yaml);
    let p = paging(
        &[],
        json!({"data": [{"id": 1}], "meta": {"page": 1, "total_pages": 4}}),
        &[],
    )
    .unwrap();
    assert_eq!(p.yaml, "{ page: { param: \"page\" }, max_pages: 20 }");
    // Nothing that looks like paging.
    assert_eq!(
        paging(&[], json!({"data": [{"id": 1}], "count": 1}), &[]),
        None
    );
}

#[test]
fn items_path_root_array_preferred_key_largest_list_and_xml() {
    assert_eq!(
        find_items(&json!([1, 2]), false).unwrap().jsonpath(),
        "$[*]"
    );
    // `data` wins over a larger array under an unknown key.
    let body = json!({"data": [{"id": 1}], "included": [{"a": 1}, {"a": 2}, {"a": 3}]});
    assert_eq!(find_items(&body, false).unwrap().jsonpath(), "$.data[*]");
    // No preferred key: the largest array of objects, however deep.
    let body =
        json!({"x": [{"a": 1}], "wrap": {"things": [{"a": 1}, {"a": 2}]}, "tags": ["a", "b", "c"]});
    assert_eq!(
        find_items(&body, false).unwrap().jsonpath(),
        "$.wrap.things[*]"
    );
    // GeoJSON.
    let body = json!({"type": "FeatureCollection", "features": [{"id": "a", "properties": {"updated": 1}}]});
    assert_eq!(
        find_items(&body, false).unwrap().jsonpath(),
        "$.features[*]"
    );
    // RSS with one item: a lone element is a list of one.
    let rss = json!({"rss": {"channel": {"title": "t", "item": {"guid": "g", "link": "l"}}}});
    let at = find_items(&rss, true).unwrap();
    assert_eq!(at.jsonpath(), "$.rss.channel.item[*]");
    assert_eq!(items_of(&rss, &at).len(), 1);
    // A single object: no items.
    assert_eq!(
        find_items(&json!({"status": {"indicator": "none"}}), false),
        None
    );
    // Keys that are not identifiers are bracketed.
    let body = json!({"odd-key": [{"id": 1}]});
    assert_eq!(
        find_items(&body, false).unwrap().jsonpath(),
        "$['odd-key'][*]"
    );
}

#[test]
fn id_guess_order_and_fallbacks() {
    let a = json!({"id": 1, "uuid": "u1", "number": 7});
    let b = json!({"id": 2, "uuid": "u2", "number": 8});
    assert_eq!(guess_id(&[&a, &b]).template, "{{ item.id }}");
    let a = json!({"number": 7, "title": "x"});
    let b = json!({"number": 8, "title": "x"});
    assert_eq!(guess_id(&[&a, &b]).template, "{{ item.number }}");
    // A `*_id` field; a repeated one (`user_id`) loses to a unique one.
    let a = json!({"user_id": 1, "order_id": 10});
    let b = json!({"user_id": 1, "order_id": 11});
    assert_eq!(guess_id(&[&a, &b]).template, "{{ item.order_id }}");
    // RSS guid.
    let a = json!({"guid": {"@isPermaLink": "false", "#text": "g"}, "link": "l"});
    assert!(guess_id(&[&a]).template.contains("item.guid['#text']"));
    // Nothing: the whole item, said so.
    let a = json!({"title": "x"});
    let g = guess_id(&[&a]);
    assert_eq!(g.template, "{{ item | tojson }}");
    assert!(g.why.contains("no id field"));
}

#[test]
fn version_guess_top_level_or_one_level_down() {
    let a = json!({"id": 1, "updatedAt": "2024-01-01"});
    assert_eq!(
        guess_version(&[&a]).unwrap().template,
        "{{ item.updatedAt }}"
    );
    let a = json!({"id": 1, "attributes": {"updated_at": "t"}});
    assert_eq!(
        guess_version(&[&a]).unwrap().template,
        "{{ item.attributes.updated_at }}"
    );
    // Missing in one item: not a version.
    let a = json!({"id": 1, "updated_at": "t"});
    let b = json!({"id": 2});
    assert_eq!(guess_version(&[&a, &b]), None);
    assert_eq!(guess_version(&[&json!({"id": 1, "created_at": "t"})]), None);
}

fn scaffold_of(cmd: &str, headers: &[(&str, &str)], body: Value) -> Scaffold {
    let req = parse_curl(cmd).unwrap();
    let h: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let seen = Observed {
        headers: &h,
        body: &body,
        xml: false,
    };
    guess("my-api", &req, &seen).unwrap()
}

#[test]
fn detect_changes_new_or_snapshot() {
    let s = scaffold_of(
        "curl https://api.example.com/v1/items",
        &[],
        json!({"data": [{"id": "a", "updated_at": "t"}], "next_cursor": null}),
    );
    assert!(s.yaml.contains("\ndetect: changes\n"), "{}", s.yaml);
    assert!(s.yaml.contains("version: \"{{ item.updated_at }}\""));
    assert!(s.yaml.contains("type: \"my_api.{{ change }}\""));
    let s = scaffold_of("curl https://x.example/feed", &[], json!([{"id": 1}]));
    assert!(s.yaml.contains("\ndetect: new\n"), "{}", s.yaml);
    assert!(s.yaml.contains("type: my_api.created"));
    let s = scaffold_of(
        "curl https://x.example/status",
        &[("ETag", "\"1\"")],
        json!({"status": "ok"}),
    );
    assert!(s.yaml.contains("\ndetect: snapshot\n"), "{}", s.yaml);
    assert!(!s.yaml.contains("items:"));
    assert!(s.yaml.contains("polls after the first are conditional"));
}

#[test]
fn secrets_become_params_and_are_never_written() {
    let s = scaffold_of(
        "curl -H 'Authorization: Bearer tok-SECRET-1' -H 'X-Tenant: acme' \
         'https://api.example.com/v1/items?state=open&api_key=key-SECRET-2' -b 'sid=cookie-SECRET-3'",
        &[],
        json!([{"id": 1}]),
    );
    for secret in ["tok-SECRET-1", "key-SECRET-2", "cookie-SECRET-3"] {
        assert!(!s.yaml.contains(secret), "{secret} written:\n{}", s.yaml);
    }
    assert!(
        s.yaml
            .contains("auth: { type: bearer, token: \"{{ token }}\" }"),
        "{}",
        s.yaml
    );
    assert!(s.yaml.contains("api_key: \"{{ api_key }}\""), "{}", s.yaml);
    assert!(s.yaml.contains("Cookie: \"{{ cookie }}\""), "{}", s.yaml);
    assert!(s.yaml.contains("X-Tenant: \"acme\""));
    assert!(s.yaml.contains("state: \"open\""));
    assert!(s.yaml.contains("token: { required: true, secret: true }"));
    assert!(s.yaml.contains("${MY_API_TOKEN}"), "{}", s.yaml);
    let secret_params: Vec<&str> = s
        .params
        .iter()
        .filter(|p| p.secret)
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(secret_params, ["token", "cookie", "api_key"]);
}

#[test]
fn basic_auth_from_u_from_the_header_and_api_key_headers() {
    let s = scaffold_of(
        "curl -u 'me:pw-SECRET' https://x.example/a",
        &[],
        json!({"a": 1}),
    );
    assert!(!s.yaml.contains("pw-SECRET"));
    assert!(s.yaml.contains(
        "auth: { type: basic, username: \"{{ username }}\", password: \"{{ password }}\" }"
    ));
    // `Basic bWU6cHctU0VDUkVU` is me:pw-SECRET.
    let s = scaffold_of(
        "curl -H 'Authorization: Basic bWU6cHctU0VDUkVU' https://x.example/a",
        &[],
        json!({"a": 1}),
    );
    assert!(!s.yaml.contains("bWU6cHctU0VDUkVU") && !s.yaml.contains("pw-SECRET"));
    assert!(s.yaml.contains("type: basic"));
    let s = scaffold_of(
        "curl -H 'X-API-Key: k-SECRET' https://x.example/a",
        &[],
        json!({"a": 1}),
    );
    assert!(!s.yaml.contains("k-SECRET"));
    assert!(s.yaml.contains(
        "auth: { type: api_key, in: header, name: \"X-API-Key\", value: \"{{ api_key }}\" }"
    ));
    // Credentials in the URL are basic auth, not part of base_url.
    let s = scaffold_of(
        "curl https://me:pw-SECRET@x.example/a",
        &[],
        json!({"a": 1}),
    );
    assert!(
        !s.yaml.contains("pw-SECRET") && s.yaml.contains("type: basic"),
        "{}",
        s.yaml
    );
}

#[test]
fn a_secret_elsewhere_is_refused_not_written() {
    let req = parse_curl("curl -H 'X-API-Key: k-SECRET' https://x.example/k-SECRET/items").unwrap();
    assert!(matches!(
        plan_request(&req).unwrap_err(),
        ScaffoldError::SecretElsewhere(_, "the URL")
    ));
    let req = parse_curl("curl ftp://x.example/").unwrap();
    assert!(matches!(
        plan_request(&req).unwrap_err(),
        ScaffoldError::Url(..)
    ));
}

#[test]
fn bodies_json_form_with_secret_fields() {
    let s = scaffold_of(
        "curl --json '{\"query\":\"x\",\"password\":\"p-SECRET\"}' https://x.example/search",
        &[],
        json!([{"id": 1}]),
    );
    assert!(!s.yaml.contains("p-SECRET"));
    assert!(s.yaml.contains("method: POST"));
    assert!(
        s.yaml
            .contains("json: {\"query\":\"x\",\"password\":\"{{ password }}\"}"),
        "{}",
        s.yaml
    );
    let s = scaffold_of(
        "curl -d 'q=rust&client_secret=c-SECRET' https://x.example/search",
        &[],
        json!([{"id": 1}]),
    );
    assert!(!s.yaml.contains("c-SECRET"));
    assert!(
        s.yaml.contains("client_secret: \"{{ client_secret }}\""),
        "{}",
        s.yaml
    );
}

#[test]
fn secret_names() {
    for n in [
        "X-API-Key",
        "Api-Key",
        "apikey",
        "access_token",
        "X-Auth-Token",
        "Private-Token",
        "client_secret",
        "key",
        "app_key",
        "appid",
    ] {
        assert!(is_secret_name(n), "{n}");
    }
    for n in [
        "Accept",
        "X-Tenant",
        "state",
        "sort_key",
        "code",
        "page",
        "per_page",
        "X-Request-Id",
    ] {
        assert!(!is_secret_name(n), "{n}");
    }
}
