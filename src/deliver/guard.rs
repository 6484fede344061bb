//! The SSRF guard of deliveries: endpoint names must not resolve to private,
//! link-local or otherwise non-public addresses (a cloud metadata service at
//! 169.254.169.254, an internal admin panel at 10.0.0.5) unless the endpoint
//! allows it. Loopback stays allowed: agents run next to pollhook.
//!
//! Checked twice, for a reason each: address literals at config load (a
//! clear error with file and line), and names at every connection, through
//! the client's resolver (a name can point anywhere, and can change). Both
//! ask the one pure function [`is_private`], so a literal refused at load is
//! refused when a name resolves to it, and the other way round.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// True for every address a delivery must not reach without
/// `allow_private`: anything that is not a public unicast address, except
/// loopback.
///
/// IPv4: `0.0.0.0/8` ("this network": `0.x` reaches the local host on
/// Linux), RFC 1918, carrier-grade NAT (`100.64/10`), link-local
/// (`169.254/16`), IETF protocol assignments (`192.0.0.0/24`), the
/// documentation nets, benchmarking (`198.18/15`), the 6to4 relay anycast,
/// multicast (`224/4`) and reserved (`240/4`, broadcast included).
///
/// IPv6: unspecified, unique-local (`fc00::/7`), link-local (`fe80::/10`),
/// site-local (`fec0::/10`, deprecated but still routed by some stacks),
/// multicast, discard (`100::/64`), documentation, the NAT64 local-use
/// prefix (`64:ff9b:1::/48`), and every form that embeds an IPv4 address
/// (IPv4-mapped, IPv4-compatible, SIIT, NAT64 `64:ff9b::/96`, 6to4
/// `2002::/16`, Teredo): those are judged by the IPv4 address they carry,
/// because that is where the packets end up (`[::ffff:10.0.0.1]` and
/// `[64:ff9b::a9fe:a9fe]` reach 10.0.0.1 and 169.254.169.254).
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_private_v4(v4),
        IpAddr::V6(v6) => is_private_v6(v6),
    }
}

fn is_private_v4(v4: Ipv4Addr) -> bool {
    let o = v4.octets();
    if v4.is_loopback() {
        return false;
    }
    o[0] == 0
        || v4.is_private()
        || v4.is_link_local()
        || (o[0] == 100 && (64..128).contains(&o[1]))
        || (o[0], o[1], o[2]) == (192, 0, 0)
        || (o[0], o[1], o[2]) == (192, 0, 2)
        || (o[0], o[1], o[2]) == (192, 88, 99)
        || (o[0] == 198 && (o[1] & 0xfe) == 18)
        || (o[0], o[1], o[2]) == (198, 51, 100)
        || (o[0], o[1], o[2]) == (203, 0, 113)
        || o[0] >= 224
}

fn is_private_v6(v6: Ipv6Addr) -> bool {
    if v6.is_loopback() {
        return false;
    }
    if v6.is_unspecified() {
        return true;
    }
    if let Some(v4) = embedded_v4(v6) {
        return is_private_v4(v4);
    }
    let seg = v6.segments();
    (seg[0] & 0xfe00) == 0xfc00 // unique-local fc00::/7
        || (seg[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (seg[0] & 0xffc0) == 0xfec0 // site-local fec0::/10
        || (seg[0] & 0xff00) == 0xff00 // multicast ff00::/8
        || seg[..4] == [0x100, 0, 0, 0] // discard 100::/64
        || seg[..2] == [0x2001, 0xdb8] // documentation 2001:db8::/32
        || seg[..3] == [0x64, 0xff9b, 1] // NAT64 local use 64:ff9b:1::/48
        || seg[0] == 0 // the rest of ::/16: reserved, never public unicast
}

/// The IPv4 address an IPv6 address carries, in the forms that route to it.
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let o = v6.octets();
    let last = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    match s {
        // IPv4-mapped ::ffff:a.b.c.d and IPv4-compatible ::a.b.c.d.
        [0, 0, 0, 0, 0, 0xffff, _, _] | [0, 0, 0, 0, 0, 0, _, _] => Some(last),
        // SIIT IPv4-translated ::ffff:0:a.b.c.d.
        [0, 0, 0, 0, 0xffff, 0, _, _] => Some(last),
        // NAT64 well-known prefix 64:ff9b::/96.
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(last),
        // 6to4 2002:a.b.c.d::/48.
        [0x2002, ..] => Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])),
        // Teredo 2001:0::/32: the client's address, obfuscated (inverted).
        [0x2001, 0, ..] => Some(Ipv4Addr::new(!o[12], !o[13], !o[14], !o[15])),
        _ => None,
    }
}

/// A resolver that drops private addresses (see [`is_private`]); a name
/// with nothing else left fails to resolve with a message saying why.
pub struct GuardedResolver;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = all
                .iter()
                .copied()
                .filter(|a| !is_private(a.ip()))
                .collect();
            if allowed.is_empty() && !all.is_empty() {
                return Err(format!(
                    "{host} resolves only to private, link-local or other non-public addresses; refused by the SSRF guard (set `allow_private: true` on the endpoint to allow it)"
                )
                .into());
            }
            let addrs: Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row: an address and whether the guard refuses it.
    const TABLE: &[(&str, bool)] = &[
        // IPv4 private and special-purpose ranges.
        ("10.0.0.5", true),
        ("172.16.3.4", true),
        ("192.168.1.1", true),
        ("169.254.169.254", true),
        ("100.64.0.1", true),
        ("0.0.0.0", true),
        ("0.1.2.3", true),
        ("192.0.0.8", true),
        ("192.0.2.1", true),
        ("198.18.0.1", true),
        ("198.19.255.254", true),
        ("198.51.100.7", true),
        ("203.0.113.9", true),
        ("224.0.0.1", true),
        ("239.255.255.250", true),
        ("240.0.0.1", true),
        ("255.255.255.255", true),
        // IPv6 ranges.
        ("::", true),
        ("fd00::1", true),
        ("fe80::1", true),
        ("fec0::1", true),
        ("ff02::1", true),
        ("100::1", true),
        ("2001:db8::1", true),
        ("64:ff9b:1::a00:1", true),
        // IPv4 embedded in IPv6: judged by the IPv4 address.
        ("::ffff:10.0.0.1", true),
        ("::ffff:169.254.169.254", true),
        ("::a00:1", true),
        ("::10.0.0.1", true),
        ("::ffff:0:10.0.0.1", true),
        ("64:ff9b::a00:1", true),
        ("64:ff9b::a9fe:a9fe", true),
        ("2002:a00:1::", true),
        ("2002:a9fe:a9fe::1", true),
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", true), // Teredo client 10.0.0.1
        // Allowed: loopback in every form, public unicast.
        ("127.0.0.1", false),
        ("127.5.5.5", false),
        ("::1", false),
        ("::ffff:127.0.0.1", false),
        ("8.8.8.8", false),
        ("100.128.0.1", false),
        ("198.20.0.1", false),
        ("192.0.1.1", false),
        ("223.255.255.255", false),
        ("2606:4700::1", false),
        ("::ffff:8.8.8.8", false),
        ("64:ff9b::808:808", false),
        ("2002:808:808::1", false),
    ];

    #[test]
    fn the_guard_refuses_every_non_public_range_in_every_form() {
        let wrong: Vec<String> = TABLE
            .iter()
            .filter(|(ip, refused)| is_private(ip.parse().unwrap()) != *refused)
            .map(|(ip, refused)| {
                format!(
                    "{ip} should be {}",
                    if *refused { "refused" } else { "allowed" }
                )
            })
            .collect();
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    #[tokio::test]
    async fn the_resolver_keeps_loopback() {
        let addrs: Vec<SocketAddr> = GuardedResolver
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }
}
